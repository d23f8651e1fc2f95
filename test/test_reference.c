/* reference_suite: the double-precision reference (reference.c) against central finite
 * differences of loss = 0.5*sum((out - target)^2), and against hand-computed answers
 * (which the library must give too). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "reference_tests.h"
#include "suites.h"

#define FD_STEP 1e-5
#define FD_TOL 1e-6

typedef struct fd_case {
    ref_config c;
    int cross;
    int batch, len_q, len_kv;
} fd_case;

static const fd_case fd_cases[] = {
    /* causal self-attention, GQA 4/2, head_dim != d_model/heads, biases, out-proj,
     * LoRA on every target */
    {{.d_model = 5, .n_heads = 4, .n_kv_heads = 2, .head_dim = 3, .rank = 2, .targets = 15,
      .causal = 1, .out_proj = 1, .bias = 1},
     0, 2, 4, 4},
    /* non-causal, MQA, rsLoRA with alpha, explicit scale, no bias, no out-proj */
    {{.d_model = 6, .n_heads = 3, .n_kv_heads = 1, .rank = 3, .targets = 7, .alpha = 3.0,
      .rslora = 1, .softmax_scale = 0.6},
     0, 1, 5, 5},
    /* causal cross-attention, len_q < len_kv, out-proj with LoRA on O only + Q */
    {{.d_model = 4, .n_heads = 2, .n_kv_heads = 1, .rank = 2, .targets = 9, .causal = 1,
      .out_proj = 1, .bias = 1},
     1, 2, 3, 5},
    /* non-causal cross-attention, len_q > len_kv, K|V|O */
    {{.d_model = 4, .n_heads = 2, .rank = 1, .targets = 14, .out_proj = 1, .alpha = 2.0},
     1, 1, 4, 2},
};

static double loss_of(const ref_layer *l, const ref_problem *p, const double *target,
                      double *out, size_t nout)
{
    ref_forward(l, p->xq, p->xkv, p->batch, p->len_q, p->len_kv, out);
    double s = 0.0;
    for (size_t i = 0; i < nout; i++)
        s += 0.5 * (out[i] - target[i]) * (out[i] - target[i]);
    return s;
}

/* Central difference of the loss w.r.t. each entry of v (n entries) into fd. */
static void central_diff(const ref_layer *l, const ref_problem *p, const double *target,
                         double *out, size_t nout, double *v, size_t n, double *fd)
{
    for (size_t i = 0; i < n; i++) {
        const double keep = v[i];
        v[i] = keep + FD_STEP;
        const double lp = loss_of(l, p, target, out, nout);
        v[i] = keep - FD_STEP;
        const double lm = loss_of(l, p, target, out, nout);
        v[i] = keep;
        fd[i] = (lp - lm) / (2.0 * FD_STEP);
    }
}

START_TEST(test_reference_vs_finite_differences)
{
    const fd_case *k = &fd_cases[_i];
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &k->c), 0);
    ref_layer_randomize(&l, 100 + (uint64_t)_i, 1.5, 0.7);
    ck_assert_int_eq(ref_problem_init(&p, &l, k->cross, k->batch, k->len_q, k->len_kv, 7), 0);
    const size_t nout = (size_t)(p.batch * p.len_q * ref_out_cols(&l));
    const size_t nxq = (size_t)(p.batch * p.len_q * l.cfg.d_model);
    const size_t nxkv = (size_t)(p.batch * p.len_kv * l.cfg.d_model);
    double *out = malloc(nout * sizeof(double)), *target = malloc(nout * sizeof(double));
    double *fd = malloc((nxq + nxkv + 256) * sizeof(double));
    ck_assert(out && target && fd);
    uint64_t s = 5;
    for (size_t i = 0; i < nout; i++)
        target[i] = ref_uniform(&s);
    /* dout = out - target is the upstream gradient of the loss. */
    ref_forward(&l, p.xq, p.xkv, p.batch, p.len_q, p.len_kv, out);
    for (size_t i = 0; i < nout; i++)
        p.dout[i] = out[i] - target[i];
    ref_grads g;
    ck_assert_int_eq(ref_grads_alloc(&g, &l, p.batch, p.len_q, p.len_kv), 0);
    ref_backward(&l, p.xq, p.xkv, p.batch, p.len_q, p.len_kv, p.dout, &g);
    char desc[512];
    ref_describe(&l, &p, desc, sizeof desc);
    static const char *names[4] = {"Q", "K", "V", "O"};
    int checked = 0;
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_is_adapted(&l, t))
            continue;
        const size_t na = (size_t)(l.rank * l.in[t]), nb = (size_t)(l.out[t] * l.rank);
        ck_assert(na <= 256 && nb <= 256);
        central_diff(&l, &p, target, out, nout, l.a[t], na, fd);
        double e = ref_rel_err_d(fd, g.da[t], na, 1e-12);
        ck_assert_msg(e <= FD_TOL && ref_max_abs(g.da[t], na) > 1e-6,
                      "dA_%s: rel err %.3g vs finite differences (max|dA| %.3g) [%s]",
                      names[t], e, ref_max_abs(g.da[t], na), desc);
        central_diff(&l, &p, target, out, nout, l.b[t], nb, fd);
        e = ref_rel_err_d(fd, g.db[t], nb, 1e-12);
        ck_assert_msg(e <= FD_TOL && ref_max_abs(g.db[t], nb) > 1e-6,
                      "dB_%s: rel err %.3g vs finite differences [%s]", names[t], e, desc);
        checked++;
    }
    ck_assert_int_gt(checked, 0);
    if (k->cross) {
        central_diff(&l, &p, target, out, nout, p.xq, nxq, fd);
        double e = ref_rel_err_d(fd, g.dxq, nxq, 1e-12);
        ck_assert_msg(e <= FD_TOL, "dxq: rel err %.3g [%s]", e, desc);
        central_diff(&l, &p, target, out, nout, p.xkv, nxkv, fd);
        e = ref_rel_err_d(fd, g.dxkv, nxkv, 1e-12);
        ck_assert_msg(e <= FD_TOL, "dxkv: rel err %.3g [%s]", e, desc);
    } else {
        /* Self-attention: x feeds Q, K and V; dL/dx = dxq + dxkv. */
        for (size_t i = 0; i < nxq; i++)
            g.dxq[i] += g.dxkv[i];
        central_diff(&l, &p, target, out, nout, p.xq, nxq, fd);
        const double e = ref_rel_err_d(fd, g.dxq, nxq, 1e-12);
        ck_assert_msg(e <= FD_TOL, "dx: rel err %.3g [%s]", e, desc);
    }
    ref_grads_free(&g);
    free(out);
    free(target);
    free(fd);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* Runs a hand-built layer through the reference and the library (forward only) and
 * checks both against `want`. */
static void known_answer(const ref_layer *l, const double *xq, const double *xkv, int cross,
                         int64_t len_q, int64_t len_kv, const double *want, size_t n,
                         const char *what)
{
    double *rout = malloc(n * sizeof(double));
    ck_assert_ptr_nonnull(rout);
    ref_forward(l, xq, xkv, 1, len_q, len_kv, rout);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(fabs(rout[i] - want[i]) <= 1e-12 * (1.0 + fabs(want[i])),
                      "%s: reference out[%zu] = %.15g, want %.15g", what, i, rout[i], want[i]);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter(l, LORA_BACKEND_EXACT, 1, &ad), LORA_OK);
    const size_t nxq = (size_t)(len_q * l->cfg.d_model), nxkv = (size_t)(len_kv * l->cfg.d_model);
    float fxq[64], fxkv[64], out[64];
    ck_assert(nxq <= 64 && nxkv <= 64 && n <= 64);
    ref_to_float(xq, fxq, nxq);
    ref_to_float(xkv, fxkv, nxkv);
    if (cross)
        ck_assert_int_eq(lora_forward_cross(ad, fxq, fxkv, 1, len_q, len_kv, out), LORA_OK);
    else
        ck_assert_int_eq(lora_forward(ad, fxq, 1, len_q, out), LORA_OK);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(fabs(out[i] - want[i]) <= 1e-6 * (1.0 + fabs(want[i])),
                      "%s: library out[%zu] = %.9g, want %.9g", what, i, (double)out[i],
                      want[i]);
    lora_adapter_destroy(ad);
    free(rout);
}

START_TEST(test_known_answer_causal_softmax)
{
    /* d_model = head_dim = 1, W_Q = W_K = W_V = 1: Q = K = V = x, beta = 1. */
    const ref_config c = {.d_model = 1, .rank = 1, .targets = 1, .causal = 1};
    ref_layer l;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    l.w[REF_Q][0] = l.w[REF_K][0] = l.w[REF_V][0] = 1.0;
    const double x[2] = {1.0, 2.0};
    const double e2 = exp(2.0), e4 = exp(4.0);
    const double want[2] = {1.0, (e2 * 1.0 + e4 * 2.0) / (e2 + e4)};
    known_answer(&l, x, x, 0, 2, 2, want, 2, "causal 1-d");
    ref_layer_free(&l);
}
END_TEST

START_TEST(test_known_answer_cross_alignment)
{
    /* W_Q = 0: every visible key gets the same weight; V = x_kv = (1, 2, 3).
     * Causal, len_q 2, len_kv 3 (bottom-right): query 0 sees keys 0..1, query 1 all. */
    const ref_config c = {.d_model = 1, .rank = 1, .targets = 2, .causal = 1};
    ref_layer l;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    l.w[REF_K][0] = l.w[REF_V][0] = 1.0;
    const double xq[2] = {0.5, -0.5}, xkv[3] = {1.0, 2.0, 3.0};
    const double want[2] = {1.5, 2.0};
    known_answer(&l, xq, xkv, 1, 2, 3, want, 2, "causal cross 2x3");
    const double want1[1] = {2.0}; /* len_q 1: the only query sees all three */
    known_answer(&l, xq, xkv, 1, 1, 3, want1, 1, "causal cross 1x3");
    l.cfg.causal = 0;
    const double want_nc[2] = {2.0, 2.0};
    known_answer(&l, xq, xkv, 1, 2, 3, want_nc, 2, "non-causal cross 2x3");
    ref_layer_free(&l);
}
END_TEST

START_TEST(test_known_answer_gqa_mapping)
{
    /* 4 query heads of dim 1 over 2 kv heads, L = 1: head h outputs V of kv head h/2.
     * W_V = I (2x2), so V = x = (a, b) and out = (a, a, b, b). */
    const ref_config c = {.d_model = 2, .n_heads = 4, .n_kv_heads = 2, .head_dim = 1,
                          .rank = 1, .targets = 1};
    ref_layer l;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    l.w[REF_V][0] = l.w[REF_V][3] = 1.0;
    const double x[2] = {0.25, -3.0};
    const double want[4] = {0.25, 0.25, -3.0, -3.0};
    known_answer(&l, x, x, 0, 1, 1, want, 4, "GQA 4/2");
    ref_layer_free(&l);
}
END_TEST

START_TEST(test_known_answer_lora_scale)
{
    /* d_model 1, W_V = 0, A = ones(r, 1), B = ones(1, r): B*A = r, L = 1 so out = V.
     * s = alpha/r gives out = alpha*x; rsLoRA s = alpha/sqrt(r) gives alpha*sqrt(r)*x. */
    for (int rs = 0; rs <= 1; rs++) {
        const ref_config c = {.d_model = 1, .rank = 4, .targets = 4, .alpha = 3.0, .rslora = rs,
                              .bias = 1};
        ref_layer l;
        ck_assert_int_eq(ref_layer_init(&l, &c), 0);
        for (int k = 0; k < 4; k++)
            l.a[REF_V][k] = l.b[REF_V][k] = 1.0;
        l.bias[REF_V][0] = 0.5;
        const double x[1] = {2.0};
        const double want[1] = {0.5 + (rs ? 3.0 * 2.0 : 3.0) * 2.0};
        known_answer(&l, x, x, 0, 1, 1, want, 1, rs ? "rsLoRA scale" : "LoRA scale");
        ref_layer_free(&l);
    }
}
END_TEST

Suite *reference_suite(void)
{
    Suite *s = suite_create("reference");
    TCase *tc = tcase_create("finite_differences");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_reference_vs_finite_differences, 0,
                        (int)(sizeof fd_cases / sizeof fd_cases[0]));
    suite_add_tcase(s, tc);
    tc = tcase_create("known_answers");
    tcase_add_test(tc, test_known_answer_causal_softmax);
    tcase_add_test(tc, test_known_answer_cross_alignment);
    tcase_add_test(tc, test_known_answer_gqa_mapping);
    tcase_add_test(tc, test_known_answer_lora_scale);
    suite_add_tcase(s, tc);
    reference_attn_tests(s);
    reference_models_tests(s);
    return s;
}
