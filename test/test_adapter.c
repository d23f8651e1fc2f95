/* adapter_suite: parameter shapes, resolved config getters, LoRA initialisation,
 * set/get round trips, base replacement, run info. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "suites.h"

static const int targets4[4] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V, LORA_TARGET_O};

/* d_model 10, 4 heads of 3 over 2 kv heads, rank 3, OUT_PROJ, the given targets. */
static lora_adapter *shaped_adapter(int targets, int init, int64_t seed)
{
    lora_config *cfg = cfg_new(10);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, 4), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, 2), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_HEAD_DIM, 3), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RANK, 3), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_OUT_PROJ, 1), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_TARGETS, targets), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_INIT, init), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_SEED, seed), LORA_OK);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    lora_config_destroy(cfg);
    return ad;
}

START_TEST(test_param_shapes)
{
    lora_adapter *ad = shaped_adapter(15, LORA_INIT_KAIMING_ZERO, 0);
    /* q_dim = 12, kv_dim = 6, d_model = 10, rank 3. */
    const int64_t a_rows[4] = {3, 3, 3, 3}, a_cols[4] = {10, 10, 10, 12};
    const int64_t b_rows[4] = {12, 6, 6, 10}, b_cols[4] = {3, 3, 3, 3};
    for (int t = 0; t < 4; t++) {
        int64_t r = -1, c = -1;
        ck_assert_int_eq(lora_adapter_param_shape(ad, targets4[t], LORA_A, &r, &c), LORA_OK);
        ck_assert_msg(r == a_rows[t] && c == a_cols[t], "A of target %d is (%lld, %lld)",
                      targets4[t], (long long)r, (long long)c);
        ck_assert_int_eq(lora_adapter_param_shape(ad, targets4[t], LORA_B, &r, &c), LORA_OK);
        ck_assert_msg(r == b_rows[t] && c == b_cols[t], "B of target %d is (%lld, %lld)",
                      targets4[t], (long long)r, (long long)c);
        /* count = rows*cols is what set/get_param take. */
        float buf[64];
        ck_assert_int_eq(lora_adapter_get_param(ad, targets4[t], LORA_A, buf,
                                                (size_t)(a_rows[t] * a_cols[t])),
                         LORA_OK);
        ck_assert_int_eq(lora_adapter_get_param(ad, targets4[t], LORA_B, buf,
                                                (size_t)(b_rows[t] * b_cols[t])),
                         LORA_OK);
    }
    lora_adapter_destroy(ad);

    /* Targets not adapted have no shape. */
    ad = shaped_adapter(LORA_TARGET_Q | LORA_TARGET_V, LORA_INIT_KAIMING_ZERO, 0);
    int64_t r = 0, c = 0;
    ck_assert_int_eq(lora_adapter_param_shape(ad, LORA_TARGET_Q, LORA_A, &r, &c), LORA_OK);
    ck_assert_int_eq(lora_adapter_param_shape(ad, LORA_TARGET_K, LORA_A, &r, &c),
                     LORA_ERR_INVALID_ARG);
    ck_assert_str_eq(lora_adapter_last_error(ad), ""); /* const: no message (lora.h, Threads) */
    ck_assert_int_eq(lora_adapter_param_shape(ad, LORA_TARGET_O, LORA_B, &r, &c),
                     LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_param_shape(ad, LORA_TARGET_V, 2, &r, &c),
                     LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_param_shape(ad, 3, LORA_A, &r, &c), LORA_ERR_INVALID_ARG);
    lora_adapter_destroy(ad);
}
END_TEST

START_TEST(test_adapter_config_getters)
{
    lora_config *cfg = cfg_new(12);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, 3), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RANK, 4), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_THREADS, 2), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_CAUSAL, 1), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_SEED, 99), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RSLORA, 1), LORA_OK);
    ck_assert_int_eq(lora_config_set_double(cfg, LORA_CFG_TOLERANCE, 0.01), LORA_OK);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    lora_config_destroy(cfg);
    const struct {
        int p;
        int64_t v;
    } ints[] = {{LORA_CFG_D_MODEL, 12}, {LORA_CFG_N_HEADS, 3},   {LORA_CFG_N_KV_HEADS, 3},
                {LORA_CFG_HEAD_DIM, 4}, {LORA_CFG_TARGETS, 5},   {LORA_CFG_RANK, 4},
                {LORA_CFG_RSLORA, 1},   {LORA_CFG_CAUSAL, 1},    {LORA_CFG_BACKEND, 0},
                {LORA_CFG_THREADS, 2},  {LORA_CFG_SEED, 99},     {LORA_CFG_INIT, 0},
                {LORA_CFG_OUT_PROJ, 0}, {LORA_CFG_POLY_DEGREE, 0}};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        int64_t v = -7;
        ck_assert_int_eq(lora_adapter_get_config_int(ad, ints[i].p, &v), LORA_OK);
        ck_assert_msg(v == ints[i].v, "param %d reads %lld, want %lld", ints[i].p,
                      (long long)v, (long long)ints[i].v);
    }
    double d = 0.0;
    ck_assert_int_eq(lora_adapter_get_config_double(ad, LORA_CFG_ALPHA, &d), LORA_OK);
    ck_assert_double_eq(d, 4.0);
    ck_assert_int_eq(lora_adapter_get_config_double(ad, LORA_CFG_SOFTMAX_SCALE, &d), LORA_OK);
    ck_assert_double_eq_tol(d, 0.5, 1e-15);
    ck_assert_int_eq(lora_adapter_get_config_double(ad, LORA_CFG_TOLERANCE, &d), LORA_OK);
    ck_assert_double_eq(d, 0.01);
    /* Wrong type, unknown params. */
    int64_t v;
    ck_assert_int_eq(lora_adapter_get_config_int(ad, LORA_CFG_ALPHA, &v), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_get_config_double(ad, LORA_CFG_RANK, &d),
                     LORA_ERR_INVALID_ARG);
    const int unknown[] = {0, CFG_PARAM_UNKNOWN, -1, 1000};
    for (size_t i = 0; i < 4; i++) {
        ck_assert_int_eq(lora_adapter_get_config_int(ad, unknown[i], &v), LORA_ERR_INVALID_ARG);
        ck_assert_int_eq(lora_adapter_get_config_double(ad, unknown[i], &d),
                         LORA_ERR_INVALID_ARG);
    }
    lora_adapter_destroy(ad);

    /* THREADS = 0 resolves to a positive count. */
    cfg = cfg_new(8);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_THREADS, 0), LORA_OK);
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    lora_config_destroy(cfg);
    v = 0;
    ck_assert_int_eq(lora_adapter_get_config_int(ad, LORA_CFG_THREADS, &v), LORA_OK);
    ck_assert_int_ge(v, 1);
    lora_adapter_destroy(ad);
}
END_TEST

/* Reads A and B of every adapted target of a shaped_adapter. */
static void read_factors(lora_adapter *ad, int t, float *a, size_t na, float *b, size_t nb)
{
    ck_assert_int_eq(lora_adapter_get_param(ad, targets4[t], LORA_A, a, na), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_param(ad, targets4[t], LORA_B, b, nb), LORA_OK);
}

START_TEST(test_init_kaiming_zero)
{
    const size_t na[4] = {30, 30, 30, 36}, nb[4] = {36, 18, 18, 30};
    const double in[4] = {10, 10, 10, 12};
    lora_adapter *ad = shaped_adapter(15, LORA_INIT_KAIMING_ZERO, 5);
    lora_adapter *same = shaped_adapter(15, LORA_INIT_KAIMING_ZERO, 5);
    lora_adapter *other = shaped_adapter(15, LORA_INIT_KAIMING_ZERO, 6);
    for (int t = 0; t < 4; t++) {
        float a[64], b[64], a2[64], b2[64], a3[64], b3[64];
        read_factors(ad, t, a, na[t], b, nb[t]);
        read_factors(same, t, a2, na[t], b2, nb[t]);
        read_factors(other, t, a3, na[t], b3, nb[t]);
        const double bound = 1.0 / sqrt(in[t]);
        double mx = 0.0, sq = 0.0;
        for (size_t i = 0; i < na[t]; i++) {
            ck_assert_msg(fabs(a[i]) <= bound * (1.0 + 1e-6), "target %d: |A| = %g > 1/sqrt(%g)",
                          targets4[t], (double)a[i], in[t]);
            mx = fabs(a[i]) > mx ? fabs(a[i]) : mx;
            sq += (double)a[i] * a[i];
        }
        /* Uniform on [-bound, bound]: not degenerate, spread about bound/sqrt(3). */
        ck_assert_msg(mx > 0.5 * bound, "target %d: A is too narrow (max %g)", targets4[t], mx);
        const double rms = sqrt(sq / (double)na[t]);
        ck_assert_msg(rms > 0.3 * bound && rms < 0.85 * bound, "target %d: A rms %g, bound %g",
                      targets4[t], rms, bound);
        for (size_t i = 0; i < nb[t]; i++)
            ck_assert_msg(b[i] == 0.0f, "target %d: B[%zu] = %g, want 0", targets4[t], i,
                          (double)b[i]);
        ck_assert_msg(memcmp(a, a2, na[t] * sizeof(float)) == 0,
                      "target %d: same seed gave a different A", targets4[t]);
        ck_assert_msg(memcmp(a, a3, na[t] * sizeof(float)) != 0,
                      "target %d: different seeds gave the same A", targets4[t]);
    }
    /* Different targets do not share one stream (A of Q differs from A of K). */
    float aq[30], ak[30];
    ck_assert_int_eq(lora_adapter_get_param(ad, LORA_TARGET_Q, LORA_A, aq, 30), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_param(ad, LORA_TARGET_K, LORA_A, ak, 30), LORA_OK);
    ck_assert(memcmp(aq, ak, sizeof aq) != 0);
    /* Gradients start at zero. */
    float g[64];
    for (int t = 0; t < 4; t++) {
        ck_assert_int_eq(lora_adapter_get_grad(ad, targets4[t], LORA_A, g, na[t]), LORA_OK);
        for (size_t i = 0; i < na[t]; i++)
            ck_assert(g[i] == 0.0f);
        ck_assert_int_eq(lora_adapter_get_grad(ad, targets4[t], LORA_B, g, nb[t]), LORA_OK);
        for (size_t i = 0; i < nb[t]; i++)
            ck_assert(g[i] == 0.0f);
    }
    lora_adapter_destroy(ad);
    lora_adapter_destroy(same);
    lora_adapter_destroy(other);
}
END_TEST

START_TEST(test_init_gaussian)
{
    /* d_model 512, rank 4, Q|K|V: 3 * 2048 samples of N(0, (1/4)^2). */
    lora_config *cfg = cfg_new(512);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RANK, 4), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_TARGETS, 7), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_INIT, LORA_INIT_GAUSSIAN), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_SEED, 1234), LORA_OK);
    lora_adapter *ad = NULL, *same = NULL;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    ck_assert_int_eq(lora_adapter_create(&same, cfg), LORA_OK);
    lora_config_destroy(cfg);
    enum { NA = 4 * 512, NB = 512 * 4 };
    static float a[NA], a2[NA], b[NB];
    double sum = 0.0, sq = 0.0;
    for (int t = 0; t < 3; t++) {
        ck_assert_int_eq(lora_adapter_get_param(ad, targets4[t], LORA_A, a, NA), LORA_OK);
        ck_assert_int_eq(lora_adapter_get_param(same, targets4[t], LORA_A, a2, NA), LORA_OK);
        ck_assert(memcmp(a, a2, sizeof a) == 0);
        ck_assert_int_eq(lora_adapter_get_param(ad, targets4[t], LORA_B, b, NB), LORA_OK);
        for (int i = 0; i < NB; i++)
            ck_assert(b[i] == 0.0f);
        for (int i = 0; i < NA; i++) {
            sum += a[i];
            sq += (double)a[i] * a[i];
        }
    }
    const double n = 3.0 * NA, mean = sum / n, sd = sqrt(sq / n - mean * mean);
    /* Standard errors: mean 0.25/sqrt(6144) = 0.003, sd about 0.9%. */
    ck_assert_msg(fabs(mean) < 0.02, "GAUSSIAN mean %g, want ~0", mean);
    ck_assert_msg(fabs(sd - 0.25) < 0.0125, "GAUSSIAN sd %g, want 1/r = 0.25", sd);
    lora_adapter_destroy(ad);
    lora_adapter_destroy(same);
}
END_TEST

START_TEST(test_init_zero)
{
    lora_adapter *ad = shaped_adapter(15, LORA_INIT_ZERO, 77);
    const size_t na[4] = {30, 30, 30, 36}, nb[4] = {36, 18, 18, 30};
    for (int t = 0; t < 4; t++) {
        float a[64], b[64];
        read_factors(ad, t, a, na[t], b, nb[t]);
        for (size_t i = 0; i < na[t]; i++)
            ck_assert(a[i] == 0.0f);
        for (size_t i = 0; i < nb[t]; i++)
            ck_assert(b[i] == 0.0f);
    }
    lora_adapter_destroy(ad);
}
END_TEST

START_TEST(test_set_get_param_roundtrip)
{
    lora_adapter *ad = shaped_adapter(LORA_TARGET_K | LORA_TARGET_O, LORA_INIT_ZERO, 0);
    float src[36], dst[36];
    fill_uniform(src, 36, 3, 2.0f);
    ck_assert_int_eq(lora_adapter_set_param(ad, LORA_TARGET_O, LORA_A, src, 36), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_param(ad, LORA_TARGET_O, LORA_A, dst, 36), LORA_OK);
    ck_assert(memcmp(src, dst, sizeof src) == 0);
    ck_assert_int_eq(lora_adapter_set_param(ad, LORA_TARGET_K, LORA_B, src, 18), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_param(ad, LORA_TARGET_K, LORA_B, dst, 18), LORA_OK);
    ck_assert(memcmp(src, dst, 18 * sizeof(float)) == 0);
    /* The other factors are untouched. */
    ck_assert_int_eq(lora_adapter_get_param(ad, LORA_TARGET_K, LORA_A, dst, 30), LORA_OK);
    for (int i = 0; i < 30; i++)
        ck_assert(dst[i] == 0.0f);
    lora_adapter_destroy(ad);
}
END_TEST

/* Replacing a base weight (and removing a bias) takes effect on the next forward. */
START_TEST(test_set_base_replaces)
{
    tfx f;
    tfx_init(&f, 0, 1);
    tfx_assert_works(&f);
    ref_layer_randomize(&f.l, 99, 1.0, 0.3); /* new W, bias, A, B for every projection */
    for (int t = 0; t < REF_NPROJ; t++) {
        float w[128], a[64], b[64];
        const size_t nw = (size_t)(f.l.out[t] * f.l.in[t]);
        const size_t na = (size_t)(f.l.rank * f.l.in[t]), nb = (size_t)(f.l.out[t] * f.l.rank);
        ck_assert(nw <= 128 && na <= 64 && nb <= 64);
        ref_to_float(f.l.w[t], w, nw);
        /* Q and O lose their bias in both. */
        const int drop_bias = t == REF_Q || t == REF_O;
        float bias[16];
        if (drop_bias) {
            free(f.l.bias[t]);
            f.l.bias[t] = NULL;
        } else {
            ref_to_float(f.l.bias[t], bias, (size_t)f.l.out[t]);
        }
        ck_assert_int_eq(lora_adapter_set_base(f.ad, targets4[t], w, drop_bias ? NULL : bias),
                         LORA_OK);
        ref_to_float(f.l.a[t], a, na);
        ref_to_float(f.l.b[t], b, nb);
        ck_assert_int_eq(lora_adapter_set_param(f.ad, targets4[t], LORA_A, a, na), LORA_OK);
        ck_assert_int_eq(lora_adapter_set_param(f.ad, targets4[t], LORA_B, b, nb), LORA_OK);
    }
    tfx_assert_works(&f);
    tfx_free(&f);
}
END_TEST

/* Every version of lora_run_info has at least the fields up to grad_bound. */
#define RUN_INFO_MIN_SIZE (offsetof(lora_run_info, grad_bound) + sizeof(double))

START_TEST(test_run_info)
{
    lora_config *cfg = cfg_new(8);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, 2), LORA_OK);
    {
        ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_BACKEND, LORA_BACKEND_EXACT), LORA_OK);
        lora_adapter *ad = adapter_new(cfg, 4);
        lora_run_info info;
        memset(&info, 0xff, sizeof info);
        info.struct_size = sizeof info;
        ck_assert_int_eq(lora_adapter_get_run_info(ad, &info), LORA_OK);
        ck_assert_int_eq(info.backend, 0); /* nothing ran yet */
        float x[3 * 8], out[3 * 8], dx[3 * 8];
        fill_uniform(x, 24, 1, 1.0f);
        ck_assert_int_eq(lora_forward(ad, x, 1, 3, out), LORA_OK);
        memset(&info, 0xff, sizeof info);
        info.struct_size = sizeof info;
        ck_assert_int_eq(lora_adapter_get_run_info(ad, &info), LORA_OK);
        ck_assert_int_eq(info.backend, LORA_BACKEND_EXACT);
        ck_assert_int_eq(info.poly_degree, 0);
        ck_assert_int_eq(info.poly_rank, 0);
        ck_assert_double_eq(info.error_bound, 0.0);
        ck_assert_msg(isfinite(info.score_bound) && info.score_bound > 0.0,
                      "score_bound %g after forward", info.score_bound);
        ck_assert_double_eq(info.measured_out_error, -1.0); /* not measured for EXACT */
        ck_assert_int_eq(lora_backward(ad, out, dx), LORA_OK);
        memset(&info, 0, sizeof info);
        info.struct_size = sizeof info;
        ck_assert_int_eq(lora_adapter_get_run_info(ad, &info), LORA_OK);
        ck_assert_int_eq(info.backend, LORA_BACKEND_EXACT);
        ck_assert_double_eq(info.grad_bound, 0.0);
        ck_assert_double_eq(info.measured_dq_error, -1.0);

        /* struct_size smaller than the first version of the struct (which has at least
         * every field up to grad_bound). */
        const uint32_t small[] = {0, 4, 8, (uint32_t)RUN_INFO_MIN_SIZE - 1};
        for (size_t i = 0; i < sizeof small / sizeof small[0]; i++) {
            info.struct_size = small[i];
            ck_assert_int_eq(lora_adapter_get_run_info(ad, &info), LORA_ERR_INVALID_ARG);
            ck_assert_str_eq(lora_adapter_last_error(ad), ""); /* const: no message (lora.h, Threads) */
        }
        /* A newer, larger caller struct: the bytes past ours are left alone. */
        union {
            lora_run_info info;
            unsigned char bytes[sizeof(lora_run_info) + 16];
        } big;
        memset(&big, 0xab, sizeof big);
        big.info.struct_size = (uint32_t)sizeof big;
        ck_assert_int_eq(lora_adapter_get_run_info(ad, &big.info), LORA_OK);
        ck_assert_int_eq(big.info.backend, LORA_BACKEND_EXACT);
        for (size_t i = sizeof(lora_run_info); i < sizeof big; i++)
            ck_assert_msg(big.bytes[i] == 0xab, "run_info wrote past its struct (byte %zu)", i);
        lora_adapter_destroy(ad);
    }
    /* AUTO reports the backend it chose. */
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_BACKEND, LORA_BACKEND_AUTO), LORA_OK);
    lora_adapter *ad = adapter_new(cfg, 4);
    float x[3 * 8], out[3 * 8];
    fill_uniform(x, 24, 1, 1.0f);
    ck_assert_int_eq(lora_forward(ad, x, 1, 3, out), LORA_OK);
    lora_run_info info = {.struct_size = sizeof info};
    ck_assert_int_eq(lora_adapter_get_run_info(ad, &info), LORA_OK);
    ck_assert(info.backend == LORA_BACKEND_EXACT || info.backend == LORA_BACKEND_POLY);
    lora_adapter_destroy(ad);
    lora_config_destroy(cfg);
}
END_TEST

Suite *adapter_suite(void)
{
    Suite *s = suite_create("adapter");
    TCase *tc = tcase_create("adapter");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_param_shapes);
    tcase_add_test(tc, test_adapter_config_getters);
    tcase_add_test(tc, test_set_get_param_roundtrip);
    tcase_add_test(tc, test_set_base_replaces);
    tcase_add_test(tc, test_run_info);
    suite_add_tcase(s, tc);
    tc = tcase_create("init");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_init_kaiming_zero);
    tcase_add_test(tc, test_init_gaussian);
    tcase_add_test(tc, test_init_zero);
    suite_add_tcase(s, tc);
    return s;
}
