/* decode suite: lora_decode over a KV cache equals one causal inference forward of the
 * whole sequence (MHA, GQA, RoPE in both layouts, partial rotary, custom frequencies,
 * WINDOW with and without a ring, SOFTCAP, dropout off, no output projection), in any
 * split into calls and with different lengths per sequence; capacity overflow and bad
 * arguments change nothing; reset; bf16 base; many tenants in one batch equal each
 * sequence decoded alone with its own adapter; bitwise the same for any thread count;
 * the adapter's parameters, gradients and saved forward are untouched; the cache's
 * memory comes from the config's allocator. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "fixtures.h"
#include "helpers.h"
#include "suites.h"

/* A layer for decoding: fixture geometry plus attention settings. */
typedef struct dcfg {
    int d_model, heads, kv, rank, out_proj, bias, targets;
    int rope, rope_dim, window, threads, custom_freqs;
    double softcap, dropout;
} dcfg;

static dcfg dcfg_default(void)
{
    return (dcfg){.d_model = 40, .heads = 2, .kv = 1, .rank = 3, .out_proj = 1, .bias = 1,
                  .targets = 15, .threads = 1};
}

static lora_config *dcfg_config(const dcfg *c, int rank)
{
    fx_spec s = fx_default();
    s.d_model = c->d_model;
    s.n_heads = c->heads;
    s.n_kv_heads = c->kv;
    s.rank = rank;
    s.out_proj = c->out_proj;
    s.bias = c->bias;
    s.targets = c->targets;
    lora_config *cfg = fx_config(&s);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_ROPE, c->rope), LORA_OK);
    if (c->rope_dim)
        ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_ROPE_DIM, c->rope_dim), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_WINDOW, c->window), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_THREADS, c->threads), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_CAUSAL, 1), LORA_OK);
    ck_assert_int_eq(lora_config_set_double(cfg, LORA_CFG_SOFTCAP, c->softcap), LORA_OK);
    ck_assert_int_eq(lora_config_set_double(cfg, LORA_CFG_DROPOUT, c->dropout), LORA_OK);
    return cfg;
}

static fx_spec dcfg_spec(const dcfg *c)
{
    fx_spec s = fx_default();
    s.d_model = c->d_model;
    s.n_heads = c->heads;
    s.n_kv_heads = c->kv;
    s.out_proj = c->out_proj;
    s.bias = c->bias;
    return s;
}

/* An adapter of c with random factors (rank), base weights from b (copied). */
static lora_adapter *dcfg_adapter(const dcfg *c, int rank, const fx_base *b, uint64_t seed)
{
    lora_config *cfg = dcfg_config(c, rank);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    lora_config_destroy(cfg);
    fx_randomize_factors(ad, seed, 0.5f);
    if (b)
        fx_base_apply(b, ad, 1);
    if (c->custom_freqs) {
        const int n = (c->rope_dim ? c->rope_dim : c->d_model / c->heads) / 2;
        double f[64];
        for (int i = 0; i < n; i++)
            f[i] = 0.7 / (1.0 + 3.0 * i);
        ck_assert_int_eq(lora_adapter_set_rope_freqs(ad, f, (size_t)n), LORA_OK);
    }
    return ad;
}

static int out_cols(const dcfg *c) { return c->out_proj ? c->d_model : c->d_model; }

/* One causal inference forward of one sequence (len rows of x): out (len, cols). */
static void full_forward(lora_adapter *ad, const float *x, int64_t len, float *out)
{
    lora_attn_args a = {.struct_size = sizeof a, .flags = LORA_FWD_INFER};
    ck_assert_int_eq(lora_forward_ex(ad, &a, x, NULL, 1, len, len, out), LORA_OK);
}

/* max |a - b| <= tol·max(1, max |b|) */
static void assert_close(const float *a, const float *b, size_t n, double tol, const char *what)
{
    double err = 0.0, mag = 1.0;
    for (size_t i = 0; i < n; i++) {
        err = fmax(err, fabs((double)a[i] - (double)b[i]));
        mag = fmax(mag, fabs((double)b[i]));
    }
    ck_assert_msg(err <= tol * mag, "%s: max error %g (scale %g)", what, err, mag);
}

#define DEC_TOL 2e-5

/* Decodes `batch` sequences of len tokens (x: (batch, len, d)) in calls of the given
 * sizes (sizes[k] tokens each, summing to len) and checks every sequence's rows against
 * its full forward. */
static void check_split(const dcfg *c, int64_t batch, int64_t len, const int64_t *sizes,
                        int64_t capacity)
{
    fx_base b;
    const fx_spec s = dcfg_spec(c);
    fx_base_make(&b, &s, 3);
    lora_adapter *ad = dcfg_adapter(c, c->rank, &b, 5);
    const int d = c->d_model, cols = out_cols(c);
    float *x = malloc(sizeof(float) * (size_t)(batch * len * d));
    float *ref = malloc(sizeof(float) * (size_t)(batch * len * cols));
    float *got = malloc(sizeof(float) * (size_t)(batch * len * cols));
    float *step_x = malloc(sizeof(float) * (size_t)(batch * len * d));
    float *step_out = malloc(sizeof(float) * (size_t)(batch * len * cols));
    fill_uniform(x, (size_t)(batch * len * d), 11, 1.0f);
    for (int64_t q = 0; q < batch; q++)
        full_forward(ad, x + q * len * d, len, ref + q * len * cols);
    lora_kv_cache *cache = NULL;
    ck_assert_int_eq(lora_kv_cache_create(&cache, ad, batch, capacity), LORA_OK);
    for (int64_t at = 0, k = 0; at < len; at += sizes[k++]) {
        const int64_t n = sizes[k];
        for (int64_t q = 0; q < batch; q++)
            memcpy(step_x + q * n * d, x + (q * len + at) * d, sizeof(float) * (size_t)(n * d));
        ck_assert_int_eq(lora_decode(ad, cache, step_x, n, step_out), LORA_OK);
        for (int64_t q = 0; q < batch; q++) {
            memcpy(got + (q * len + at) * cols, step_out + q * n * cols,
                   sizeof(float) * (size_t)(n * cols));
            int64_t have = -1;
            ck_assert_int_eq(lora_kv_cache_length(cache, q, &have), LORA_OK);
            ck_assert_int_eq(have, at + n);
        }
    }
    assert_close(got, ref, (size_t)(batch * len * cols), DEC_TOL, "decode vs forward");
    lora_kv_cache_destroy(cache);
    lora_adapter_destroy(ad);
    fx_base_free(&b);
    free(x), free(ref), free(got), free(step_x), free(step_out);
}

/* Every row of a table, token by token and prefill + steps + chunks. */
typedef struct layer_row {
    const char *name;
    dcfg c;
    int64_t capacity; /* 0: the sequence length */
} layer_row;

static layer_row layer_rows(int i)
{
    dcfg c = dcfg_default();
    switch (i) {
    case 0: return (layer_row){"MHA", (c.kv = 2, c), 0};
    case 1: return (layer_row){"GQA", (c.heads = 4, c.d_model = 48, c.kv = 2, c), 0};
    case 2: return (layer_row){"RoPE half", (c.rope = LORA_ROPE_HALF, c), 0};
    case 3:
        return (layer_row){"RoPE interleaved, partial",
                           (c.rope = LORA_ROPE_INTERLEAVED, c.rope_dim = 8, c), 0};
    case 4:
        return (layer_row){"custom freqs", (c.rope = LORA_ROPE_HALF, c.custom_freqs = 1, c), 0};
    case 5: return (layer_row){"window, no ring", (c.window = 5, c), 0};
    case 6: return (layer_row){"window ring", (c.window = 5, c.rope = LORA_ROPE_HALF, c), 64};
    case 7: return (layer_row){"window 17 ring", (c.window = 17, c.heads = 4, c.kv = 2, c), 40};
    case 8: return (layer_row){"softcap", (c.softcap = 2.0, c), 0};
    case 9: return (layer_row){"dropout off in decode", (c.dropout = 0.5, c), 0};
    case 10: return (layer_row){"no out_proj, no bias", (c.out_proj = 0, c.bias = 0, c.targets = 7, c), 0};
    case 11: return (layer_row){"head_dim 144", (c.d_model = 288, c), 0};
    case 12: return (layer_row){"head_dim 5", (c.d_model = 10, c), 0};
    default: return (layer_row){"large capacity", c, 1000};
    }
}
#define LAYER_ROWS 14

START_TEST(test_decode_token_by_token_matches_forward)
{
    const layer_row r = layer_rows(_i);
    const int64_t len = 37, ones[37] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                        1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    check_split(&r.c, 2, len, ones, r.capacity ? r.capacity : len);
}
END_TEST

START_TEST(test_decode_prefill_then_steps)
{
    const layer_row r = layer_rows(_i);
    const int64_t sizes[] = {19, 1, 1, 5, 1, 10};
    check_split(&r.c, 2, 37, sizes, r.capacity ? r.capacity : 37);
}
END_TEST

/* Sequences of different lengths in one batch via n_tokens: each equals its own
 * forward; padded rows of out are 0; a sequence with 0 tokens is left alone. */
START_TEST(test_decode_batch_different_lengths)
{
    dcfg c = dcfg_default();
    c.rope = LORA_ROPE_HALF;
    c.heads = 4, c.kv = 2, c.d_model = 48;
    fx_base b;
    const fx_spec s = dcfg_spec(&c);
    fx_base_make(&b, &s, 4);
    lora_adapter *ad = dcfg_adapter(&c, 2, &b, 9);
    const int d = c.d_model, cols = d;
    enum { B = 3, L = 24 };
    static float x[B][L][48], ref[B][L][48], got[B][L][48], sx[B][8][48], so[B][8][48];
    fill_uniform(&x[0][0][0], sizeof x / sizeof(float), 21, 1.0f);
    for (int q = 0; q < B; q++)
        full_forward(ad, &x[q][0][0], L, &ref[q][0][0]);
    /* calls: tokens per sequence (rows), n_new = the largest */
    const int64_t plan[][B] = {{5, 8, 0}, {1, 1, 3}, {0, 1, 8}, {8, 1, 1}, {1, 8, 8},
                               {1, 5, 4}, {8, 0, 0}};
    const int n_calls = sizeof plan / sizeof plan[0];
    lora_kv_cache *cache = NULL;
    ck_assert_int_eq(lora_kv_cache_create(&cache, ad, B, L), LORA_OK);
    int64_t at[B] = {0, 0, 0};
    for (int k = 0; k < n_calls; k++) {
        int64_t n_new = 0;
        for (int q = 0; q < B; q++) {
            n_new = plan[k][q] > n_new ? plan[k][q] : n_new;
            for (int i = 0; i < plan[k][q]; i++)
                memcpy(sx[q][i], x[q][at[q] + i], sizeof(float) * (size_t)d);
        }
        float packed_x[B * 8 * 48], packed_out[B * 8 * 48];
        for (int q = 0; q < B; q++)
            memcpy(packed_x + q * n_new * d, sx[q], sizeof(float) * (size_t)(n_new * d));
        for (size_t i = 0; i < sizeof packed_out / sizeof(float); i++)
            packed_out[i] = NAN;
        lora_decode_args a = {.struct_size = sizeof a, .n_tokens = plan[k]};
        ck_assert_int_eq(lora_decode_ex(ad, &a, cache, packed_x, n_new, packed_out), LORA_OK);
        for (int q = 0; q < B; q++) {
            memcpy(so[q], packed_out + q * n_new * cols, sizeof(float) * (size_t)(n_new * cols));
            for (int i = 0; i < plan[k][q]; i++)
                memcpy(got[q][at[q] + i], so[q][i], sizeof(float) * (size_t)cols);
            for (int64_t i = plan[k][q]; i < n_new; i++)
                for (int j = 0; j < cols; j++)
                    ck_assert_msg(so[q][i][j] == 0.0f, "padded row %lld of sequence %d not 0",
                                  (long long)i, q);
            at[q] += plan[k][q];
            int64_t have;
            ck_assert_int_eq(lora_kv_cache_length(cache, q, &have), LORA_OK);
            ck_assert_int_eq(have, at[q]);
        }
    }
    for (int q = 0; q < B; q++) {
        ck_assert_int_eq(at[q], L);
        assert_close(&got[q][0][0], &ref[q][0][0], (size_t)(L * cols), DEC_TOL, "sequence");
    }
    lora_kv_cache_destroy(cache);
    lora_adapter_destroy(ad);
    fx_base_free(&b);
}
END_TEST

/* Overflowing capacity: SHAPE, nothing appended to any sequence, out untouched; the
 * cache then goes on as if the call had not happened. */
START_TEST(test_decode_capacity_overflow)
{
    dcfg c = dcfg_default();
    fx_base b;
    const fx_spec s = dcfg_spec(&c);
    fx_base_make(&b, &s, 6);
    lora_adapter *ad = dcfg_adapter(&c, 2, &b, 7);
    const int d = c.d_model;
    enum { L = 6 };
    float x[2 * L * 40], ref[2][L * 40], out[2 * 4 * 40], step[2 * 4 * 40];
    fill_uniform(x, sizeof x / sizeof(float), 5, 1.0f);
    for (int q = 0; q < 2; q++)
        full_forward(ad, x + q * L * d, L, ref[q]);
    lora_kv_cache *cache = NULL;
    ck_assert_int_eq(lora_kv_cache_create(&cache, ad, 2, L), LORA_OK);
    /* 4 tokens, then 3 more: overflow */
    for (int q = 0; q < 2; q++)
        memcpy(step + q * 4 * d, x + q * L * d, sizeof(float) * 4 * (size_t)d);
    ck_assert_int_eq(lora_decode(ad, cache, step, 4, out), LORA_OK);
    for (int q = 0; q < 2; q++) /* the third token: whatever step held */
        memcpy(step + q * 3 * d, x + (q * L + 4) * d, sizeof(float) * 2 * (size_t)d);
    for (size_t i = 0; i < sizeof out / sizeof(float); i++)
        out[i] = 42.0f;
    ck_assert_int_eq(lora_decode(ad, cache, step, 3, out), LORA_ERR_SHAPE);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(ad), "capacity"));
    for (size_t i = 0; i < sizeof out / sizeof(float); i++)
        ck_assert(out[i] == 42.0f);
    /* only sequence 1 overflowing still appends to neither */
    const int64_t tokens[2] = {1, 3};
    lora_decode_args a = {.struct_size = sizeof a, .n_tokens = tokens};
    ck_assert_int_eq(lora_decode_ex(ad, &a, cache, step, 3, out), LORA_ERR_SHAPE);
    for (int q = 0; q < 2; q++) {
        int64_t have;
        ck_assert_int_eq(lora_kv_cache_length(cache, q, &have), LORA_OK);
        ck_assert_int_eq(have, 4);
    }
    /* the two remaining tokens fit and match the forward's last rows */
    for (int q = 0; q < 2; q++)
        memcpy(step + q * 2 * d, x + (q * L + 4) * d, sizeof(float) * 2 * (size_t)d);
    ck_assert_int_eq(lora_decode(ad, cache, step, 2, out), LORA_OK);
    for (int q = 0; q < 2; q++)
        assert_close(out + q * 2 * d, ref[q] + 4 * d, 2 * (size_t)d, DEC_TOL, "after refusal");
    lora_kv_cache_destroy(cache);
    lora_adapter_destroy(ad);
    fx_base_free(&b);
}
END_TEST

/* reset(b) empties sequence b only, reset(-1) all: decoding again from position 0
 * gives the first rows of the forward again. */
START_TEST(test_decode_reset)
{
    dcfg c = dcfg_default();
    c.rope = LORA_ROPE_HALF;
    fx_base b;
    const fx_spec s = dcfg_spec(&c);
    fx_base_make(&b, &s, 8);
    lora_adapter *ad = dcfg_adapter(&c, 2, &b, 3);
    const int d = c.d_model;
    float x[2 * 3 * 40], ref[2][3 * 40], out[2 * 3 * 40], out2[2 * 3 * 40];
    fill_uniform(x, sizeof x / sizeof(float), 8, 1.0f);
    for (int q = 0; q < 2; q++)
        full_forward(ad, x + q * 3 * d, 3, ref[q]);
    lora_kv_cache *cache = NULL;
    ck_assert_int_eq(lora_kv_cache_create(&cache, ad, 2, 6), LORA_OK);
    ck_assert_int_eq(lora_decode(ad, cache, x, 3, out), LORA_OK);
    ck_assert_int_eq(lora_kv_cache_reset(cache, 1), LORA_OK);
    int64_t have;
    ck_assert_int_eq(lora_kv_cache_length(cache, 0, &have), LORA_OK);
    ck_assert_int_eq(have, 3);
    ck_assert_int_eq(lora_kv_cache_length(cache, 1, &have), LORA_OK);
    ck_assert_int_eq(have, 0);
    const int64_t only1[2] = {0, 3};
    lora_decode_args a = {.struct_size = sizeof a, .n_tokens = only1};
    ck_assert_int_eq(lora_decode_ex(ad, &a, cache, x, 3, out2), LORA_OK);
    assert_close(out2 + 3 * d, ref[1], 3 * (size_t)d, DEC_TOL, "sequence 1 after reset");
    ck_assert_int_eq(lora_kv_cache_reset(cache, -1), LORA_OK);
    for (int q = 0; q < 2; q++) {
        ck_assert_int_eq(lora_kv_cache_length(cache, q, &have), LORA_OK);
        ck_assert_int_eq(have, 0);
    }
    ck_assert_int_eq(lora_decode(ad, cache, x, 3, out2), LORA_OK);
    ck_assert_mem_eq(out, out2, sizeof out);
    ck_assert_int_eq(lora_kv_cache_reset(cache, 2), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_kv_cache_reset(cache, -2), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_kv_cache_reset(NULL, 0), LORA_ERR_INVALID_ARG);
    lora_kv_cache_destroy(cache);
    lora_adapter_destroy(ad);
    fx_base_free(&b);
}
END_TEST

static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static float from_bf16(uint16_t h)
{
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* A bf16 base decodes as a float base holding the same rounded values; steps of one
 * row take the register route, a 20-row prefill the panel route. */
START_TEST(test_decode_bf16_base)
{
    dcfg c = dcfg_default();
    c.rope = LORA_ROPE_HALF;
    fx_base b;
    const fx_spec s = dcfg_spec(&c);
    fx_base_make(&b, &s, 12);
    uint16_t *w16[4];
    for (int t = 0; t < 4; t++) {
        w16[t] = malloc(b.nw[t] * sizeof(uint16_t));
        for (size_t i = 0; i < b.nw[t]; i++) {
            w16[t][i] = to_bf16(b.w[t][i]);
            b.w[t][i] = from_bf16(w16[t][i]);
        }
    }
    lora_adapter *f32 = dcfg_adapter(&c, 2, &b, 4), *bf = dcfg_adapter(&c, 2, NULL, 4);
    for (int t = 0; t < 4; t++)
        ck_assert_int_eq(lora_adapter_set_base_typed(bf, fx_tbits[t], w16[t], LORA_DTYPE_BF16,
                                                     b.bias[t], 0),
                         LORA_OK);
    const int d = c.d_model;
    enum { L = 23 };
    float x[2 * L * 40], o1[2 * 20 * 40], o2[2 * 20 * 40];
    fill_uniform(x, sizeof x / sizeof(float), 13, 1.0f);
    lora_kv_cache *c1 = NULL, *c2 = NULL;
    ck_assert_int_eq(lora_kv_cache_create(&c1, f32, 2, L), LORA_OK);
    ck_assert_int_eq(lora_kv_cache_create(&c2, bf, 2, L), LORA_OK);
    for (int64_t at = 0, n = 20; at < L; at += n, n = 1) {
        float sx[2 * 20 * 40];
        for (int q = 0; q < 2; q++)
            memcpy(sx + q * n * d, x + (q * L + at) * d, sizeof(float) * (size_t)(n * d));
        ck_assert_int_eq(lora_decode(f32, c1, sx, n, o1), LORA_OK);
        ck_assert_int_eq(lora_decode(bf, c2, sx, n, o2), LORA_OK);
        assert_close(o2, o1, (size_t)(2 * n * d), DEC_TOL, "bf16 vs float base");
    }
    lora_kv_cache_destroy(c1);
    lora_kv_cache_destroy(c2);
    lora_adapter_destroy(f32);
    lora_adapter_destroy(bf);
    for (int t = 0; t < 4; t++)
        free(w16[t]);
    fx_base_free(&b);
}
END_TEST

/* Many tenants in one batch (ranks 1, 2, 5; one adapting Q and V only; one sequence
 * on the base alone) equal each sequence decoded alone by its own adapter. */
START_TEST(test_decode_tenants_equal_alone)
{
    dcfg c = dcfg_default();
    c.rope = LORA_ROPE_HALF;
    c.heads = 4, c.kv = 2, c.d_model = 48;
    c.threads = 2;
    fx_base b;
    const fx_spec s = dcfg_spec(&c);
    fx_base_make(&b, &s, 30);
    lora_adapter *holder = dcfg_adapter(&c, 4, NULL, 31);
    fx_base_apply(&b, holder, 0);
    dcfg cqv = c;
    cqv.targets = LORA_TARGET_Q | LORA_TARGET_V;
    lora_adapter *ten[3] = {dcfg_adapter(&c, 1, NULL, 32), dcfg_adapter(&c, 5, NULL, 33),
                            dcfg_adapter(&cqv, 2, NULL, 34)};
    /* the base alone: an adapter whose B factors are 0 */
    lora_config *cfg0 = dcfg_config(&c, 2);
    lora_adapter *plain = NULL;
    ck_assert_int_eq(lora_adapter_create(&plain, cfg0), LORA_OK);
    lora_config_destroy(cfg0);
    fx_base_apply(&b, plain, 0);
    enum { B = 5, L = 9 };
    const int32_t tenant_of_seq[B] = {2, 0, -1, 1, 0};
    const int d = c.d_model;
    static float x[B * L * 48], got[B * L * 48], alone[B * L * 48], so[B * 48];
    fill_uniform(x, sizeof x / sizeof(float), 35, 1.0f);
    lora_kv_cache *cache = NULL, *one = NULL;
    ck_assert_int_eq(lora_kv_cache_create(&cache, holder, B, L), LORA_OK);
    /* prefill 4, then single steps */
    for (int64_t at = 0, n = 4; at < L; at += n, n = 1) {
        float sx[B * 4 * 48];
        for (int q = 0; q < B; q++)
            memcpy(sx + q * n * d, x + (q * L + at) * d, sizeof(float) * (size_t)(n * d));
        float big[B * 4 * 48];
        lora_decode_args a = {.struct_size = sizeof a, .tenants = (const lora_adapter *const *)ten,
                              .n_tenants = 3, .tenant_of_seq = tenant_of_seq};
        ck_assert_int_eq(lora_decode_ex(holder, &a, cache, sx, n, big), LORA_OK);
        for (int q = 0; q < B; q++)
            memcpy(got + (q * L + at) * d, big + q * n * d, sizeof(float) * (size_t)(n * d));
    }
    for (int q = 0; q < B; q++) {
        lora_adapter *own = tenant_of_seq[q] < 0 ? plain : ten[tenant_of_seq[q]];
        if (own != plain)
            fx_base_apply(&b, own, 0);
        ck_assert_int_eq(lora_kv_cache_create(&one, own, 1, L), LORA_OK);
        for (int i = 0; i < L; i++) {
            ck_assert_int_eq(lora_decode(own, one, x + (q * L + i) * d, 1, so), LORA_OK);
            memcpy(alone + (q * L + i) * d, so, sizeof(float) * (size_t)d);
        }
        lora_kv_cache_destroy(one);
    }
    assert_close(got, alone, (size_t)(B * L * d), DEC_TOL, "tenants vs alone");
    /* geometry and id checks */
    float sx[B * 48], big[B * 48];
    fill_uniform(sx, sizeof sx / sizeof(float), 36, 1.0f);
    int32_t bad_ids[B] = {0, 3, 0, 0, 0};
    lora_decode_args a = {.struct_size = sizeof a, .tenants = (const lora_adapter *const *)ten,
                          .n_tenants = 3, .tenant_of_seq = bad_ids};
    lora_kv_cache_reset(cache, -1);
    ck_assert_int_eq(lora_decode_ex(holder, &a, cache, sx, 1, big), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(holder), "tenant_of_seq[1]"));
    dcfg other = c;
    other.heads = 2, other.kv = 1;
    lora_adapter *odd = dcfg_adapter(&other, 2, NULL, 37);
    const lora_adapter *mixed[2] = {ten[0], odd};
    a.tenants = mixed, a.n_tenants = 2, a.tenant_of_seq = tenant_of_seq;
    bad_ids[1] = 0;
    a.tenant_of_seq = bad_ids;
    ck_assert_int_eq(lora_decode_ex(holder, &a, cache, sx, 1, big), LORA_ERR_SHAPE);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(holder), "tenants[1]"));
    a.tenant_of_seq = NULL;
    ck_assert_int_eq(lora_decode_ex(holder, &a, cache, sx, 1, big), LORA_ERR_INVALID_ARG);
    for (int q = 0; q < B; q++) {
        int64_t have;
        ck_assert_int_eq(lora_kv_cache_length(cache, q, &have), LORA_OK);
        ck_assert_int_eq(have, 0);
    }
    lora_kv_cache_destroy(cache);
    lora_adapter_destroy(odd);
    for (int i = 0; i < 3; i++)
        lora_adapter_destroy(ten[i]);
    lora_adapter_destroy(plain);
    lora_adapter_destroy(holder);
    fx_base_free(&b);
}
END_TEST

/* THREADS 1, 2, 3: bitwise the same outputs (prefill and steps, GQA, batch 3); row 1
 * with projections large enough that the steps split their columns over the pool. */
START_TEST(test_decode_threads_bitwise)
{
    dcfg c = dcfg_default();
    c.rope = LORA_ROPE_INTERLEAVED;
    c.heads = 4, c.kv = 2, c.d_model = _i == 0 ? 48 : 512;
    fx_base b;
    const fx_spec s = dcfg_spec(&c);
    fx_base_make(&b, &s, 40);
    enum { B = 3, L = 30 };
    static float x[B * L * 512], outs[3][B * L * 512];
    const int d = c.d_model;
    fill_uniform(x, sizeof x / sizeof(float), 41, 1.0f);
    for (int th = 1; th <= 3; th++) {
        c.threads = th;
        lora_adapter *ad = dcfg_adapter(&c, 3, &b, 42);
        lora_kv_cache *cache = NULL;
        ck_assert_int_eq(lora_kv_cache_create(&cache, ad, B, L), LORA_OK);
        for (int64_t at = 0, n = 20; at < L; at += n, n = 1) {
            static float sx[B * 20 * 512], so[B * 20 * 512];
            for (int q = 0; q < B; q++)
                memcpy(sx + q * n * d, x + (q * L + at) * d, sizeof(float) * (size_t)(n * d));
            ck_assert_int_eq(lora_decode(ad, cache, sx, n, so), LORA_OK);
            for (int q = 0; q < B; q++)
                memcpy(outs[th - 1] + (q * L + at) * d, so + q * n * d,
                       sizeof(float) * (size_t)(n * d));
        }
        lora_kv_cache_destroy(cache);
        lora_adapter_destroy(ad);
    }
    ck_assert_mem_eq(outs[0], outs[1], sizeof outs[0]);
    ck_assert_mem_eq(outs[0], outs[2], sizeof outs[0]);
    fx_base_free(&b);
}
END_TEST

/* Decoding between a forward and its backward: the backward still runs (the saved
 * forward is untouched) and gives the gradients of an identical adapter that did not
 * decode (with dropout: decoding counts no training forward); parameters and run info
 * unchanged. */
START_TEST(test_decode_leaves_adapter_untouched)
{
    dcfg c = dcfg_default();
    c.dropout = 0.3;
    fx_base b;
    const fx_spec s = dcfg_spec(&c);
    fx_base_make(&b, &s, 50);
    lora_adapter *ad = dcfg_adapter(&c, 2, &b, 51), *twin = dcfg_adapter(&c, 2, &b, 51);
    float x[5 * 40], out[5 * 40], dout[5 * 40], dx1[5 * 40], dx2[5 * 40], so[5 * 40];
    fill_uniform(x, sizeof x / sizeof(float), 52, 1.0f);
    fill_uniform(dout, sizeof dout / sizeof(float), 53, 1.0f);
    size_t np = 0;
    float *p0 = fx_params(ad, &np), *g1 = malloc(np * sizeof(float)), *g2 = malloc(np * sizeof(float));
    lora_adapter *order[2] = {twin, ad};
    for (int round = 0; round < 2; round++) /* the twin's second forward is the reference */
        for (int k = 0; k < 2; k++) {
            ck_assert_int_eq(lora_forward(order[k], x, 1, 5, out), LORA_OK);
            if (round == 0)
                ck_assert_int_eq(lora_backward(order[k], dout, dx1), LORA_OK);
        }
    lora_run_info before = {.struct_size = sizeof before}, after = {.struct_size = sizeof after};
    ck_assert_int_eq(lora_adapter_get_run_info(ad, &before), LORA_OK);
    lora_kv_cache *cache = NULL;
    ck_assert_int_eq(lora_kv_cache_create(&cache, ad, 1, 8), LORA_OK);
    ck_assert_int_eq(lora_decode(ad, cache, x, 5, so), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_run_info(ad, &after), LORA_OK);
    ck_assert_mem_eq(&before, &after, sizeof before);
    ck_assert_int_eq(lora_adapter_zero_grad(ad), LORA_OK);
    ck_assert_int_eq(lora_adapter_zero_grad(twin), LORA_OK);
    ck_assert_int_eq(lora_backward(twin, dout, dx1), LORA_OK);
    ck_assert_int_eq(lora_backward(ad, dout, dx2), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_grads_flat(twin, g1, np), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_grads_flat(ad, g2, np), LORA_OK);
    ck_assert_mem_eq(g1, g2, np * sizeof(float));
    ck_assert_mem_eq(dx1, dx2, sizeof dx1);
    /* the next training forwards draw the same dropout masks */
    float out2[5 * 40];
    ck_assert_int_eq(lora_forward(twin, x, 1, 5, out), LORA_OK);
    ck_assert_int_eq(lora_forward(ad, x, 1, 5, out2), LORA_OK);
    ck_assert_mem_eq(out, out2, sizeof out);
    size_t np2;
    float *p1 = fx_params(ad, &np2);
    ck_assert_mem_eq(p0, p1, np * sizeof(float));
    lora_kv_cache_destroy(cache);
    lora_adapter_destroy(ad);
    lora_adapter_destroy(twin);
    fx_base_free(&b);
    free(p0), free(p1), free(g1), free(g2);
}
END_TEST

/* Bad arguments: status, a message naming the argument, the cache unchanged. */
START_TEST(test_decode_bad_args)
{
    dcfg c = dcfg_default();
    fx_base b;
    const fx_spec s = dcfg_spec(&c);
    fx_base_make(&b, &s, 60);
    lora_adapter *ad = dcfg_adapter(&c, 2, &b, 61);
    const int d = c.d_model;
    float x[2 * 2 * 40], out[2 * 2 * 40];
    fill_uniform(x, sizeof x / sizeof(float), 62, 1.0f);
    lora_kv_cache *cache = NULL;
    ck_assert_int_eq(lora_kv_cache_create(NULL, ad, 2, 4), LORA_ERR_INVALID_ARG);
    cache = (lora_kv_cache *)&b; /* must be overwritten with NULL */
    ck_assert_int_eq(lora_kv_cache_create(&cache, NULL, 2, 4), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_null(cache);
    ck_assert_int_eq(lora_kv_cache_create(&cache, ad, 0, 4), LORA_ERR_SHAPE);
    ck_assert_int_eq(lora_kv_cache_create(&cache, ad, 2, 0), LORA_ERR_SHAPE);
    ck_assert_int_eq(lora_kv_cache_create(&cache, ad, INT64_MAX / 2, INT64_MAX / 4),
                     LORA_ERR_SHAPE);
    ck_assert_int_eq(lora_kv_cache_create(&cache, ad, 2, 4), LORA_OK);
    ck_assert_int_eq(lora_decode(ad, cache, x, 1, out), LORA_OK); /* length 1 each */
    int64_t len;
    ck_assert_int_eq(lora_kv_cache_length(cache, 2, &len), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_kv_cache_length(cache, -1, &len), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_kv_cache_length(cache, 0, NULL), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_kv_cache_length(NULL, 0, &len), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_decode(NULL, cache, x, 1, out), LORA_ERR_INVALID_ARG);
    struct {
        int st;
        const char *needle;
        lora_kv_cache *cache;
        const float *x;
        int64_t n_new;
        float *out;
    } rows[] = {
        {LORA_ERR_INVALID_ARG, "cache", NULL, x, 1, out},
        {LORA_ERR_INVALID_ARG, "x", cache, NULL, 1, out},
        {LORA_ERR_INVALID_ARG, "out", cache, x, 1, NULL},
        {LORA_ERR_SHAPE, "n_new", cache, x, 0, out},
        {LORA_ERR_SHAPE, "n_new", cache, x, -3, out},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        ck_assert_int_eq(lora_decode(ad, rows[i].cache, rows[i].x, rows[i].n_new, rows[i].out),
                         rows[i].st);
        ck_assert_msg(strstr(lora_adapter_last_error(ad), rows[i].needle), "row %zu: %s", i,
                      lora_adapter_last_error(ad));
    }
    /* args */
    const int64_t too_many[2] = {3, 0}, negative[2] = {-1, 0};
    lora_decode_args a = {.struct_size = 4};
    ck_assert_int_eq(lora_decode_ex(ad, &a, cache, x, 2, out), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(ad), "struct_size"));
    a = (lora_decode_args){.struct_size = sizeof a, .flags = 1};
    ck_assert_int_eq(lora_decode_ex(ad, &a, cache, x, 2, out), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(ad), "flags"));
    a = (lora_decode_args){.struct_size = sizeof a, .n_tokens = too_many};
    ck_assert_int_eq(lora_decode_ex(ad, &a, cache, x, 2, out), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(ad), "n_tokens[0]"));
    a.n_tokens = negative;
    ck_assert_int_eq(lora_decode_ex(ad, &a, cache, x, 2, out), LORA_ERR_INVALID_ARG);
    struct {
        lora_decode_args a;
        uint64_t extra;
    } big = {{.struct_size = sizeof big}, 1};
    ck_assert_int_eq(lora_decode_ex(ad, &big.a, cache, x, 2, out), LORA_ERR_UNSUPPORTED);
    big.extra = 0;
    ck_assert_int_eq(lora_decode_ex(ad, &big.a, cache, x, 1, out), LORA_OK); /* length 2 */
    const lora_adapter *tn[1] = {ad};
    const int32_t ids[2] = {0, 0};
    a = (lora_decode_args){.struct_size = sizeof a, .tenants = tn, .n_tenants = 0,
                           .tenant_of_seq = ids};
    ck_assert_int_eq(lora_decode_ex(ad, &a, cache, x, 1, out), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(ad), "n_tenants"));
    a.n_tenants = 1, a.tenants = NULL;
    ck_assert_int_eq(lora_decode_ex(ad, &a, cache, x, 1, out), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(ad), "tenants"));
    const lora_adapter *null_tenant[1] = {NULL};
    a.tenants = null_tenant;
    ck_assert_int_eq(lora_decode_ex(ad, &a, cache, x, 1, out), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(ad), "tenants[0]"));
    /* NaN in a read row: NONFINITE; in a row that is not read: fine */
    float xn[2 * 2 * 40];
    memcpy(xn, x, sizeof xn);
    xn[d + 3] = NAN; /* sequence 0, token 1 */
    ck_assert_int_eq(lora_decode(ad, cache, xn, 2, out), LORA_ERR_NONFINITE);
    const int64_t one_each[2] = {1, 1};
    a = (lora_decode_args){.struct_size = sizeof a, .n_tokens = one_each};
    /* cache of another geometry */
    dcfg c2 = c;
    c2.heads = 4, c2.kv = 2;
    lora_adapter *other = dcfg_adapter(&c2, 2, NULL, 63);
    lora_kv_cache *wrong = NULL;
    ck_assert_int_eq(lora_kv_cache_create(&wrong, other, 2, 4), LORA_OK);
    ck_assert_int_eq(lora_decode(ad, wrong, x, 1, out), LORA_ERR_SHAPE);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(ad), "kv heads"));
    lora_kv_cache_destroy(wrong);
    /* a ring made for WINDOW 2 used by an adapter without a window */
    dcfg cw = c;
    cw.window = 2;
    lora_adapter *windowed = dcfg_adapter(&cw, 2, NULL, 64);
    ck_assert_int_eq(lora_kv_cache_create(&wrong, windowed, 2, 9), LORA_OK);
    ck_assert_int_eq(lora_decode(ad, wrong, x, 1, out), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(ad), "WINDOW"));
    lora_kv_cache_destroy(wrong);
    /* no base weight */
    ck_assert_int_eq(lora_kv_cache_create(&wrong, other, 2, 4), LORA_OK);
    ck_assert_int_eq(lora_decode(other, wrong, x, 1, out), LORA_ERR_STATE);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(other), "W_Q"));
    lora_kv_cache_destroy(wrong);
    for (int q = 0; q < 2; q++) { /* every refusal left the lengths alone */
        ck_assert_int_eq(lora_kv_cache_length(cache, q, &len), LORA_OK);
        ck_assert_int_eq(len, 2);
    }
    lora_kv_cache_destroy(NULL);
    lora_kv_cache_destroy(cache);
    lora_adapter_destroy(windowed);
    lora_adapter_destroy(other);
    lora_adapter_destroy(ad);
    fx_base_free(&b);
}
END_TEST

/* The cache's memory comes from the config's allocator, and all of it goes back. */
static size_t live_blocks;
static void *count_alloc(void *u, size_t n)
{
    (void)u;
    live_blocks++;
    return malloc(n);
}
static void count_free(void *u, void *p)
{
    (void)u;
    if (p)
        live_blocks--;
    free(p);
}

START_TEST(test_decode_cache_uses_allocator)
{
    lora_config *cfg2 = NULL;
    const lora_allocator al = {count_alloc, count_free, NULL};
    ck_assert_int_eq(lora_config_create_with_allocator(&cfg2, &al), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg2, LORA_CFG_D_MODEL, 40), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg2, LORA_CFG_N_HEADS, 2), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg2, LORA_CFG_THREADS, 1), LORA_OK);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg2), LORA_OK);
    const size_t before = live_blocks;
    lora_kv_cache *cache = NULL;
    ck_assert_int_eq(lora_kv_cache_create(&cache, ad, 2, 100), LORA_OK);
    ck_assert_uint_ge(live_blocks, before + 3);
    lora_kv_cache_destroy(cache);
    ck_assert_uint_eq(live_blocks, before);
    lora_adapter_destroy(ad);
    lora_config_destroy(cfg2);
}
END_TEST

Suite *decode_suite(void)
{
    Suite *s = suite_create("decode");
    TCase *tc = tcase_create("decode");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_decode_token_by_token_matches_forward, 0, LAYER_ROWS);
    tcase_add_loop_test(tc, test_decode_prefill_then_steps, 0, LAYER_ROWS);
    tcase_add_test(tc, test_decode_batch_different_lengths);
    tcase_add_test(tc, test_decode_capacity_overflow);
    tcase_add_test(tc, test_decode_reset);
    tcase_add_test(tc, test_decode_bf16_base);
    tcase_add_test(tc, test_decode_tenants_equal_alone);
    tcase_add_loop_test(tc, test_decode_threads_bitwise, 0, 2);
    tcase_add_test(tc, test_decode_leaves_adapter_untouched);
    tcase_add_test(tc, test_decode_bad_args);
    tcase_add_test(tc, test_decode_cache_uses_allocator);
    suite_add_tcase(s, tc);
    return s;
}
