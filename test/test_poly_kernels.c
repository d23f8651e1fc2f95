/* poly_kernels_suite: how the POLY backend's kernels are scheduled leaves its results
 * unchanged. With fewer (batch, kv head) tasks than threads, a non-causal backward runs
 * each task's dQ sweep and its dK/dV sweep as two parts at once; out, dx and every
 * gradient must then be bitwise those of one thread (the sweeps write disjoint
 * gradients, and a product's result does not depend on its thread count). */
#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "suites.h"

typedef struct kernel_case {
    ref_config c;
    int cross, batch, len_q, len_kv;
} kernel_case;

START_TEST(test_poly_halves_same_as_serial)
{
    static const kernel_case cases[] = {
        /* one task, head_dim 16: the JACOBIAN backward, its state product in 2 slices */
        {{.d_model = 16, .rank = 2, .targets = 7}, 0, 1, 150, 0},
        /* 2 tasks (batch 2, GQA 4 heads over 1 kv head, head_dim 4): 3 threads, 4 parts */
        {{.d_model = 16, .n_heads = 4, .n_kv_heads = 1, .rank = 2, .targets = 15,
          .out_proj = 1, .bias = 1},
         0, 2, 130, 0},
        /* cross-attention, head_dim 8 over d_model 12: the EXPANDED backward */
        {{.d_model = 12, .n_heads = 2, .n_kv_heads = 1, .head_dim = 8, .rank = 3,
          .targets = 7, .bias = 1},
         1, 1, 70, 150},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        ref_layer l;
        ref_problem p;
        ck_assert_int_eq(ref_layer_init(&l, &cases[c].c), 0);
        ref_layer_randomize(&l, 91 + c, 1.0, 0.5);
        ck_assert_int_eq(ref_problem_init(&p, &l, cases[c].cross, cases[c].batch,
                                          cases[c].len_q, cases[c].len_kv, 92 + c),
                         0);
        problem_set_score_bound(&l, &p, 0.5);
        const ref_param xp[] = {{LORA_CFG_POLY_DEGREE, 0, 2, 0.0}};
        lib_result serial;
        for (int threads = 1; threads <= 3; threads++) {
            lora_adapter *ad = NULL;
            ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_POLY, threads, xp, 1, &ad),
                             LORA_OK);
            lib_result r;
            ck_assert_int_eq(lib_run(ad, &l, &p, &r), LORA_OK);
            ck_assert_int_eq(r.info.backend, LORA_BACKEND_POLY);
            if (threads == 1)
                serial = r;
            else {
                ck_assert_msg(lib_result_same(&serial, &r),
                              "case %zu: POLY with %d threads differs from 1 thread", c,
                              threads);
                lib_result_free(&r);
            }
            lora_adapter_destroy(ad);
        }
        lib_result_free(&serial);
        ref_problem_free(&p);
        ref_layer_free(&l);
    }
}
END_TEST

Suite *poly_kernels_suite(void)
{
    Suite *s = suite_create("poly_kernels");
    TCase *tc = tcase_create("schedule");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_poly_halves_same_as_serial);
    suite_add_tcase(s, tc);
    return s;
}
