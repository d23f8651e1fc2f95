/* backward_suite: gradient accumulation, zero_grad, optional dx outputs, and the call
 * order rules (backward needs its own kind of saved forward, which set_param and
 * set_base invalidate). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "suites.h"

static double max_rel_diff(const float *x, const float *y, size_t n)
{
    double md = 0.0, my = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)x[i] - (double)y[i]);
        md = (d > md || isnan(d)) ? d : md;
        my = fabs(y[i]) > my ? fabs(y[i]) : my;
    }
    return md / (my > 0 ? my : 1e-300);
}

/* Two backwards after one forward = twice the gradient; dx is overwritten, not summed. */
START_TEST(test_backward_twice_accumulates)
{
    tfx f;
    tfx_init(&f, _i, 1);
    float *g1 = tfx_prime(&f); /* one forward + one backward */
    float *dx1 = malloc(f.nxq * sizeof(float)), *g2 = malloc(f.ngrads * sizeof(float));
    ck_assert(dx1 && g2);
    memcpy(dx1, f.dxq, f.nxq * sizeof(float));
    if (f.p.cross)
        ck_assert_int_eq(lora_backward_cross(f.ad, f.dout, f.dxq, f.dxkv), LORA_OK);
    else
        ck_assert_int_eq(lora_backward(f.ad, f.dout, f.dxq), LORA_OK);
    tfx_grads(&f, g2);
    for (size_t i = 0; i < f.ngrads; i++)
        g1[i] *= 2.0f;
    const double e = max_rel_diff(g2, g1, f.ngrads);
    ck_assert_msg(e <= 1e-6, "second backward: grads differ from 2x the first by %g", e);
    ck_assert_msg(memcmp(dx1, f.dxq, f.nxq * sizeof(float)) == 0,
                  "dx changed on the second backward (summed instead of overwritten?)");
    /* zero_grad resets every gradient to exactly zero. */
    ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    tfx_grads(&f, g2);
    for (size_t i = 0; i < f.ngrads; i++)
        ck_assert_msg(g2[i] == 0.0f, "grad %zu = %g after zero_grad", i, (double)g2[i]);
    /* zero_grad keeps the saved forward: a backward still gives the single gradient. */
    if (f.p.cross)
        ck_assert_int_eq(lora_backward_cross(f.ad, f.dout, NULL, NULL), LORA_OK);
    else
        ck_assert_int_eq(lora_backward(f.ad, f.dout, NULL), LORA_OK);
    tfx_grads(&f, g2);
    for (size_t i = 0; i < f.ngrads; i++)
        g1[i] *= 0.5f;
    ck_assert_msg(max_rel_diff(g2, g1, f.ngrads) <= 1e-6, "backward after zero_grad differs");
    free(g1);
    free(g2);
    free(dx1);
    tfx_free(&f);
}
END_TEST

/* Steps on two different inputs accumulate to the sum of their gradients. */
START_TEST(test_backward_accumulates_across_forwards)
{
    tfx f;
    tfx_init(&f, 0, 0);
    float *g1 = tfx_prime(&f);
    float *x2 = malloc(f.nxq * sizeof(float)), *d2 = malloc(f.nout * sizeof(float));
    float *g2 = malloc(f.ngrads * sizeof(float)), *g12 = malloc(f.ngrads * sizeof(float));
    ck_assert(x2 && d2 && g2 && g12);
    fill_uniform(x2, f.nxq, 31, 1.0f);
    fill_uniform(d2, f.nout, 32, 1.0f);
    ck_assert_int_eq(lora_forward(f.ad, x2, f.p.batch, f.p.len_q, f.out), LORA_OK);
    ck_assert_int_eq(lora_backward(f.ad, d2, NULL), LORA_OK);
    tfx_grads(&f, g12);
    ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    ck_assert_int_eq(lora_forward(f.ad, x2, f.p.batch, f.p.len_q, f.out), LORA_OK);
    ck_assert_int_eq(lora_backward(f.ad, d2, NULL), LORA_OK);
    tfx_grads(&f, g2);
    double scale = 0.0, md = 0.0;
    for (size_t i = 0; i < f.ngrads; i++) {
        const double want = (double)g1[i] + (double)g2[i];
        md = fmax(md, fabs((double)g12[i] - want));
        scale = fmax(scale, fabs(want));
    }
    ck_assert_msg(md <= 1e-6 * scale, "accumulated grads off by %g (scale %g)", md, scale);
    free(g1);
    free(g2);
    free(g12);
    free(x2);
    free(d2);
    tfx_free(&f);
}
END_TEST

/* dx / dxq / dxkv are optional; whichever is given is right, grads do not depend on it. */
START_TEST(test_backward_optional_dx)
{
    tfx f;
    tfx_init(&f, 1, 1);
    float *g = tfx_prime(&f); /* with dxq and dxkv */
    float *dxq = malloc(f.nxq * sizeof(float)), *dxkv = malloc(f.nxkv * sizeof(float));
    float *g2 = malloc(f.ngrads * sizeof(float));
    ck_assert(dxq && dxkv && g2);
    memcpy(dxq, f.dxq, f.nxq * sizeof(float));
    memcpy(dxkv, f.dxkv, f.nxkv * sizeof(float));
    const struct {
        int want_q, want_kv;
    } modes[3] = {{0, 0}, {1, 0}, {0, 1}};
    for (int m = 0; m < 3; m++) {
        memset(f.dxq, 0x7f, f.nxq * sizeof(float));
        memset(f.dxkv, 0x7f, f.nxkv * sizeof(float));
        ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
        ck_assert_int_eq(lora_backward_cross(f.ad, f.dout, modes[m].want_q ? f.dxq : NULL,
                                             modes[m].want_kv ? f.dxkv : NULL),
                         LORA_OK);
        tfx_grads(&f, g2);
        ck_assert_msg(max_rel_diff(g2, g, f.ngrads) <= 1e-6, "mode %d: grads differ", m);
        if (modes[m].want_q)
            ck_assert_msg(max_rel_diff(f.dxq, dxq, f.nxq) <= 1e-6, "mode %d: dxq differs", m);
        if (modes[m].want_kv)
            ck_assert_msg(max_rel_diff(f.dxkv, dxkv, f.nxkv) <= 1e-6, "mode %d: dxkv differs",
                          m);
    }
    free(g);
    free(g2);
    free(dxq);
    free(dxkv);
    tfx_free(&f);
}
END_TEST

/* A call refused with LORA_ERR_STATE: message set, gradients unchanged. */
static void expect_state(tfx *f, int st, const char *what)
{
    ck_assert_msg(st == LORA_ERR_STATE, "%s: status %d, want LORA_ERR_STATE", what, st);
    ck_assert_msg(lora_adapter_last_error(f->ad)[0] != '\0', "%s: empty message", what);
}

START_TEST(test_backward_before_forward)
{
    tfx f;
    tfx_init(&f, 0, 1);
    expect_state(&f, lora_backward(f.ad, f.dout, f.dxq), "backward before any forward");
    expect_state(&f, lora_backward_cross(f.ad, f.dout, NULL, NULL),
                 "backward_cross before any forward");
    float *z = malloc(f.ngrads * sizeof(float));
    ck_assert_ptr_nonnull(z);
    tfx_grads(&f, z);
    for (size_t i = 0; i < f.ngrads; i++)
        ck_assert(z[i] == 0.0f);
    free(z);
    tfx_assert_works(&f);
    tfx_free(&f);
}
END_TEST

START_TEST(test_backward_kind_mismatch)
{
    /* _i = 0: saved self forward, backward_cross refused; 1: the other way round. */
    tfx f;
    tfx_init(&f, _i, 1);
    float *snap = tfx_prime(&f);
    int st;
    if (_i == 0) {
        st = lora_backward_cross(f.ad, f.dout, f.dxq, f.dxkv);
        expect_state(&f, st, "backward_cross after lora_forward");
    } else {
        st = lora_backward(f.ad, f.dout, f.dxq);
        expect_state(&f, st, "backward after lora_forward_cross");
    }
    /* The right kind still works on the same saved forward. */
    float *now = malloc(f.ngrads * sizeof(float));
    ck_assert_ptr_nonnull(now);
    tfx_grads(&f, now);
    ck_assert(memcmp(now, snap, f.ngrads * sizeof(float)) == 0);
    free(now);
    if (_i == 0)
        ck_assert_int_eq(lora_backward(f.ad, f.dout, NULL), LORA_OK);
    else
        ck_assert_int_eq(lora_backward_cross(f.ad, f.dout, NULL, NULL), LORA_OK);
    free(snap);
    tfx_assert_works(&f);
    tfx_free(&f);
}
END_TEST

/* set_param and set_base invalidate the saved forward. */
START_TEST(test_backward_after_parameter_change)
{
    tfx f;
    tfx_init(&f, 0, 1);
    float a[16];
    /* _i = 0: set_param (same values), 1: set_base (same values). */
    float *snap = tfx_prime(&f);
    if (_i == 0) {
        ck_assert_int_eq(lora_adapter_get_param(f.ad, LORA_TARGET_K, LORA_A, a, 16), LORA_OK);
        ck_assert_int_eq(lora_adapter_set_param(f.ad, LORA_TARGET_K, LORA_A, a, 16), LORA_OK);
    } else {
        float w[64], b[8];
        ref_to_float(f.l.w[REF_V], w, 32);
        ref_to_float(f.l.bias[REF_V], b, 4);
        ck_assert_int_eq(lora_adapter_set_base(f.ad, LORA_TARGET_V, w, b), LORA_OK);
    }
    expect_state(&f, lora_backward(f.ad, f.dout, f.dxq),
                 _i == 0 ? "backward after set_param" : "backward after set_base");
    tfx_assert_unchanged_and_works(&f, snap, "backward after a parameter change");
    tfx_free(&f);
}
END_TEST

Suite *backward_suite(void)
{
    Suite *s = suite_create("backward");
    TCase *tc = tcase_create("accumulate");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_backward_twice_accumulates, 0, 2);
    tcase_add_test(tc, test_backward_accumulates_across_forwards);
    tcase_add_test(tc, test_backward_optional_dx);
    suite_add_tcase(s, tc);
    tc = tcase_create("call_order");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_backward_before_forward);
    tcase_add_loop_test(tc, test_backward_kind_mismatch, 0, 2);
    tcase_add_loop_test(tc, test_backward_after_parameter_change, 0, 2);
    suite_add_tcase(s, tc);
    return s;
}
