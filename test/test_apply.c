/* serving suite, lora_apply: the multi-tenant LoRA delta against a double reference
 * (tenants of different ranks and scales, rows with -1, both kernel routes, shuffled
 * row orders), many threads on the same tenants at once, and every bad input. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "fixtures.h"
#include "helpers.h"
#include "suites.h"

/* Tenants: one fx_spec each (d_model 40 over 5 heads: in and out not multiples of 16),
 * ranks below, at and above 16, different alphas, one rsLoRA. */
#define APPLY_TENANTS 5
static const int apply_ranks[APPLY_TENANTS] = {2, 16, 5, 17, 33};

static fx_spec apply_spec(int i)
{
    fx_spec s = fx_default();
    s.d_model = 40;
    s.n_heads = 5;
    s.n_kv_heads = 5; /* Q, K, V and O all 40 x 40 */
    s.rank = apply_ranks[i];
    s.alpha = 3.0 + i;
    s.rslora = i == 3;
    return s;
}

static void make_tenants(lora_adapter **t, int n)
{
    for (int i = 0; i < n; i++) {
        fx_spec s = apply_spec(i % APPLY_TENANTS);
        t[i] = fx_adapter_nobase(&s, 100u + (uint64_t)i);
    }
}

static void free_tenants(lora_adapter **t, int n)
{
    for (int i = 0; i < n; i++)
        lora_adapter_destroy(t[i]);
}

/* y[r] + s_t (x[r] A_tᵀ) B_tᵀ in double, for the rows of tenant >= 0 (else y[r]). */
static double *reference_apply(lora_adapter *const *tenants, int target, const int32_t *tid,
                               const float *x, int64_t rows, const float *y, int64_t *in_out)
{
    int64_t r0, in, out, r1;
    ck_assert_int_eq(lora_adapter_param_shape(tenants[0], target, LORA_A, &r0, &in), LORA_OK);
    ck_assert_int_eq(lora_adapter_param_shape(tenants[0], target, LORA_B, &out, &r1), LORA_OK);
    in_out[0] = in;
    in_out[1] = out;
    double *ref = malloc((size_t)(rows * out) * sizeof(double));
    for (int64_t i = 0; i < rows * out; i++)
        ref[i] = y[i];
    for (int64_t r = 0; r < rows; r++) {
        if (tid[r] < 0)
            continue;
        lora_adapter *ad = tenants[tid[r]];
        int64_t rank, cols, rslora;
        double alpha;
        ck_assert_int_eq(lora_adapter_param_shape(ad, target, LORA_A, &rank, &cols), LORA_OK);
        ck_assert_int_eq(lora_adapter_get_config_double(ad, LORA_CFG_ALPHA, &alpha), LORA_OK);
        ck_assert_int_eq(lora_adapter_get_config_int(ad, LORA_CFG_RSLORA, &rslora), LORA_OK);
        const double s = rslora ? alpha / sqrt((double)rank) : alpha / (double)rank;
        float *a = malloc((size_t)(rank * in) * sizeof(float));
        float *b = malloc((size_t)(out * rank) * sizeof(float));
        ck_assert_int_eq(lora_adapter_get_param(ad, target, LORA_A, a, (size_t)(rank * in)),
                         LORA_OK);
        ck_assert_int_eq(lora_adapter_get_param(ad, target, LORA_B, b, (size_t)(out * rank)),
                         LORA_OK);
        for (int64_t j = 0; j < out; j++) {
            double acc = 0.0;
            for (int64_t k = 0; k < rank; k++) {
                double t = 0.0;
                for (int64_t c = 0; c < in; c++)
                    t += (double)x[r * in + c] * a[k * in + c];
                acc += t * b[j * rank + k];
            }
            ref[r * out + j] += s * acc;
        }
        free(a);
        free(b);
    }
    return ref;
}

static uint64_t lcg(uint64_t *s)
{
    *s = *s * UINT64_C(6364136223846793005) + UINT64_C(1442695040888963407);
    return *s >> 33;
}

/* Row r's tenant: -1 for every 7th row; tenants 1..3 one row in 100 (a few rows: the
 * register route); the others split between tenants 0 (several row blocks) and 4. */
static void make_tenant_ids(int32_t *tid, int64_t rows, uint64_t seed)
{
    uint64_t s = seed;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t m = r % 100;
        tid[r] = r % 7 == 3                     ? -1
                 : m == 1 || m == 2 || m == 5 ? (int32_t)(m == 5 ? 3 : m)
                 : lcg(&s) % 100 < 70         ? 0
                                              : 4;
    }
}

static void check_against_reference(lora_adapter *const *tenants, int target,
                                    const int32_t *tid, const float *x, int64_t rows,
                                    const float *y0)
{
    int64_t io[2];
    double *ref = reference_apply(tenants, target, tid, x, rows, y0, io);
    const int64_t out = io[1];
    float *y = malloc((size_t)(rows * out) * sizeof(float));
    memcpy(y, y0, (size_t)(rows * out) * sizeof(float));
    char err[128];
    ck_assert_msg(lora_apply_with_error((const lora_adapter *const *)tenants, APPLY_TENANTS,
                                        target, tid, x, rows, y, err, sizeof err) == LORA_OK,
                  "%s", err);
    ck_assert_str_eq(err, "");
    double scale = 1e-30;
    for (int64_t i = 0; i < rows * out; i++)
        scale = fabs(ref[i]) > scale ? fabs(ref[i]) : scale;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < out; j++) {
            const int64_t i = r * out + j;
            if (tid[r] < 0)
                ck_assert_msg(memcmp(&y[i], &y0[i], sizeof(float)) == 0,
                              "row %lld has tenant -1 but changed", (long long)r);
            else
                ck_assert_msg(fabs(y[i] - ref[i]) <= 2e-6 * scale,
                              "row %lld col %lld: %g vs reference %g", (long long)r,
                              (long long)j, (double)y[i], ref[i]);
        }
    free(ref);
    free(y);
}

/* Every target, against the reference; then the rows shuffled (another order of the
 * same rows) against the reference again. */
START_TEST(test_apply_matches_reference)
{
    const int target = fx_tbits[_i];
    lora_adapter *tenants[APPLY_TENANTS];
    make_tenants(tenants, APPLY_TENANTS);
    const int64_t rows = 700, in = 40, out = 40; /* every projection is 40 x 40 here */
    int32_t *tid = malloc((size_t)rows * sizeof(int32_t));
    float *x = malloc((size_t)(rows * in) * sizeof(float));
    float *y0 = malloc((size_t)(rows * out) * sizeof(float));
    make_tenant_ids(tid, rows, 1 + (uint64_t)_i);
    fill_uniform(x, (size_t)(rows * in), 3, 1.0f);
    fill_uniform(y0, (size_t)(rows * out), 4, 1.0f);
    for (int64_t r = 0; r < rows; r++) /* rows the call must not read */
        if (tid[r] < 0)
            x[r * in] = NAN;
    check_against_reference(tenants, target, tid, x, rows, y0);
    /* Shuffle rows (Fisher-Yates) and their tenant ids together. */
    uint64_t s = 99;
    for (int64_t r = rows - 1; r > 0; r--) {
        const int64_t k = (int64_t)(lcg(&s) % (uint64_t)(r + 1));
        int32_t t = tid[r];
        tid[r] = tid[k];
        tid[k] = t;
        for (int64_t c = 0; c < in; c++) {
            float v = x[r * in + c];
            x[r * in + c] = x[k * in + c];
            x[k * in + c] = v;
        }
    }
    check_against_reference(tenants, target, tid, x, rows, y0);
    /* Small batches: one row per tenant (decode), and all rows of one tenant. */
    fill_uniform(x, (size_t)(rows * in), 5, 1.0f);
    for (int64_t r = 0; r < 8; r++)
        tid[r] = (int32_t)(r % 6) - 1;
    check_against_reference(tenants, target, tid, x, 8, y0);
    for (int64_t r = 0; r < 9; r++)
        tid[r] = 4;
    check_against_reference(tenants, target, tid, x, 9, y0);
    free(tid);
    free(x);
    free(y0);
    free_tenants(tenants, APPLY_TENANTS);
}
END_TEST

/* lora_apply adds exactly a tenant's own LoRA term: with one token, attention returns
 * the value row, so a forward is x·W_Vᵀ + s·(x·Aᵀ)·Bᵀ (no bias, no output projection);
 * lora_apply onto the forward of the same adapter with B = 0 gives the full forward. */
START_TEST(test_apply_equals_forward_delta)
{
    fx_spec s = apply_spec(1);
    s.out_proj = 0;
    s.bias = 0;
    s.targets = LORA_TARGET_V;
    s.n_heads = s.n_kv_heads = 1;
    lora_adapter *ad = fx_adapter(&s, 7), *zero = fx_adapter(&s, 7);
    float *bz = calloc(40 * 16, sizeof(float));
    ck_assert_int_eq(lora_adapter_set_param(zero, LORA_TARGET_V, LORA_B, bz, 40 * 16), LORA_OK);
    const int64_t batch = 3;
    float x[3 * 40], y_ad[3 * 40], y_zero[3 * 40];
    fill_uniform(x, 3 * 40, 5, 1.0f);
    ck_assert_int_eq(lora_forward(ad, x, batch, 1, y_ad), LORA_OK);
    ck_assert_int_eq(lora_forward(zero, x, batch, 1, y_zero), LORA_OK);
    const int32_t tid[3] = {0, 0, 0};
    const lora_adapter *const tenants[1] = {ad};
    ck_assert_int_eq(lora_apply(tenants, 1, LORA_TARGET_V, tid, x, batch, y_zero), LORA_OK);
    for (int i = 0; i < 3 * 40; i++)
        ck_assert_msg(fabsf(y_zero[i] - y_ad[i]) <= 1e-5f * (1.0f + fabsf(y_ad[i])),
                      "entry %d: %g vs forward %g", i, (double)y_zero[i], (double)y_ad[i]);
    free(bz);
    lora_adapter_destroy(ad);
    lora_adapter_destroy(zero);
}
END_TEST

typedef struct apply_thread {
    const lora_adapter *const *tenants;
    const int32_t *tid;
    const float *x;
    float *y;
    int64_t rows, out;
    const float *expect;
    int iterations, status, mismatch;
} apply_thread;

static void *apply_thread_run(void *arg)
{
    apply_thread *j = arg;
    const size_t n = (size_t)(j->rows * j->out);
    for (int it = 0; it < j->iterations && j->status == LORA_OK && !j->mismatch; it++) {
        memset(j->y, 0, n * sizeof(float));
        char err[64];
        j->status = lora_apply_with_error(j->tenants, APPLY_TENANTS, LORA_TARGET_K, j->tid,
                                          j->x, j->rows, j->y, err, sizeof err);
        j->mismatch = memcmp(j->y, j->expect, n * sizeof(float)) != 0;
    }
    return NULL;
}

/* Many threads call lora_apply on the same tenants at once (each with its own x and y):
 * every call gives bitwise the single-threaded result. Run under TSan by check-tsan. */
START_TEST(test_apply_concurrent_threads)
{
    enum { THREADS = 8 };
    lora_adapter *tenants[APPLY_TENANTS];
    make_tenants(tenants, APPLY_TENANTS);
    const int64_t rows = 120, in = 40, out = 40;
    apply_thread jobs[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        int32_t *tid = malloc((size_t)rows * sizeof(int32_t));
        float *x = malloc((size_t)(rows * in) * sizeof(float));
        float *expect = calloc((size_t)(rows * out), sizeof(float));
        make_tenant_ids(tid, rows, 10u + (uint64_t)i);
        fill_uniform(x, (size_t)(rows * in), 20u + (uint64_t)i, 1.0f);
        ck_assert_int_eq(lora_apply((const lora_adapter *const *)tenants, APPLY_TENANTS,
                                    LORA_TARGET_K, tid, x, rows, expect),
                         LORA_OK);
        jobs[i] = (apply_thread){(const lora_adapter *const *)tenants, tid, x,
                                 malloc((size_t)(rows * out) * sizeof(float)), rows, out,
                                 expect, 25, LORA_OK, 0};
    }
    for (int i = 0; i < THREADS; i++)
        ck_assert_int_eq(pthread_create(&th[i], NULL, apply_thread_run, &jobs[i]), 0);
    for (int i = 0; i < THREADS; i++)
        ck_assert_int_eq(pthread_join(th[i], NULL), 0);
    for (int i = 0; i < THREADS; i++) {
        ck_assert_int_eq(jobs[i].status, LORA_OK);
        ck_assert_msg(!jobs[i].mismatch, "thread %d: result differs from the serial one", i);
        free((void *)jobs[i].tid);
        free((void *)jobs[i].x);
        free(jobs[i].y);
        free((void *)jobs[i].expect);
    }
    free_tenants(tenants, APPLY_TENANTS);
}
END_TEST

/* Threads listed for this process (/proc/self/status). */
static int process_thread_count(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    ck_assert_ptr_nonnull(f);
    char line[256];
    int n = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "Threads: %d", &n) == 1)
            break;
    fclose(f);
    ck_assert_int_gt(n, 0);
    return n;
}

/* Tenants wide enough for several parts (d_model 256: 64 KiB of factors and rows per
 * part); tenants[0] is made with `threads` worker threads, so lora_apply runs on them. */
#define WIDE_TENANTS 6
static void make_wide_tenants(lora_adapter **t, int threads)
{
    static const int ranks[WIDE_TENANTS] = {16, 64, 5, 33, 8, 48};
    for (int i = 0; i < WIDE_TENANTS; i++) {
        fx_spec s = fx_default();
        s.d_model = 256;
        s.n_heads = s.n_kv_heads = 4;
        s.rank = ranks[i];
        s.alpha = 2.0 + i;
        lora_config *cfg = fx_config(&s);
        ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_THREADS, i == 0 ? threads : 1),
                         LORA_OK);
        ck_assert_int_eq(lora_adapter_create(&t[i], cfg), LORA_OK);
        lora_config_destroy(cfg);
        fx_randomize_factors(t[i], 500u + (uint64_t)i, 0.5f);
    }
}

/* lora_apply runs on tenants[0]'s worker threads (the process gains threads) and gives
 * bitwise the single-threaded y for 1 to 4 threads: many rows per tenant (the BLIS
 * route) and a decode batch of two rows per tenant (the register route). */
START_TEST(test_apply_same_for_any_thread_count)
{
    const int64_t in = 256, out = 256, rows = 300;
    int32_t *tid = malloc((size_t)rows * sizeof(int32_t));
    float *x = malloc((size_t)(rows * in) * sizeof(float));
    float *y0 = malloc((size_t)(rows * out) * sizeof(float));
    float *y1[2], *y = malloc((size_t)(rows * out) * sizeof(float));
    fill_uniform(x, (size_t)(rows * in), 7, 1.0f);
    fill_uniform(y0, (size_t)(rows * out), 8, 1.0f);
    const int64_t n_rows[2] = {rows, 2 * WIDE_TENANTS};
    for (int threads = 1; threads <= 4; threads++) {
        lora_adapter *t[WIDE_TENANTS];
        make_wide_tenants(t, threads);
        const lora_adapter *const *ct = (const lora_adapter *const *)t;
        const int before = process_thread_count();
        for (int c = 0; c < 2; c++) {
            for (int64_t r = 0; r < n_rows[c]; r++)
                tid[r] = r % 11 == 5 ? -1 : (int32_t)((r * 5) % WIDE_TENANTS);
            memcpy(y, y0, (size_t)(rows * out) * sizeof(float));
            ck_assert_int_eq(lora_apply(ct, WIDE_TENANTS, LORA_TARGET_V, tid, x, n_rows[c], y),
                             LORA_OK);
            if (threads == 1) {
                y1[c] = malloc((size_t)(rows * out) * sizeof(float));
                memcpy(y1[c], y, (size_t)(rows * out) * sizeof(float));
                ck_assert(memcmp(y, y0, (size_t)(n_rows[c] * out) * sizeof(float)) != 0);
            } else {
                ck_assert_msg(memcmp(y, y1[c], (size_t)(rows * out) * sizeof(float)) == 0,
                              "%d threads, case %d: y differs from 1 thread", threads, c);
            }
        }
        if (threads > 1)
            ck_assert_msg(process_thread_count() > before,
                          "%d threads: lora_apply started no worker", threads);
        for (int i = 0; i < WIDE_TENANTS; i++)
            lora_adapter_destroy(t[i]);
    }
    free(y1[0]);
    free(y1[1]);
    free(tid);
    free(x);
    free(y0);
    free(y);
}
END_TEST

/* Every bad input: its status, a message naming the argument, y unchanged. */
START_TEST(test_apply_bad_inputs)
{
    lora_adapter *t[3];
    make_tenants(t, 2);
    fx_spec other = apply_spec(0);
    other.d_model = 48; /* another (in, out) */
    other.n_heads = 6;
    other.n_kv_heads = 6;
    t[2] = fx_adapter_nobase(&other, 3);
    fx_spec only_q = apply_spec(0);
    only_q.targets = LORA_TARGET_Q;
    lora_adapter *q_only = fx_adapter_nobase(&only_q, 4);
    const lora_adapter *ok2[2] = {t[0], t[1]};
    const lora_adapter *with_null[2] = {t[0], NULL};
    const lora_adapter *mixed_shape[2] = {t[0], t[2]};
    const lora_adapter *not_adapted[2] = {t[0], q_only};
    enum { ROWS = 4, W = 40 };
    float x[ROWS * W], y[ROWS * W], y0[ROWS * W], xnan[ROWS * W];
    fill_uniform(x, ROWS * W, 1, 1.0f);
    fill_uniform(y0, ROWS * W, 2, 1.0f);
    memcpy(xnan, x, sizeof x);
    xnan[2 * W + 5] = NAN;
    const int32_t tid[ROWS] = {0, 1, 0, -1}, tid_hi[ROWS] = {0, 2, 0, 0},
                  tid_lo[ROWS] = {0, -2, 0, 0};
    const struct {
        const lora_adapter *const *tenants;
        size_t n;
        int target;
        const int32_t *tid;
        const float *x;
        int64_t rows;
        int yes_y;
        int status;
        const char *names;
    } cases[] = {
        {NULL, 2, LORA_TARGET_K, tid, x, ROWS, 1, LORA_ERR_INVALID_ARG, "tenants"},
        {ok2, 0, LORA_TARGET_K, tid, x, ROWS, 1, LORA_ERR_INVALID_ARG, "n_tenants"},
        {with_null, 2, LORA_TARGET_K, tid, x, ROWS, 1, LORA_ERR_INVALID_ARG, "tenants[1]"},
        {ok2, 2, 3, tid, x, ROWS, 1, LORA_ERR_INVALID_ARG, "target"},
        {ok2, 2, 0, tid, x, ROWS, 1, LORA_ERR_INVALID_ARG, "target"},
        {not_adapted, 2, LORA_TARGET_K, tid, x, ROWS, 1, LORA_ERR_INVALID_ARG, "tenants[1]"},
        {mixed_shape, 2, LORA_TARGET_K, tid, x, ROWS, 1, LORA_ERR_SHAPE, "tenants[1]"},
        {ok2, 2, LORA_TARGET_K, tid, x, -1, 1, LORA_ERR_SHAPE, "rows"},
        {ok2, 2, LORA_TARGET_K, NULL, x, ROWS, 1, LORA_ERR_INVALID_ARG, "tenant_of_row"},
        {ok2, 2, LORA_TARGET_K, tid, NULL, ROWS, 1, LORA_ERR_INVALID_ARG, "x"},
        {ok2, 2, LORA_TARGET_K, tid, x, ROWS, 0, LORA_ERR_INVALID_ARG, "y"},
        {ok2, 2, LORA_TARGET_K, tid_hi, x, ROWS, 1, LORA_ERR_INVALID_ARG, "tenant_of_row[1]"},
        {ok2, 2, LORA_TARGET_K, tid_lo, x, ROWS, 1, LORA_ERR_INVALID_ARG, "tenant_of_row[1]"},
        {ok2, 2, LORA_TARGET_K, tid, xnan, ROWS, 1, LORA_ERR_NONFINITE, "row 2"},
        {ok2, 2, LORA_TARGET_K, tid, x, INT64_MAX / 8, 1, LORA_ERR_SHAPE, "overflows"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        memcpy(y, y0, sizeof y);
        char err[256] = "unset";
        const int st = lora_apply_with_error(cases[c].tenants, cases[c].n, cases[c].target,
                                             cases[c].tid, cases[c].x, cases[c].rows,
                                             cases[c].yes_y ? y : NULL, err, sizeof err);
        ck_assert_msg(st == cases[c].status, "case %zu: status %d, expected %d (%s)", c, st,
                      cases[c].status, err);
        ck_assert_msg(strstr(err, cases[c].names) != NULL, "case %zu: message '%s' lacks '%s'",
                      c, err, cases[c].names);
        ck_assert_msg(memcmp(y, y0, sizeof y) == 0, "case %zu changed y", c);
        /* lora_apply itself: the same status, and nothing to read afterwards */
        ck_assert_int_eq(lora_apply(cases[c].tenants, cases[c].n, cases[c].target,
                                    cases[c].tid, cases[c].x, cases[c].rows,
                                    cases[c].yes_y ? y : NULL),
                         cases[c].status);
        ck_assert_int_eq(lora_adapter_last_error(t[0])[0], '\0'); /* tenants untouched */
    }
    /* A NaN in a row of tenant -1 is never read; rows = 0 accepts NULL arrays. */
    const int32_t skip_nan[ROWS] = {0, 1, -1, 0};
    memcpy(y, y0, sizeof y);
    ck_assert_int_eq(lora_apply(ok2, 2, LORA_TARGET_K, skip_nan, xnan, ROWS, y), LORA_OK);
    for (int j = 0; j < W; j++)
        ck_assert(memcmp(&y[2 * W + j], &y0[2 * W + j], sizeof(float)) == 0);
    ck_assert_int_eq(lora_apply(ok2, 2, LORA_TARGET_K, NULL, NULL, 0, NULL), LORA_OK);
    /* The message is truncated to the buffer; error_size 0 writes nothing. */
    char small[8] = "xxxxxxx", none[4] = "abc";
    ck_assert_int_eq(lora_apply_with_error(ok2, 2, 3, tid, x, ROWS, y, small, sizeof small),
                     LORA_ERR_INVALID_ARG);
    ck_assert_uint_eq(strlen(small), sizeof small - 1);
    ck_assert_int_eq(lora_apply_with_error(ok2, 2, 3, tid, x, ROWS, y, none, 0),
                     LORA_ERR_INVALID_ARG);
    ck_assert_str_eq(none, "abc");
    free_tenants(t, 3);
    lora_adapter_destroy(q_only);
}
END_TEST

/* An allocator that fails while `fail` is set, after `ok_left` more successes. */
typedef struct switch_alloc {
    int fail, ok_left;
} switch_alloc;

static void *switch_malloc(void *u, size_t n)
{
    switch_alloc *sw = u;
    if (sw->fail && sw->ok_left-- <= 0)
        return NULL;
    return malloc(n);
}
static void switch_free(void *u, void *p)
{
    (void)u;
    free(p);
}

/* The workspace comes from tenants[0]'s allocator; when it fails: NOMEM, y unchanged. */
START_TEST(test_apply_nomem)
{
    switch_alloc sw = {0};
    const lora_allocator hooks = {switch_malloc, switch_free, &sw};
    lora_config *cfg = NULL;
    ck_assert_int_eq(lora_config_create_with_allocator(&cfg, &hooks), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_D_MODEL, 32), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, 2), LORA_OK);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    lora_config_destroy(cfg);
    fx_randomize_factors(ad, 3, 0.5f);
    const lora_adapter *tenants[1] = {ad};
    float x[3 * 32], y[3 * 32], y0[3 * 32];
    fill_uniform(x, 3 * 32, 1, 1.0f);
    fill_uniform(y0, 3 * 32, 2, 1.0f);
    memcpy(y, y0, sizeof y);
    const int32_t tid[3] = {0, 0, -1};
    char err[128];
    sw.fail = 1;
    ck_assert_int_eq(lora_apply_with_error(tenants, 1, LORA_TARGET_Q, tid, x, 3, y, err,
                                           sizeof err),
                     LORA_ERR_NOMEM);
    ck_assert(strstr(err, "allocate") != NULL);
    ck_assert(memcmp(y, y0, sizeof y) == 0);
    sw.ok_left = 1; /* the sorted rows, then not the parts' scratch */
    ck_assert_int_eq(lora_apply_with_error(tenants, 1, LORA_TARGET_Q, tid, x, 3, y, err,
                                           sizeof err),
                     LORA_ERR_NOMEM);
    ck_assert(strstr(err, "workspace") != NULL);
    ck_assert(memcmp(y, y0, sizeof y) == 0);
    sw.fail = 0;
    ck_assert_int_eq(lora_apply(tenants, 1, LORA_TARGET_Q, tid, x, 3, y), LORA_OK);
    ck_assert(memcmp(y, y0, sizeof y) != 0);
    lora_adapter_destroy(ad);
}
END_TEST

TCase *serving_apply_tcase(void)
{
    TCase *tc = tcase_create("apply");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_apply_matches_reference, 0, 4);
    tcase_add_test(tc, test_apply_equals_forward_delta);
    tcase_add_test(tc, test_apply_bad_inputs);
    tcase_add_test(tc, test_apply_nomem);
    tcase_add_test(tc, test_apply_concurrent_threads);
    tcase_add_test(tc, test_apply_same_for_any_thread_count);
    return tc;
}
