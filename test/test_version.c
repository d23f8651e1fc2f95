/* version_suite: version number/string, status strings, lora_mse_loss and
 * lora_mse_loss_mean. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "suites.h"

START_TEST(test_version_number_matches_header)
{
    ck_assert_uint_eq(lora_version_number(), LORA_VERSION_NUMBER);
    ck_assert_uint_eq(LORA_VERSION_NUMBER, LORA_VERSION_MAJOR * 10000u +
                                               LORA_VERSION_MINOR * 100u + LORA_VERSION_PATCH);
}
END_TEST

START_TEST(test_version_string_matches_header)
{
    char want[64];
    snprintf(want, sizeof want, "%d.%d.%d", LORA_VERSION_MAJOR, LORA_VERSION_MINOR,
             LORA_VERSION_PATCH);
    const char *s = lora_version_string();
    ck_assert_ptr_nonnull(s);
    ck_assert_str_eq(s, want);
    /* Stable storage: a second call returns the same text. */
    ck_assert_str_eq(lora_version_string(), s);
}
END_TEST

START_TEST(test_status_strings_nonempty_and_distinct)
{
    const char *s[LORA_ERR_TOLERANCE + 1];
    for (int i = LORA_OK; i <= LORA_ERR_TOLERANCE; i++) {
        s[i] = lora_status_string(i);
        ck_assert_ptr_nonnull(s[i]);
        ck_assert_msg(s[i][0] != '\0', "status %d has an empty string", i);
        for (int j = 0; j < i; j++)
            ck_assert_msg(strcmp(s[i], s[j]) != 0, "status %d and %d share \"%s\"", i, j,
                          s[i]);
    }
    const int unknown[] = {-1, LORA_ERR_TOLERANCE + 1, 1000, -2147483647 - 1};
    for (size_t k = 0; k < sizeof unknown / sizeof unknown[0]; k++) {
        const char *u = lora_status_string(unknown[k]);
        ck_assert_ptr_nonnull(u);
        ck_assert_msg(u[0] != '\0', "unknown status %d has an empty string", unknown[k]);
        for (int j = 0; j <= LORA_ERR_TOLERANCE; j++)
            ck_assert_msg(strcmp(u, s[j]) != 0, "unknown status %d reads as status %d",
                          unknown[k], j);
    }
}
END_TEST

START_TEST(test_mse_known_answer)
{
    const float out[4] = {1.0f, 2.0f, 3.0f, -0.5f};
    const float target[4] = {0.0f, 0.0f, 1.0f, 0.5f};
    float dout[4] = {9, 9, 9, 9};
    double loss = -1.0;
    ck_assert_int_eq(lora_mse_loss(out, target, 4, &loss, dout), LORA_OK);
    ck_assert_double_eq_tol(loss, 0.5 * (1.0 + 4.0 + 4.0 + 1.0), 1e-12);
    const float want[4] = {1.0f, 2.0f, 2.0f, -1.0f};
    for (int i = 0; i < 4; i++)
        ck_assert_float_eq(dout[i], want[i]);
    /* dout may be NULL. */
    loss = -1.0;
    ck_assert_int_eq(lora_mse_loss(out, target, 4, &loss, NULL), LORA_OK);
    ck_assert_double_eq_tol(loss, 5.0, 1e-12);
    /* n counts elements: only the first two here. */
    ck_assert_int_eq(lora_mse_loss(out, target, 2, &loss, NULL), LORA_OK);
    ck_assert_double_eq_tol(loss, 2.5, 1e-12);
}
END_TEST

/* The sum is accumulated in double: 1e8 + 1000 * 0.01 loses everything in float. */
START_TEST(test_mse_accumulates_in_double)
{
    enum { N = 1001 };
    static float out[N], target[N];
    out[0] = 1e4f;
    for (int i = 1; i < N; i++)
        out[i] = 0.1f;
    double loss = 0.0;
    ck_assert_int_eq(lora_mse_loss(out, target, N, &loss, NULL), LORA_OK);
    const double d = (double)0.1f;
    const double want = 0.5 * (1e8 + 1000.0 * d * d);
    ck_assert_msg(fabs(loss - want) <= 1e-9 * want, "loss %.17g, want %.17g", loss, want);
}
END_TEST

START_TEST(test_mse_errors)
{
    const float a[2] = {1.0f, 2.0f}, b[2] = {0.0f, 1.0f};
    float dout[2] = {7.0f, 7.0f};
    double loss = 42.0;
    ck_assert_int_eq(lora_mse_loss(NULL, b, 2, &loss, dout), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_mse_loss(a, NULL, 2, &loss, dout), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_mse_loss(a, b, 2, NULL, dout), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_mse_loss(a, b, 0, &loss, dout), LORA_ERR_INVALID_ARG);
    const float nan_[2] = {1.0f, NAN}, inf_[2] = {INFINITY, 0.0f};
    ck_assert_int_eq(lora_mse_loss(nan_, b, 2, &loss, dout), LORA_ERR_NONFINITE);
    ck_assert_int_eq(lora_mse_loss(a, nan_, 2, &loss, dout), LORA_ERR_NONFINITE);
    ck_assert_int_eq(lora_mse_loss(inf_, b, 2, &loss, dout), LORA_ERR_NONFINITE);
    ck_assert_int_eq(lora_mse_loss(a, inf_, 2, &loss, NULL), LORA_ERR_NONFINITE);
    /* Still works afterwards (no hidden state). */
    ck_assert_int_eq(lora_mse_loss(a, b, 2, &loss, dout), LORA_OK);
    ck_assert_double_eq_tol(loss, 1.0, 1e-12);
}
END_TEST

/* torch.nn.MSELoss (reduction "mean"): loss = mean((out - target)^2), gradient
 * 2*(out - target)/n; the paper's loss and its dout are the same numbers scaled. */
START_TEST(test_mse_mean_known_answer)
{
    const float out[4] = {1.0f, 2.0f, 3.0f, -0.5f};
    const float target[4] = {0.0f, 0.0f, 1.0f, 0.5f};
    float dout[4] = {9, 9, 9, 9};
    double loss = -1.0;
    ck_assert_int_eq(lora_mse_loss_mean(out, target, 4, &loss, dout), LORA_OK);
    ck_assert_double_eq_tol(loss, (1.0 + 4.0 + 4.0 + 1.0) / 4.0, 1e-12);
    const float want[4] = {0.5f, 1.0f, 1.0f, -0.5f}; /* 2/4 * (out - target) */
    for (int i = 0; i < 4; i++)
        ck_assert_float_eq(dout[i], want[i]);
    ck_assert_int_eq(lora_mse_loss_mean(out, target, 4, &loss, NULL), LORA_OK);
    ck_assert_double_eq_tol(loss, 2.5, 1e-12);
    /* n = 3: 2/3 is rounded to float once, then multiplies (out - target). */
    ck_assert_int_eq(lora_mse_loss_mean(out, target, 3, &loss, dout), LORA_OK);
    ck_assert_double_eq_tol(loss, 9.0 / 3.0, 1e-12);
    ck_assert_float_eq(dout[1], (float)(2.0 / 3.0) * 2.0f);
    ck_assert_float_eq(dout[3], -0.5f); /* past n: untouched since the n = 4 call */
    /* Half the paper's loss times 2/n, for random data of odd length. */
    enum { N = 37 };
    float o[N], t[N], d_sum[N], d_mean[N];
    for (int i = 0; i < N; i++) {
        o[i] = (float)sin(1.7 * i);
        t[i] = (float)cos(0.3 * i);
    }
    double half = 0.0, mean = 0.0;
    ck_assert_int_eq(lora_mse_loss(o, t, N, &half, d_sum), LORA_OK);
    ck_assert_int_eq(lora_mse_loss_mean(o, t, N, &mean, d_mean), LORA_OK);
    ck_assert_msg(fabs(mean - 2.0 * half / N) <= 1e-15 * mean, "%.17g vs %.17g", mean,
                  2.0 * half / N);
    for (int i = 0; i < N; i++)
        ck_assert_float_eq(d_mean[i], (float)(2.0 / N) * d_sum[i]);
}
END_TEST

START_TEST(test_mse_mean_errors)
{
    const float a[2] = {1.0f, 2.0f}, b[2] = {0.0f, 1.0f};
    float dout[2] = {7.0f, 7.0f};
    double loss = 42.0;
    ck_assert_int_eq(lora_mse_loss_mean(NULL, b, 2, &loss, dout), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_mse_loss_mean(a, NULL, 2, &loss, dout), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_mse_loss_mean(a, b, 2, NULL, dout), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_mse_loss_mean(a, b, 0, &loss, dout), LORA_ERR_INVALID_ARG);
    const float nan_[2] = {1.0f, NAN};
    ck_assert_int_eq(lora_mse_loss_mean(nan_, b, 2, &loss, dout), LORA_ERR_NONFINITE);
    ck_assert_int_eq(lora_mse_loss_mean(a, nan_, 2, &loss, dout), LORA_ERR_NONFINITE);
    /* A failed call writes nothing. */
    ck_assert(loss == 42.0 && dout[0] == 7.0f && dout[1] == 7.0f);
}
END_TEST

Suite *version_suite(void)
{
    Suite *s = suite_create("version");
    TCase *tc = tcase_create("version");
    tcase_add_test(tc, test_version_number_matches_header);
    tcase_add_test(tc, test_version_string_matches_header);
    tcase_add_test(tc, test_status_strings_nonempty_and_distinct);
    suite_add_tcase(s, tc);
    tc = tcase_create("mse_loss");
    tcase_add_test(tc, test_mse_known_answer);
    tcase_add_test(tc, test_mse_accumulates_in_double);
    tcase_add_test(tc, test_mse_errors);
    tcase_add_test(tc, test_mse_mean_known_answer);
    tcase_add_test(tc, test_mse_mean_errors);
    suite_add_tcase(s, tc);
    return s;
}
