/* bf16_suite: LORA_CFG_COMPUTE = LORA_COMPUTE_BF16 against the double reference
 * (relative error <= 1e-2 for out, every dA, dB and dx), lora_run_info's
 * attention_compute, the refusal on a CPU without AVX512_BF16 (LORA_DISABLE_BF16 masks
 * the instructions), and fp32 results bitwise unchanged by the bf16 code. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "suites.h"

#define TOL_BF16 1e-2

static int cpu_has_bf16(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
    return 0;
#endif
}

typedef struct bf16_case {
    ref_config c;
    int cross, batch, len_q, len_kv, threads;
    int32_t attention; /* expected run_info.attention_compute */
} bf16_case;

/* head_dim a multiple of 16 runs the bf16 tiles; 7 runs only the projections in bf16. */
static const bf16_case cases[] = {
    /* 0: GQA 4/2 heads of 16, everything on, causal, batch 2, L across a k pair */
    {{.d_model = 64, .n_heads = 4, .n_kv_heads = 2, .rank = 4, .targets = 15, .out_proj = 1,
      .bias = 1, .causal = 1},
     0, 2, 77, 0, 2, LORA_COMPUTE_BF16},
    /* 1: 2 heads of 64, causal, RoPE, L 300 over two key tiles, one thread */
    {{.d_model = 128, .n_heads = 2, .rank = 8, .targets = 7, .causal = 1,
      .rope = REF_ROPE_HALF},
     0, 1, 300, 0, 1, LORA_COMPUTE_BF16},
    /* 2: cross, 3 heads of 32, 41 queries over 270 keys (odd sums in every product) */
    {{.d_model = 96, .n_heads = 3, .rank = 4, .targets = 15, .out_proj = 1}, 1, 1, 41, 270, 2,
     LORA_COMPUTE_BF16},
    /* 3: one head of 48, batch 1 on 2 threads (the key-split backward), window, softcap */
    {{.d_model = 48, .rank = 2, .targets = 3, .causal = 1, .window = 100, .softcap = 30.0},
     0, 1, 520, 0, 2, LORA_COMPUTE_BF16},
    /* 4: head_dim 7: attention in fp32, projections in bf16 (odd widths, odd d_model) */
    {{.d_model = 17, .n_heads = 2, .n_kv_heads = 1, .head_dim = 7, .rank = 2, .targets = 15,
      .out_proj = 1, .causal = 1, .bias = 1},
     0, 2, 33, 0, 2, LORA_COMPUTE_F32},
};
#define N_CASES ((int)(sizeof cases / sizeof cases[0]))

static const ref_param compute_bf16 = {LORA_CFG_COMPUTE, 0, LORA_COMPUTE_BF16, 0.0};

/* Forward + backward of ad on p against l; returns the errors, asserting it ran. */
static ref_errors compare(lora_adapter *ad, const ref_layer *l, const ref_problem *p,
                          const char *what, int32_t *attention)
{
    ref_errors e;
    char err[512];
    ck_assert_msg(ref_compare_adapter(ad, l, p, &e) == LORA_OK, "%s: %s", what,
                  ref_errors_format(&e, err, sizeof err));
    lora_run_info info = {.struct_size = sizeof info};
    ck_assert_int_eq(lora_adapter_get_run_info(ad, &info), LORA_OK);
    *attention = info.attention_compute;
    return e;
}

START_TEST(test_bf16_vs_reference)
{
    const bf16_case *k = &cases[_i];
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &k->c), 0);
    ref_layer_randomize(&l, 1700 + (uint64_t)_i, 1.5, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, k->cross, k->batch, k->len_q, k->len_kv,
                                      1800 + (uint64_t)_i), 0);
    lora_adapter *ad = NULL;
    const int st = ref_make_adapter_ex(&l, LORA_BACKEND_EXACT, k->threads, &compute_bf16, 1, &ad);
    if (!cpu_has_bf16()) {
        ck_assert_int_eq(st, LORA_ERR_UNSUPPORTED);
        ref_problem_free(&p);
        ref_layer_free(&l);
        return;
    }
    ck_assert_int_eq(st, LORA_OK);
    char desc[512], err[512];
    int32_t attention = -1, attention32 = -1;
    const ref_errors e = compare(ad, &l, &p, "bf16", &attention);
    lora_adapter_destroy(ad);
    ck_assert_msg(e.max <= TOL_BF16, "bf16 vs reference: %s [%s]",
                  ref_errors_format(&e, err, sizeof err), ref_describe(&l, &p, desc, sizeof desc));
    ck_assert_msg(e.ref_grad_max > 1e-3, "degenerate case: max|grad| %g", e.ref_grad_max);
    ck_assert_int_eq(attention, k->attention);
    /* bf16 really ran: fp32 on the same layer is far closer to the reference. */
    ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_EXACT, k->threads, &ad), LORA_OK);
    const ref_errors e32 = compare(ad, &l, &p, "fp32", &attention32);
    lora_adapter_destroy(ad);
    ck_assert_int_eq(attention32, LORA_COMPUTE_F32);
    ck_assert_msg(e32.max <= TOL_F32 && e.max > 10.0 * e32.max,
                  "bf16 error %g is not that of bf16 operands (fp32: %g)", e.max, e32.max);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* AUTO in bf16 mode may still pick POLY, which computes in fp32: run info says so. */
START_TEST(test_bf16_poly_runs_fp32)
{
    if (!cpu_has_bf16())
        return;
    const ref_config c = {.d_model = 8, .n_heads = 2, .rank = 2, .targets = 15, .out_proj = 1};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 1901, 1.5, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 1, 40, 0, 1902), 0);
    problem_set_score_bound(&l, &p, 0.5);
    lora_adapter *ad = NULL;
    const ref_param xp[] = {compute_bf16, {LORA_CFG_POLY_DEGREE, 0, 6, 0.0}};
    ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_POLY, 1, xp, 2, &ad), LORA_OK);
    int32_t attention = -1;
    const ref_errors e = compare(ad, &l, &p, "bf16 + POLY", &attention);
    lora_run_info info = {.struct_size = sizeof info};
    ck_assert_int_eq(lora_adapter_get_run_info(ad, &info), LORA_OK);
    ck_assert_int_eq(info.backend, LORA_BACKEND_POLY);
    ck_assert_int_eq(attention, LORA_COMPUTE_F32);
    ck_assert_msg(e.max <= TOL_BF16, "bf16 + POLY error %g", e.max);
    lora_adapter_destroy(ad);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

static lora_config *bf16_config(void)
{
    lora_config *cfg = cfg_new(32);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, 2), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_COMPUTE, LORA_COMPUTE_BF16), LORA_OK);
    return cfg;
}

/* Without AVX512_BF16 (masked by LORA_DISABLE_BF16): create refuses with UNSUPPORTED,
 * validate names the parameter and the instructions, fp32 still works. */
START_TEST(test_bf16_refused_without_instructions)
{
    ck_assert_int_eq(setenv("LORA_DISABLE_BF16", "1", 1), 0);
    lora_config *cfg = bf16_config();
    lora_adapter *ad = (lora_adapter *)&ad;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_ERR_UNSUPPORTED);
    ck_assert_ptr_null(ad);
    ck_assert_int_eq(lora_config_validate(cfg), LORA_ERR_UNSUPPORTED);
    const char *msg = lora_config_last_error(cfg);
    ck_assert_msg(strstr(msg, "LORA_CFG_COMPUTE") && strstr(msg, "AVX512_BF16"), "message: %s",
                  msg);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_COMPUTE, LORA_COMPUTE_F32), LORA_OK);
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    lora_adapter_destroy(ad);
    /* "0" masks nothing: the CPU decides again. */
    ck_assert_int_eq(setenv("LORA_DISABLE_BF16", "0", 1), 0);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_COMPUTE, LORA_COMPUTE_BF16), LORA_OK);
    const int st = lora_adapter_create(&ad, cfg);
    ck_assert_int_eq(st, cpu_has_bf16() ? LORA_OK : LORA_ERR_UNSUPPORTED);
    lora_adapter_destroy(ad);
    lora_config_destroy(cfg);
    ck_assert_int_eq(unsetenv("LORA_DISABLE_BF16"), 0);
}
END_TEST

/* AUTO and the estimator price exact attention lower in bf16 (its products run at
 * about twice the rate): over lengths where POLY starts to win in fp32, bf16 mode
 * recommends EXACT for some, and never POLY where fp32 recommends EXACT. */
START_TEST(test_bf16_auto_prices_exact_lower)
{
    if (!cpu_has_bf16())
        return;
    const ref_config c = {.d_model = 16, .n_heads = 1, .rank = 2, .targets = 5};
    ref_layer l;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 1960, 0.35, 0.5);
    const ref_param tol = {LORA_CFG_TOLERANCE, 1, 0, 0.05};
    const ref_param both[] = {tol, compute_bf16};
    lora_adapter *ad32 = NULL, *ad16 = NULL;
    ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_AUTO, 1, &tol, 1, &ad32), LORA_OK);
    ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_AUTO, 1, both, 2, &ad16), LORA_OK);
    const int64_t lens[] = {32768, 49152, 65536, 98304, 131072};
    const int64_t most = 131072;
    float *x = malloc((size_t)most * 16 * sizeof(float));
    ck_assert_ptr_nonnull(x);
    uint64_t rng = 1961;
    for (size_t i = 0; i < (size_t)most * 16; i++)
        x[i] = ref_uniform_f(&rng);
    int differ = 0, poly32 = 0;
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        lora_threshold_report r32 = {.struct_size = sizeof r32};
        lora_threshold_report r16 = {.struct_size = sizeof r16};
        ck_assert_int_eq(lora_threshold_estimate(ad32, x, 1, lens[i], &r32), LORA_OK);
        ck_assert_int_eq(lora_threshold_estimate(ad16, x, 1, lens[i], &r16), LORA_OK);
        ck_assert_double_eq(r32.flops_exact, r16.flops_exact);
        ck_assert_msg(!(r16.recommended_backend == LORA_BACKEND_POLY &&
                        r32.recommended_backend == LORA_BACKEND_EXACT),
                      "L %lld: bf16 recommends POLY where fp32 does not", (long long)lens[i]);
        poly32 += r32.recommended_backend == LORA_BACKEND_POLY;
        differ += r32.recommended_backend != r16.recommended_backend;
    }
    ck_assert_msg(poly32 > 0, "fp32 never recommends POLY: the lengths miss the crossover");
    ck_assert_msg(differ > 0, "bf16 recommends what fp32 does at every length");
    free(x);
    lora_adapter_destroy(ad32);
    lora_adapter_destroy(ad16);
    ref_layer_free(&l);
}
END_TEST

/* A bf16 base (lora_adapter_set_base_typed) in bf16 compute is used as it is: the same
 * bits as a float base holding the same values. */
START_TEST(test_bf16_typed_base_same_as_float)
{
    if (!cpu_has_bf16())
        return;
    const bf16_case *k = &cases[0];
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &k->c), 0);
    ref_layer_randomize(&l, 1950, 1.5, 0.5);
    uint16_t *w16[REF_NPROJ] = {0};
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_has_proj(&l, t))
            continue;
        const size_t n = (size_t)(l.out[t] * l.in[t]);
        w16[t] = malloc(n * sizeof(uint16_t));
        ck_assert_ptr_nonnull(w16[t]);
        for (size_t i = 0; i < n; i++) { /* truncate to bf16: the value stays exact */
            const float f = (float)l.w[t][i];
            uint32_t bits;
            memcpy(&bits, &f, sizeof bits);
            w16[t][i] = (uint16_t)(bits >> 16);
            bits = (uint32_t)w16[t][i] << 16;
            float g;
            memcpy(&g, &bits, sizeof g);
            l.w[t][i] = g;
        }
    }
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, k->batch, k->len_q, 0, 1951), 0);
    lora_adapter *ad32 = NULL, *ad16 = NULL;
    ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_EXACT, 2, &compute_bf16, 1, &ad32),
                     LORA_OK);
    ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_EXACT, 2, &compute_bf16, 1, &ad16),
                     LORA_OK);
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!w16[t])
            continue;
        float *bias = NULL;
        if (l.bias[t]) {
            bias = malloc((size_t)l.out[t] * sizeof(float));
            ck_assert_ptr_nonnull(bias);
            ref_to_float(l.bias[t], bias, (size_t)l.out[t]);
        }
        ck_assert_int_eq(lora_adapter_set_base_typed(ad16, 1 << t, w16[t], LORA_DTYPE_BF16,
                                                     bias, 0),
                         LORA_OK);
        free(bias);
    }
    lib_result r32, r16;
    ck_assert_int_eq(lib_run(ad32, &l, &p, &r32), LORA_OK);
    ck_assert_int_eq(lib_run(ad16, &l, &p, &r16), LORA_OK);
    ck_assert(lib_result_same(&r32, &r16));
    lib_result_free(&r32);
    lib_result_free(&r16);
    lora_adapter_destroy(ad32);
    lora_adapter_destroy(ad16);
    for (int t = 0; t < REF_NPROJ; t++)
        free(w16[t]);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* ---- fp32 unchanged ----------------------------------------------------------------- */

static lib_result run_f32(const bf16_case *k, int set_compute, ref_layer *l, ref_problem *p)
{
    ck_assert_int_eq(ref_layer_init(l, &k->c), 0);
    ref_layer_randomize(l, 1700, 1.5, 0.5);
    ck_assert_int_eq(ref_problem_init(p, l, k->cross, k->batch, k->len_q, k->len_kv, 1800), 0);
    const ref_param f32 = {LORA_CFG_COMPUTE, 0, LORA_COMPUTE_F32, 0.0};
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter_ex(l, LORA_BACKEND_EXACT, k->threads, &f32,
                                         set_compute ? 1 : 0, &ad),
                     LORA_OK);
    lib_result r;
    ck_assert_int_eq(lib_run(ad, l, p, &r), LORA_OK);
    lora_adapter_destroy(ad);
    return r;
}

/* fp32 results must not move with bf16 compute present: LORA_COMPUTE_F32 set explicitly
 * is the default bit for bit, and both equal a run with the bf16 instructions masked
 * (LORA_DISABLE_BF16=1), so nothing on the fp32 path depends on the bf16 kernels or on
 * CPU detection. That the fp32 results were those of the library before bf16 existed was
 * checked once, by hashes of cases 0-3 taken on that build (AVX512_BF16 CPU, optimised
 * build); later fp32 rounding changes of the exact backend made such pins obsolete. */
START_TEST(test_f32_bitwise_unchanged)
{
    ref_layer l;
    ref_problem p;
    lib_result def = run_f32(&cases[_i], 0, &l, &p);
    ref_problem_free(&p);
    ref_layer_free(&l);
    lib_result set = run_f32(&cases[_i], 1, &l, &p);
    ref_problem_free(&p);
    ref_layer_free(&l);
    ck_assert_int_eq(setenv("LORA_DISABLE_BF16", "1", 1), 0);
    lib_result masked = run_f32(&cases[_i], 1, &l, &p);
    ck_assert_int_eq(unsetenv("LORA_DISABLE_BF16"), 0);
    ck_assert(lib_result_same(&def, &set));
    ck_assert(lib_result_same(&def, &masked));
    lib_result_free(&def);
    lib_result_free(&set);
    lib_result_free(&masked);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

Suite *bf16_suite(void)
{
    Suite *s = suite_create("bf16");
    TCase *tc = tcase_create("vs_reference");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_bf16_vs_reference, 0, N_CASES);
    tcase_add_test(tc, test_bf16_poly_runs_fp32);
    tcase_add_test(tc, test_bf16_typed_base_same_as_float);
    tcase_add_test(tc, test_bf16_auto_prices_exact_lower);
    suite_add_tcase(s, tc);
    tc = tcase_create("cpu");
    tcase_add_test(tc, test_bf16_refused_without_instructions);
    suite_add_tcase(s, tc);
    tc = tcase_create("f32_unchanged");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_f32_bitwise_unchanged, 0, 4);
    suite_add_tcase(s, tc);
    return s;
}
