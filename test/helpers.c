/* Shared fixtures (see helpers.h). */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS */
#include "helpers.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static size_t guarded_span(size_t n, size_t *page)
{
    *page = (size_t)sysconf(_SC_PAGESIZE);
    return ((n * sizeof(float) + *page - 1) / *page + 1) * *page;
}

float *guarded_alloc(size_t n)
{
    size_t page;
    const size_t span = guarded_span(n, &page);
    unsigned char *base = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                               -1, 0);
    ck_assert_msg(base != MAP_FAILED, "mmap failed");
    ck_assert_int_eq(mprotect(base + span - page, page, PROT_NONE), 0);
    float *p = (float *)(base + span - page - n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        p[i] = NAN;
    return p;
}

void guarded_free(float *p, size_t n)
{
    if (!p)
        return;
    size_t page;
    const size_t span = guarded_span(n, &page);
    unsigned char *end = (unsigned char *)(p + n) + page;
    munmap(end - span, span);
}

static const int tbits[REF_NPROJ] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V,
                                     LORA_TARGET_O};

void fill_uniform(float *x, size_t n, uint64_t seed, float gain)
{
    uint64_t s = seed;
    for (size_t i = 0; i < n; i++)
        x[i] = gain * ref_uniform_f(&s);
}

void tfx_init(tfx *f, int cross, int causal)
{
    const ref_config c = {.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .rank = 2,
                          .targets = 15, .causal = causal, .out_proj = 1, .bias = 1};
    tfx_init_config(f, &c, cross);
}

void tfx_init_config(tfx *f, const ref_config *c, int cross)
{
    memset(f, 0, sizeof *f);
    ck_assert_int_eq(ref_layer_init(&f->l, c), 0);
    ref_layer_randomize(&f->l, 11, 1.5, 0.5);
    ck_assert_int_eq(ref_problem_init(&f->p, &f->l, cross, 2, 5, 7, 12), 0);
    ck_assert_int_eq(ref_make_adapter(&f->l, LORA_BACKEND_EXACT, 1, &f->ad), LORA_OK);
    const int64_t d = f->l.cfg.d_model;
    f->nxq = (size_t)(f->p.batch * f->p.len_q * d);
    f->nxkv = (size_t)(f->p.batch * f->p.len_kv * d);
    f->nout = (size_t)(f->p.batch * f->p.len_q * ref_out_cols(&f->l));
    f->xq = malloc(f->nxq * sizeof(float));
    f->xkv = cross ? malloc(f->nxkv * sizeof(float)) : f->xq;
    f->out = malloc(f->nout * sizeof(float));
    f->dout = malloc(f->nout * sizeof(float));
    f->dxq = malloc(f->nxq * sizeof(float));
    f->dxkv = malloc(f->nxkv * sizeof(float));
    ck_assert(f->xq && f->xkv && f->out && f->dout && f->dxq && f->dxkv);
    ref_to_float(f->p.xq, f->xq, f->nxq);
    ref_to_float(f->p.xkv, f->xkv, f->nxkv);
    ref_to_float(f->p.dout, f->dout, f->nout);
    for (int t = 0; t < REF_NPROJ; t++)
        if (ref_is_adapted(&f->l, t))
            f->ngrads += (size_t)(f->l.rank * (f->l.in[t] + f->l.out[t]));
}

void tfx_free(tfx *f)
{
    lora_adapter_destroy(f->ad);
    if (f->xkv != f->xq)
        free(f->xkv);
    free(f->xq);
    free(f->out);
    free(f->dout);
    free(f->dxq);
    free(f->dxkv);
    ref_problem_free(&f->p);
    ref_layer_free(&f->l);
    memset(f, 0, sizeof *f);
}

int tfx_step(tfx *f)
{
    int st;
    if (f->p.cross) {
        st = lora_forward_cross(f->ad, f->xq, f->xkv, f->p.batch, f->p.len_q, f->p.len_kv,
                                f->out);
        return st != LORA_OK ? st : lora_backward_cross(f->ad, f->dout, f->dxq, f->dxkv);
    }
    st = lora_forward(f->ad, f->xq, f->p.batch, f->p.len_q, f->out);
    return st != LORA_OK ? st : lora_backward(f->ad, f->dout, f->dxq);
}

void tfx_grads(const tfx *f, float *dst)
{
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_is_adapted(&f->l, t))
            continue;
        const size_t na = (size_t)(f->l.rank * f->l.in[t]);
        const size_t nb = (size_t)(f->l.out[t] * f->l.rank);
        ck_assert_int_eq(lora_adapter_get_grad(f->ad, tbits[t], LORA_A, dst, na), LORA_OK);
        dst += na;
        ck_assert_int_eq(lora_adapter_get_grad(f->ad, tbits[t], LORA_B, dst, nb), LORA_OK);
        dst += nb;
    }
}

void tfx_assert_works(tfx *f)
{
    ref_errors e;
    char msg[512], desc[512];
    ref_compare_adapter(f->ad, &f->l, &f->p, &e);
    ck_assert_msg(e.status == LORA_OK && e.max <= TOL_F32,
                  "adapter no longer matches the reference: %s [%s] (last error: %s)",
                  ref_errors_format(&e, msg, sizeof msg),
                  ref_describe(&f->l, &f->p, desc, sizeof desc),
                  lora_adapter_last_error(f->ad));
}

float *tfx_prime(tfx *f)
{
    ck_assert_int_eq(tfx_step(f), LORA_OK);
    float *snap = malloc(f->ngrads * sizeof(float));
    ck_assert_ptr_nonnull(snap);
    tfx_grads(f, snap);
    double m = 0.0;
    for (size_t i = 0; i < f->ngrads; i++)
        m = fabs(snap[i]) > m ? fabs(snap[i]) : m;
    ck_assert_msg(m > 0.0, "fixture gradients are all zero");
    return snap;
}

void tfx_assert_unchanged_and_works(tfx *f, float *snap, const char *what)
{
    float *now = malloc(f->ngrads * sizeof(float));
    ck_assert_ptr_nonnull(now);
    tfx_grads(f, now);
    ck_assert_msg(memcmp(now, snap, f->ngrads * sizeof(float)) == 0,
                  "gradients changed by the failed call: %s", what);
    free(now);
    free(snap);
    tfx_assert_works(f);
}

lora_config *cfg_new(int d_model)
{
    lora_config *cfg = NULL;
    ck_assert_int_eq(lora_config_create(&cfg), LORA_OK);
    ck_assert_ptr_nonnull(cfg);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_D_MODEL, d_model), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_THREADS, 1), LORA_OK);
    return cfg;
}

lora_adapter *adapter_new(const lora_config *cfg, uint64_t seed)
{
    lora_adapter *ad = NULL;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    ck_assert_ptr_nonnull(ad);
    int64_t d, h, kv, hd, op;
    ck_assert_int_eq(lora_adapter_get_config_int(ad, LORA_CFG_D_MODEL, &d), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_config_int(ad, LORA_CFG_N_HEADS, &h), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_config_int(ad, LORA_CFG_N_KV_HEADS, &kv), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_config_int(ad, LORA_CFG_HEAD_DIM, &hd), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_config_int(ad, LORA_CFG_OUT_PROJ, &op), LORA_OK);
    const int64_t outs[4] = {h * hd, kv * hd, kv * hd, d};
    const int64_t ins[4] = {d, d, d, h * hd};
    for (int t = 0; t < (op ? 4 : 3); t++) {
        const size_t n = (size_t)(outs[t] * ins[t]);
        float *w = malloc(n * sizeof(float));
        ck_assert_ptr_nonnull(w);
        fill_uniform(w, n, seed + (uint64_t)t, 1.0f / sqrtf((float)ins[t]));
        ck_assert_int_eq(lora_adapter_set_base(ad, tbits[t], w, NULL), LORA_OK);
        free(w);
    }
    return ad;
}

int lib_run(lora_adapter *ad, const ref_layer *l, const ref_problem *p, lib_result *r)
{
    return lib_run_ex(ad, l, p, NULL, r);
}

int lib_run_ex(lora_adapter *ad, const ref_layer *l, const ref_problem *p,
               const lora_attn_args *args, lib_result *r)
{
    memset(r, 0, sizeof *r);
    const int64_t d = l->cfg.d_model;
    r->nxq = (size_t)(p->batch * p->len_q * d);
    r->nxkv = p->cross ? (size_t)(p->batch * p->len_kv * d) : 0;
    r->nout = (size_t)(p->batch * p->len_q * ref_out_cols(l));
    for (int t = 0; t < REF_NPROJ; t++)
        if (ref_is_adapted(l, t))
            r->ngrads += (size_t)(l->rank * (l->in[t] + l->out[t]));
    float *xq = malloc(r->nxq * sizeof(float));
    float *xkv = p->cross ? malloc(r->nxkv * sizeof(float)) : xq;
    float *dout = malloc(r->nout * sizeof(float));
    r->out = malloc(r->nout * sizeof(float));
    r->dxq = malloc(r->nxq * sizeof(float));
    r->dxkv = p->cross ? malloc(r->nxkv * sizeof(float)) : NULL;
    r->grads = malloc((r->ngrads + 1) * sizeof(float));
    ck_assert(xq && xkv && dout && r->out && r->dxq && r->grads && (!p->cross || r->dxkv));
    ref_to_float(p->xq, xq, r->nxq);
    if (p->cross)
        ref_to_float(p->xkv, xkv, r->nxkv);
    ref_to_float(p->dout, dout, r->nout);
    for (size_t i = 0; i < r->nout; i++)
        r->out[i] = NAN;
    for (size_t i = 0; i < r->nxq; i++)
        r->dxq[i] = NAN;
    for (size_t i = 0; i < r->nxkv; i++)
        r->dxkv[i] = NAN;
    r->fwd_info.struct_size = r->info.struct_size = sizeof(lora_run_info);
#define LRUN(expr)                \
    do {                          \
        const int st_ = (expr);   \
        if (st_ != LORA_OK) {     \
            r->status = st_;      \
            r->call = #expr;      \
            goto done;            \
        }                         \
    } while (0)
    LRUN(lora_adapter_zero_grad(ad));
    if (args)
        LRUN(lora_forward_ex(ad, args, xq, p->cross ? xkv : NULL, p->batch, p->len_q,
                             p->len_kv, r->out));
    else if (p->cross)
        LRUN(lora_forward_cross(ad, xq, xkv, p->batch, p->len_q, p->len_kv, r->out));
    else
        LRUN(lora_forward(ad, xq, p->batch, p->len_q, r->out));
    LRUN(lora_adapter_get_run_info(ad, &r->fwd_info));
    if (args)
        LRUN(lora_backward_ex(ad, NULL, dout, r->dxq, p->cross ? r->dxkv : NULL));
    else if (p->cross)
        LRUN(lora_backward_cross(ad, dout, r->dxq, r->dxkv));
    else
        LRUN(lora_backward(ad, dout, r->dxq));
    LRUN(lora_adapter_get_run_info(ad, &r->info));
    float *g = r->grads;
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_is_adapted(l, t))
            continue;
        const size_t na = (size_t)(l->rank * l->in[t]), nb = (size_t)(l->out[t] * l->rank);
        LRUN(lora_adapter_get_grad(ad, tbits[t], LORA_A, g, na));
        g += na;
        LRUN(lora_adapter_get_grad(ad, tbits[t], LORA_B, g, nb));
        g += nb;
    }
#undef LRUN
done:
    if (xkv != xq)
        free(xkv);
    free(xq);
    free(dout);
    return r->status;
}

void lib_result_free(lib_result *r)
{
    free(r->out);
    free(r->dxq);
    free(r->dxkv);
    free(r->grads);
    memset(r, 0, sizeof *r);
}

int lib_result_same(const lib_result *a, const lib_result *b)
{
    return a->nout == b->nout && a->nxq == b->nxq && a->nxkv == b->nxkv &&
           a->ngrads == b->ngrads &&
           memcmp(a->out, b->out, a->nout * sizeof(float)) == 0 &&
           memcmp(a->dxq, b->dxq, a->nxq * sizeof(float)) == 0 &&
           (a->nxkv == 0 || memcmp(a->dxkv, b->dxkv, a->nxkv * sizeof(float)) == 0) &&
           memcmp(a->grads, b->grads, a->ngrads * sizeof(float)) == 0;
}

double problem_score_bound(const ref_layer *l, const ref_problem *p, double *vmax)
{
    const size_t nq = (size_t)(p->batch * p->len_q), nk = (size_t)(p->batch * p->len_kv);
    double *q = malloc(nq * (size_t)l->q_dim * sizeof(double));
    double *k = malloc(nk * (size_t)l->kv_dim * sizeof(double));
    double *v = malloc(nk * (size_t)l->kv_dim * sizeof(double));
    ck_assert(q && k && v);
    ck_assert_int_eq(ref_activations(l, p->xq, p->xkv, p->batch, p->len_q, p->len_kv, q, k, v,
                                     NULL),
                     0);
    const double r = ref_score_bound(l, q, k, p->batch, p->len_q, p->len_kv);
    if (vmax)
        *vmax = ref_max_abs(v, nk * (size_t)l->kv_dim);
    free(q);
    free(k);
    free(v);
    return r;
}

double problem_set_score_bound(ref_layer *l, const ref_problem *p, double r)
{
    const double r0 = problem_score_bound(l, p, NULL);
    if (r0 == 0.0) /* e.g. one key: centring makes every score row constant */
        return 0.0;
    const double beta = (double)(float)(l->softmax_scale * r / r0);
    l->softmax_scale = beta;
    l->cfg.softmax_scale = beta;
    return problem_score_bound(l, p, NULL);
}

/* ---- the library's dropout masks, from their definition (docs/math.md#dropout) ---- */

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

void lib_keep_mask(uint64_t seed, uint64_t count, int t, int64_t rows, int64_t in, double p,
                   uint8_t *keep)
{
    const uint64_t golden = UINT64_C(0x9E3779B97F4A7C15);
    const uint64_t key = mix(mix(mix(seed + golden) ^ count) ^ (uint64_t)t);
    const uint64_t threshold = (uint64_t)ceil(p * 4294967296.0);
    for (int64_t r = 0; r < rows; r++) {
        const uint64_t rk = mix(key ^ (uint64_t)r);
        for (int64_t c = 0; c < in; c++)
            keep[r * in + c] = (mix(rk + (uint64_t)(c + 1) * golden) >> 32) >= threshold;
    }
}
