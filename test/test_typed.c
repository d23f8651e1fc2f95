/* serving suite, typed bases: bf16 and f16 base weights (copied or borrowed) give the
 * results of a float base holding the same rounded values, up to float rounding, in
 * forward, backward (dx, dA, dB), merged forward and the threshold estimate, on the
 * register route (few rows) and the panel route (many rows, several panels); borrowed
 * typed bases follow the lifetime rule; a copied bf16 base costs half the memory; bad
 * inputs. */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <check.h>
#include <lora.h>

#include "fixtures.h"
#include "helpers.h"
#include "suites.h"

/* ---- rounding to 16-bit formats (round to nearest even), and back ---- */

static uint16_t to_bf16(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

static float from_bf16(uint16_t h)
{
    const uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

static uint16_t to_f16(float f) /* finite inputs below 65504 */
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000u, m = x & 0x7fffffu;
    const int e = (int)((x >> 23) & 0xffu) - 127 + 15;
    if (e <= 0) { /* subnormal half (or zero) */
        if (e < -10)
            return (uint16_t)sign;
        const uint32_t mm = m | 0x800000u;
        const int shift = 14 - e;
        uint32_t h = mm >> shift;
        const uint32_t rem = mm & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1u)))
            h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = sign | ((uint32_t)e << 10) | (m >> 13);
    const uint32_t rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
        h++;
    return (uint16_t)h;
}

static float from_f16(uint16_t h)
{
    const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    const float v = e == 0 ? ldexpf((float)m, -24) : ldexpf((float)(m | 0x400), e - 25);
    return (h & 0x8000u) ? -v : v;
}

/* The base of s in a 16-bit dtype, and the float base holding the same values. */
typedef struct typed_base {
    fx_base f;         /* rounded float values */
    uint16_t *w16[4];  /* the same in dtype */
} typed_base;

static void typed_base_make(typed_base *b, const fx_spec *s, uint64_t seed, int dtype)
{
    fx_base_make(&b->f, s, seed);
    for (int t = 0; t < 4; t++) {
        b->w16[t] = NULL;
        if (!b->f.w[t])
            continue;
        b->w16[t] = malloc(b->f.nw[t] * sizeof(uint16_t));
        for (size_t i = 0; i < b->f.nw[t]; i++) {
            float v = b->f.w[t][i];
            if (i % 97 == 5) /* tiny values: f16 subnormals */
                v = (float)(i % 3) * 1e-6f - 1e-6f;
            b->w16[t][i] = dtype == LORA_DTYPE_BF16 ? to_bf16(v) : to_f16(v);
            b->f.w[t][i] = dtype == LORA_DTYPE_BF16 ? from_bf16(b->w16[t][i])
                                                    : from_f16(b->w16[t][i]);
        }
    }
}

static void typed_base_free(typed_base *b)
{
    for (int t = 0; t < 4; t++)
        free(b->w16[t]);
    fx_base_free(&b->f);
}

static void typed_apply(const typed_base *b, lora_adapter *ad, int dtype, uint32_t flags)
{
    for (int t = 0; t < 4; t++)
        if (b->w16[t])
            ck_assert_msg(lora_adapter_set_base_typed(ad, fx_tbits[t], b->w16[t], dtype,
                                                      b->f.bias[t], flags) == LORA_OK,
                          "%s", lora_adapter_last_error(ad));
}

/* Everything one adapter computes on one input. */
typedef struct typed_run {
    float *y, *dx, *grads, *ym;
    size_t ny, nx, ng;
    lora_threshold_report rep;
} typed_run;

static void typed_run_once(lora_adapter *ad, const fx_spec *s, int64_t batch, int64_t len,
                           typed_run *r)
{
    r->nx = (size_t)(batch * len * s->d_model);
    r->ny = (size_t)(batch * len * fx_out_cols(s));
    float *x = malloc(r->nx * sizeof(float)), *dout = malloc(r->ny * sizeof(float));
    r->y = malloc(r->ny * sizeof(float));
    r->ym = malloc(r->ny * sizeof(float));
    r->dx = malloc(r->nx * sizeof(float));
    fill_uniform(x, r->nx, 40, 1.0f);
    fill_uniform(dout, r->ny, 41, 1.0f);
    ck_assert_int_eq(lora_adapter_zero_grad(ad), LORA_OK);
    ck_assert_msg(lora_forward(ad, x, batch, len, r->y) == LORA_OK, "%s",
                  lora_adapter_last_error(ad));
    ck_assert_msg(lora_backward(ad, dout, r->dx) == LORA_OK, "%s", lora_adapter_last_error(ad));
    ck_assert_int_eq(lora_adapter_param_count(ad, &r->ng), LORA_OK);
    r->grads = malloc(r->ng * sizeof(float));
    ck_assert_int_eq(lora_adapter_get_grads_flat(ad, r->grads, r->ng), LORA_OK);
    ck_assert_msg(lora_forward_merged(ad, x, batch, len, r->ym) == LORA_OK, "%s",
                  lora_adapter_last_error(ad));
    memset(&r->rep, 0, sizeof r->rep);
    r->rep.struct_size = sizeof r->rep;
    ck_assert_int_eq(lora_threshold_estimate(ad, x, batch, len, &r->rep), LORA_OK);
    free(x);
    free(dout);
}

static void typed_run_free(typed_run *r)
{
    free(r->y);
    free(r->ym);
    free(r->dx);
    free(r->grads);
}

/* max |a - b| <= tol · max |b| (and both finite). */
static void assert_close(const float *a, const float *b, size_t n, double tol, const char *what)
{
    double scale = 1e-30, err = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        ck_assert_msg(isfinite(a[i]), "%s: entry %zu is not finite", what, i);
        scale = fabs(b[i]) > scale ? fabs(b[i]) : scale;
        if (fabs((double)a[i] - b[i]) > err) {
            err = fabs((double)a[i] - b[i]);
            at = i;
        }
    }
    ck_assert_msg(err <= tol * scale, "%s: max |diff| %g at %zu (%g vs %g), scale %g", what,
                  err, at, (double)a[at], (double)b[at], scale);
}

static void assert_runs_close(const typed_run *t, const typed_run *f, const char *what)
{
    char msg[96];
    snprintf(msg, sizeof msg, "%s: forward", what);
    assert_close(t->y, f->y, t->ny, 2e-6, msg);
    snprintf(msg, sizeof msg, "%s: dx", what);
    assert_close(t->dx, f->dx, t->nx, 2e-6, msg);
    snprintf(msg, sizeof msg, "%s: dA, dB", what);
    assert_close(t->grads, f->grads, t->ng, 2e-6, msg);
    snprintf(msg, sizeof msg, "%s: merged forward", what);
    assert_close(t->ym, f->ym, t->ny, 2e-6, msg);
    const double est_t[4] = {t->rep.gamma_q, t->rep.gamma_k, t->rep.gamma_v,
                             t->rep.score_bound};
    const double est_f[4] = {f->rep.gamma_q, f->rep.gamma_k, f->rep.gamma_v,
                             f->rep.score_bound};
    for (int i = 0; i < 4; i++)
        ck_assert_msg(fabs(est_t[i] - est_f[i]) <= 1e-5 * fabs(est_f[i]),
                      "%s: estimate %d: %g vs %g", what, i, est_t[i], est_f[i]);
}

static fx_spec typed_spec(void)
{
    fx_spec s = fx_default();
    s.d_model = 40; /* in and out not multiples of 16 */
    s.n_heads = 5;
    s.n_kv_heads = 1;
    s.rank = 3;
    return s;
}

/* _i: bit 0 = f16 (else bf16), bit 1 = borrowed (else copied). Row counts 1, 2, 3, 7
 * (register route) and 24 (panel route). */
START_TEST(test_typed_base_equals_float)
{
    const int dtype = _i & 1 ? LORA_DTYPE_F16 : LORA_DTYPE_BF16;
    const uint32_t flags = _i & 2 ? LORA_BASE_BORROW : 0;
    const fx_spec s = typed_spec();
    typed_base b;
    typed_base_make(&b, &s, 3, dtype);
    lora_adapter *typed = fx_adapter_nobase(&s, 9), *flt = fx_adapter_nobase(&s, 9);
    typed_apply(&b, typed, dtype, flags);
    fx_base_apply(&b.f, flt, 1);
    const int64_t shapes[5][2] = {{1, 1}, {2, 1}, {1, 3}, {1, 7}, {2, 12}};
    for (int k = 0; k < 5; k++) {
        typed_run rt, rf;
        typed_run_once(typed, &s, shapes[k][0], shapes[k][1], &rt);
        typed_run_once(flt, &s, shapes[k][0], shapes[k][1], &rf);
        char what[64];
        snprintf(what, sizeof what, "%s %s, %lld x %lld rows",
                 dtype == LORA_DTYPE_F16 ? "f16" : "bf16", flags ? "borrowed" : "copied",
                 (long long)shapes[k][0], (long long)shapes[k][1]);
        assert_runs_close(&rt, &rf, what);
        typed_run_free(&rt);
        typed_run_free(&rf);
    }
    lora_adapter_destroy(typed);
    lora_adapter_destroy(flt);
    typed_base_free(&b);
}
END_TEST

/* A projection wider than one conversion panel (1048 x 1048 > 2^20 weights), with
 * 8-wide tails of 16 columns and 24-wide tails of 32: one row and two (register route;
 * with bf16 the dot-product route where the CPU has it), five rows (register route,
 * bf16 in pairs) and 20 rows (two panels; dx sums over both). */
START_TEST(test_typed_base_wide)
{
    fx_spec s = fx_default();
    s.d_model = 1048;
    s.n_heads = s.n_kv_heads = 8;
    s.rank = 2;
    s.targets = LORA_TARGET_Q | LORA_TARGET_V;
    s.out_proj = 0;
    typed_base b;
    typed_base_make(&b, &s, 5, LORA_DTYPE_BF16);
    lora_adapter *typed = fx_adapter_nobase(&s, 2), *flt = fx_adapter_nobase(&s, 2);
    typed_apply(&b, typed, LORA_DTYPE_BF16, 0);
    fx_base_apply(&b.f, flt, 1);
    const int64_t lens[4] = {1, 2, 5, 20};
    for (int k = 0; k < 4; k++) {
        typed_run rt, rf;
        typed_run_once(typed, &s, 1, lens[k], &rt);
        typed_run_once(flt, &s, 1, lens[k], &rf);
        char what[32];
        snprintf(what, sizeof what, "wide, %lld rows", (long long)lens[k]);
        assert_runs_close(&rt, &rf, what);
        typed_run_free(&rt);
        typed_run_free(&rf);
    }
    lora_adapter_destroy(typed);
    lora_adapter_destroy(flt);
    typed_base_free(&b);
}
END_TEST

/* The register route splits W's rows over the adapter's threads: the forward is bitwise
 * the single-threaded one for 1 to 3 threads, for bf16, f16 and float bases. Sequences
 * of one token (attention returns the value row, exactly), 7 of them: x·Wᵀ with 7 rows
 * for Q, K, V and O, each W 512 x 512 (several parts). */
START_TEST(test_typed_same_for_any_thread_count)
{
    fx_spec s = fx_default();
    s.d_model = 512;
    s.n_heads = 8;
    s.n_kv_heads = 2;
    s.rank = 4;
    const int64_t batch = 7;
    const size_t nx = (size_t)(batch * s.d_model), ny = (size_t)(batch * fx_out_cols(&s));
    float *x = malloc(nx * sizeof(float)), *y = malloc(ny * sizeof(float));
    float *y1 = malloc(ny * sizeof(float));
    fill_uniform(x, nx, 12, 1.0f);
    const int dtypes[3] = {LORA_DTYPE_BF16, LORA_DTYPE_F16, LORA_DTYPE_F32};
    for (int d = 0; d < 3; d++) {
        typed_base b;
        typed_base_make(&b, &s, 13, d == 1 ? LORA_DTYPE_F16 : LORA_DTYPE_BF16);
        for (int threads = 1; threads <= 3; threads++) {
            lora_config *cfg = fx_config(&s);
            ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_THREADS, threads), LORA_OK);
            lora_adapter *ad = NULL;
            ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
            lora_config_destroy(cfg);
            fx_randomize_factors(ad, 14, 0.5f);
            if (dtypes[d] == LORA_DTYPE_F32)
                fx_base_apply(&b.f, ad, 1);
            else
                typed_apply(&b, ad, dtypes[d], 0);
            ck_assert_int_eq(lora_forward(ad, x, batch, 1, threads == 1 ? y1 : y), LORA_OK);
            if (threads > 1)
                ck_assert_msg(memcmp(y, y1, ny * sizeof(float)) == 0,
                              "dtype %d, %d threads: the forward differs from 1 thread",
                              dtypes[d], threads);
            lora_adapter_destroy(ad);
        }
        typed_base_free(&b);
    }
    free(x);
    free(y);
    free(y1);
}
END_TEST

/* Borrowed typed bases: read-only pages are never written; replacing the borrow by a
 * copy lets the caller unmap them; destroy leaves the caller's buffers alone. */
START_TEST(test_typed_borrow_lifetime)
{
    const fx_spec s = typed_spec();
    typed_base b;
    typed_base_make(&b, &s, 4, LORA_DTYPE_BF16);
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uint16_t *ro[4] = {NULL};
    size_t bytes[4] = {0};
    for (int t = 0; t < 4; t++) {
        bytes[t] = (b.f.nw[t] * sizeof(uint16_t) + page - 1) / page * page;
        ro[t] = mmap(NULL, bytes[t], PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
        ck_assert(ro[t] != MAP_FAILED);
        memcpy(ro[t], b.w16[t], b.f.nw[t] * sizeof(uint16_t));
        ck_assert_int_eq(mprotect(ro[t], bytes[t], PROT_READ), 0);
    }
    lora_adapter *ad = fx_adapter_nobase(&s, 1), *ref = fx_adapter_nobase(&s, 1);
    for (int t = 0; t < 4; t++)
        ck_assert_int_eq(lora_adapter_set_base_typed(ad, fx_tbits[t], ro[t], LORA_DTYPE_BF16,
                                                     b.f.bias[t], LORA_BASE_BORROW),
                         LORA_OK);
    fx_base_apply(&b.f, ref, 1);
    typed_run r1, r2;
    typed_run_once(ad, &s, 2, 12, &r1); /* panel route */
    typed_run_free(&r1);
    typed_run_once(ad, &s, 1, 2, &r1); /* register route */
    typed_run_once(ref, &s, 1, 2, &r2);
    assert_runs_close(&r1, &r2, "borrowed read-only bf16");
    typed_run_free(&r1);
    typed_run_free(&r2);
    /* Replace by copies (of f16 this time), then the borrowed pages may go. */
    typed_base h;
    typed_base_make(&h, &s, 4, LORA_DTYPE_F16);
    typed_apply(&h, ad, LORA_DTYPE_F16, 0);
    for (int t = 0; t < 4; t++)
        munmap(ro[t], bytes[t]);
    lora_adapter_destroy(ref);
    ref = fx_adapter_nobase(&s, 1);
    fx_base_apply(&h.f, ref, 1);
    typed_run_once(ad, &s, 1, 5, &r1);
    typed_run_once(ref, &s, 1, 5, &r2);
    assert_runs_close(&r1, &r2, "after replacing the borrow by an f16 copy");
    typed_run_free(&r1);
    typed_run_free(&r2);
    /* Borrow again, destroy: the caller's buffer stays intact. */
    typed_apply(&h, ad, LORA_DTYPE_F16, LORA_BASE_BORROW);
    lora_adapter_destroy(ad);
    lora_adapter_destroy(ref);
    for (size_t i = 0; i < h.f.nw[0]; i++)
        ck_assert(from_f16(h.w16[0][i]) == h.f.w[0][i]);
    typed_base_free(&h);
    typed_base_free(&b);
}
END_TEST

/* Bytes live in an allocator. */
typedef struct counting {
    size_t live;
} counting;

static void *count_alloc(void *u, size_t n)
{
    size_t *p = malloc(n + 16);
    if (!p)
        return NULL;
    p[0] = n;
    ((counting *)u)->live += n;
    return (unsigned char *)p + 16;
}

static void count_free(void *u, void *ptr)
{
    size_t *p = (size_t *)(void *)((unsigned char *)ptr - 16);
    ((counting *)u)->live -= p[0];
    free(p);
}

/* A copied bf16 or f16 base holds half the bytes of a float one. */
START_TEST(test_typed_copy_memory)
{
    fx_spec s = typed_spec();
    s.d_model = 256;
    s.n_heads = 4;
    s.bias = 0;
    counting c = {0};
    const lora_allocator hooks = {count_alloc, count_free, &c};
    lora_config *cfg = NULL;
    ck_assert_int_eq(lora_config_create_with_allocator(&cfg, &hooks), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_D_MODEL, s.d_model), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, s.n_heads), LORA_OK);
    size_t delta[3];
    const int dtypes[3] = {LORA_DTYPE_F32, LORA_DTYPE_BF16, LORA_DTYPE_F16};
    typed_base b;
    typed_base_make(&b, &s, 1, LORA_DTYPE_BF16);
    for (int k = 0; k < 3; k++) {
        lora_adapter *ad = NULL;
        ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
        const size_t before = c.live;
        const void *w = dtypes[k] == LORA_DTYPE_F32 ? (const void *)b.f.w[0] : b.w16[0];
        ck_assert_int_eq(lora_adapter_set_base_typed(ad, LORA_TARGET_Q, w, dtypes[k], NULL, 0),
                         LORA_OK);
        delta[k] = c.live - before;
        lora_adapter_destroy(ad);
    }
    ck_assert_uint_ge(delta[0], b.f.nw[0] * 4);
    for (int k = 1; k < 3; k++)
        ck_assert_msg(delta[k] <= delta[0] / 2 + 256, "dtype %d holds %zu bytes, float %zu",
                      dtypes[k], delta[k], delta[0]);
    lora_config_destroy(cfg);
    ck_assert_uint_eq(c.live, 0); /* every buffer, typed ones included, went back */
    typed_base_free(&b);
}
END_TEST

/* NaN/Inf in each 16-bit encoding, unknown dtypes and flags: the status, a message, and
 * the previous base still in place. */
START_TEST(test_typed_bad_inputs)
{
    const fx_spec s = typed_spec();
    typed_base b;
    typed_base_make(&b, &s, 6, LORA_DTYPE_BF16);
    lora_adapter *ad = fx_adapter_nobase(&s, 1), *ref = fx_adapter_nobase(&s, 1);
    typed_apply(&b, ad, LORA_DTYPE_BF16, 0);
    fx_base_apply(&b.f, ref, 1);
    const size_t n = b.f.nw[0];
    uint16_t *bad = malloc(n * sizeof(uint16_t));
    const struct {
        int dtype;
        uint16_t value;
    } specials[] = {{LORA_DTYPE_BF16, 0x7f80u}, {LORA_DTYPE_BF16, 0xff80u},
                    {LORA_DTYPE_BF16, 0x7fc1u}, {LORA_DTYPE_F16, 0x7c00u},
                    {LORA_DTYPE_F16, 0xfc00u},  {LORA_DTYPE_F16, 0x7e01u}};
    for (size_t k = 0; k < sizeof specials / sizeof specials[0]; k++)
        for (int flags = 0; flags <= 1; flags++) {
            for (size_t i = 0; i < n; i++) /* finite in both encodings */
                bad[i] = specials[k].dtype == LORA_DTYPE_BF16 ? to_bf16(0.25f) : to_f16(0.25f);
            bad[n - 1 - k] = specials[k].value;
            ck_assert_int_eq(lora_adapter_set_base_typed(ad, LORA_TARGET_Q, bad,
                                                         specials[k].dtype, NULL,
                                                         flags ? LORA_BASE_BORROW : 0),
                             LORA_ERR_NONFINITE);
            char want[32];
            snprintf(want, sizeof want, "index %zu", n - 1 - k);
            ck_assert_msg(strstr(lora_adapter_last_error(ad), want) != NULL, "%s",
                          lora_adapter_last_error(ad));
        }
    ck_assert_int_eq(lora_adapter_set_base_typed(ad, LORA_TARGET_Q, b.w16[0], 3, NULL, 0),
                     LORA_ERR_UNSUPPORTED);
    ck_assert(strstr(lora_adapter_last_error(ad), "dtype") != NULL);
    ck_assert_int_eq(lora_adapter_set_base_typed(ad, LORA_TARGET_Q, b.w16[0], LORA_DTYPE_BF16,
                                                 NULL, 4),
                     LORA_ERR_INVALID_ARG);
    ck_assert(strstr(lora_adapter_last_error(ad), "flags") != NULL);
    /* The subnormal and signed-zero encodings are finite and accepted. */
    const uint16_t fine[4] = {0x0001u, 0x8000u, 0x03ffu, 0x0000u};
    for (size_t i = 0; i < n; i++)
        bad[i] = fine[i % 4];
    ck_assert_int_eq(lora_adapter_set_base_typed(ref, LORA_TARGET_K, bad, LORA_DTYPE_F16, NULL,
                                                 0),
                     LORA_OK);
    ck_assert_int_eq(lora_adapter_set_base_typed(ref, LORA_TARGET_K, b.w16[1], LORA_DTYPE_BF16,
                                                 b.f.bias[1], 0),
                     LORA_OK);
    ck_assert_int_eq(lora_adapter_set_base(ref, LORA_TARGET_K, b.f.w[1], b.f.bias[1]), LORA_OK);
    /* Every failure kept the bf16 base: still the float base's results. */
    typed_run r1, r2;
    typed_run_once(ad, &s, 1, 3, &r1);
    typed_run_once(ref, &s, 1, 3, &r2);
    assert_runs_close(&r1, &r2, "after refused typed bases");
    typed_run_free(&r1);
    typed_run_free(&r2);
    free(bad);
    lora_adapter_destroy(ad);
    lora_adapter_destroy(ref);
    typed_base_free(&b);
}
END_TEST

TCase *serving_typed_tcase(void)
{
    TCase *tc = tcase_create("typed");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_typed_base_equals_float, 0, 4);
    tcase_add_test(tc, test_typed_base_wide);
    tcase_add_test(tc, test_typed_same_for_any_thread_count);
    tcase_add_test(tc, test_typed_borrow_lifetime);
    tcase_add_test(tc, test_typed_copy_memory);
    tcase_add_test(tc, test_typed_bad_inputs);
    return tc;
}
