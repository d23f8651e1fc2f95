/* attention_suite: the 0.2 attention of the exact backend (RoPE, WINDOW, SOFTCAP, LoRA
 * dropout, per-call lengths, positions and segments) against the double reference's
 * ref_forward_ex / ref_backward_ex, equalities that must hold bitwise, dropout's
 * statistics and finite differences, and the parameters' checks. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "suites.h"

/* ---- one library run against the reference ---------------------------------------- */

/* Per-call arguments of a test (NULL = default), for the library and the reference. */
typedef struct call_args {
    const int64_t *q_lens, *kv_lens, *q_pos, *kv_pos;
    const int32_t *q_seg, *kv_seg;
} call_args;

static int has_args(const call_args *a)
{
    return a && (a->q_lens || a->kv_lens || a->q_pos || a->kv_pos || a->q_seg || a->kv_seg);
}

/* The library's forward + backward of p with args a (zero_grad first): lib_run, or
 * when a has a field set lib_run (training forward 0) and then lib_run_ex with them
 * (training forward 1). */
static int lib_call(lora_adapter *ad, const ref_layer *l, const ref_problem *p,
                    const call_args *a, lib_result *r)
{
    if (!has_args(a))
        return lib_run(ad, l, p, r);
    const int st0 = lib_run(ad, l, p, r); /* training forward 0 */
    if (st0 != LORA_OK)
        return st0;
    lib_result_free(r);
    lora_attn_args la = {.struct_size = sizeof la};
    la.q_lens = a->q_lens;
    la.kv_lens = a->kv_lens;
    la.q_pos = a->q_pos;
    la.kv_pos = a->kv_pos;
    la.q_seg = a->q_seg;
    la.kv_seg = a->kv_seg;
    return lib_run_ex(ad, l, p, &la, r);
}

/* The reference's out, dx and gradients of p with args a and the keep masks of the
 * library's forward number count (seed: the adapter's LORA_CFG_SEED), in lib_result's
 * layout (doubles). */
typedef struct ref_result {
    double *out, *dxq, *dxkv, *grads;
} ref_result;

static void ref_run(const ref_layer *l, const ref_problem *p, const call_args *a,
                    uint64_t seed, uint64_t count, const lib_result *shape, ref_result *rr)
{
    ref_attn_args ra;
    memset(&ra, 0, sizeof ra);
    if (a) {
        ra.q_lens = a->q_lens;
        ra.kv_lens = a->kv_lens;
        ra.q_pos = a->q_pos;
        ra.kv_pos = a->kv_pos;
        ra.q_seg = a->q_seg;
        ra.kv_seg = a->kv_seg;
    }
    uint8_t *keep[REF_NPROJ] = {0};
    if (l->cfg.dropout > 0.0)
        for (int t = 0; t < REF_NPROJ; t++) {
            if (!ref_is_adapted(l, t))
                continue;
            const int64_t rows = p->batch * (t == REF_K || t == REF_V ? p->len_kv : p->len_q);
            keep[t] = malloc((size_t)(rows * l->in[t]));
            ck_assert_ptr_nonnull(keep[t]);
            lib_keep_mask(seed, count, t, rows, l->in[t], l->cfg.dropout, keep[t]);
            ra.keep[t] = keep[t];
        }
    const double *xkv = p->cross ? p->xkv : NULL;
    rr->out = malloc(shape->nout * sizeof(double));
    rr->grads = malloc((shape->ngrads + 1) * sizeof(double));
    ref_grads g;
    ck_assert_int_eq(ref_grads_alloc(&g, l, p->batch, p->len_q, p->len_kv), 0);
    ck_assert(rr->out && rr->grads);
    ref_forward_ex(l, &ra, p->xq, xkv, p->batch, p->len_q, p->len_kv, rr->out);
    ref_backward_ex(l, &ra, p->xq, xkv, p->batch, p->len_q, p->len_kv, p->dout, &g);
    if (!p->cross)
        for (size_t i = 0; i < shape->nxq; i++)
            g.dxq[i] += g.dxkv[i];
    double *dst = rr->grads;
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_is_adapted(l, t))
            continue;
        const size_t na = (size_t)(l->rank * l->in[t]), nb = (size_t)(l->out[t] * l->rank);
        memcpy(dst, g.da[t], na * sizeof(double));
        memcpy(dst + na, g.db[t], nb * sizeof(double));
        dst += na + nb;
    }
    rr->dxq = g.dxq;
    rr->dxkv = p->cross ? g.dxkv : NULL;
    g.dxq = NULL;
    if (p->cross)
        g.dxkv = NULL;
    ref_grads_free(&g);
    for (int t = 0; t < REF_NPROJ; t++)
        free(keep[t]);
}

static void ref_result_free(ref_result *rr)
{
    free(rr->out);
    free(rr->dxq);
    free(rr->dxkv);
    free(rr->grads);
    memset(rr, 0, sizeof *rr);
}

/* The largest relative error (reference.h's measure: out; the gradients with dx as one
 * family) of a library run against the reference. */
static double result_error(const lib_result *r, const ref_result *rr)
{
    const double om = ref_max_abs(rr->out, r->nout);
    double gm = ref_max_abs(rr->grads, r->ngrads), xm = ref_max_abs(rr->dxq, r->nxq);
    if (rr->dxkv)
        xm = fmax(xm, ref_max_abs(rr->dxkv, r->nxkv));
    gm = fmax(gm, xm);
    double e = ref_rel_err_f(r->out, rr->out, r->nout, REF_REL_FLOOR * om);
    e = fmax(e, ref_rel_err_f(r->grads, rr->grads, r->ngrads, REF_REL_FLOOR * gm));
    e = fmax(e, ref_rel_err_f(r->dxq, rr->dxq, r->nxq, REF_REL_FLOOR * gm));
    if (rr->dxkv)
        e = fmax(e, ref_rel_err_f(r->dxkv, rr->dxkv, r->nxkv, REF_REL_FLOOR * gm));
    return e;
}

/* Library (fresh adapter: forward number 0, seed 0) against the reference. */
static double check_against_ref(const ref_layer *l, const ref_problem *p, const call_args *a,
                                int threads, const char *what)
{
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter(l, LORA_BACKEND_EXACT, threads, &ad), LORA_OK);
    lib_result r;
    const int st = lib_call(ad, l, p, a, &r);
    ck_assert_msg(st == LORA_OK, "%s: %s failed: %s (%s)", what, r.call ? r.call : "call",
                  lora_status_string(st), lora_adapter_last_error(ad));
    ref_result rr;
    /* lib_call's args route runs lib_run first: its forward_ex is training forward 1 */
    ref_run(l, p, a, 0, has_args(a) ? 1 : 0, &r, &rr);
    const double e = result_error(&r, &rr);
    char desc[256];
    ck_assert_msg(e <= TOL_F32, "%s (%s): relative error %g", what,
                  ref_describe(l, p, desc, sizeof desc), e);
    ref_result_free(&rr);
    lib_result_free(&r);
    lora_adapter_destroy(ad);
    return e;
}

/* ---- configuration-driven features -------------------------------------------------- */

typedef struct cfg_case {
    const char *name;
    ref_config c;
    int cross, batch, len_q, len_kv, threads;
} cfg_case;

/* Each 0.2 parameter alone and together, around the exact backend's 256-row tiles. */
static const cfg_case cfg_cases[] = {
    {"rope half", {.d_model = 16, .n_heads = 2, .rank = 2, .targets = 3, .rope = 1}, 0, 2, 9, 0, 1},
    {"rope interleaved, GQA, causal",
     {.d_model = 16, .n_heads = 4, .n_kv_heads = 2, .head_dim = 4, .rank = 2, .targets = 15,
      .causal = 1, .out_proj = 1, .bias = 1, .rope = 2, .rope_theta = 100.0},
     0, 2, 11, 0, 2},
    {"rope partial, cross",
     {.d_model = 12, .n_heads = 2, .head_dim = 8, .rank = 3, .targets = 7, .rope = 1,
      .rope_dim = 4, .rope_theta = 500.0},
     1, 2, 5, 9, 1},
    {"rope, causal cross (bottom-right positions)",
     {.d_model = 8, .n_heads = 2, .rank = 2, .targets = 3, .causal = 1, .rope = 2}, 1, 1, 6, 10, 1},
    {"window causal", {.d_model = 8, .n_heads = 2, .rank = 2, .targets = 7, .causal = 1, .window = 3},
     0, 2, 13, 0, 1},
    {"window non-causal cross", {.d_model = 8, .rank = 2, .targets = 7, .window = 2}, 1, 2, 7, 9, 2},
    {"softcap", {.d_model = 8, .n_heads = 2, .rank = 2, .targets = 3, .softcap = 0.7}, 0, 1, 10, 0, 1},
    {"softcap causal, out-proj",
     {.d_model = 8, .n_heads = 2, .rank = 2, .targets = 15, .causal = 1, .out_proj = 1,
      .softcap = 1.5, .softmax_scale = 2.0},
     0, 2, 7, 0, 1},
    {"dropout Q K V O",
     {.d_model = 8, .n_heads = 2, .rank = 2, .targets = 15, .out_proj = 1, .bias = 1,
      .dropout = 0.3},
     0, 2, 6, 0, 1},
    {"dropout cross, GQA",
     {.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .rank = 3, .targets = 7, .dropout = 0.5},
     1, 1, 5, 7, 2},
    {"all: rope, window, softcap, dropout, GQA, causal, out-proj",
     {.d_model = 16, .n_heads = 4, .n_kv_heads = 2, .rank = 2, .targets = 15, .causal = 1,
      .out_proj = 1, .bias = 1, .rope = 1, .rope_dim = 2, .window = 4, .softcap = 2.0,
      .dropout = 0.1},
     0, 2, 9, 0, 2},
    /* tiles: 300 rows cross the 256-row tile boundary; the window skips whole tiles */
    {"window 40 over 300 rows, rope (tile skipping)",
     {.d_model = 16, .n_heads = 1, .rank = 2, .targets = 3, .causal = 1, .window = 40,
      .rope = 1},
     0, 1, 300, 0, 2},
    {"non-causal window 20 over 290 x 300 cross",
     {.d_model = 16, .n_heads = 1, .rank = 2, .targets = 7, .window = 20}, 1, 1, 290, 300, 1},
    {"head_dim 16 (fused tiles), rope interleaved, softcap, window",
     {.d_model = 32, .n_heads = 2, .rank = 2, .targets = 7, .causal = 1, .window = 100,
      .softcap = 3.0, .rope = 2},
     0, 1, 270, 0, 2},
};

START_TEST(test_attention_config_vs_reference)
{
    const cfg_case *k = &cfg_cases[_i];
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &k->c), 0);
    ref_layer_randomize(&l, 100 + (uint64_t)_i, 1.5, 0.7);
    ck_assert_int_eq(ref_problem_init(&p, &l, k->cross, k->batch, k->len_q,
                                      k->cross ? k->len_kv : k->len_q, 7 + (uint64_t)_i),
                     0);
    check_against_ref(&l, &p, NULL, k->threads, k->name);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* Random combinations of every configuration feature (RoPE × GQA × causal × cross ×
 * window × softcap × dropout × out-proj) against the reference. */
START_TEST(test_attention_random_configs)
{
    uint64_t rng = 0xA77E4710 + (uint64_t)_i;
    for (int n = 0; n < 12; n++) {
        ref_config c = {0};
        const int heads[3][2] = {{1, 1}, {2, 1}, {4, 2}};
        const int hsel = (int)(ref_rng_next(&rng) % 3);
        c.n_heads = heads[hsel][0];
        c.n_kv_heads = heads[hsel][1];
        c.head_dim = ref_rng_next(&rng) % 2 ? 4 : 6;
        c.d_model = 8;
        c.rank = 2;
        c.out_proj = (int)(ref_rng_next(&rng) % 2);
        c.targets = 1 + (int)(ref_rng_next(&rng) % (c.out_proj ? 15 : 7));
        c.causal = (int)(ref_rng_next(&rng) % 2);
        c.bias = (int)(ref_rng_next(&rng) % 2);
        c.rope = (int)(ref_rng_next(&rng) % 3);
        c.rope_dim = c.rope && ref_rng_next(&rng) % 2 ? 2 : 0;
        c.rope_theta = ref_rng_next(&rng) % 2 ? 10.0 : 0.0;
        c.window = ref_rng_next(&rng) % 2 ? 1 + (int)(ref_rng_next(&rng) % 4) : 0;
        c.softcap = ref_rng_next(&rng) % 2 ? 0.5 + (double)(ref_rng_next(&rng) % 4) : 0.0;
        c.dropout = ref_rng_next(&rng) % 2 ? 0.25 : 0.0;
        const int cross = (int)(ref_rng_next(&rng) % 2);
        const int len_q = 1 + (int)(ref_rng_next(&rng) % 7);
        const int len_kv = cross ? len_q + (int)(ref_rng_next(&rng) % 5) : len_q;
        ref_layer l;
        ref_problem p;
        ck_assert_int_eq(ref_layer_init(&l, &c), 0);
        ref_layer_randomize(&l, ref_rng_next(&rng), 1.5, 0.7);
        ck_assert_int_eq(ref_problem_init(&p, &l, cross, 2, len_q, len_kv, ref_rng_next(&rng)),
                         0);
        char what[64];
        snprintf(what, sizeof what, "random config %d.%d", _i, n);
        check_against_ref(&l, &p, NULL, 1 + (int)(ref_rng_next(&rng) % 2), what);
        ref_problem_free(&p);
        ref_layer_free(&l);
    }
}
END_TEST

/* ---- equalities that hold bitwise ----------------------------------------------------- */

static void assert_same(const lib_result *a, const lib_result *b, const char *what)
{
    ck_assert_msg(lib_result_same(a, b), "%s: results differ", what);
}

static void run_layer(const ref_layer *l, const ref_problem *p, int threads,
                      const ref_param *extra, int n_extra, const double *freqs, size_t nf,
                      lib_result *r)
{
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter_ex(l, LORA_BACKEND_EXACT, threads, extra, n_extra, &ad),
                     LORA_OK);
    if (freqs)
        ck_assert_int_eq(lora_adapter_set_rope_freqs(ad, freqs, nf), LORA_OK);
    ck_assert_int_eq(lib_run(ad, l, p, r), LORA_OK);
    lora_adapter_destroy(ad);
}

/* A table of zero frequencies turns nothing: RoPE with it equals no RoPE, bitwise. */
START_TEST(test_attention_zero_freqs_equal_no_rope)
{
    ref_config c = {.d_model = 16, .n_heads = 2, .n_kv_heads = 1, .rank = 2, .targets = 15,
                    .causal = 1, .out_proj = 1, .bias = 1};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 5, 1.0, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, 9, 9, 6), 0);
    lib_result none, zeros, rotated;
    run_layer(&l, &p, 1, NULL, 0, NULL, 0, &none);
    const double zero[4] = {0.0, 0.0, 0.0, 0.0}, some[4] = {1.0, 0.5, 0.1, 0.0};
    for (int rope = LORA_ROPE_HALF; rope <= LORA_ROPE_INTERLEAVED; rope++) {
        const ref_param on = {LORA_CFG_ROPE, 0, rope, 0.0};
        run_layer(&l, &p, 1, &on, 1, zero, 4, &zeros);
        assert_same(&none, &zeros, "zero frequency table vs no RoPE");
        run_layer(&l, &p, 1, &on, 1, some, 4, &rotated);
        ck_assert_msg(!lib_result_same(&none, &rotated), "a nonzero table changes nothing");
        lib_result_free(&zeros);
        lib_result_free(&rotated);
    }
    lib_result_free(&none);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* DROPOUT = 0 set explicitly is no dropout, bitwise. */
START_TEST(test_attention_dropout_zero_equals_none)
{
    ref_config c = {.d_model = 8, .n_heads = 2, .rank = 2, .targets = 15, .out_proj = 1};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 9, 1.0, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, 5, 5, 10), 0);
    lib_result none, zero, some;
    run_layer(&l, &p, 1, NULL, 0, NULL, 0, &none);
    const ref_param p0 = {LORA_CFG_DROPOUT, 1, 0, 0.0}, p1 = {LORA_CFG_DROPOUT, 1, 0, 0.2};
    run_layer(&l, &p, 1, &p0, 1, NULL, 0, &zero);
    run_layer(&l, &p, 1, &p1, 1, NULL, 0, &some);
    assert_same(&none, &zero, "DROPOUT 0 vs unset");
    ck_assert_msg(!lib_result_same(&none, &some), "DROPOUT 0.2 changes nothing");
    lib_result_free(&none);
    lib_result_free(&zero);
    lib_result_free(&some);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* A window at least as wide as the sequence computes the same tiles and hides the same
 * pairs as no window: bitwise equal, causal and not. */
START_TEST(test_attention_wide_window_equals_none)
{
    for (int causal = 0; causal <= 1; causal++) {
        ref_config c = {.d_model = 16, .n_heads = 2, .rank = 2, .targets = 7, .causal = causal};
        ref_layer l;
        ref_problem p;
        ck_assert_int_eq(ref_layer_init(&l, &c), 0);
        ref_layer_randomize(&l, 11, 1.0, 0.5);
        ck_assert_int_eq(ref_problem_init(&p, &l, 0, 1, 300, 300, 12), 0);
        lib_result none, wide;
        run_layer(&l, &p, 2, NULL, 0, NULL, 0, &none);
        const ref_param w = {LORA_CFG_WINDOW, 0, 300, 0.0};
        run_layer(&l, &p, 2, &w, 1, NULL, 0, &wide);
        assert_same(&none, &wide, "WINDOW = L vs none");
        lib_result_free(&none);
        lib_result_free(&wide);
        ref_problem_free(&p);
        ref_layer_free(&l);
    }
}
END_TEST

/* ---- dropout --------------------------------------------------------------------------- */

/* The mean output of training forwards over 2000 seeds approaches the undropped output
 * (dropout on V and O: the output is linear in both dropped inputs, so the mean is
 * exactly the undropped output), within 5 standard errors per entry; and one dropped
 * output is far from it (the test can fail). */
START_TEST(test_attention_dropout_mean_over_seeds)
{
    ref_config c = {.d_model = 8, .n_heads = 2, .rank = 4, .targets = LORA_TARGET_V | LORA_TARGET_O,
                    .out_proj = 1, .bias = 1, .causal = 1};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 21, 1.0, 1.0);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 1, 6, 6, 22), 0);
    const size_t n = (size_t)(6 * 8);
    float *x = malloc(n * sizeof(float)), *out = malloc(n * sizeof(float));
    float *clean = malloc(n * sizeof(float));
    double *sum = calloc(n, sizeof(double)), *sq = calloc(n, sizeof(double));
    ck_assert(x && out && clean && sum && sq);
    ref_to_float(p.xq, x, n);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_EXACT, 1, &ad), LORA_OK);
    ck_assert_int_eq(lora_forward(ad, x, 1, 6, clean), LORA_OK);
    lora_adapter_destroy(ad);
    const int seeds = 2000;
    double far = 0.0;
    for (int s = 0; s < seeds; s++) {
        const ref_param prm[2] = {{LORA_CFG_DROPOUT, 1, 0, 0.3}, {LORA_CFG_SEED, 0, 1000 + s, 0}};
        ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_EXACT, 1, prm, 2, &ad), LORA_OK);
        ck_assert_int_eq(lora_forward(ad, x, 1, 6, out), LORA_OK);
        lora_adapter_destroy(ad);
        for (size_t i = 0; i < n; i++) {
            sum[i] += out[i];
            sq[i] += (double)out[i] * out[i];
            far = fmax(far, fabs(out[i] - clean[i]));
        }
    }
    double worst = 0.0, scale = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double mean = sum[i] / seeds, var = fmax(sq[i] / seeds - mean * mean, 0.0);
        const double se = sqrt(var / seeds);
        worst = fmax(worst, fabs(mean - clean[i]) / (5.0 * se + 1e-6));
        scale = fmax(scale, fabs(clean[i]));
    }
    ck_assert_msg(worst <= 1.0, "mean over %d seeds is %g x 5 standard errors off", seeds,
                  worst);
    ck_assert_msg(far > 0.05 * scale, "dropout barely changes the output (%g vs %g)", far,
                  scale);
    free(x);
    free(out);
    free(clean);
    free(sum);
    free(sq);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* The library's own dropout backward against central differences of its own forward
 * with the same masks (fresh adapters: every forward is number 0): dA of Q (whose LoRA
 * input is dropped x) and dx (both paths). Loss = sum(out·dout). */
static double lib_loss(const ref_layer *l, const ref_param *prm, const float *x,
                       const float *dout, size_t nout, int64_t len)
{
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter_ex(l, LORA_BACKEND_EXACT, 1, prm, 1, &ad), LORA_OK);
    float *out = malloc(nout * sizeof(float));
    ck_assert_ptr_nonnull(out);
    ck_assert_int_eq(lora_forward(ad, x, 1, len, out), LORA_OK);
    double s = 0.0;
    for (size_t i = 0; i < nout; i++)
        s += (double)out[i] * dout[i];
    free(out);
    lora_adapter_destroy(ad);
    return s;
}

START_TEST(test_attention_dropout_backward_finite_differences)
{
    ref_config c = {.d_model = 4, .n_heads = 2, .head_dim = 2, .rank = 2, .targets = 15,
                    .out_proj = 1, .dropout = 0.4};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 31, 1.0, 1.0);
    const int64_t len = 4;
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 1, len, len, 32), 0);
    const size_t nx = (size_t)(len * 4), nout = nx, na = (size_t)(2 * 4);
    float *x = malloc(nx * sizeof(float)), *dout = malloc(nout * sizeof(float));
    float *out = malloc(nout * sizeof(float)), *dx = malloc(nx * sizeof(float));
    float *da = malloc(na * sizeof(float));
    ck_assert(x && dout && out && dx && da);
    ref_to_float(p.xq, x, nx);
    ref_to_float(p.dout, dout, nout);
    const ref_param prm = {LORA_CFG_DROPOUT, 1, 0, 0.4};
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_EXACT, 1, &prm, 1, &ad), LORA_OK);
    ck_assert_int_eq(lora_forward(ad, x, 1, len, out), LORA_OK);
    ck_assert_int_eq(lora_backward(ad, dout, dx), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_grad(ad, LORA_TARGET_Q, LORA_A, da, na), LORA_OK);
    lora_adapter_destroy(ad);
    const double h = 1.0 / 128; /* exact in float for the entries' magnitudes here */
    double worst = 0.0, gmax = 0.0;
    for (size_t i = 0; i < nx; i++) {
        const float keep = x[i];
        x[i] = keep + (float)h;
        const double lp = lib_loss(&l, &prm, x, dout, nout, len);
        x[i] = keep - (float)h;
        const double lm = lib_loss(&l, &prm, x, dout, nout, len);
        x[i] = keep;
        const double fd = (lp - lm) / ((double)(keep + (float)h) - (double)(keep - (float)h));
        worst = fmax(worst, fabs(fd - dx[i]));
        gmax = fmax(gmax, fabs(dx[i]));
    }
    for (size_t i = 0; i < na; i++) {
        const double keep = l.a[REF_Q][i];
        l.a[REF_Q][i] = keep + h;
        const double lp = lib_loss(&l, &prm, x, dout, nout, len);
        l.a[REF_Q][i] = keep - h;
        const double lm = lib_loss(&l, &prm, x, dout, nout, len);
        l.a[REF_Q][i] = keep;
        const double fd = (lp - lm) / (2.0 * h);
        worst = fmax(worst, fabs(fd - da[i]));
        gmax = fmax(gmax, fabs(da[i]));
    }
    ck_assert_msg(worst <= 2e-3 * gmax, "finite differences off by %g (gradients up to %g)",
                  worst, gmax);
    free(x);
    free(dout);
    free(out);
    free(dx);
    free(da);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* Each training forward draws new masks (its number keys them); inference forwards
 * (lora_forward_merged) never drop and do not count; and the backward uses its own
 * forward's masks, whatever came between. */
START_TEST(test_attention_dropout_forward_count)
{
    ref_config c = {.d_model = 8, .n_heads = 2, .rank = 2, .targets = 7, .dropout = 0.5};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 41, 1.0, 1.0);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 1, 5, 5, 42), 0);
    const size_t n = 5 * 8;
    float x[40], o1[40], o2[40], o3[40], m1[40], m2[40];
    ref_to_float(p.xq, x, n);
    lora_adapter *a = NULL, *b = NULL;
    ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_EXACT, 1, &a), LORA_OK);
    ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_EXACT, 1, &b), LORA_OK);
    ck_assert_int_eq(lora_forward(a, x, 1, 5, o1), LORA_OK);
    ck_assert_int_eq(lora_forward(a, x, 1, 5, o2), LORA_OK);
    ck_assert_msg(memcmp(o1, o2, sizeof o1) != 0, "two training forwards drew the same masks");
    ck_assert_int_eq(lora_forward(b, x, 1, 5, o3), LORA_OK);
    ck_assert_int_eq(lora_forward_merged(b, x, 1, 5, m1), LORA_OK);
    ck_assert_int_eq(lora_forward_merged(b, x, 1, 5, m2), LORA_OK);
    ck_assert_msg(memcmp(m1, m2, sizeof m1) == 0, "inference forwards differ");
    ck_assert_int_eq(lora_forward(b, x, 1, 5, o3), LORA_OK);
    ck_assert_msg(memcmp(o2, o3, sizeof o2) == 0,
                  "an inference forward changed the training forwards' masks");
    /* The backward of a (forward number 1) after an inference forward equals b's. */
    float dout[40], dxa[40], dxb[40];
    ref_to_float(p.dout, dout, n);
    ck_assert_int_eq(lora_forward_merged(a, x, 1, 5, m1), LORA_OK);
    ck_assert_int_eq(lora_backward(a, dout, dxa), LORA_OK);
    ck_assert_int_eq(lora_backward(b, dout, dxb), LORA_OK);
    ck_assert_msg(memcmp(dxa, dxb, sizeof dxa) == 0, "backward used other masks");
    lora_adapter_destroy(a);
    lora_adapter_destroy(b);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* ---- determinism ----------------------------------------------------------------------- */

/* With every feature on, a thread count gives bitwise the same results twice, and
 * threads 1 and 2 agree (the masks do not depend on the thread count). */
START_TEST(test_attention_threads_deterministic)
{
    ref_config c = {.d_model = 16, .n_heads = 2, .n_kv_heads = 1, .rank = 2, .targets = 15,
                    .causal = 1, .out_proj = 1, .bias = 1, .rope = 1, .window = 70,
                    .softcap = 2.0, .dropout = 0.2};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 51, 1.0, 0.7);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 1, 290, 290, 52), 0);
    lib_result r[2][2];
    for (int t = 0; t < 2; t++)
        for (int k = 0; k < 2; k++)
            run_layer(&l, &p, t + 1, NULL, 0, NULL, 0, &r[t][k]);
    assert_same(&r[0][0], &r[0][1], "threads 1, twice");
    assert_same(&r[1][0], &r[1][1], "threads 2, twice");
    ref_result rr;
    ref_run(&l, &p, NULL, 0, 0, &r[0][0], &rr);
    for (int t = 0; t < 2; t++)
        ck_assert_msg(result_error(&r[t][0], &rr) <= TOL_F32, "threads %d: error %g", t + 1,
                      result_error(&r[t][0], &rr));
    ref_result_free(&rr);
    for (int t = 0; t < 2; t++)
        for (int k = 0; k < 2; k++)
            lib_result_free(&r[t][k]);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* ---- parameters ----------------------------------------------------------------------- */

/* Parameters 19-24 build adapters; lora_adapter_set_rope_freqs checks its table. */
START_TEST(test_attention_params_accepted_and_freqs_checked)
{
    lora_config *cfg = cfg_new(16);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, 2), LORA_OK);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    const double f[4] = {1.0, 0.5, 0.25, 0.125};
    ck_assert_int_eq(lora_adapter_set_rope_freqs(ad, f, 4), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(ad), "ROPE"));
    lora_adapter_destroy(ad);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_ROPE, LORA_ROPE_INTERLEAVED), LORA_OK);
    ck_assert_int_eq(lora_config_set_double(cfg, LORA_CFG_ROPE_THETA, 500000.0), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_ROPE_DIM, 8), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_WINDOW, 16), LORA_OK);
    ck_assert_int_eq(lora_config_set_double(cfg, LORA_CFG_SOFTCAP, 50.0), LORA_OK);
    ck_assert_int_eq(lora_config_set_double(cfg, LORA_CFG_DROPOUT, 0.1), LORA_OK);
    ck_assert_int_eq(lora_config_validate(cfg), LORA_OK);
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    ck_assert_int_eq(lora_adapter_set_rope_freqs(NULL, f, 4), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_set_rope_freqs(ad, NULL, 4), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(ad), "inv_freq"));
    ck_assert_int_eq(lora_adapter_set_rope_freqs(ad, f, 3), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(ad), "ROPE_DIM/2"));
    const double neg[4] = {1.0, -0.5, 0.25, 0.0}, inf[4] = {1.0, INFINITY, 0.0, 0.0};
    const double nan_[4] = {NAN, 1.0, 0.0, 0.0};
    ck_assert_int_eq(lora_adapter_set_rope_freqs(ad, neg, 4), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(ad), "inv_freq[1]"));
    ck_assert_int_eq(lora_adapter_set_rope_freqs(ad, inf, 4), LORA_ERR_NONFINITE);
    ck_assert_int_eq(lora_adapter_set_rope_freqs(ad, nan_, 4), LORA_ERR_NONFINITE);
    ck_assert_int_eq(lora_adapter_set_rope_freqs(ad, f, 4), LORA_OK);
    lora_adapter_destroy(ad);
    lora_config_destroy(cfg);
}
END_TEST

/* A new frequency table drops the saved forward (its Q and K turned by the old one). */
START_TEST(test_attention_set_freqs_drops_saved_forward)
{
    ref_config c = {.d_model = 8, .n_heads = 2, .rank = 2, .targets = 3, .rope = 1};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 61, 1.0, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 1, 3, 3, 62), 0);
    float x[24], out[24], dx[24];
    ref_to_float(p.xq, x, 24);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_EXACT, 1, &ad), LORA_OK);
    ck_assert_int_eq(lora_forward(ad, x, 1, 3, out), LORA_OK);
    const double f[2] = {0.3, 0.1};
    ck_assert_int_eq(lora_adapter_set_rope_freqs(ad, f, 2), LORA_OK);
    ck_assert_int_eq(lora_backward(ad, out, dx), LORA_ERR_STATE);
    lora_adapter_destroy(ad);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* The library with a frequency table equals the reference with the same table. */
START_TEST(test_attention_freq_table_vs_reference)
{
    ref_config c = {.d_model = 12, .n_heads = 2, .head_dim = 6, .rank = 2, .targets = 3,
                    .causal = 1, .rope = 2, .rope_dim = 4};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 71, 1.0, 0.5);
    double f[2];
    ref_rope_freqs_llama3(500000.0, 4, 8.0, 1.0, 4.0, 16.0, f);
    ck_assert_int_eq(ref_layer_set_rope_freqs(&l, f, 2), 0);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, 7, 7, 72), 0);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_EXACT, 1, &ad), LORA_OK);
    ck_assert_int_eq(lora_adapter_set_rope_freqs(ad, f, 2), LORA_OK);
    lib_result r;
    ck_assert_int_eq(lib_run(ad, &l, &p, &r), LORA_OK);
    ref_result rr;
    ref_run(&l, &p, NULL, 0, 0, &r, &rr);
    ck_assert_msg(result_error(&r, &rr) <= TOL_F32, "error %g", result_error(&r, &rr));
    ref_result_free(&rr);
    lib_result_free(&r);
    lora_adapter_destroy(ad);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* ---- POLY ------------------------------------------------------------------------------ */

/* WINDOW and SOFTCAP route to EXACT: AUTO runs exact attention (run info says so) and a
 * forced POLY is refused with LORA_ERR_UNSUPPORTED naming the option. */
START_TEST(test_attention_poly_refuses_window_softcap)
{
    static const struct {
        int param, is_double;
        double value;
        const char *name;
    } opts[2] = {{LORA_CFG_WINDOW, 0, 4, "LORA_CFG_WINDOW"},
                 {LORA_CFG_SOFTCAP, 1, 5.0, "LORA_CFG_SOFTCAP"}};
    ref_config c = {.d_model = 8, .n_heads = 2, .rank = 2, .targets = 3, .causal = 1,
                    .softmax_scale = 0.01};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 81, 0.1, 0.1);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 1, 64, 64, 82), 0);
    float *x = malloc(64 * 8 * sizeof(float)), *out = malloc(64 * 8 * sizeof(float));
    ck_assert(x && out);
    ref_to_float(p.xq, x, 64 * 8);
    for (int o = 0; o < 2; o++) {
        const ref_param prm[2] = {
            {opts[o].param, opts[o].is_double, (int64_t)opts[o].value, opts[o].value},
            {LORA_CFG_POLY_DEGREE, 0, 2, 0.0}};
        for (int backend = LORA_BACKEND_AUTO; backend <= LORA_BACKEND_POLY; backend += 2) {
            lora_adapter *ad = NULL;
            /* without the option a forced POLY runs here (tiny scores, degree 2) */
            ck_assert_int_eq(ref_make_adapter_ex(&l, backend, 1, prm + 1, 1, &ad), LORA_OK);
            ck_assert_int_eq(lora_forward(ad, x, 1, 64, out), LORA_OK);
            lora_run_info info = {.struct_size = sizeof info};
            ck_assert_int_eq(lora_adapter_get_run_info(ad, &info), LORA_OK);
            if (backend == LORA_BACKEND_POLY)
                ck_assert_int_eq(info.backend, LORA_BACKEND_POLY);
            lora_adapter_destroy(ad);
            ck_assert_int_eq(ref_make_adapter_ex(&l, backend, 1, prm, 2, &ad), LORA_OK);
            const int st = lora_forward(ad, x, 1, 64, out);
            if (backend == LORA_BACKEND_POLY) {
                ck_assert_int_eq(st, LORA_ERR_UNSUPPORTED);
                ck_assert_msg(strstr(lora_adapter_last_error(ad), opts[o].name) != NULL,
                              "message '%s' does not name %s", lora_adapter_last_error(ad),
                              opts[o].name);
            } else {
                ck_assert_int_eq(st, LORA_OK);
                ck_assert_int_eq(lora_adapter_get_run_info(ad, &info), LORA_OK);
                ck_assert_int_eq(info.backend, LORA_BACKEND_EXACT);
                ck_assert_int_eq(info.poly_groups, 0);
            }
            lora_adapter_destroy(ad);
        }
    }
    free(x);
    free(out);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* Under RoPE the estimator's score bound is that of the rotated Q and K (the keys'
 * mean taken after rotation), as the forward's run info reports it; without the
 * rotation the bound would differ (checked: the unrotated bound is far off). */
START_TEST(test_attention_estimate_rope_score_bound)
{
    ref_config c = {.d_model = 16, .n_heads = 2, .n_kv_heads = 1, .rank = 2, .targets = 3,
                    .bias = 1, .rope = 1 + _i % 2, .rope_theta = 30.0};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 91, 1.0, 0.5);
    for (int o = 0; o < 8; o++)
        l.bias[REF_K][o] += 3.0; /* a large key mean, which rotation spreads */
    const int64_t len = 600; /* more than one SUM_BLOCK of 512 */
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, len, len, 92), 0);
    const size_t nq = (size_t)(2 * len * l.q_dim), nk = (size_t)(2 * len * l.kv_dim);
    double *q = malloc(nq * sizeof(double)), *k = malloc(nk * sizeof(double));
    ck_assert(q && k);
    ck_assert_int_eq(ref_activations_ex(&l, NULL, p.xq, NULL, 2, len, len, q, k, NULL, NULL),
                     0);
    const double r_ref = ref_score_bound(&l, q, k, 2, len, len);
    l.cfg.rope = REF_ROPE_NONE; /* the same layer, unrotated */
    ck_assert_int_eq(ref_activations(&l, p.xq, p.xq, 2, len, len, q, k, NULL, NULL), 0);
    l.cfg.rope = c.rope;
    const double r_unrotated = ref_score_bound(&l, q, k, 2, len, len);
    ck_assert_msg(fabs(r_unrotated - r_ref) > 0.05 * r_ref, "RoPE barely changes R (%g, %g)",
                  r_unrotated, r_ref);
    float *x = malloc((size_t)(2 * len * 16) * sizeof(float));
    ck_assert_ptr_nonnull(x);
    ref_to_float(p.xq, x, (size_t)(2 * len * 16));
    for (int threads = 1; threads <= 2; threads++) {
        lora_adapter *ad = NULL;
        ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_EXACT, threads, &ad), LORA_OK);
        lora_threshold_report rep = {.struct_size = sizeof rep};
        ck_assert_int_eq(lora_threshold_estimate(ad, x, 2, len, &rep), LORA_OK);
        ck_assert_msg(fabs(rep.score_bound - r_ref) <= 1e-4 * r_ref,
                      "threads %d: estimate R = %g, reference %g", threads, rep.score_bound,
                      r_ref);
        lora_adapter_destroy(ad);
    }
    free(x);
    free(q);
    free(k);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* POLY with RoPE runs on the rotated Q and K: its score bound is theirs, and its output
 * stays within the certificate eta·max|V| (no output projection), its gradients within
 * a few times the measured error of MATH §5 at that R. */
START_TEST(test_attention_poly_rope_within_certificate)
{
    ref_config c = {.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .head_dim = 4, .rank = 2,
                    .targets = 7, .causal = _i, .rope = 1 + _i, .rope_theta = 20.0};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 111 + (uint64_t)_i, 1.0, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, 200, 200, 112), 0);
    const double r = problem_set_score_bound(&l, &p, 0.5);
    double vmax;
    problem_score_bound(&l, &p, &vmax);
    const ref_param deg = {LORA_CFG_POLY_DEGREE, 0, 4, 0.0};
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_POLY, 1, &deg, 1, &ad), LORA_OK);
    lib_result lr;
    ck_assert_int_eq(lib_run(ad, &l, &p, &lr), LORA_OK);
    ck_assert_int_eq(lr.info.backend, LORA_BACKEND_POLY);
    ck_assert_msg(fabs(lr.info.score_bound - r) <= 1e-4 * r, "score bound %g, rotated R %g",
                  lr.info.score_bound, r);
    ref_result rr;
    ref_run(&l, &p, NULL, 0, 0, &lr, &rr);
    double out_err = 0.0;
    for (size_t k = 0; k < lr.nout; k++)
        out_err = fmax(out_err, fabs(lr.out[k] - rr.out[k]));
    ck_assert_msg(out_err <= lr.info.error_bound * vmax + 1e-5 * ref_max_abs(rr.out, lr.nout),
                  "|out~ - out| = %g above eta*|V| = %g", out_err, lr.info.error_bound * vmax);
    const double e = result_error(&lr, &rr);
    ck_assert_msg(e <= 10.0 * 4e-6 + 2e-5, "relative error %g at R = 0.5, g = 4", e);
    ref_result_free(&rr);
    lib_result_free(&lr);
    lora_adapter_destroy(ad);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* ---- per-call arguments ------------------------------------------------------------ */

/* Random lengths, positions and segments (self and cross; with RoPE, GQA, causal,
 * window, softcap, dropout and out-proj drawn too) against the reference. */
START_TEST(test_attention_args_vs_reference)
{
    uint64_t rng = 0xA1160000 + (uint64_t)_i;
    for (int n = 0; n < 10; n++) {
        ref_config c = {.d_model = 8, .rank = 2, .head_dim = 4};
        c.n_heads = ref_rng_next(&rng) % 2 ? 2 : 1;
        c.n_kv_heads = c.n_heads == 2 && ref_rng_next(&rng) % 2 ? 1 : c.n_heads;
        c.out_proj = (int)(ref_rng_next(&rng) % 2);
        c.targets = 1 + (int)(ref_rng_next(&rng) % (c.out_proj ? 15 : 7));
        c.causal = (int)(ref_rng_next(&rng) % 2);
        c.bias = 1;
        c.rope = (int)(ref_rng_next(&rng) % 3);
        c.window = ref_rng_next(&rng) % 3 == 0 ? 2 : 0;
        c.softcap = ref_rng_next(&rng) % 3 == 0 ? 1.5 : 0.0;
        c.dropout = ref_rng_next(&rng) % 3 == 0 ? 0.25 : 0.0;
        const int cross = (int)(ref_rng_next(&rng) % 2), batch = 2;
        const int len_q = 2 + (int)(ref_rng_next(&rng) % 5);
        const int len_kv = cross ? len_q + (int)(ref_rng_next(&rng) % 4) : len_q;
        int64_t q_lens[2], kv_lens[2], q_pos[2 * 12], kv_pos[2 * 12];
        int32_t q_seg[2 * 12], kv_seg[2 * 12];
        call_args a = {0};
        for (int b = 0; b < batch; b++) {
            q_lens[b] = (int64_t)(ref_rng_next(&rng) % (uint64_t)(len_q + 1));
            kv_lens[b] = cross ? (int64_t)(ref_rng_next(&rng) % (uint64_t)(len_kv + 1))
                               : q_lens[b];
        }
        for (int i = 0; i < batch * len_q; i++) {
            q_pos[i] = (int64_t)(ref_rng_next(&rng) % 9) - 2;
            q_seg[i] = (int32_t)(ref_rng_next(&rng) % 2);
        }
        for (int j = 0; j < batch * len_kv; j++) {
            kv_pos[j] = (int64_t)(ref_rng_next(&rng) % 9) - 2;
            kv_seg[j] = (int32_t)(ref_rng_next(&rng) % 2);
        }
        const uint64_t pick = ref_rng_next(&rng);
        a.q_lens = pick & 1 ? q_lens : NULL;
        a.kv_lens = cross && pick & 2 ? kv_lens : NULL;
        a.q_pos = pick & 4 ? q_pos : NULL;
        a.kv_pos = cross && pick & 8 ? kv_pos : NULL;
        a.q_seg = pick & 16 ? q_seg : NULL;
        a.kv_seg = cross && pick & 32 ? kv_seg : NULL;
        if (!has_args(&a))
            a.q_lens = q_lens;
        ref_layer l;
        ref_problem p;
        ck_assert_int_eq(ref_layer_init(&l, &c), 0);
        ref_layer_randomize(&l, ref_rng_next(&rng), 1.5, 0.7);
        ck_assert_int_eq(ref_problem_init(&p, &l, cross, batch, len_q, len_kv, ref_rng_next(&rng)),
                         0);
        char what[64];
        snprintf(what, sizeof what, "random args %d.%d (pick %d)", _i, n, (int)(pick & 63));
        check_against_ref(&l, &p, &a, 1 + (int)(ref_rng_next(&rng) % 2), what);
        ref_problem_free(&p);
        ref_layer_free(&l);
    }
}
END_TEST

/* Tiles: 300 rows with padding, restarting positions and segments over the 256-row
 * tiles (skipped, full and partial tiles all occur), head_dim 16 (fused tiles). */
START_TEST(test_attention_args_tiles_vs_reference)
{
    ref_config c = {.d_model = 32, .n_heads = 2, .rank = 2, .targets = 7, .causal = _i,
                    .rope = 1};
    enum { L = 300 };
    static int64_t lens[2] = {300, 170}, pos[2 * L];
    static int32_t seg[2 * L];
    for (int i = 0; i < 2 * L; i++) {
        const int r = i % L;
        seg[i] = r < 120 ? 0 : r < 280 ? 1 : 2;
        pos[i] = r < 120 ? r : r < 280 ? r - 120 : r - 280;
    }
    call_args a = {.q_lens = lens, .q_pos = pos, .q_seg = seg};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 131, 1.0, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, L, L, 132), 0);
    check_against_ref(&l, &p, &a, 2, "300 rows, packed, padded");
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* Sub-tiles (the exact backend cuts partial 256-row tiles into 32-row blocks): 600 rows,
 * batch 2, against the reference, each case causal and not, fused tiles (head_dim 16)
 * and BLIS ones (head_dim 12):
 *   0 segments of 19 to 45 rows, boundaries inside tiles and sub-tiles;
 *   1 segments of 64 rows (whole sub-tile blocks: full sub-tiles inside partial tiles);
 *   2 two segment ids alternating every 64 rows (a sequence in non-adjacent blocks:
 *     full blocks with hidden ones between them);
 *   3 window 100 (not a multiple of 32), lengths 600 and 333 (padded tails);
 *   4 window 70, positions shifted by 5 every 150 rows, lengths 517 and 600. */
START_TEST(test_attention_sub_tiles_vs_reference)
{
    const int which = _i / 4, causal = _i % 2, fused = (_i / 2) % 2 == 0;
    enum { L = 600 };
    ref_config c = {.d_model = fused ? 32 : 24, .n_heads = 2, .rank = 2, .targets = 7,
                    .causal = causal, .rope = 1, .window = which == 3 ? 100 : which == 4 ? 70 : 0};
    static int64_t lens[2], pos[2 * L];
    static int32_t seg[2 * L];
    int start = 0, len = 19;
    for (int i = 0; i < 2 * L; i++) {
        const int r = i % L;
        if (r == 0 || r - start == len) { /* case 0: lengths 19, 26, .., 45, 19, .. */
            start = r;
            len = r == 0 ? 19 : 19 + (len - 19 + 7) % 33;
        }
        seg[i] = which == 0 ? start : which == 1 ? r / 64 : (r / 64) % 2;
        pos[i] = which == 0 ? r - start : which == 1 ? r % 64 : which == 4 ? r + 5 * (r / 150) : r;
    }
    lens[0] = which == 3 ? 600 : which == 4 ? 517 : L;
    lens[1] = which == 3 ? 333 : L;
    call_args a = {.q_lens = which >= 3 ? lens : NULL, .q_pos = which == 2 || which == 3 ? NULL : pos,
                   .q_seg = which <= 2 ? seg : NULL};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 140 + (uint64_t)_i, 1.0, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, L, L, 141 + (uint64_t)_i), 0);
    char what[64];
    snprintf(what, sizeof what, "sub-tiles case %d, causal %d, %s tiles", which, causal,
             fused ? "fused" : "BLIS");
    check_against_ref(&l, &p, &a, 1 + _i % 3 % 2, what);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

static void run_args(const ref_layer *l, const ref_problem *p, const call_args *a,
                     lib_result *r)
{
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter(l, LORA_BACKEND_EXACT, 2, &ad), LORA_OK);
    ck_assert_int_eq(lib_call(ad, l, p, a, r), LORA_OK);
    lora_adapter_destroy(ad);
}

/* args NULL, lengths all full and segment ids all equal change nothing, bitwise. */
START_TEST(test_attention_trivial_args_equal_none)
{
    ref_config c = {.d_model = 16, .n_heads = 2, .n_kv_heads = 1, .rank = 2, .targets = 15,
                    .causal = 1, .out_proj = 1, .bias = 1, .rope = 1, .window = 50};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 141, 1.0, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, 270, 270, 142), 0);
    static int64_t full[2] = {270, 270};
    static int32_t same[2 * 270];
    for (int i = 0; i < 2 * 270; i++)
        same[i] = 7;
    lib_result none, r;
    run_args(&l, &p, NULL, &none);
    /* args NULL through lora_forward_ex equals lora_forward */
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_EXACT, 2, &ad), LORA_OK);
    float *x = malloc(none.nxq * sizeof(float)), *out = malloc(none.nout * sizeof(float));
    ck_assert(x && out);
    ref_to_float(p.xq, x, none.nxq);
    ck_assert_int_eq(lora_forward_ex(ad, NULL, x, NULL, 2, 270, 270, out), LORA_OK);
    ck_assert_msg(memcmp(out, none.out, none.nout * sizeof(float)) == 0,
                  "forward_ex(args NULL) differs from lora_forward");
    lora_adapter_destroy(ad);
    free(x);
    free(out);
    const call_args lens = {.q_lens = full}, segs = {.q_seg = same};
    run_args(&l, &p, &lens, &r);
    assert_same(&none, &r, "all lengths full vs none");
    lib_result_free(&r);
    run_args(&l, &p, &segs, &r);
    assert_same(&none, &r, "one segment id vs none");
    lib_result_free(&r);
    lib_result_free(&none);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* A packed row of three sequences (segments, positions restarting) equals running the
 * sequences one by one: out and dx rows equal, gradients summed (to float rounding). */
START_TEST(test_attention_packed_equals_separate)
{
    ref_config c = {.d_model = 16, .n_heads = 2, .rank = 2, .targets = 15, .causal = 1,
                    .out_proj = 1, .bias = 1, .rope = 2};
    const int lens[3] = {5, 9, 4}, L = 18;
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 151, 1.0, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 1, L, L, 152), 0);
    int64_t pos[18];
    int32_t seg[18];
    for (int s = 0, i = 0; s < 3; s++)
        for (int k = 0; k < lens[s]; k++, i++) {
            pos[i] = k;
            seg[i] = s;
        }
    const call_args a = {.q_pos = pos, .q_seg = seg};
    lib_result packed;
    run_args(&l, &p, &a, &packed);
    float *gsum = calloc(packed.ngrads, sizeof(float));
    ck_assert_ptr_nonnull(gsum);
    double worst = 0.0, scale = 0.0;
    for (int s = 0, i0 = 0; s < 3; i0 += lens[s], s++) {
        ref_problem one;
        ck_assert_int_eq(ref_problem_init(&one, &l, 0, 1, lens[s], lens[s], 1), 0);
        memcpy(one.xq, p.xq + i0 * 16, (size_t)lens[s] * 16 * sizeof(double));
        memcpy(one.dout, p.dout + i0 * 16, (size_t)lens[s] * 16 * sizeof(double));
        lib_result r;
        run_args(&l, &one, NULL, &r);
        for (size_t k = 0; k < r.nout; k++) {
            worst = fmax(worst, fabs(r.out[k] - packed.out[i0 * 16 + k]));
            worst = fmax(worst, fabs(r.dxq[k] - packed.dxq[i0 * 16 + k]));
            scale = fmax(scale, fabs(r.out[k]));
        }
        for (size_t k = 0; k < r.ngrads; k++)
            gsum[k] += r.grads[k];
        lib_result_free(&r);
        ref_problem_free(&one);
    }
    for (size_t k = 0; k < packed.ngrads; k++) {
        worst = fmax(worst, fabs(gsum[k] - packed.grads[k]));
        scale = fmax(scale, fabs(gsum[k]));
    }
    ck_assert_msg(worst <= 1e-5 * scale, "packed vs separate differ by %g (scale %g)", worst,
                  scale);
    free(gsum);
    lib_result_free(&packed);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* The estimator with args: the statistics and the plans cover the valid rows only (a
 * padded batch reports what its valid rows alone report), and args NULL equals the 0.1
 * call. */
START_TEST(test_attention_estimate_ex)
{
    ref_config c = {.d_model = 8, .n_heads = 2, .rank = 2, .targets = 3, .softmax_scale = 0.01};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 161, 0.2, 0.1);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 1, 4096, 4096, 162), 0);
    float *x = malloc(4096 * 8 * sizeof(float));
    ck_assert_ptr_nonnull(x);
    ref_to_float(p.xq, x, 4096 * 8);
    for (int i = 100 * 8; i < 4096 * 8; i++)
        x[i] *= 100.0f; /* padding: large rows that would dominate Γ */
    const ref_param deg = {LORA_CFG_POLY_DEGREE, 0, 2, 0.0};
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_AUTO, 1, &deg, 1, &ad), LORA_OK);
    lora_threshold_report a = {.struct_size = sizeof a}, b = a, c0 = a;
    ck_assert_int_eq(lora_threshold_estimate(ad, x, 1, 4096, &a), LORA_OK);
    ck_assert_int_eq(lora_threshold_estimate_ex(ad, NULL, x, 1, 4096, &b), LORA_OK);
    ck_assert_msg(memcmp(&a, &b, sizeof a) == 0, "estimate_ex(NULL) differs");
    static const int64_t len[1] = {100};
    lora_attn_args args = {.struct_size = sizeof args, .q_lens = len};
    ck_assert_int_eq(lora_threshold_estimate_ex(ad, &args, x, 1, 4096, &c0), LORA_OK);
    lora_threshold_report v = a;
    ck_assert_int_eq(lora_threshold_estimate(ad, x, 1, 100, &v), LORA_OK);
    ck_assert_int_eq(c0.recommended_backend, v.recommended_backend);
    ck_assert_int_eq(c0.poly_degree, v.poly_degree);
    ck_assert_msg(c0.flops_exact == v.flops_exact && c0.flops_poly == v.flops_poly,
                  "flops with padding (%g, %g) vs the valid rows alone (%g, %g)",
                  c0.flops_exact, c0.flops_poly, v.flops_exact, v.flops_poly);
    ck_assert_msg(fabs(c0.score_bound - v.score_bound) <= 1e-6 * v.score_bound,
                  "R with padding %.17g vs the valid rows alone %.17g", c0.score_bound,
                  v.score_bound);
    ck_assert_msg(c0.gamma_q < a.gamma_q / 10.0, "padding counted in gamma_q (%g vs %g)",
                  c0.gamma_q, a.gamma_q);
    static const int64_t bad[1] = {4097};
    args.q_lens = bad;
    ck_assert_int_eq(lora_threshold_estimate_ex(ad, &args, x, 1, 4096, &c0), LORA_ERR_SHAPE);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(ad), "q_lens"));
    lora_adapter_destroy(ad);
    free(x);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

Suite *attention_suite(void)
{
    Suite *s = suite_create("attention");
    TCase *tc = tcase_create("attention");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_attention_config_vs_reference, 0,
                        (int)(sizeof cfg_cases / sizeof cfg_cases[0]));
    tcase_add_loop_test(tc, test_attention_random_configs, 0, 4);
    tcase_add_test(tc, test_attention_zero_freqs_equal_no_rope);
    tcase_add_test(tc, test_attention_dropout_zero_equals_none);
    tcase_add_test(tc, test_attention_wide_window_equals_none);
    tcase_add_test(tc, test_attention_dropout_mean_over_seeds);
    tcase_add_test(tc, test_attention_dropout_backward_finite_differences);
    tcase_add_test(tc, test_attention_dropout_forward_count);
    tcase_add_test(tc, test_attention_threads_deterministic);
    tcase_add_test(tc, test_attention_params_accepted_and_freqs_checked);
    tcase_add_test(tc, test_attention_set_freqs_drops_saved_forward);
    tcase_add_test(tc, test_attention_freq_table_vs_reference);
    tcase_add_test(tc, test_attention_poly_refuses_window_softcap);
    tcase_add_loop_test(tc, test_attention_estimate_rope_score_bound, 0, 2);
    tcase_add_loop_test(tc, test_attention_poly_rope_within_certificate, 0, 2);
    tcase_add_loop_test(tc, test_attention_args_vs_reference, 0, 4);
    tcase_add_loop_test(tc, test_attention_args_tiles_vs_reference, 0, 2);
    tcase_add_loop_test(tc, test_attention_sub_tiles_vs_reference, 0, 20);
    tcase_add_test(tc, test_attention_trivial_args_equal_none);
    tcase_add_test(tc, test_attention_packed_equals_separate);
    tcase_add_test(tc, test_attention_estimate_ex);
    suite_add_tcase(s, tc);
    return s;
}
