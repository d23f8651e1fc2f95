/* alloc_suite: the allocator hooks (lora_config_create_with_allocator) and allocation
 * failure. A counting allocator fails the k-th allocation, for every k, of a full
 * cycle: config create, adapter create, set_base, set_param, forward, backward,
 * threshold estimate, cross forward/backward, buffer growth, an optimizer step, merged
 * forward, borrowed base, hot swap (copy_params), PEFT and GGUF save and load, destroy.
 * Each injected
 * failure must return LORA_ERR_NOMEM, keep no block it allocated (live blocks do not
 * grow; a failed forward may release its dead activations), leave a message on a
 * live handle, and leave the handle usable: the
 * retried call succeeds and the whole cycle's results are bitwise those of an
 * unfailed cycle. After destroy nothing is live. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "suites.h"

/* ---- the test allocator -------------------------------------------------------------- */

typedef struct talloc {
    long calls;    /* alloc calls so far */
    long fail_at;  /* fail the call with this number (1-based); 0 = never */
    long injected; /* failures injected */
    long live;     /* blocks allocated and not yet freed */
    long frees;
    size_t live_bytes;
} talloc;

/* Blocks carry their size in a 16-byte header and are handed out at an odd address, so
 * the library must align by itself (lora.h: "It need not align"). */
static void *t_alloc(void *user, size_t size)
{
    talloc *t = user;
    t->calls++;
    if (t->fail_at > 0 && t->calls == t->fail_at) {
        t->injected++;
        return NULL;
    }
    if (size > ((size_t)1 << 34))
        return NULL; /* larger than any test needs: a size bug, not a real request */
    unsigned char *raw = malloc(size + 17);
    if (!raw)
        return NULL;
    memcpy(raw, &size, sizeof size);
    t->live++;
    t->live_bytes += size;
    return raw + 17;
}

static void t_free(void *user, void *ptr)
{
    talloc *t = user;
    ck_assert_msg(ptr != NULL, "free hook called with NULL");
    unsigned char *raw = (unsigned char *)ptr - 17;
    size_t size;
    memcpy(&size, raw, sizeof size);
    ck_assert_msg(t->live > 0, "free of a block the hook never returned");
    t->live--;
    t->frees++;
    t->live_bytes -= size;
    free(raw);
}

/* ---- one cycle ------------------------------------------------------------------------- */

static const int tbits[REF_NPROJ] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V,
                                     LORA_TARGET_O};

typedef struct cycle_case {
    const char *name;
    int backend;       /* LORA_CFG_BACKEND */
    int measure_rows;  /* LORA_CFG_MEASURE_ROWS */
    int causal;
} cycle_case;

static const cycle_case cycle_cases[] = {
    {"exact, causal", LORA_BACKEND_EXACT, 0, 1},
    {"auto", LORA_BACKEND_AUTO, 0, 0},
    {"poly with measured rows", LORA_BACKEND_POLY, 2, 0},
};

/* Everything a cycle computes, compared bitwise between cycles. */
typedef struct cycle_out {
    float *out1, *dx1, *out2, *dxq2, *dxkv2, *out3, *grads;
    float *merged, *stepped, *loaded_peft, *loaded_gguf; /* merged: out1-sized; others:
                                                           every factor (nparams) */
    size_t nparams;
    size_t nout1, nx1, nout2, nxq2, nxkv2, nout3, ngrads;
    lora_threshold_report report;
    lora_run_info info;
} cycle_out;

static float *falloc(size_t n)
{
    float *p = calloc(n ? n : 1, sizeof(float));
    ck_assert_ptr_nonnull(p);
    return p;
}

static void cycle_out_init(cycle_out *o, const ref_layer *l, const ref_problem *self,
                           const ref_problem *cross, const ref_problem *big)
{
    memset(o, 0, sizeof *o);
    const size_t d = (size_t)l->cfg.d_model, oc = (size_t)ref_out_cols(l);
    o->nout1 = (size_t)(self->batch * self->len_q) * oc;
    o->nx1 = (size_t)(self->batch * self->len_q) * d;
    o->nout2 = (size_t)(cross->batch * cross->len_q) * oc;
    o->nxq2 = (size_t)(cross->batch * cross->len_q) * d;
    o->nxkv2 = (size_t)(cross->batch * cross->len_kv) * d;
    o->nout3 = (size_t)(big->batch * big->len_q) * oc;
    for (int t = 0; t < REF_NPROJ; t++)
        if (ref_is_adapted(l, t))
            o->ngrads += (size_t)(l->rank * (l->in[t] + l->out[t]));
    o->out1 = falloc(o->nout1);
    o->dx1 = falloc(o->nx1);
    o->out2 = falloc(o->nout2);
    o->dxq2 = falloc(o->nxq2);
    o->dxkv2 = falloc(o->nxkv2);
    o->out3 = falloc(o->nout3);
    o->grads = falloc(o->ngrads);
    o->nparams = o->ngrads; /* as many factors as gradients */
    o->merged = falloc(o->nout1);
    o->stepped = falloc(o->nparams);
    o->loaded_peft = falloc(o->nparams);
    o->loaded_gguf = falloc(o->nparams);
}

static void cycle_out_free(cycle_out *o)
{
    free(o->out1);
    free(o->dx1);
    free(o->out2);
    free(o->dxq2);
    free(o->dxkv2);
    free(o->out3);
    free(o->grads);
    free(o->merged);
    free(o->stepped);
    free(o->loaded_peft);
    free(o->loaded_gguf);
}

typedef struct cycle_ctx {
    talloc t;
    lora_config *cfg;
    lora_adapter *ad;
    int nomem;      /* NOMEM statuses seen (and retried) */
    const char *dir; /* where save/load write */
    const char *where; /* call that failed */
} cycle_ctx;

/* Runs a call; on LORA_ERR_NOMEM checks that it kept no block it allocated and left a
 * message on the handle (if any), then retries it once (the allocator only fails one
 * call). The retry, or the first attempt, must succeed. */
#define STEP(c, handle_err, call)                                                          \
    do {                                                                                   \
        const long live0_ = (c)->t.live;                                                   \
        int st_ = (call);                                                                  \
        if (st_ == LORA_ERR_NOMEM) {                                                       \
            (c)->nomem++;                                                                  \
            (c)->where = #call;                                                            \
            ck_assert_msg((c)->t.live <= live0_,                                           \
                          "%s failed with NOMEM but kept new blocks: live %ld -> %ld "      \
                          "(fail_at %ld)",                                                 \
                          #call, live0_, (c)->t.live, (c)->t.fail_at);                     \
            const char *m_ = (handle_err);                                                 \
            ck_assert_msg(m_ && m_[0], "%s: NOMEM without a message", #call);              \
            st_ = (call);                                                                  \
        }                                                                                  \
        ck_assert_msg(st_ == LORA_OK, "%s: status %d (%s), fail_at %ld: %s", #call, st_,   \
                      lora_status_string(st_), (c)->t.fail_at,                             \
                      (c)->ad ? lora_adapter_last_error((c)->ad) : "");                    \
    } while (0)

/* As STEP, for a call that may keep what it built before the failure as a cache owned
 * by the handle (lora_forward_merged keeps the merged weights of the projections it
 * merged): live blocks may grow; the destroy at the end of the cycle must still free
 * everything, and results must not change. */
#define STEP_CACHE(c, handle_err, call)                                                    \
    do {                                                                                   \
        int st_ = (call);                                                                  \
        if (st_ == LORA_ERR_NOMEM) {                                                       \
            (c)->nomem++;                                                                  \
            const char *m_ = (handle_err);                                                 \
            ck_assert_msg(m_ && m_[0], "%s: NOMEM without a message", #call);              \
            st_ = (call);                                                                  \
        }                                                                                  \
        ck_assert_msg(st_ == LORA_OK, "%s: status %d (%s), fail_at %ld", #call, st_,       \
                      lora_status_string(st_), (c)->t.fail_at);                            \
    } while (0)

/* Create calls: on NOMEM the output handle must be NULL. */
#define STEP_CREATE(c, outp, call)                                                         \
    do {                                                                                   \
        const long live0_ = (c)->t.live;                                                   \
        int st_ = (call);                                                                  \
        if (st_ == LORA_ERR_NOMEM) {                                                       \
            (c)->nomem++;                                                                  \
            ck_assert_msg((c)->t.live == live0_, "%s leaked on NOMEM (fail_at %ld)", #call, \
                          (c)->t.fail_at);                                                 \
            ck_assert_msg((outp) == NULL, "%s: handle not NULL after NOMEM", #call);       \
            st_ = (call);                                                                  \
        }                                                                                  \
        ck_assert_msg(st_ == LORA_OK, "%s: status %d (fail_at %ld)", #call, st_,           \
                      (c)->t.fail_at);                                                     \
    } while (0)

static const char *no_msg(void) { return "(no handle)"; }

static void set_bases(cycle_ctx *c, const ref_layer *l, int with_bias)
{
    float w[256], b[32];
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_has_proj(l, t))
            continue;
        const size_t nw = (size_t)(l->out[t] * l->in[t]);
        ck_assert(nw <= 256 && l->out[t] <= 32);
        ref_to_float(l->w[t], w, nw);
        ref_to_float(l->bias[t], b, (size_t)l->out[t]);
        STEP(c, lora_adapter_last_error(c->ad),
             lora_adapter_set_base(c->ad, tbits[t], w, with_bias ? b : NULL));
    }
}

/* The full cycle with allocation number fail_at failing (0: none). Fills o. */
static void run_cycle(const cycle_case *cc, const ref_layer *l, const ref_problem *self,
                      const ref_problem *cross, const ref_problem *big, long fail_at,
                      cycle_out *o, cycle_ctx *c, const char *dir)
{
    memset(c, 0, sizeof *c);
    c->t.fail_at = fail_at;
    c->dir = dir;
    const lora_allocator a = {t_alloc, t_free, &c->t};
    float buf[256];

    STEP_CREATE(c, c->cfg, lora_config_create_with_allocator(&c->cfg, &a));
    const ref_config *rc = &l->cfg;
    ck_assert_int_eq(lora_config_set_int(c->cfg, LORA_CFG_D_MODEL, rc->d_model), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(c->cfg, LORA_CFG_N_HEADS, rc->n_heads), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(c->cfg, LORA_CFG_N_KV_HEADS, rc->n_kv_heads), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(c->cfg, LORA_CFG_RANK, rc->rank), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(c->cfg, LORA_CFG_TARGETS, rc->targets), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(c->cfg, LORA_CFG_OUT_PROJ, rc->out_proj), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(c->cfg, LORA_CFG_CAUSAL, rc->causal), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(c->cfg, LORA_CFG_THREADS, 1), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(c->cfg, LORA_CFG_BACKEND, cc->backend), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(c->cfg, LORA_CFG_MEASURE_ROWS, cc->measure_rows),
                     LORA_OK);
    if (cc->backend == LORA_BACKEND_POLY)
        ck_assert_int_eq(lora_config_set_int(c->cfg, LORA_CFG_POLY_DEGREE, 4), LORA_OK);
    ck_assert_int_eq(lora_config_validate(c->cfg), LORA_OK);

    STEP_CREATE(c, c->ad, lora_adapter_create(&c->ad, c->cfg));
    lora_config_destroy(c->cfg); /* the adapter keeps its copy and the allocator */
    c->cfg = NULL;

    /* Bases without biases, then again with (bias blocks allocated on the way). */
    set_bases(c, l, 0);
    set_bases(c, l, 1);
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_is_adapted(l, t))
            continue;
        const size_t na = (size_t)(l->rank * l->in[t]), nb = (size_t)(l->out[t] * l->rank);
        ref_to_float(l->a[t], buf, na);
        STEP(c, lora_adapter_last_error(c->ad),
             lora_adapter_set_param(c->ad, tbits[t], LORA_A, buf, na));
        ref_to_float(l->b[t], buf, nb);
        STEP(c, lora_adapter_last_error(c->ad),
             lora_adapter_set_param(c->ad, tbits[t], LORA_B, buf, nb));
    }

    /* Self-attention. */
    float *x = falloc(o->nx1), *dout = falloc(o->nout1);
    ref_to_float(self->xq, x, o->nx1);
    ref_to_float(self->dout, dout, o->nout1);
    STEP(c, lora_adapter_last_error(c->ad),
         lora_forward(c->ad, x, self->batch, self->len_q, o->out1));
    STEP(c, lora_adapter_last_error(c->ad), lora_backward(c->ad, dout, o->dx1));
    memset(&o->report, 0, sizeof o->report);
    o->report.struct_size = sizeof o->report;
    STEP(c, lora_adapter_last_error(c->ad),
         lora_threshold_estimate(c->ad, x, self->batch, self->len_q, &o->report));
    free(x);
    free(dout);

    /* Cross-attention. */
    float *xq = falloc(o->nxq2), *xkv = falloc(o->nxkv2);
    dout = falloc(o->nout2);
    ref_to_float(cross->xq, xq, o->nxq2);
    ref_to_float(cross->xkv, xkv, o->nxkv2);
    ref_to_float(cross->dout, dout, o->nout2);
    STEP(c, lora_adapter_last_error(c->ad),
         lora_forward_cross(c->ad, xq, xkv, cross->batch, cross->len_q, cross->len_kv,
                            o->out2));
    STEP(c, lora_adapter_last_error(c->ad),
         lora_backward_cross(c->ad, dout, o->dxq2, o->dxkv2));
    free(xq);
    free(xkv);
    free(dout);

    /* A larger input: every buffer grows. */
    const size_t nx3 = (size_t)(big->batch * big->len_q * l->cfg.d_model);
    x = falloc(nx3);
    dout = falloc(o->nout3);
    ref_to_float(big->xq, x, nx3);
    ref_to_float(big->dout, dout, o->nout3);
    STEP(c, lora_adapter_last_error(c->ad),
         lora_threshold_estimate(c->ad, x, big->batch, big->len_q, &o->report));
    STEP(c, lora_adapter_last_error(c->ad),
         lora_forward(c->ad, x, big->batch, big->len_q, o->out3));
    STEP(c, lora_adapter_last_error(c->ad), lora_backward(c->ad, dout, NULL));
    free(x);
    free(dout);

    /* Optimizer: create (NOMEM leaves *out NULL and a message on the adapter), step. */
    {
        lora_optimizer *opt = NULL;
        STEP_CREATE(c, opt, lora_optimizer_create(&opt, c->ad, LORA_OPTIMIZER_ADAMW));
        STEP(c, lora_optimizer_last_error(opt), lora_optimizer_step(opt, c->ad));
        lora_optimizer_destroy(opt);
        ck_assert_int_eq(lora_adapter_get_params_flat(c->ad, o->stepped, o->nparams), LORA_OK);
    }
    /* Merged forward: merged weights and the inference buffer are allocated. */
    x = falloc(o->nx1);
    ref_to_float(self->xq, x, o->nx1);
    STEP_CACHE(c, lora_adapter_last_error(c->ad),
               lora_forward_merged(c->ad, x, self->batch, self->len_q, o->merged));
    free(x);
    /* Save and load, PEFT and GGUF, through a config on the same allocator. */
    for (int gguf = 0; gguf < 2; gguf++) {
        char path[256];
        snprintf(path, sizeof path, "%s/%s", c->dir, gguf ? "a.gguf" : "peft");
        lora_adapter *const set[1] = {c->ad};
        const int64_t layer0[1] = {5};
        STEP(c, lora_adapter_last_error(c->ad),
             gguf ? lora_save_gguf(path, set, layer0, 1, NULL) : lora_save_peft(path, set, layer0, 1));
        lora_config *lc = NULL;
        const lora_allocator la = {t_alloc, t_free, &c->t};
        STEP_CREATE(c, lc, lora_config_create_with_allocator(&lc, &la));
        ck_assert_int_eq(lora_config_set_int(lc, LORA_CFG_D_MODEL, rc->d_model), LORA_OK);
        ck_assert_int_eq(lora_config_set_int(lc, LORA_CFG_N_HEADS, rc->n_heads), LORA_OK);
        ck_assert_int_eq(lora_config_set_int(lc, LORA_CFG_N_KV_HEADS, rc->n_kv_heads), LORA_OK);
        ck_assert_int_eq(lora_config_set_int(lc, LORA_CFG_OUT_PROJ, rc->out_proj), LORA_OK);
        ck_assert_int_eq(lora_config_set_int(lc, LORA_CFG_CAUSAL, rc->causal), LORA_OK);
        ck_assert_int_eq(lora_config_set_int(lc, LORA_CFG_THREADS, 1), LORA_OK);
        lora_adapter *loaded[2] = {NULL, NULL};
        int64_t layers[2];
        size_t count = 0;
        const long live0 = c->t.live;
        int st = gguf ? lora_load_gguf(loaded, layers, 2, &count, path, lc)
                      : lora_load_peft(loaded, layers, 2, &count, path, lc);
        if (st == LORA_ERR_NOMEM) {
            c->nomem++;
            ck_assert_msg(c->t.live == live0 && !loaded[0] && !loaded[1],
                          "load (gguf %d) failed with NOMEM but kept blocks or adapters "
                          "(fail_at %ld)", gguf, c->t.fail_at);
            ck_assert(lora_config_last_error(lc)[0] != '\0');
            st = gguf ? lora_load_gguf(loaded, layers, 2, &count, path, lc)
                      : lora_load_peft(loaded, layers, 2, &count, path, lc);
        }
        ck_assert_msg(st == LORA_OK, "load (gguf %d): %d: %s", gguf, st,
                      lora_config_last_error(lc));
        ck_assert(count == 1 && layers[0] == 5 && loaded[0] && !loaded[1]);
        ck_assert_int_eq(lora_adapter_get_params_flat(loaded[0], gguf ? o->loaded_gguf
                                                                      : o->loaded_peft,
                                                      o->nparams),
                         LORA_OK);
        /* Hot swap the loaded factors back into the working adapter. */
        STEP(c, lora_adapter_last_error(c->ad), lora_adapter_copy_params(c->ad, loaded[0]));
        lora_adapter_destroy(loaded[0]);
        lora_config_destroy(lc);
    }
    /* A borrowed base (no copy, nothing allocated), then an owned one again. */
    {
        float *wk = falloc((size_t)(l->out[REF_K] * l->in[REF_K]));
        ref_to_float(l->w[REF_K], wk, (size_t)(l->out[REF_K] * l->in[REF_K]));
        STEP(c, lora_adapter_last_error(c->ad),
             lora_adapter_set_base_borrowed(c->ad, LORA_TARGET_K, wk, NULL));
        x = falloc(o->nx1);
        float *tmp = falloc(o->nout1);
        ref_to_float(self->xq, x, o->nx1);
        STEP(c, lora_adapter_last_error(c->ad), lora_forward(c->ad, x, self->batch, self->len_q, tmp));
        STEP(c, lora_adapter_last_error(c->ad),
             lora_adapter_set_base(c->ad, LORA_TARGET_K, wk, NULL));
        free(x);
        free(tmp);
        free(wk);
    }

    /* Replacing a base drops its bias block and the saved forward. */
    ref_to_float(l->w[REF_Q], buf, (size_t)(l->out[REF_Q] * l->in[REF_Q]));
    STEP(c, lora_adapter_last_error(c->ad), lora_adapter_set_base(c->ad, LORA_TARGET_Q, buf, NULL));
    ck_assert_int_eq(lora_backward(c->ad, o->out3, NULL), LORA_ERR_STATE);

    float *g = o->grads;
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_is_adapted(l, t))
            continue;
        const size_t na = (size_t)(l->rank * l->in[t]), nb = (size_t)(l->out[t] * l->rank);
        ck_assert_int_eq(lora_adapter_get_grad(c->ad, tbits[t], LORA_A, g, na), LORA_OK);
        g += na;
        ck_assert_int_eq(lora_adapter_get_grad(c->ad, tbits[t], LORA_B, g, nb), LORA_OK);
        g += nb;
    }
    memset(&o->info, 0, sizeof o->info);
    o->info.struct_size = sizeof o->info;
    ck_assert_int_eq(lora_adapter_get_run_info(c->ad, &o->info), LORA_OK);

    lora_adapter_destroy(c->ad);
    c->ad = NULL;
    ck_assert_msg(c->t.live == 0 && c->t.live_bytes == 0,
                  "%ld blocks (%zu bytes) still live after destroy (fail_at %ld)", c->t.live,
                  c->t.live_bytes, fail_at);
    (void)no_msg;
}

static int same(const float *a, const float *b, size_t n)
{
    return memcmp(a, b, n * sizeof(float)) == 0;
}

static void assert_same_results(const cycle_out *a, const cycle_out *b, long k)
{
    ck_assert_msg(same(a->out1, b->out1, a->nout1), "fail_at %ld: forward out differs", k);
    ck_assert_msg(same(a->dx1, b->dx1, a->nx1), "fail_at %ld: dx differs", k);
    ck_assert_msg(same(a->out2, b->out2, a->nout2), "fail_at %ld: cross out differs", k);
    ck_assert_msg(same(a->dxq2, b->dxq2, a->nxq2), "fail_at %ld: dxq differs", k);
    ck_assert_msg(same(a->dxkv2, b->dxkv2, a->nxkv2), "fail_at %ld: dxkv differs", k);
    ck_assert_msg(same(a->out3, b->out3, a->nout3), "fail_at %ld: grown out differs", k);
    ck_assert_msg(same(a->grads, b->grads, a->ngrads), "fail_at %ld: gradients differ", k);
    ck_assert_msg(memcmp(&a->report, &b->report, sizeof a->report) == 0,
                  "fail_at %ld: threshold report differs", k);
    ck_assert_msg(memcmp(&a->info, &b->info, sizeof a->info) == 0,
                  "fail_at %ld: run info differs", k);
    ck_assert_msg(same(a->merged, b->merged, a->nout1), "fail_at %ld: merged out differs", k);
    ck_assert_msg(same(a->stepped, b->stepped, a->nparams), "fail_at %ld: optimizer step differs", k);
    ck_assert_msg(same(a->loaded_peft, b->loaded_peft, a->nparams), "fail_at %ld: PEFT load differs", k);
    ck_assert_msg(same(a->loaded_gguf, b->loaded_gguf, a->nparams), "fail_at %ld: GGUF load differs", k);
}

/* Every k from 1 to the number of allocations of an unfailed cycle. _i: cycle_cases. */
START_TEST(test_fail_kth_allocation)
{
    const cycle_case *cc = &cycle_cases[_i];
    ref_layer l;
    ref_problem self, cross, big;
    const ref_config rc = {.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .rank = 2,
                           .targets = 15, .causal = cc->causal, .out_proj = 1, .bias = 1};
    ck_assert_int_eq(ref_layer_init(&l, &rc), 0);
    ref_layer_randomize(&l, 21, 1.0, 0.5);
    ck_assert_int_eq(ref_problem_init(&self, &l, 0, 2, 5, 5, 31), 0);
    ck_assert_int_eq(ref_problem_init(&cross, &l, 1, 2, 3, 6, 32), 0);
    ck_assert_int_eq(ref_problem_init(&big, &l, 0, 3, 9, 9, 33), 0);

    cycle_out clean, run;
    cycle_ctx c;
    char dir[64] = "/tmp/lora_alloc_XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    cycle_out_init(&clean, &l, &self, &cross, &big);
    run_cycle(cc, &l, &self, &cross, &big, 0, &clean, &c, dir);
    const long total = c.t.calls;
    ck_assert_msg(total >= 8, "%s: only %ld allocations in a full cycle", cc->name, total);
    ck_assert_int_eq(c.nomem, 0);

    long injected = 0;
    for (long k = 1; k <= total; k++) {
        cycle_out_init(&run, &l, &self, &cross, &big);
        run_cycle(cc, &l, &self, &cross, &big, k, &run, &c, dir);
        ck_assert_msg(c.t.injected == 1 && c.nomem == 1,
                      "%s: allocation %ld failed %ld times, %d NOMEM statuses seen", cc->name,
                      k, c.t.injected, c.nomem);
        assert_same_results(&clean, &run, k);
        injected += c.t.injected;
        cycle_out_free(&run);
    }
    ck_assert_int_eq(injected, total);
    cycle_out_free(&clean);
    char path[128];
    snprintf(path, sizeof path, "%s/peft/adapter_config.json", dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/peft/adapter_model.safetensors", dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/peft", dir);
    rmdir(path);
    snprintf(path, sizeof path, "%s/a.gguf", dir);
    unlink(path);
    rmdir(dir);
    ref_problem_free(&self);
    ref_problem_free(&cross);
    ref_problem_free(&big);
    ref_layer_free(&l);
}
END_TEST

/* The hooks see every byte: an adapter's whole footprint is on the counting allocator,
 * the default allocator works alongside, and NULL hooks mean the default. */
START_TEST(test_allocator_basics)
{
    talloc t = {0};
    const lora_allocator a = {t_alloc, t_free, &t};
    lora_config *cfg = NULL;
    ck_assert_int_eq(lora_config_create_with_allocator(&cfg, &a), LORA_OK);
    ck_assert_int_eq(t.live, 1);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_D_MODEL, 16), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_THREADS, 1), LORA_OK);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    ck_assert_int_gt(t.live, 1);
    lora_config_destroy(cfg);
    const long after_create = t.live;
    ck_assert_int_gt(after_create, 0);
    lora_adapter_destroy(ad);
    ck_assert_int_eq(t.live, 0);
    ck_assert_int_eq(t.live_bytes, 0);

    /* NULL allocator, or both hooks NULL: the default (nothing reaches t). */
    const long calls = t.calls;
    const lora_allocator none = {NULL, NULL, &t};
    ck_assert_int_eq(lora_config_create_with_allocator(&cfg, NULL), LORA_OK);
    lora_config_destroy(cfg);
    ck_assert_int_eq(lora_config_create_with_allocator(&cfg, &none), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_D_MODEL, 16), LORA_OK);
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    lora_adapter_destroy(ad);
    lora_config_destroy(cfg);
    ck_assert_int_eq(t.calls, calls);

    /* Allocation failure of the config itself. */
    t.fail_at = t.calls + 1;
    cfg = (lora_config *)(uintptr_t)1;
    ck_assert_int_eq(lora_config_create_with_allocator(&cfg, &a), LORA_ERR_NOMEM);
    ck_assert_ptr_null(cfg);
    ck_assert_int_eq(t.live, 0);
}
END_TEST

/* A huge but valid layer: adapter creation asks for more than the allocator gives and
 * reports NOMEM cleanly (the size never wraps). */
START_TEST(test_huge_layer_nomem)
{
    talloc t = {0};
    const lora_allocator a = {t_alloc, t_free, &t};
    lora_config *cfg = NULL;
    ck_assert_int_eq(lora_config_create_with_allocator(&cfg, &a), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_D_MODEL, INT64_C(1) << 20), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RANK, INT64_C(1) << 19), LORA_OK);
    lora_adapter *ad = (lora_adapter *)(uintptr_t)1;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_ERR_NOMEM);
    ck_assert_ptr_null(ad);
    ck_assert_int_eq(t.live, 1); /* the config only */
    lora_config_destroy(cfg);
    ck_assert_int_eq(t.live, 0);
}
END_TEST

Suite *alloc_suite(void)
{
    Suite *s = suite_create("alloc");
    TCase *tc = tcase_create("alloc");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_allocator_basics);
    tcase_add_test(tc, test_huge_layer_nomem);
    tcase_add_loop_test(tc, test_fail_kth_allocation, 0,
                        (int)(sizeof cycle_cases / sizeof cycle_cases[0]));
    suite_add_tcase(s, tc);
    return s;
}
