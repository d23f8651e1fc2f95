/* merge_suite: lora_adapter_merge / _unmerge (values, the documented round-trip bound,
 * safe merge on NaN/Inf, argument errors) and the merged-weight inference forward
 * (same outputs as lora_forward, the saved forward untouched, cache invalidation). */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "fixtures.h"
#include "helpers.h"
#include "suites.h"

static double lora_scale_of(const fx_spec *s)
{
    const double alpha = s->alpha != 0.0 ? s->alpha : s->rank;
    return s->rslora ? alpha / sqrt((double)s->rank) : alpha / s->rank;
}

/* Target t's (out, in) and factors. */
static void factors_of(lora_adapter *ad, int t, int64_t *out, int64_t *in, int64_t *r,
                       float **a, float **b)
{
    int64_t ar, ac, br, bc;
    ck_assert_int_eq(lora_adapter_param_shape(ad, fx_tbits[t], LORA_A, &ar, &ac), LORA_OK);
    ck_assert_int_eq(lora_adapter_param_shape(ad, fx_tbits[t], LORA_B, &br, &bc), LORA_OK);
    *out = br;
    *in = ac;
    *r = ar;
    *a = malloc((size_t)(ar * ac) * sizeof(float));
    *b = malloc((size_t)(br * bc) * sizeof(float));
    ck_assert(*a && *b);
    ck_assert_int_eq(lora_adapter_get_param(ad, fx_tbits[t], LORA_A, *a, (size_t)(ar * ac)),
                     LORA_OK);
    ck_assert_int_eq(lora_adapter_get_param(ad, fx_tbits[t], LORA_B, *b, (size_t)(br * bc)),
                     LORA_OK);
}

/* W with entries spread over six decades (and some exact zeros). */
static void spread_weight(float *w, size_t n, uint64_t seed)
{
    fill_uniform(w, n, seed, 1.0f);
    for (size_t i = 0; i < n; i++)
        w[i] = (i % 17 == 0) ? 0.0f : w[i] * powf(10.0f, (float)((int)(i % 7) - 3));
}

/* The documented round trip: |W' - W| <= eps*(1 + 2^-22)*(|W| + s*(|B||A|)) + 2^-148,
 * and merge itself within half an ulp (plus double error) of W + s*B*A. */
START_TEST(test_merge_roundtrip_bound)
{
    fx_spec s = fx_default();
    s.d_model = 48;
    s.rank = 8;
    s.alpha = 16.0;
    s.rslora = _i;
    lora_adapter *ad = fx_adapter_nobase(&s, 3);
    fx_randomize_factors(ad, 5, 2.0f); /* large B: the LoRA term rivals W */
    const double sc = lora_scale_of(&s);
    for (int t = 0; t < 4; t++) {
        int64_t out, in, r;
        float *a, *b;
        factors_of(ad, t, &out, &in, &r, &a, &b);
        const size_t n = (size_t)(out * in);
        float *w = malloc(n * sizeof(float)), *w0 = malloc(n * sizeof(float));
        ck_assert(w && w0);
        spread_weight(w0, n, 40u + (uint64_t)t);
        memcpy(w, w0, n * sizeof(float));
        ck_assert_int_eq(lora_adapter_merge(ad, fx_tbits[t], w, n), LORA_OK);
        double worst_merge = 0.0;
        for (int64_t i = 0; i < out; i++)
            for (int64_t j = 0; j < in; j++) {
                double d = 0.0, absprod = 0.0;
                for (int64_t k = 0; k < r; k++) {
                    d += (double)b[i * r + k] * (double)a[k * in + j];
                    absprod += fabs((double)b[i * r + k]) * fabs((double)a[k * in + j]);
                }
                const double exact = (double)w0[i * in + j] + sc * d;
                const double err = fabs((double)w[i * in + j] - exact);
                /* half an ulp, plus both double evaluations' error (r+2 roundings) */
                const double allowed = 0x1p-24 * (1.0 + 0x1p-20) * fabs(exact) + 0x1p-149 +
                                       2.0 * (double)(r + 2) * 0x1p-53 *
                                           (fabs((double)w0[i * in + j]) + sc * absprod);
                worst_merge = fmax(worst_merge, err / allowed);
            }
        ck_assert_msg(worst_merge <= 1.0,
                      "merge of target %d: error / half-ulp bound = %g", t, worst_merge);
        ck_assert_int_eq(lora_adapter_unmerge(ad, fx_tbits[t], w, n), LORA_OK);
        double worst = 0.0, max_err = 0.0;
        for (int64_t i = 0; i < out; i++)
            for (int64_t j = 0; j < in; j++) {
                double absprod = 0.0;
                for (int64_t k = 0; k < r; k++)
                    absprod += fabs((double)b[i * r + k]) * fabs((double)a[k * in + j]);
                const double w_ij = w0[i * in + j];
                const double bound =
                    FLT_EPSILON * (1.0 + 0x1p-22) * (fabs(w_ij) + sc * absprod) + 0x1p-148;
                const double err = fabs((double)w[i * in + j] - w_ij);
                worst = fmax(worst, err / bound);
                max_err = fmax(max_err, err);
            }
        ck_assert_msg(worst <= 1.0,
                      "round trip of target %d: max error %g, max error / bound = %g", t,
                      max_err, worst);
        free(w);
        free(w0);
        free(a);
        free(b);
    }
    lora_adapter_destroy(ad);
}
END_TEST

/* B = 0 (the state after PEFT initialisation): merge and unmerge are exact. */
START_TEST(test_merge_zero_b_exact)
{
    fx_spec s = fx_default();
    s.keep_init = 1; /* Kaiming A, B = 0 */
    lora_adapter *ad = fx_adapter_nobase(&s, 1);
    for (int t = 0; t < 4; t++) {
        int64_t out, in, r;
        float *a, *b;
        factors_of(ad, t, &out, &in, &r, &a, &b);
        const size_t n = (size_t)(out * in);
        float *w = malloc(n * sizeof(float)), *w0 = malloc(n * sizeof(float));
        spread_weight(w0, n, 9);
        memcpy(w, w0, n * sizeof(float));
        ck_assert_int_eq(lora_adapter_merge(ad, fx_tbits[t], w, n), LORA_OK);
        ck_assert(memcmp(w, w0, n * sizeof(float)) == 0);
        ck_assert_int_eq(lora_adapter_unmerge(ad, fx_tbits[t], w, n), LORA_OK);
        ck_assert(memcmp(w, w0, n * sizeof(float)) == 0);
        free(w);
        free(w0);
        free(a);
        free(b);
    }
    lora_adapter_destroy(ad);
}
END_TEST

/* Safe merge: a NaN/Inf input or result is NONFINITE and the buffer is untouched. */
START_TEST(test_merge_nonfinite_untouched)
{
    fx_spec s = fx_default();
    s.out_proj = 0;
    s.targets = LORA_TARGET_Q;
    lora_adapter *ad = fx_adapter_nobase(&s, 2);
    int64_t r, c;
    ck_assert_int_eq(lora_adapter_param_shape(ad, LORA_TARGET_Q, LORA_B, &r, &c), LORA_OK);
    const size_t n = (size_t)(r * 16);
    float *w = malloc(n * sizeof(float)), *w0 = malloc(n * sizeof(float));
    for (int unmerge = 0; unmerge < 2; unmerge++) {
        int (*fn)(const lora_adapter *, int, float *, size_t) =
            unmerge ? lora_adapter_unmerge : lora_adapter_merge;
        /* NaN and Inf in the weight. */
        for (int k = 0; k < 2; k++) {
            fill_uniform(w0, n, 4, 1.0f);
            w0[n / 2] = k ? INFINITY : NAN;
            memcpy(w, w0, n * sizeof(float));
            ck_assert_int_eq(fn(ad, LORA_TARGET_Q, w, n), LORA_ERR_NONFINITE);
            ck_assert(memcmp(w, w0, n * sizeof(float)) == 0);
            ck_assert_str_eq(lora_adapter_last_error(ad), ""); /* const: no message (lora.h, Threads) */
        }
    }
    /* A finite weight whose merged value overflows. */
    int64_t ar, ac;
    ck_assert_int_eq(lora_adapter_param_shape(ad, LORA_TARGET_Q, LORA_A, &ar, &ac), LORA_OK);
    float *ones_a = malloc((size_t)(ar * ac) * sizeof(float));
    float *big_b = malloc((size_t)(r * c) * sizeof(float));
    for (int64_t i = 0; i < ar * ac; i++)
        ones_a[i] = 1.0f;
    for (int64_t i = 0; i < r * c; i++)
        big_b[i] = 1e35f;
    ck_assert_int_eq(lora_adapter_set_param(ad, LORA_TARGET_Q, LORA_A, ones_a, (size_t)(ar * ac)),
                     LORA_OK);
    ck_assert_int_eq(lora_adapter_set_param(ad, LORA_TARGET_Q, LORA_B, big_b, (size_t)(r * c)),
                     LORA_OK);
    fill_uniform(w0, n, 5, 1.0f);
    w0[7] = FLT_MAX;
    memcpy(w, w0, n * sizeof(float));
    ck_assert_int_eq(lora_adapter_merge(ad, LORA_TARGET_Q, w, n), LORA_ERR_NONFINITE);
    ck_assert(memcmp(w, w0, n * sizeof(float)) == 0);
    w0[7] = -FLT_MAX;
    memcpy(w, w0, n * sizeof(float));
    ck_assert_int_eq(lora_adapter_unmerge(ad, LORA_TARGET_Q, w, n), LORA_ERR_NONFINITE);
    ck_assert(memcmp(w, w0, n * sizeof(float)) == 0);
    /* Without the huge entry it merges, and the adapter is unchanged by all this. */
    w0[7] = 0.0f;
    memcpy(w, w0, n * sizeof(float));
    ck_assert_int_eq(lora_adapter_merge(ad, LORA_TARGET_Q, w, n), LORA_OK);
    ck_assert_str_eq(lora_adapter_last_error(ad), "");
    free(ones_a);
    free(big_b);
    free(w);
    free(w0);
    lora_adapter_destroy(ad);
}
END_TEST

START_TEST(test_merge_bad_arguments)
{
    fx_spec s = fx_default();
    s.targets = LORA_TARGET_Q | LORA_TARGET_V;
    lora_adapter *ad = fx_adapter_nobase(&s, 2);
    const size_t n = 16 * 16;
    float *w = malloc(n * sizeof(float));
    fill_uniform(w, n, 1, 1.0f);
    for (int unmerge = 0; unmerge < 2; unmerge++) {
        int (*fn)(const lora_adapter *, int, float *, size_t) =
            unmerge ? lora_adapter_unmerge : lora_adapter_merge;
        ck_assert_int_eq(fn(NULL, LORA_TARGET_Q, w, n), LORA_ERR_INVALID_ARG);
        const struct {
            int target;
            float *w;
            size_t n;
        } bad[] = {
            {3, w, n},                 /* not a target */
            {LORA_TARGET_K, w, 16 * 8}, /* not adapted */
            {LORA_TARGET_Q, NULL, n},
            {LORA_TARGET_Q, w, n - 1}, /* count does not match */
            {LORA_TARGET_Q, w, 0},
        };
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            ck_assert_int_eq(fn(ad, bad[i].target, bad[i].w, bad[i].n), LORA_ERR_INVALID_ARG);
            ck_assert_msg(lora_adapter_last_error(ad)[0] == '\0', /* const: no message */
                          "case %zu: message '%s'", i, lora_adapter_last_error(ad));
        }
    }
    free(w);
    lora_adapter_destroy(ad);
}
END_TEST

static float *run_forward(lora_adapter *ad, const fx_spec *s, const float *x, int64_t batch,
                          int64_t len, int merged)
{
    const size_t n = (size_t)(batch * len * fx_out_cols(s));
    float *out = malloc(n * sizeof(float));
    ck_assert_ptr_nonnull(out);
    const int st = merged ? lora_forward_merged(ad, x, batch, len, out)
                          : lora_forward(ad, x, batch, len, out);
    ck_assert_msg(st == LORA_OK, "%s: %s", merged ? "forward_merged" : "forward",
                  lora_adapter_last_error(ad));
    return out;
}

static double max_rel(const float *x, const float *y, size_t n)
{
    double m = 0.0, d = 0.0;
    for (size_t i = 0; i < n; i++) {
        m = fmax(m, fabs((double)y[i]));
        d = fmax(d, fabs((double)x[i] - (double)y[i]));
    }
    return d / (m > 0.0 ? m : 1.0);
}

/* forward_merged = forward up to rounding, and bitwise = lora_forward of an adapter whose
 * base holds the merged weights and whose B is zero. */
START_TEST(test_forward_merged_matches)
{
    fx_spec s = fx_default();
    s.rslora = _i;
    const int64_t batch = 2, len = 6;
    const size_t nx = (size_t)(batch * len * s.d_model), nout = (size_t)(batch * len * s.d_model);
    float *x = malloc(nx * sizeof(float));
    fill_uniform(x, nx, 77, 1.0f);
    fx_base base;
    fx_base_make(&base, &s, 8);
    lora_adapter *ad = fx_adapter_nobase(&s, 4);
    fx_base_apply(&base, ad, 1);
    float *y = run_forward(ad, &s, x, batch, len, 0);
    float *ym = run_forward(ad, &s, x, batch, len, 1);
    const double rel = max_rel(ym, y, nout);
    ck_assert_msg(rel < 2e-6, "forward_merged vs forward: max rel error %g", rel);

    /* The same merged weights through lora_adapter_merge into a plain adapter. */
    fx_spec z = s;
    z.init = LORA_INIT_ZERO;
    z.keep_init = 1;
    lora_adapter *plain = fx_adapter_nobase(&z, 0);
    for (int t = 0; t < 4; t++) {
        float *w = malloc(base.nw[t] * sizeof(float));
        memcpy(w, base.w[t], base.nw[t] * sizeof(float));
        ck_assert_int_eq(lora_adapter_merge(ad, fx_tbits[t], w, base.nw[t]), LORA_OK);
        ck_assert_int_eq(lora_adapter_set_base(plain, fx_tbits[t], w, base.bias[t]), LORA_OK);
        free(w);
    }
    float *yp = run_forward(plain, &s, x, batch, len, 0);
    ck_assert_msg(memcmp(yp, ym, nout * sizeof(float)) == 0,
                  "forward_merged differs from a forward on merged weights: %g",
                  max_rel(ym, yp, nout));
    lora_run_info info = {.struct_size = sizeof info};
    ck_assert_int_eq(lora_adapter_get_run_info(ad, &info), LORA_OK);
    ck_assert_int_eq(info.backend, LORA_BACKEND_EXACT);
    free(y);
    free(ym);
    free(yp);
    free(x);
    lora_adapter_destroy(plain);
    lora_adapter_destroy(ad);
    fx_base_free(&base);
}
END_TEST

/* forward_merged between a forward and its backward changes nothing of the backward;
 * changing the factors rebuilds the merged weights. */
START_TEST(test_forward_merged_keeps_training_state)
{
    fx_spec s = fx_default();
    const int64_t batch = 2, len = 5;
    const size_t nx = (size_t)(batch * len * s.d_model);
    float *x = malloc(nx * sizeof(float)), *x2 = malloc(nx * sizeof(float));
    float *dout = malloc(nx * sizeof(float)), *dx1 = malloc(nx * sizeof(float));
    float *dx2 = malloc(nx * sizeof(float));
    fill_uniform(x, nx, 1, 1.0f);
    fill_uniform(x2, nx, 2, 1.0f);
    fill_uniform(dout, nx, 3, 1.0f);
    lora_adapter *a1 = fx_adapter(&s, 10), *a2 = fx_adapter(&s, 10);
    float *y1 = run_forward(a1, &s, x, batch, len, 0);
    float *y2 = run_forward(a2, &s, x, batch, len, 0);
    float *ym = run_forward(a2, &s, x2, batch, len, 1); /* in between */
    ck_assert_int_eq(lora_backward(a1, dout, dx1), LORA_OK);
    ck_assert_int_eq(lora_backward(a2, dout, dx2), LORA_OK);
    ck_assert(memcmp(dx1, dx2, nx * sizeof(float)) == 0);
    size_t n;
    float *p1 = fx_params(a1, &n);
    float *g1 = malloc(n * sizeof(float)), *g2 = malloc(n * sizeof(float));
    ck_assert_int_eq(lora_adapter_get_grads_flat(a1, g1, n), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_grads_flat(a2, g2, n), LORA_OK);
    ck_assert(memcmp(g1, g2, n * sizeof(float)) == 0);

    /* New factors: forward_merged follows them (the cache is rebuilt). */
    fx_randomize_factors(a2, 99, 0.5f);
    float *ya = run_forward(a2, &s, x2, batch, len, 0);
    float *yb = run_forward(a2, &s, x2, batch, len, 1);
    ck_assert_msg(max_rel(yb, ya, nx) < 2e-6, "after set_param: %g", max_rel(yb, ya, nx));
    ck_assert(max_rel(yb, ym, nx) > 1e-3); /* really different factors */
    free(p1);
    free(g1);
    free(g2);
    free(y1);
    free(y2);
    free(ym);
    free(ya);
    free(yb);
    free(x);
    free(x2);
    free(dout);
    free(dx1);
    free(dx2);
    lora_adapter_destroy(a1);
    lora_adapter_destroy(a2);
}
END_TEST

START_TEST(test_forward_merged_cross_matches)
{
    fx_spec s = fx_default();
    const int64_t batch = 2, lq = 1, lkv = 7; /* decoding one token against a cache */
    const size_t nq = (size_t)(batch * lq * s.d_model), nkv = (size_t)(batch * lkv * s.d_model);
    float *xq = malloc(nq * sizeof(float)), *xkv = malloc(nkv * sizeof(float));
    fill_uniform(xq, nq, 5, 1.0f);
    fill_uniform(xkv, nkv, 6, 1.0f);
    lora_adapter *ad = fx_adapter(&s, 12);
    float *y = malloc(nq * sizeof(float)), *ym = malloc(nq * sizeof(float));
    ck_assert_int_eq(lora_forward_cross(ad, xq, xkv, batch, lq, lkv, y), LORA_OK);
    ck_assert_int_eq(lora_forward_merged_cross(ad, xq, xkv, batch, lq, lkv, ym), LORA_OK);
    ck_assert_msg(max_rel(ym, y, nq) < 2e-6, "cross: %g", max_rel(ym, y, nq));
    /* Errors as lora_forward: NULL, shapes, NaN input, no base. */
    ck_assert_int_eq(lora_forward_merged(NULL, xq, 1, 1, y), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_forward_merged(ad, NULL, 1, 1, y), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_forward_merged(ad, xq, 1, 1, NULL), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_forward_merged(ad, xq, 0, 1, y), LORA_ERR_SHAPE);
    ck_assert_int_eq(lora_forward_merged_cross(ad, xq, NULL, 1, 1, 1, y), LORA_ERR_INVALID_ARG);
    xq[3] = NAN;
    ck_assert_int_eq(lora_forward_merged(ad, xq, 1, 1, y), LORA_ERR_NONFINITE);
    ck_assert(lora_adapter_last_error(ad)[0] != '\0');
    lora_adapter *nobase = fx_adapter_nobase(&s, 1);
    ck_assert_int_eq(lora_forward_merged(nobase, xkv, 1, 1, y), LORA_ERR_STATE);
    lora_adapter_destroy(nobase);
    free(xq);
    free(xkv);
    free(y);
    free(ym);
    lora_adapter_destroy(ad);
}
END_TEST

Suite *merge_suite(void)
{
    Suite *s = suite_create("merge");
    TCase *tc = tcase_create("merge");
    tcase_set_timeout(tc, 30);
    tcase_add_loop_test(tc, test_merge_roundtrip_bound, 0, 2);
    tcase_add_test(tc, test_merge_zero_b_exact);
    tcase_add_test(tc, test_merge_nonfinite_untouched);
    tcase_add_test(tc, test_merge_bad_arguments);
    suite_add_tcase(s, tc);
    tc = tcase_create("forward_merged");
    tcase_set_timeout(tc, 30);
    tcase_add_loop_test(tc, test_forward_merged_matches, 0, 2);
    tcase_add_test(tc, test_forward_merged_keeps_training_state);
    tcase_add_test(tc, test_forward_merged_cross_matches);
    suite_add_tcase(s, tc);
    return s;
}
