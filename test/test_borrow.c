/* borrow_suite: caller-owned factor and gradient storage (lora_adapter_borrow_factor):
 * used in place, written in place, the caller's own writes seen by tapes and the
 * merged-weight cache. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "suites.h"

static const int tbits[REF_NPROJ] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V,
                                     LORA_TARGET_O};

/* Caller buffers for every factor and gradient of a fixture's adapter, in flat order. */
typedef struct borrowed {
    float *param[REF_NPROJ][2], *grad[REF_NPROJ][2];
    size_t n[REF_NPROJ][2];
} borrowed;

/* Borrows every factor (values copied from the adapter first) and every gradient
 * (zeroed) of f's adapter into malloc'd buffers. */
static void borrow_all(tfx *f, lora_adapter *ad, borrowed *b)
{
    memset(b, 0, sizeof *b);
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_is_adapted(&f->l, t))
            continue;
        for (int w = 0; w < 2; w++) {
            const size_t n = (size_t)(w == LORA_A ? f->l.rank * f->l.in[t]
                                                  : f->l.out[t] * f->l.rank);
            b->n[t][w] = n;
            b->param[t][w] = malloc(n * sizeof(float));
            b->grad[t][w] = calloc(n, sizeof(float));
            ck_assert(b->param[t][w] && b->grad[t][w]);
            ck_assert_int_eq(lora_adapter_get_param(ad, tbits[t], w, b->param[t][w], n), LORA_OK);
            ck_assert_int_eq(lora_adapter_borrow_factor(ad, tbits[t], w, b->param[t][w],
                                                        b->grad[t][w], n),
                             LORA_OK);
        }
    }
}

static void borrowed_free(borrowed *b)
{
    for (int t = 0; t < REF_NPROJ; t++)
        for (int w = 0; w < 2; w++) {
            free(b->param[t][w]);
            free(b->grad[t][w]);
        }
}

/* The adapter reads and writes the caller's buffers themselves: after a backward the
 * gradient buffers hold the gradients (no copy out), an optimizer step writes the
 * parameter buffers; an external step on the same memory (SGD done by the caller, as
 * torch.optim does) and liblora's SGD step agree bit for bit. */
START_TEST(test_borrowed_storage_used_in_place)
{
    tfx f;
    tfx_init(&f, 0, 1);
    lora_adapter *twin = NULL;
    ck_assert_int_eq(ref_make_adapter(&f.l, LORA_BACKEND_EXACT, 1, &twin), LORA_OK);
    borrowed b1, b2;
    borrow_all(&f, f.ad, &b1);
    borrow_all(&f, twin, &b2);
    for (int step = 0; step < 3; step++) {
        ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
        ck_assert_int_eq(lora_adapter_zero_grad(twin), LORA_OK);
        ck_assert_int_eq(tfx_step(&f), LORA_OK);
        ck_assert_int_eq(lora_forward(twin, f.xq, f.p.batch, f.p.len_q, f.out), LORA_OK);
        ck_assert_int_eq(lora_backward(twin, f.dout, NULL), LORA_OK);
        if (step == 0)
            tfx_assert_works(&f); /* the borrowed values are the reference's */
        lora_optimizer *opt = NULL;
        ck_assert_int_eq(lora_optimizer_create(&opt, twin, LORA_OPTIMIZER_SGD), LORA_OK);
        ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_LR, 0.05), LORA_OK);
        for (int t = 0; t < REF_NPROJ; t++)
            for (int w = 0; w < 2; w++) {
                const size_t n = b1.n[t][w];
                if (!n)
                    continue;
                float *g = malloc(n * sizeof(float));
                ck_assert_ptr_nonnull(g);
                ck_assert_int_eq(lora_adapter_get_grad(f.ad, tbits[t], w, g, n), LORA_OK);
                ck_assert_msg(memcmp(g, b1.grad[t][w], n * sizeof(float)) == 0,
                              "gradient %d%c is not in the caller's buffer", t, "AB"[w]);
                ck_assert_msg(memcmp(b1.grad[t][w], b2.grad[t][w], n * sizeof(float)) == 0,
                              "twins' gradients differ");
                double gmax = 0.0;
                for (size_t i = 0; i < n; i++) {
                    gmax = fmax(gmax, fabs(g[i]));
                    /* the caller's optimizer, in place (SGD, double as liblora's) */
                    b1.param[t][w][i] =
                        (float)((double)b1.param[t][w][i] - 0.05 * (double)b1.grad[t][w][i]);
                }
                ck_assert_msg(gmax > 0.0, "gradient %d%c is zero", t, "AB"[w]);
                free(g);
            }
        ck_assert_int_eq(lora_optimizer_step(opt, twin), LORA_OK); /* writes b2.param */
        lora_optimizer_destroy(opt);
        for (int t = 0; t < REF_NPROJ; t++)
            for (int w = 0; w < 2; w++)
                ck_assert_msg(b1.n[t][w] == 0 || memcmp(b1.param[t][w], b2.param[t][w],
                                                        b1.n[t][w] * sizeof(float)) == 0,
                              "step %d: external and liblora SGD differ (%d%c)", step, t,
                              "AB"[w]);
    }
    lora_adapter_destroy(twin);
    borrowed_free(&b2);
    tfx_free(&f);
    borrowed_free(&b1);
}
END_TEST

/* A write into a borrowed factor between forward and backward is a parameter change:
 * STATE for the built-in tape and every other; rewriting the same values is not. */
START_TEST(test_caller_write_makes_tapes_stale)
{
    tfx f;
    tfx_init(&f, 0, 1);
    borrowed b;
    borrow_all(&f, f.ad, &b);
    lora_tape *t = NULL;
    ck_assert_int_eq(lora_tape_create(&t, f.ad), LORA_OK);
    lora_attn_args a = {.struct_size = sizeof a, .tape = t};
    const int64_t B = f.p.batch, L = f.p.len_q;
    ck_assert_int_eq(lora_forward_ex(f.ad, &a, f.xq, NULL, B, L, L, f.out), LORA_OK);
    ck_assert_int_eq(lora_forward(f.ad, f.xq, B, L, f.out), LORA_OK);
    /* the same bits again: nothing changed */
    const float keep = b.param[REF_V][LORA_B][3];
    b.param[REF_V][LORA_B][3] = keep;
    ck_assert_int_eq(lora_backward(f.ad, f.dout, NULL), LORA_OK);
    ck_assert_int_eq(lora_backward_ex(f.ad, t, f.dout, NULL, NULL), LORA_OK);
    /* one bit of one entry */
    b.param[REF_V][LORA_B][3] = nextafterf(keep, INFINITY);
    ck_assert_int_eq(lora_backward_ex(f.ad, t, f.dout, NULL, NULL), LORA_ERR_STATE);
    ck_assert_int_eq(lora_backward(f.ad, f.dout, NULL), LORA_ERR_STATE);
    b.param[REF_V][LORA_B][3] = keep;
    ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    tfx_assert_works(&f);
    lora_tape_destroy(t);
    tfx_free(&f);
    borrowed_free(&b);
}
END_TEST

/* lora_forward_merged's cached merged weights follow the caller's writes. */
START_TEST(test_merged_cache_follows_caller_writes)
{
    tfx f;
    tfx_init(&f, 0, 1);
    borrowed b;
    borrow_all(&f, f.ad, &b);
    const int64_t B = f.p.batch, L = f.p.len_q;
    float *merged = malloc(f.nout * sizeof(float)), *before = malloc(f.nout * sizeof(float));
    ck_assert(merged && before);
    ck_assert_int_eq(lora_forward_merged(f.ad, f.xq, B, L, before), LORA_OK);
    for (size_t i = 0; i < b.n[REF_Q][LORA_B]; i++)
        b.param[REF_Q][LORA_B][i] *= 2.0f;
    ck_assert_int_eq(lora_forward_merged(f.ad, f.xq, B, L, merged), LORA_OK);
    ck_assert_int_eq(lora_forward(f.ad, f.xq, B, L, f.out), LORA_OK);
    double d = 0.0, m = 0.0, moved = 0.0;
    for (size_t i = 0; i < f.nout; i++) {
        d = fmax(d, fabs((double)merged[i] - f.out[i]));
        m = fmax(m, fabs((double)f.out[i]));
        moved = fmax(moved, fabs((double)before[i] - f.out[i]));
    }
    ck_assert_msg(moved > 1e-3 * m, "doubling B_Q did not change the output");
    ck_assert_msg(d <= 1e-5 * m, "merged forward after a caller write off by %g (max %g)", d,
                  m);
    free(merged);
    free(before);
    tfx_free(&f);
    borrowed_free(&b);
}
END_TEST

/* Returning to own storage copies the buffer's values; the buffer may then be freed.
 * zero_grad and set_grads_flat write the borrowed gradients. */
START_TEST(test_unborrow_copies_back)
{
    tfx f;
    tfx_init(&f, 0, 1);
    borrowed b;
    borrow_all(&f, f.ad, &b);
    const size_t n = b.n[REF_K][LORA_A];
    for (size_t i = 0; i < n; i++)
        b.param[REF_K][LORA_A][i] = 0.001f * (float)i;
    size_t ng = 0;
    ck_assert_int_eq(lora_adapter_param_count(f.ad, &ng), LORA_OK);
    float *ones = malloc(ng * sizeof(float));
    ck_assert_ptr_nonnull(ones);
    for (size_t i = 0; i < ng; i++)
        ones[i] = 1.0f;
    ck_assert_int_eq(lora_adapter_set_grads_flat(f.ad, ones, ng), LORA_OK);
    ck_assert(b.grad[REF_O][LORA_B][0] == 1.0f);
    ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    ck_assert(b.grad[REF_O][LORA_B][0] == 0.0f && b.grad[REF_Q][LORA_A][0] == 0.0f);
    ck_assert_int_eq(lora_adapter_borrow_factor(f.ad, LORA_TARGET_K, LORA_A, NULL, NULL, n),
                     LORA_OK);
    float *got = malloc(n * sizeof(float));
    ck_assert_ptr_nonnull(got);
    memcpy(got, b.param[REF_K][LORA_A], n * sizeof(float));
    free(b.param[REF_K][LORA_A]); /* no longer the adapter's: ASan checks no use */
    free(b.grad[REF_K][LORA_A]);
    b.param[REF_K][LORA_A] = b.grad[REF_K][LORA_A] = NULL;
    float *now = malloc(n * sizeof(float));
    ck_assert_ptr_nonnull(now);
    ck_assert_int_eq(lora_adapter_get_param(f.ad, LORA_TARGET_K, LORA_A, now, n), LORA_OK);
    ck_assert(memcmp(now, got, n * sizeof(float)) == 0);
    ck_assert_int_eq(tfx_step(&f), LORA_OK);
    free(got);
    free(now);
    free(ones);
    tfx_free(&f);
    borrowed_free(&b);
}
END_TEST

Suite *borrow_suite(void)
{
    Suite *s = suite_create("borrow");
    TCase *tc = tcase_create("borrow");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_borrowed_storage_used_in_place);
    tcase_add_test(tc, test_caller_write_makes_tapes_stale);
    tcase_add_test(tc, test_merged_cache_follows_caller_writes);
    tcase_add_test(tc, test_unborrow_copies_back);
    suite_add_tcase(s, tc);
    return s;
}
