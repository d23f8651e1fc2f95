/* corners_suite: second tests, from other entry points, for corners that only one test
 * used to cover: SGD dampening and gradient clipping as known answers through the flat
 * gradient API, a hot swap (lora_adapter_copy_params) carrying the source's scale
 * into gradients and explicit merges, POLY under badly scaled queries and keys, and the
 * smallest run-info struct accepted. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "fixtures.h"
#include "helpers.h"
#include "suites.h"

static lora_adapter *small_adapter(double alpha, int rslora, uint64_t seed)
{
    fx_spec s = fx_default();
    s.alpha = alpha;
    s.rslora = rslora;
    return fx_adapter(&s, seed);
}

static float *flat_params(const lora_adapter *ad, size_t *n)
{
    ck_assert_int_eq(lora_adapter_param_count(ad, n), LORA_OK);
    float *p = malloc(*n * sizeof(float));
    ck_assert_ptr_nonnull(p);
    ck_assert_int_eq(lora_adapter_get_params_flat(ad, p, *n), LORA_OK);
    return p;
}

/* torch.optim.SGD with momentum μ and dampening τ: buf = g on the first step, then
 * buf = μ·buf + (1 − τ)·g; p -= lr·buf. Gradients set directly (set_grads_flat). */
START_TEST(test_sgd_dampening_known_answer)
{
    const double dampening[2] = {1.0, 0.75};
    const double lr = 0.1, mu = 0.5;
    lora_adapter *ad = small_adapter(8.0, 0, 31);
    size_t n;
    float *p0 = flat_params(ad, &n);
    float *g = malloc(n * sizeof(float)), *got = malloc(n * sizeof(float));
    double *want = malloc(n * sizeof(double)), *buf = malloc(n * sizeof(double));
    ck_assert(g && got && want && buf);
    lora_optimizer *opt = NULL;
    ck_assert_int_eq(lora_optimizer_create(&opt, ad, LORA_OPTIMIZER_SGD), LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_LR, lr), LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_MOMENTUM, mu), LORA_OK);
    for (int c = 0; c < 2; c++) {
        ck_assert_int_eq(lora_optimizer_reset(opt), LORA_OK);
        ck_assert_int_eq(lora_adapter_set_params_flat(ad, p0, n), LORA_OK);
        ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_DAMPENING, dampening[c]),
                         LORA_OK);
        for (size_t i = 0; i < n; i++)
            want[i] = p0[i];
        for (int step = 0; step < 4; step++) {
            fill_uniform(g, n, 40u + (uint64_t)step, 1.0f);
            ck_assert_int_eq(lora_adapter_set_grads_flat(ad, g, n), LORA_OK);
            ck_assert_int_eq(lora_optimizer_step(opt, ad), LORA_OK);
            for (size_t i = 0; i < n; i++) {
                buf[i] = step == 0 ? g[i] : mu * buf[i] + (1.0 - dampening[c]) * g[i];
                want[i] = (float)(want[i] - lr * buf[i]);
            }
            ck_assert_int_eq(lora_adapter_get_params_flat(ad, got, n), LORA_OK);
            for (size_t i = 0; i < n; i++)
                ck_assert_msg(fabs(got[i] - want[i]) <= 1e-6 * (1.0 + fabs(want[i])),
                              "dampening %g step %d param %zu: %.9g, want %.9g",
                              dampening[c], step + 1, i, got[i], want[i]);
        }
    }
    lora_optimizer_destroy(opt);
    lora_adapter_destroy(ad);
    free(p0);
    free(g);
    free(got);
    free(want);
    free(buf);
}
END_TEST

/* clip_grad_norm_: coef = max_norm / (‖g‖ + 1e-6), applied when below 1. With ‖g‖ near
 * 1e-6 the 1e-6 halves the coefficient, so it must be there. */
START_TEST(test_clip_tiny_norm_known_answer)
{
    lora_adapter *ad = small_adapter(8.0, 0, 32);
    size_t n;
    float *p = flat_params(ad, &n);
    float *g = malloc(n * sizeof(float));
    ck_assert_ptr_nonnull(g);
    memset(p, 0, n * sizeof(float));
    ck_assert_int_eq(lora_adapter_set_params_flat(ad, p, n), LORA_OK);
    fill_uniform(g, n, 41, 1.0f);
    double norm = 0.0;
    for (size_t i = 0; i < n; i++)
        norm += (double)g[i] * g[i];
    const float unit = (float)(1e-6 / sqrt(norm)); /* ‖g‖ becomes ~1e-6 */
    norm = 0.0;
    for (size_t i = 0; i < n; i++) {
        g[i] *= unit;
        norm += (double)g[i] * g[i];
    }
    norm = sqrt(norm);
    ck_assert_int_eq(lora_adapter_set_grads_flat(ad, g, n), LORA_OK);
    lora_optimizer *opt = NULL;
    ck_assert_int_eq(lora_optimizer_create(&opt, ad, LORA_OPTIMIZER_SGD), LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_LR, 1.0), LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_MAX_GRAD_NORM, 1e-7), LORA_OK);
    ck_assert_int_eq(lora_optimizer_step(opt, ad), LORA_OK);
    const double coef = 1e-7 / (norm + 1e-6);
    ck_assert_int_eq(lora_adapter_get_params_flat(ad, p, n), LORA_OK);
    for (size_t i = 0; i < n; i++) {
        const double want = -(double)g[i] * coef;
        ck_assert_msg(fabs(p[i] - want) <= 1e-6 * fabs(want) + 1e-30,
                      "param %zu: %.9g, want %.9g (norm %.3g, coef %.6g)", i, p[i], want, norm,
                      coef);
    }
    lora_optimizer_destroy(opt);
    lora_adapter_destroy(ad);
    free(p);
    free(g);
}
END_TEST

/* One forward + backward of ad on fixed inputs; returns the flat gradients. */
static float *grads_of(lora_adapter *ad, size_t n)
{
    const fx_spec s = fx_default();
    const int64_t batch = 2, len = 6;
    const size_t nx = (size_t)(batch * len * s.d_model), ny = (size_t)(batch * len) *
                                                             (size_t)fx_out_cols(&s);
    float *x = malloc(nx * sizeof(float)), *y = malloc(ny * sizeof(float));
    float *g = malloc(n * sizeof(float));
    ck_assert(x && y && g);
    fill_uniform(x, nx, 61, 1.0f);
    ck_assert_int_eq(lora_adapter_zero_grad(ad), LORA_OK);
    ck_assert_int_eq(lora_forward(ad, x, batch, len, y), LORA_OK);
    fill_uniform(y, ny, 62, 1.0f); /* dout */
    ck_assert_int_eq(lora_backward(ad, y, NULL), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_grads_flat(ad, g, n), LORA_OK);
    free(x);
    free(y);
    return g;
}

/* After copy_params, the worker's gradients and explicit merges are the source's: the
 * scale (alpha, rsLoRA) travels with the factors. Swapped in both directions between a
 * plain and an rsLoRA adapter of different alpha. */
START_TEST(test_hot_swap_scale_in_gradients_and_merge)
{
    fx_spec s = fx_default();
    fx_base base;
    fx_base_make(&base, &s, 63);
    fx_spec sa = s, sb = s;
    sa.alpha = 2.0;
    sb.alpha = 12.0;
    sb.rslora = 1;
    lora_adapter *a = fx_adapter_nobase(&sa, 64), *b = fx_adapter_nobase(&sb, 65);
    lora_adapter *worker = fx_adapter_nobase(&sa, 66);
    fx_base_apply(&base, a, 1);
    fx_base_apply(&base, b, 1);
    fx_base_apply(&base, worker, 1);
    size_t n;
    ck_assert_int_eq(lora_adapter_param_count(a, &n), LORA_OK);
    lora_adapter *order[3] = {b, a, b};
    for (int k = 0; k < 3; k++) {
        lora_adapter *src = order[k];
        ck_assert_int_eq(lora_adapter_copy_params(worker, src), LORA_OK);
        float *gw = grads_of(worker, n), *gs = grads_of(src, n);
        ck_assert_msg(memcmp(gw, gs, n * sizeof(float)) == 0,
                      "swap %d: worker's gradients differ from the source's", k);
        free(gw);
        free(gs);
        const size_t nw = base.nw[0];
        float *w1 = malloc(nw * sizeof(float)), *w2 = malloc(nw * sizeof(float));
        ck_assert(w1 && w2);
        memcpy(w1, base.w[0], nw * sizeof(float));
        memcpy(w2, base.w[0], nw * sizeof(float));
        ck_assert_int_eq(lora_adapter_merge(worker, LORA_TARGET_Q, w1, nw), LORA_OK);
        ck_assert_int_eq(lora_adapter_merge(src, LORA_TARGET_Q, w2, nw), LORA_OK);
        ck_assert_msg(memcmp(w1, w2, nw * sizeof(float)) == 0,
                      "swap %d: worker's merged W_Q differs from the source's", k);
        free(w1);
        free(w2);
    }
    lora_adapter_destroy(a);
    lora_adapter_destroy(b);
    lora_adapter_destroy(worker);
    fx_base_free(&base);
}
END_TEST

/* POLY's features are powers of the query and key entries (degree 8 here): with W_Q
 * scaled by 2^-20 and W_K by 2^20 the scores are unchanged, but unbalanced feature maps
 * would overflow (k^8 ~ 2^160) and underflow in float. The backend balances the two
 * norms, so it still matches the reference. */
START_TEST(test_poly_unbalanced_query_key_scales)
{
    const ref_config c = {.d_model = 8, .n_heads = 2, .rank = 2, .targets = LORA_TARGET_V};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 67, 1.5, 0.5);
    for (int64_t i = 0; i < l.out[REF_Q] * l.in[REF_Q]; i++)
        l.w[REF_Q][i] = ldexp(l.w[REF_Q][i], -20);
    for (int64_t i = 0; i < l.out[REF_K] * l.in[REF_K]; i++)
        l.w[REF_K][i] = ldexp(l.w[REF_K][i], 20);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, 24, 0, 68), 0);
    const double r = problem_set_score_bound(&l, &p, 1.0);
    ck_assert(r > 0.5 && r < 1.5);
    const ref_param xp[] = {{LORA_CFG_POLY_DEGREE, 0, 8, 0.0}};
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_POLY, 1, xp, 1, &ad), LORA_OK);
    ref_errors e;
    char msg[512];
    ref_compare_adapter(ad, &l, &p, &e);
    ck_assert_msg(e.status == LORA_OK && e.max <= 1e-3, "POLY degree 8, R %.3g: %s", r,
                  ref_errors_format(&e, msg, sizeof msg));
    lora_adapter_destroy(ad);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* lora_run_info's first version ends with measured_dq_error (poly_groups was appended):
 * exactly that size is filled and nothing past it is written; one byte less is refused. */
START_TEST(test_run_info_first_version_size)
{
    tfx f;
    tfx_init(&f, 0, 1);
    ck_assert_int_eq(tfx_step(&f), LORA_OK);
    const size_t first = offsetof(lora_run_info, measured_dq_error) + sizeof(double);
    union {
        lora_run_info info;
        unsigned char bytes[sizeof(lora_run_info)];
    } u;
    memset(&u, 0xab, sizeof u);
    u.info.struct_size = (uint32_t)first;
    ck_assert_int_eq(lora_adapter_get_run_info(f.ad, &u.info), LORA_OK);
    ck_assert_uint_eq(u.info.struct_size, first);
    ck_assert_int_eq(u.info.backend, LORA_BACKEND_EXACT);
    ck_assert_double_eq(u.info.measured_dq_error, -1.0);
    for (size_t i = first; i < sizeof u; i++)
        ck_assert_msg(u.bytes[i] == 0xab, "byte %zu past struct_size %zu written", i, first);
    u.info.struct_size = (uint32_t)(first - 1);
    ck_assert_int_eq(lora_adapter_get_run_info(f.ad, &u.info), LORA_ERR_INVALID_ARG);
    tfx_free(&f);
}
END_TEST

Suite *corners_suite(void)
{
    Suite *s = suite_create("corners");
    TCase *tc = tcase_create("second_angles");
    tcase_add_test(tc, test_sgd_dampening_known_answer);
    tcase_add_test(tc, test_clip_tiny_norm_known_answer);
    tcase_add_test(tc, test_hot_swap_scale_in_gradients_and_merge);
    tcase_add_test(tc, test_poly_unbalanced_query_key_scales);
    tcase_add_test(tc, test_run_info_first_version_size);
    suite_add_tcase(s, tc);
    return s;
}
