/* errors_suite: every bad input of every entry point. For each: the exact status, a
 * non-empty last-error message where a handle exists, gradients untouched by the failed
 * call, and the adapter still matching the reference afterwards. Tests whose name
 * starts with "bug_" reproduce known library bugs: each quotes the contract it checks
 * and fails until the library is fixed. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "suites.h"

/* Asserts status and message of a failed call on f, and that the gradients still equal
 * snap. */
static void bad_call(tfx *f, const float *snap, int st, int want, const char *what)
{
    ck_assert_msg(st == want, "%s: status %d (%s), want %d (%s)", what, st,
                  lora_status_string(st), want, lora_status_string(want));
    const char *msg = lora_adapter_last_error(f->ad);
    ck_assert_msg(msg != NULL && msg[0] != '\0', "%s: lora_adapter_last_error is empty", what);
    float *now = malloc(f->ngrads * sizeof(float));
    ck_assert_ptr_nonnull(now);
    tfx_grads(f, now);
    ck_assert_msg(memcmp(now, snap, f->ngrads * sizeof(float)) == 0,
                  "%s: gradients changed by the failed call", what);
    free(now);
}

/* ---- NULL pointers ------------------------------------------------------------------- */

START_TEST(test_null_config_args)
{
    ck_assert_int_eq(lora_config_create(NULL), LORA_ERR_INVALID_ARG);
    lora_config_destroy(NULL);
    int64_t iv = 0;
    double dv = 0.0;
    ck_assert_int_eq(lora_config_set_int(NULL, LORA_CFG_D_MODEL, 8), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_config_set_double(NULL, LORA_CFG_ALPHA, 1.0), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_config_get_int(NULL, LORA_CFG_D_MODEL, &iv), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_config_get_double(NULL, LORA_CFG_ALPHA, &dv), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_config_validate(NULL), LORA_ERR_INVALID_ARG);
    const char *m = lora_config_last_error(NULL);
    ck_assert_ptr_nonnull(m);
    ck_assert(m[0] != '\0');
    lora_config *cfg = cfg_new(8);
    ck_assert_int_eq(lora_config_get_int(cfg, LORA_CFG_D_MODEL, NULL), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_config_get_double(cfg, LORA_CFG_ALPHA, NULL), LORA_ERR_INVALID_ARG);
    /* The config still works. */
    ck_assert_int_eq(lora_config_get_int(cfg, LORA_CFG_D_MODEL, &iv), LORA_OK);
    ck_assert_int_eq(iv, 8);
    lora_config_destroy(cfg);
}
END_TEST

START_TEST(test_null_adapter_handle)
{
    lora_config *cfg = cfg_new(8);
    lora_adapter *ad = (lora_adapter *)(uintptr_t)1;
    ck_assert_int_eq(lora_adapter_create(NULL, cfg), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_create(&ad, NULL), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_null(ad);
    lora_config_destroy(cfg);
    lora_adapter_destroy(NULL);
    float buf[64] = {0};
    int64_t r, c, iv;
    double dv;
    lora_run_info info = {.struct_size = sizeof info};
    ck_assert_int_eq(lora_adapter_set_base(NULL, LORA_TARGET_Q, buf, NULL), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_set_param(NULL, LORA_TARGET_Q, LORA_A, buf, 16),
                     LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_get_param(NULL, LORA_TARGET_Q, LORA_A, buf, 16),
                     LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_get_grad(NULL, LORA_TARGET_Q, LORA_A, buf, 16),
                     LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_param_shape(NULL, LORA_TARGET_Q, LORA_A, &r, &c),
                     LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_zero_grad(NULL), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_get_config_int(NULL, LORA_CFG_RANK, &iv), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_get_config_double(NULL, LORA_CFG_ALPHA, &dv),
                     LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_get_run_info(NULL, &info), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_forward(NULL, buf, 1, 1, buf), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_backward(NULL, buf, buf), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_forward_cross(NULL, buf, buf, 1, 1, 1, buf), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_backward_cross(NULL, buf, buf, buf + 32), LORA_ERR_INVALID_ARG);
    const char *m = lora_adapter_last_error(NULL);
    ck_assert_ptr_nonnull(m);
    ck_assert(m[0] != '\0');
}
END_TEST

/* NULL data pointers on a live adapter (self-attention fixture). */
START_TEST(test_null_args_with_handle)
{
    tfx f;
    tfx_init(&f, 0, 1);
    float *snap = tfx_prime(&f);
    float buf[64];
    int64_t r = 0, c = 0;
    bad_call(&f, snap, lora_adapter_set_base(f.ad, LORA_TARGET_Q, NULL, buf),
             LORA_ERR_INVALID_ARG, "set_base weight NULL");
    bad_call(&f, snap, lora_adapter_set_param(f.ad, LORA_TARGET_Q, LORA_A, NULL, 16),
             LORA_ERR_INVALID_ARG, "set_param src NULL");
    bad_call(&f, snap, lora_adapter_get_param(f.ad, LORA_TARGET_Q, LORA_A, NULL, 16),
             LORA_ERR_INVALID_ARG, "get_param dst NULL");
    bad_call(&f, snap, lora_adapter_get_grad(f.ad, LORA_TARGET_Q, LORA_B, NULL, 16),
             LORA_ERR_INVALID_ARG, "get_grad dst NULL");
    bad_call(&f, snap, lora_adapter_param_shape(f.ad, LORA_TARGET_Q, LORA_A, NULL, &c),
             LORA_ERR_INVALID_ARG, "param_shape rows NULL");
    bad_call(&f, snap, lora_adapter_param_shape(f.ad, LORA_TARGET_Q, LORA_A, &r, NULL),
             LORA_ERR_INVALID_ARG, "param_shape cols NULL");
    bad_call(&f, snap, lora_forward(f.ad, NULL, 2, 5, f.out), LORA_ERR_INVALID_ARG,
             "forward x NULL");
    bad_call(&f, snap, lora_forward(f.ad, f.xq, 2, 5, NULL), LORA_ERR_INVALID_ARG,
             "forward out NULL");
    ck_assert_int_eq(lora_forward(f.ad, f.xq, 2, 5, f.out), LORA_OK);
    bad_call(&f, snap, lora_backward(f.ad, NULL, f.dxq), LORA_ERR_INVALID_ARG,
             "backward dout NULL");
    bad_call(&f, snap, lora_forward_cross(f.ad, NULL, f.xq, 2, 5, 5, f.out), LORA_ERR_INVALID_ARG,
             "forward_cross xq NULL");
    bad_call(&f, snap, lora_forward_cross(f.ad, f.xq, NULL, 2, 5, 5, f.out), LORA_ERR_INVALID_ARG,
             "forward_cross xkv NULL");
    bad_call(&f, snap, lora_forward_cross(f.ad, f.xq, f.xq, 2, 5, 5, NULL), LORA_ERR_INVALID_ARG,
             "forward_cross out NULL");
    ck_assert_int_eq(lora_forward_cross(f.ad, f.xq, f.xq, 2, 5, 5, f.out), LORA_OK);
    bad_call(&f, snap, lora_backward_cross(f.ad, NULL, f.dxq, NULL), LORA_ERR_INVALID_ARG,
             "backward_cross dout NULL");
    /* Getters with a NULL output (messages: test_getter_failures_set_message). */
    int64_t iv;
    double dv;
    ck_assert_int_eq(lora_adapter_get_config_int(f.ad, LORA_CFG_RANK, NULL),
                     LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_get_config_double(f.ad, LORA_CFG_ALPHA, NULL),
                     LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_get_run_info(f.ad, NULL), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_get_config_int(f.ad, LORA_CFG_RANK, &iv), LORA_OK);
    ck_assert_int_eq(iv, 2);
    ck_assert_int_eq(lora_adapter_get_config_double(f.ad, LORA_CFG_ALPHA, &dv), LORA_OK);
    ck_assert_double_eq(dv, 2.0);
    tfx_assert_unchanged_and_works(&f, snap, "NULL arguments");
    tfx_free(&f);
}
END_TEST

/* ---- shapes ------------------------------------------------------------------------- */

START_TEST(test_bad_shapes_self)
{
    tfx f;
    tfx_init(&f, 0, 1);
    float *snap = tfx_prime(&f);
    const int64_t bad[][2] = {
        {0, 5}, {-1, 5}, {INT64_MIN, 5}, {2, 0}, {2, -1}, {2, INT64_MIN}, {0, 0},
        /* overflowing sizes */
        {INT64_MAX / 2, 1}, {INT64_MAX / 2, 2}, {1, INT64_MAX}, {INT64_MAX, INT64_MAX},
        {INT64_C(1) << 32, INT64_C(1) << 32}, {3, INT64_MAX / 3 + 1},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char what[96];
        snprintf(what, sizeof what, "forward batch=%lld seq_len=%lld", (long long)bad[i][0],
                 (long long)bad[i][1]);
        bad_call(&f, snap, lora_forward(f.ad, f.xq, bad[i][0], bad[i][1], f.out),
                 LORA_ERR_SHAPE, what);
    }
    tfx_assert_unchanged_and_works(&f, snap, "bad shapes");
    tfx_free(&f);
}
END_TEST

START_TEST(test_bad_shapes_cross)
{
    /* _i = 0: non-causal, 1: causal. */
    tfx f;
    tfx_init(&f, 1, _i);
    float *snap = tfx_prime(&f);
    float *out7 = malloc(f.nxkv * sizeof(float)); /* out for len_q = 7: 2 x 7 x d_model */
    ck_assert_ptr_nonnull(out7);
    const int64_t bad[][3] = {
        {0, 5, 7}, {-1, 5, 7}, {2, 0, 7}, {2, -3, 7}, {2, 5, 0}, {2, 5, -1},
        {INT64_MAX / 2, 1, 1}, {1, INT64_MAX / 2, 1}, {1, 1, INT64_MAX / 2},
        {1, 1, INT64_MAX}, {2, INT64_MAX, 3},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char what[128];
        snprintf(what, sizeof what, "forward_cross batch=%lld len_q=%lld len_kv=%lld",
                 (long long)bad[i][0], (long long)bad[i][1], (long long)bad[i][2]);
        bad_call(&f, snap,
                 lora_forward_cross(f.ad, f.xq, f.xkv, bad[i][0], bad[i][1], bad[i][2], f.out),
                 LORA_ERR_SHAPE, what);
    }
    if (_i == 1) {
        /* Causal cross-attention needs len_q <= len_kv. */
        bad_call(&f, snap, lora_forward_cross(f.ad, f.xkv, f.xq, 2, 7, 5, out7), LORA_ERR_SHAPE,
                 "causal forward_cross len_q 7 > len_kv 5");
        bad_call(&f, snap, lora_forward_cross(f.ad, f.xkv, f.xq, 1, 2, 1, out7), LORA_ERR_SHAPE,
                 "causal forward_cross len_q 2 > len_kv 1");
    } else {
        /* Non-causal: len_q > len_kv is fine. */
        ck_assert_int_eq(lora_forward_cross(f.ad, f.xkv, f.xq, 2, 7, 5, out7), LORA_OK);
    }
    free(out7);
    tfx_assert_unchanged_and_works(&f, snap, "bad cross shapes");
    tfx_free(&f);
}
END_TEST

/* ---- targets, factors, counts ------------------------------------------------------ */

START_TEST(test_bad_targets_and_counts)
{
    tfx f;
    tfx_init(&f, 0, 0);
    float *snap = tfx_prime(&f);
    float buf[128] = {0};
    const int bad_targets[] = {0, 3, 5, 16, -1, 1000};
    for (size_t i = 0; i < sizeof bad_targets / sizeof bad_targets[0]; i++) {
        const int t = bad_targets[i];
        char what[96];
        snprintf(what, sizeof what, "set_base target %d", t);
        bad_call(&f, snap, lora_adapter_set_base(f.ad, t, buf, NULL), LORA_ERR_INVALID_ARG, what);
        snprintf(what, sizeof what, "set_param target %d", t);
        bad_call(&f, snap, lora_adapter_set_param(f.ad, t, LORA_A, buf, 16), LORA_ERR_INVALID_ARG,
                 what);
        snprintf(what, sizeof what, "get_param target %d", t);
        bad_call(&f, snap, lora_adapter_get_param(f.ad, t, LORA_A, buf, 16), LORA_ERR_INVALID_ARG,
                 what);
        snprintf(what, sizeof what, "get_grad target %d", t);
        bad_call(&f, snap, lora_adapter_get_grad(f.ad, t, LORA_B, buf, 16), LORA_ERR_INVALID_ARG,
                 what);
    }
    const int bad_which[] = {2, -1, 100};
    for (size_t i = 0; i < 3; i++) {
        char what[96];
        snprintf(what, sizeof what, "which %d", bad_which[i]);
        bad_call(&f, snap, lora_adapter_set_param(f.ad, LORA_TARGET_Q, bad_which[i], buf, 16),
                 LORA_ERR_INVALID_ARG, what);
        bad_call(&f, snap, lora_adapter_get_param(f.ad, LORA_TARGET_Q, bad_which[i], buf, 16),
                 LORA_ERR_INVALID_ARG, what);
        bad_call(&f, snap, lora_adapter_get_grad(f.ad, LORA_TARGET_Q, bad_which[i], buf, 16),
                 LORA_ERR_INVALID_ARG, what);
        int64_t r, c;
        bad_call(&f, snap, lora_adapter_param_shape(f.ad, LORA_TARGET_Q, bad_which[i], &r, &c),
                 LORA_ERR_INVALID_ARG, what);
    }
    /* Element counts: A of Q is 2x8 = 16, B of O is 8x2 = 16, A of O is 2x8. */
    const size_t bad_counts[] = {0, 15, 17, 32, SIZE_MAX};
    for (size_t i = 0; i < sizeof bad_counts / sizeof bad_counts[0]; i++) {
        const size_t n = bad_counts[i];
        char what[96];
        snprintf(what, sizeof what, "count %zu for a 16-element factor", n);
        bad_call(&f, snap, lora_adapter_set_param(f.ad, LORA_TARGET_Q, LORA_A, buf, n),
                 LORA_ERR_INVALID_ARG, what);
        bad_call(&f, snap, lora_adapter_get_param(f.ad, LORA_TARGET_O, LORA_B, buf, n),
                 LORA_ERR_INVALID_ARG, what);
        bad_call(&f, snap, lora_adapter_get_grad(f.ad, LORA_TARGET_K, LORA_A, buf, n),
                 LORA_ERR_INVALID_ARG, what);
    }
    /* B of K is kv_dim x rank = 4x2 = 8: the count of A (16) is wrong for it. */
    bad_call(&f, snap, lora_adapter_set_param(f.ad, LORA_TARGET_K, LORA_B, buf, 16),
             LORA_ERR_INVALID_ARG, "set_param B of K with A's count");
    tfx_assert_unchanged_and_works(&f, snap, "bad targets and counts");
    tfx_free(&f);
}
END_TEST

/* Targets not in LORA_CFG_TARGETS, and TARGET_O without an output projection. */
START_TEST(test_target_not_adapted)
{
    lora_config *cfg = cfg_new(8); /* targets default Q|V, no out-proj */
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RANK, 2), LORA_OK);
    lora_adapter *ad = adapter_new(cfg, 3);
    lora_config_destroy(cfg);
    float buf[64] = {0}, x[16], out[16], dx[16];
    fill_uniform(x, 16, 5, 1.0f);
    int64_t r, c;
    const int missing[] = {LORA_TARGET_K, LORA_TARGET_O};
    for (int i = 0; i < 2; i++) {
        const int t = missing[i];
        ck_assert_int_eq(lora_adapter_set_param(ad, t, LORA_A, buf, 16), LORA_ERR_INVALID_ARG);
        ck_assert(lora_adapter_last_error(ad)[0] != '\0');
        ck_assert_int_eq(lora_adapter_get_param(ad, t, LORA_B, buf, 16), LORA_ERR_INVALID_ARG);
        ck_assert(lora_adapter_last_error(ad)[0] != '\0');
        ck_assert_int_eq(lora_adapter_get_grad(ad, t, LORA_A, buf, 16), LORA_ERR_INVALID_ARG);
        ck_assert(lora_adapter_last_error(ad)[0] != '\0');
        ck_assert_int_eq(lora_adapter_param_shape(ad, t, LORA_A, &r, &c), LORA_ERR_INVALID_ARG);
        ck_assert(lora_adapter_last_error(ad)[0] != '\0');
    }
    /* No output projection: its base cannot be set either. */
    ck_assert_int_eq(lora_adapter_set_base(ad, LORA_TARGET_O, buf, NULL), LORA_ERR_INVALID_ARG);
    ck_assert(lora_adapter_last_error(ad)[0] != '\0');
    /* Still works; K's base is set (only not adapted). */
    ck_assert_int_eq(lora_forward(ad, x, 1, 2, out), LORA_OK);
    ck_assert_int_eq(lora_backward(ad, out, dx), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_grad(ad, LORA_TARGET_V, LORA_B, buf, 16), LORA_OK);
    lora_adapter_destroy(ad);
}
END_TEST

/* ---- non-finite values -------------------------------------------------------------- */

START_TEST(test_nonfinite_inputs_self)
{
    tfx f;
    tfx_init(&f, 0, 1);
    float *snap = tfx_prime(&f);
    const float bads[3] = {NAN, INFINITY, -INFINITY};
    const size_t where[2] = {0, f.nxq - 1};
    for (int b = 0; b < 3; b++)
        for (int w = 0; w < 2; w++) {
            const float keep = f.xq[where[w]];
            f.xq[where[w]] = bads[b];
            bad_call(&f, snap, lora_forward(f.ad, f.xq, f.p.batch, f.p.len_q, f.out),
                     LORA_ERR_NONFINITE, "non-finite x");
            f.xq[where[w]] = keep;
        }
    /* dout: a fresh forward, then a NaN / Inf in dout. */
    ck_assert_int_eq(lora_forward(f.ad, f.xq, f.p.batch, f.p.len_q, f.out), LORA_OK);
    for (int b = 0; b < 3; b++)
        for (int w = 0; w < 2; w++) {
            const size_t at = w ? f.nout - 1 : 0;
            const float keep = f.dout[at];
            f.dout[at] = bads[b];
            bad_call(&f, snap, lora_backward(f.ad, f.dout, f.dxq), LORA_ERR_NONFINITE,
                     "non-finite dout");
            f.dout[at] = keep;
        }
    tfx_assert_unchanged_and_works(&f, snap, "non-finite x / dout");
    tfx_free(&f);
}
END_TEST

START_TEST(test_nonfinite_inputs_cross)
{
    tfx f;
    tfx_init(&f, 1, 0);
    float *snap = tfx_prime(&f);
    f.xq[f.nxq - 1] = NAN;
    bad_call(&f, snap,
             lora_forward_cross(f.ad, f.xq, f.xkv, f.p.batch, f.p.len_q, f.p.len_kv, f.out),
             LORA_ERR_NONFINITE, "NaN in xq");
    ref_to_float(f.p.xq, f.xq, f.nxq);
    f.xkv[f.nxkv - 1] = INFINITY;
    bad_call(&f, snap,
             lora_forward_cross(f.ad, f.xq, f.xkv, f.p.batch, f.p.len_q, f.p.len_kv, f.out),
             LORA_ERR_NONFINITE, "Inf in xkv");
    f.xkv[0] = NAN;
    bad_call(&f, snap,
             lora_forward_cross(f.ad, f.xq, f.xkv, f.p.batch, f.p.len_q, f.p.len_kv, f.out),
             LORA_ERR_NONFINITE, "NaN in xkv");
    ref_to_float(f.p.xkv, f.xkv, f.nxkv);
    ck_assert_int_eq(
        lora_forward_cross(f.ad, f.xq, f.xkv, f.p.batch, f.p.len_q, f.p.len_kv, f.out), LORA_OK);
    f.dout[3] = NAN;
    bad_call(&f, snap, lora_backward_cross(f.ad, f.dout, f.dxq, f.dxkv), LORA_ERR_NONFINITE,
             "NaN in dout (cross)");
    ref_to_float(f.p.dout, f.dout, f.nout);
    tfx_assert_unchanged_and_works(&f, snap, "non-finite cross inputs");
    tfx_free(&f);
}
END_TEST

START_TEST(test_nonfinite_weights_and_params)
{
    tfx f;
    tfx_init(&f, 0, 1);
    float *snap = tfx_prime(&f);
    static const int tb[4] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V, LORA_TARGET_O};
    const float bads[2] = {NAN, -INFINITY};
    for (int t = 0; t < REF_NPROJ; t++)
        for (int b = 0; b < 2; b++) {
            float w[64], bias[8], a[16], bb[16];
            const size_t nw = (size_t)(f.l.out[t] * f.l.in[t]);
            const size_t na = (size_t)(f.l.rank * f.l.in[t]), nb = (size_t)(f.l.out[t] * f.l.rank);
            /* Garbage that would show if a failed call copied anything. */
            fill_uniform(w, nw, 40 + (uint64_t)t, 9.0f);
            fill_uniform(bias, (size_t)f.l.out[t], 50, 9.0f);
            fill_uniform(a, na, 60, 9.0f);
            fill_uniform(bb, nb, 70, 9.0f);
            w[nw - 1] = bads[b];
            bad_call(&f, snap, lora_adapter_set_base(f.ad, tb[t], w, bias), LORA_ERR_NONFINITE,
                     "non-finite base weight");
            w[nw - 1] = 0.0f;
            bias[0] = bads[b];
            bad_call(&f, snap, lora_adapter_set_base(f.ad, tb[t], w, bias), LORA_ERR_NONFINITE,
                     "non-finite bias");
            a[na / 2] = bads[b];
            bad_call(&f, snap, lora_adapter_set_param(f.ad, tb[t], LORA_A, a, na),
                     LORA_ERR_NONFINITE, "non-finite A");
            bb[nb - 1] = bads[b];
            bad_call(&f, snap, lora_adapter_set_param(f.ad, tb[t], LORA_B, bb, nb),
                     LORA_ERR_NONFINITE, "non-finite B");
        }
    /* The reference still holds the original weights: nothing was copied. */
    tfx_assert_unchanged_and_works(&f, snap, "non-finite weights");
    tfx_free(&f);
}
END_TEST

/* ---- call order ------------------------------------------------------------------------ */

START_TEST(test_forward_before_set_base)
{
    /* _i: which base is missing (Q, K, V, O). */
    static const int tb[4] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V, LORA_TARGET_O};
    tfx f;
    tfx_init(&f, 0, 0);
    lora_adapter *ad = NULL;
    /* A second adapter with every base but one. */
    lora_adapter_destroy(f.ad);
    f.ad = NULL;
    {
        ref_layer *l = &f.l;
        lora_config *cfg = cfg_new(l->cfg.d_model);
        ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, l->n_heads), LORA_OK);
        ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, l->n_kv_heads), LORA_OK);
        ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RANK, l->rank), LORA_OK);
        ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_TARGETS, 15), LORA_OK);
        ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_OUT_PROJ, 1), LORA_OK);
        ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
        lora_config_destroy(cfg);
    }
    float w[64], bias[8], p[16];
    for (int t = 0; t < REF_NPROJ; t++) {
        const size_t na = (size_t)(f.l.rank * f.l.in[t]), nb = (size_t)(f.l.out[t] * f.l.rank);
        ref_to_float(f.l.a[t], p, na);
        ck_assert_int_eq(lora_adapter_set_param(ad, tb[t], LORA_A, p, na), LORA_OK);
        ref_to_float(f.l.b[t], p, nb);
        ck_assert_int_eq(lora_adapter_set_param(ad, tb[t], LORA_B, p, nb), LORA_OK);
        if (t == _i)
            continue;
        ref_to_float(f.l.w[t], w, (size_t)(f.l.out[t] * f.l.in[t]));
        ref_to_float(f.l.bias[t], bias, (size_t)f.l.out[t]);
        ck_assert_int_eq(lora_adapter_set_base(ad, tb[t], w, bias), LORA_OK);
    }
    f.ad = ad;
    float *zero = calloc(f.ngrads, sizeof(float));
    ck_assert_ptr_nonnull(zero);
    bad_call(&f, zero, lora_forward(ad, f.xq, f.p.batch, f.p.len_q, f.out), LORA_ERR_STATE,
             "forward with a base weight unset");
    bad_call(&f, zero, lora_forward_cross(ad, f.xq, f.xq, f.p.batch, f.p.len_q, f.p.len_q, f.out),
             LORA_ERR_STATE, "forward_cross with a base weight unset");
    bad_call(&f, zero, lora_backward(ad, f.dout, NULL), LORA_ERR_STATE,
             "backward after a refused forward");
    /* Set the missing base: everything works. */
    ref_to_float(f.l.w[_i], w, (size_t)(f.l.out[_i] * f.l.in[_i]));
    ref_to_float(f.l.bias[_i], bias, (size_t)f.l.out[_i]);
    ck_assert_int_eq(lora_adapter_set_base(ad, tb[_i], w, bias), LORA_OK);
    tfx_assert_unchanged_and_works(&f, zero, "forward before set_base");
    tfx_free(&f);
}
END_TEST

/* ---- lora_threshold_estimate ---------------------------------------------------------- */

START_TEST(test_threshold_estimate_bad_inputs)
{
    tfx f;
    tfx_init(&f, 0, 1);
    float *snap = tfx_prime(&f); /* leaves a saved forward */
    lora_threshold_report r = {.struct_size = sizeof r};
    ck_assert_int_eq(lora_threshold_estimate(NULL, f.xq, 2, 5, &r), LORA_ERR_INVALID_ARG);
    bad_call(&f, snap, lora_threshold_estimate(f.ad, NULL, 2, 5, &r), LORA_ERR_INVALID_ARG,
             "threshold_estimate x NULL");
    bad_call(&f, snap, lora_threshold_estimate(f.ad, f.xq, 2, 5, NULL), LORA_ERR_INVALID_ARG,
             "threshold_estimate report NULL");
    r.struct_size = 4;
    bad_call(&f, snap, lora_threshold_estimate(f.ad, f.xq, 2, 5, &r), LORA_ERR_INVALID_ARG,
             "threshold_estimate struct_size 4");
    r.struct_size = sizeof r;
    bad_call(&f, snap, lora_threshold_estimate(f.ad, f.xq, 0, 5, &r), LORA_ERR_SHAPE,
             "threshold_estimate batch 0");
    bad_call(&f, snap, lora_threshold_estimate(f.ad, f.xq, 2, -1, &r), LORA_ERR_SHAPE,
             "threshold_estimate seq_len -1");
    bad_call(&f, snap, lora_threshold_estimate(f.ad, f.xq, INT64_MAX / 2, 2, &r), LORA_ERR_SHAPE,
             "threshold_estimate overflowing batch");
    f.xq[7] = NAN;
    bad_call(&f, snap, lora_threshold_estimate(f.ad, f.xq, 2, 5, &r), LORA_ERR_NONFINITE,
             "threshold_estimate NaN in x");
    ref_to_float(f.p.xq, f.xq, f.nxq);
    /* A good estimate touches neither the gradients nor the saved forward. */
    ck_assert_int_eq(lora_threshold_estimate(f.ad, f.xq, 2, 5, &r), LORA_OK);
    ck_assert(r.recommended_backend == LORA_BACKEND_EXACT ||
              r.recommended_backend == LORA_BACKEND_POLY);
    float *now = malloc(f.ngrads * sizeof(float));
    ck_assert_ptr_nonnull(now);
    tfx_grads(&f, now);
    ck_assert(memcmp(now, snap, f.ngrads * sizeof(float)) == 0);
    ck_assert_int_eq(lora_backward(f.ad, f.dout, NULL), LORA_OK);
    tfx_grads(&f, now);
    double md = 0.0, m = 0.0;
    for (size_t i = 0; i < f.ngrads; i++) {
        md = fmax(md, fabs((double)now[i] - 2.0 * snap[i]));
        m = fmax(m, fabs(2.0 * snap[i]));
    }
    ck_assert_msg(md <= 1e-6 * m, "backward after threshold_estimate: off by %g", md);
    free(now);
    free(snap);
    tfx_assert_works(&f);
    tfx_free(&f);

    /* Before set_base. */
    lora_config *cfg = cfg_new(8);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    lora_config_destroy(cfg);
    float x[16] = {0};
    ck_assert_int_eq(lora_threshold_estimate(ad, x, 1, 2, &r), LORA_ERR_STATE);
    ck_assert(lora_adapter_last_error(ad)[0] != '\0');
    lora_adapter_destroy(ad);
}
END_TEST

/* lora.h, lora_forward: "On failure ... the adapter keeps its parameters and gradients
 * (the saved forward is dropped)": a following backward is LORA_ERR_STATE. */
START_TEST(test_failed_forward_drops_saved_forward)
{
    tfx f;
    tfx_init(&f, _i, 1);
    float *snap = tfx_prime(&f); /* leaves a saved forward */
    const int64_t lkv = f.p.len_kv;
    for (int k = 0; k < 3; k++) {
        int st;
        if (k == 0) { /* NONFINITE */
            f.xq[0] = NAN;
            st = f.p.cross ? lora_forward_cross(f.ad, f.xq, f.xkv, 2, 5, lkv, f.out)
                           : lora_forward(f.ad, f.xq, 2, 5, f.out);
            ref_to_float(f.p.xq, f.xq, f.nxq);
            ck_assert_int_eq(st, LORA_ERR_NONFINITE);
        } else if (k == 1) { /* SHAPE */
            st = f.p.cross ? lora_forward_cross(f.ad, f.xq, f.xkv, 0, 5, lkv, f.out)
                           : lora_forward(f.ad, f.xq, 0, 5, f.out);
            ck_assert_int_eq(st, LORA_ERR_SHAPE);
        } else { /* INVALID_ARG */
            st = f.p.cross ? lora_forward_cross(f.ad, f.xq, f.xkv, 2, 5, lkv, NULL)
                           : lora_forward(f.ad, f.xq, 2, 5, NULL);
            ck_assert_int_eq(st, LORA_ERR_INVALID_ARG);
        }
        st = f.p.cross ? lora_backward_cross(f.ad, f.dout, NULL, NULL)
                       : lora_backward(f.ad, f.dout, NULL);
        ck_assert_msg(st == LORA_ERR_STATE,
                      "backward after a failed forward (%d): status %d, want LORA_ERR_STATE", k,
                      st);
        ck_assert_int_eq(tfx_step(&f), LORA_OK); /* a saved forward again */
        ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    }
    free(snap);
    tfx_assert_works(&f);
    tfx_free(&f);
}
END_TEST

/* lora_adapter_last_error: "Detail of the last failed call on this adapter". Failing
 * getters set a message too (checked after a successful call cleared it). */
START_TEST(test_getter_failures_set_message)
{
    tfx f;
    tfx_init(&f, 0, 0);
    int64_t iv;
    double dv;
    for (int i = 0; i < 6; i++) {
        ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
        int st;
        const char *what;
        switch (i) {
        case 0:
            st = lora_adapter_get_config_int(f.ad, 1000, &iv);
            what = "get_config_int(1000)";
            break;
        case 1:
            st = lora_adapter_get_config_int(f.ad, LORA_CFG_ALPHA, &iv);
            what = "get_config_int(ALPHA)";
            break;
        case 2:
            st = lora_adapter_get_config_double(f.ad, LORA_CFG_RANK, &dv);
            what = "get_config_double(RANK)";
            break;
        case 3:
            st = lora_adapter_get_config_double(f.ad, 0, &dv);
            what = "get_config_double(0)";
            break;
        case 4:
            st = lora_adapter_get_config_int(f.ad, LORA_CFG_RANK, NULL);
            what = "get_config_int(value NULL)";
            break;
        default:
            st = lora_adapter_get_run_info(f.ad, NULL);
            what = "get_run_info(NULL)";
            break;
        }
        ck_assert_msg(st == LORA_ERR_INVALID_ARG, "%s: status %d", what, st);
        ck_assert_msg(lora_adapter_last_error(f.ad)[0] != '\0',
                      "%s failed with an empty lora_adapter_last_error", what);
    }
    tfx_free(&f);
}
END_TEST

/* ---- library bugs ---------------------------------------------------------------------- */

/* lora_config_last_error: "Detail of the last failed call on this config ("" if none)".
 * lora_config_get_int / _get_double fail (unknown param, wrong type, NULL value) without
 * setting a message: the text stays "" (or a stale one). */
START_TEST(bug_config_getter_failure_leaves_no_message)
{
    lora_config *cfg = cfg_new(8);
    int64_t iv;
    double dv;
    for (int i = 0; i < 4; i++) {
        ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RANK, 4), LORA_OK); /* clears */
        int st;
        const char *what;
        switch (i) {
        case 0:
            st = lora_config_get_int(cfg, 1000, &iv);
            what = "get_int(1000)";
            break;
        case 1:
            st = lora_config_get_int(cfg, LORA_CFG_ALPHA, &iv);
            what = "get_int(ALPHA)";
            break;
        case 2:
            st = lora_config_get_double(cfg, LORA_CFG_RANK, &dv);
            what = "get_double(RANK)";
            break;
        default:
            st = lora_config_get_int(cfg, LORA_CFG_RANK, NULL);
            what = "get_int(value NULL)";
            break;
        }
        ck_assert_msg(st == LORA_ERR_INVALID_ARG, "lora_config_%s: status %d", what, st);
        ck_assert_msg(lora_config_last_error(cfg)[0] != '\0',
                      "lora_config_%s failed with an empty lora_config_last_error", what);
    }
    lora_config_destroy(cfg);
}
END_TEST

Suite *errors_suite(void)
{
    Suite *s = suite_create("errors");
    TCase *tc = tcase_create("null");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_null_config_args);
    tcase_add_test(tc, test_null_adapter_handle);
    tcase_add_test(tc, test_null_args_with_handle);
    suite_add_tcase(s, tc);
    tc = tcase_create("shapes_targets");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_bad_shapes_self);
    tcase_add_loop_test(tc, test_bad_shapes_cross, 0, 2);
    tcase_add_test(tc, test_bad_targets_and_counts);
    tcase_add_test(tc, test_target_not_adapted);
    suite_add_tcase(s, tc);
    tc = tcase_create("nonfinite_state");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_nonfinite_inputs_self);
    tcase_add_test(tc, test_nonfinite_inputs_cross);
    tcase_add_test(tc, test_nonfinite_weights_and_params);
    tcase_add_loop_test(tc, test_forward_before_set_base, 0, 4);
    tcase_add_test(tc, test_threshold_estimate_bad_inputs);
    suite_add_tcase(s, tc);
    tcase_add_loop_test(tc, test_failed_forward_drops_saved_forward, 0, 2);
    tcase_add_test(tc, test_getter_failures_set_message);
    suite_add_tcase(s, tc);
    tc = tcase_create("library_bugs");
    tcase_add_test(tc, bug_config_getter_failure_leaves_no_message);
    suite_add_tcase(s, tc);
    return s;
}
