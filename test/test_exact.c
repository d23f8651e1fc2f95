/* exact_suite: LORA_BACKEND_EXACT against the double reference on many configurations
 * (max relative error <= 1e-4 for out, every dA and dB, and dx), sequence lengths
 * around block boundaries, and logits of +-1e4. */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "suites.h"

typedef struct exact_case {
    ref_config c;
    int cross, batch, len_q, len_kv, threads;
} exact_case;

/* Every target subset 1..15 appears (entries 0..14 in order), plus cross-attention,
 * GQA/MQA, head_dim != d_model/heads, biases, rsLoRA, explicit scales and lengths
 * around 64-row blocks. */
static const exact_case cases[] = {
    /* 0: L = 1 */
    {{.d_model = 8, .rank = 2, .targets = 1}, 0, 1, 1, 0, 1},
    /* 1: L = 1, causal, MQA */
    {{.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .rank = 2, .targets = 2, .causal = 1},
     0, 1, 1, 0, 2},
    /* 2: L = 2, batch 2, causal, biases */
    {{.d_model = 8, .n_heads = 2, .rank = 2, .targets = 3, .causal = 1, .bias = 1}, 0, 2, 2, 0,
     1},
    /* 3: L = 3, MQA over 3 heads with head_dim 4 (q_dim 12 != d_model 6) */
    {{.d_model = 6, .n_heads = 3, .n_kv_heads = 1, .head_dim = 4, .rank = 3, .targets = 4},
     0, 1, 3, 0, 2},
    /* 4: L = 63, causal */
    {{.d_model = 8, .n_heads = 2, .rank = 2, .targets = 5, .causal = 1}, 0, 1, 63, 0, 2},
    /* 5: L = 64, causal, biases */
    {{.d_model = 8, .n_heads = 2, .rank = 2, .targets = 6, .causal = 1, .bias = 1}, 0, 1, 64,
     0, 1},
    /* 6: L = 65, causal, MQA */
    {{.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .rank = 2, .targets = 7, .causal = 1}, 0, 1,
     65, 0, 2},
    /* 7: L = 127, batch 2, out-proj with LoRA on O only */
    {{.d_model = 8, .n_heads = 2, .rank = 2, .targets = 8, .causal = 1, .out_proj = 1}, 0, 2,
     127, 0, 2},
    /* 8: L = 128, GQA 4/2, head_dim 3, biases */
    {{.d_model = 8, .n_heads = 4, .n_kv_heads = 2, .head_dim = 3, .rank = 2, .targets = 9,
      .out_proj = 1, .bias = 1},
     0, 1, 128, 0, 1},
    /* 9: L = 129, causal, rsLoRA */
    {{.d_model = 8, .n_heads = 2, .rank = 4, .targets = 10, .causal = 1, .out_proj = 1,
      .rslora = 1},
     0, 1, 129, 0, 2},
    /* 10: L = 255, causal */
    {{.d_model = 4, .rank = 2, .targets = 11, .causal = 1, .out_proj = 1}, 0, 1, 255, 0, 2},
    /* 11: L = 256, head_dim 2 */
    {{.d_model = 4, .n_heads = 2, .rank = 2, .targets = 12, .out_proj = 1}, 0, 1, 256, 0, 1},
    /* 12: L = 257, causal, MQA, biases */
    {{.d_model = 4, .n_heads = 2, .n_kv_heads = 1, .rank = 2, .targets = 13, .causal = 1,
      .out_proj = 1, .bias = 1},
     0, 1, 257, 0, 2},
    /* 13: batch 3, GQA 4/2, head_dim 5, alpha and rsLoRA */
    {{.d_model = 12, .n_heads = 4, .n_kv_heads = 2, .head_dim = 5, .rank = 3, .targets = 14,
      .out_proj = 1, .alpha = 3.0, .rslora = 1},
     0, 3, 5, 0, 2},
    /* 14: everything on, explicit softmax scale */
    {{.d_model = 16, .n_heads = 4, .n_kv_heads = 1, .rank = 4, .targets = 15, .out_proj = 1,
      .bias = 1, .causal = 1, .softmax_scale = 0.7},
     0, 2, 7, 0, 2},
    /* 15: cross, len_q < len_kv, non-causal */
    {{.d_model = 8, .n_heads = 2, .rank = 2, .targets = 7}, 1, 2, 3, 5, 1},
    /* 16: cross, len_q > len_kv, non-causal, MQA */
    {{.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .rank = 2, .targets = 1}, 1, 1, 5, 3, 2},
    /* 17: cross, causal, biases, out-proj */
    {{.d_model = 8, .n_heads = 2, .rank = 2, .targets = 14, .causal = 1, .out_proj = 1,
      .bias = 1},
     1, 2, 4, 9, 2},
    /* 18: cross, causal, len_q 1 vs len_kv 70, head_dim 4 over 3 heads */
    {{.d_model = 6, .n_heads = 3, .head_dim = 4, .rank = 2, .targets = 15, .causal = 1,
      .out_proj = 1},
     1, 1, 1, 70, 1},
    /* 19: cross, causal, len_q = len_kv = 65 */
    {{.d_model = 8, .n_heads = 2, .rank = 2, .targets = 3, .causal = 1}, 1, 1, 65, 65, 2},
    /* 20: cross, causal, 64 queries over 129 keys, GQA, head_dim 2, rsLoRA */
    {{.d_model = 8, .n_heads = 4, .n_kv_heads = 2, .head_dim = 2, .rank = 2, .targets = 9,
      .causal = 1, .out_proj = 1, .rslora = 1},
     1, 1, 64, 129, 2},
    /* 21: batch 4 > threads, defaults for targets, biases */
    {{.d_model = 8, .n_heads = 2, .n_kv_heads = 2, .bias = 1}, 0, 4, 9, 0, 1},
    /* 22: head_dim 7 over d_model 10, MQA, explicit scale, causal */
    {{.d_model = 10, .n_heads = 2, .n_kv_heads = 1, .head_dim = 7, .rank = 2, .targets = 6,
      .causal = 1, .softmax_scale = 0.2},
     0, 2, 33, 0, 2},
    /* 23: head_dim 1, 8 heads over 2 kv heads, everything on */
    {{.d_model = 8, .n_heads = 8, .n_kv_heads = 2, .head_dim = 1, .rank = 2, .targets = 15,
      .causal = 1, .out_proj = 1},
     0, 1, 100, 0, 2},
    /* 24: rank 1, d_model 9, 3 heads, batch 3 */
    {{.d_model = 9, .n_heads = 3, .rank = 1, .targets = 12, .out_proj = 1}, 0, 3, 17, 0, 1},
    /* 25: cross, causal, 1 query over 1 key */
    {{.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .rank = 2, .targets = 10, .causal = 1,
      .out_proj = 1, .bias = 1},
     1, 3, 1, 1, 2},
    /* 26: rank above d_model, alpha 16 with rsLoRA, batch 2 */
    {{.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .rank = 9, .targets = 7, .alpha = 16.0,
      .rslora = 1, .causal = 1},
     0, 2, 66, 0, 2},
    /* 27: cross, 130 queries over 3 keys, non-causal */
    {{.d_model = 4, .rank = 2, .targets = 3, .bias = 1}, 1, 2, 130, 3, 1},
    /* 28: out-proj without LoRA on O, explicit scale, non-causal */
    {{.d_model = 8, .n_heads = 2, .rank = 2, .targets = 5, .out_proj = 1, .bias = 1,
      .softmax_scale = 1.3},
     0, 2, 20, 0, 2},
    /* 29: cross, causal, 2 queries over 257 keys, out-proj, no LoRA on O */
    {{.d_model = 4, .n_heads = 2, .rank = 2, .targets = 7, .causal = 1, .out_proj = 1},
     1, 1, 2, 257, 2},
};
#define N_CASES ((int)(sizeof cases / sizeof cases[0]))

static void run_case(const ref_config *c, int cross, int batch, int len_q, int len_kv,
                     int threads, uint64_t seed)
{
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, c), 0);
    ref_layer_randomize(&l, seed, 1.5, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, cross, batch, len_q, len_kv, seed + 1), 0);
    ref_errors e;
    char desc[512], err[512];
    const int ok = ref_check(&l, LORA_BACKEND_EXACT, threads, &p, TOL_F32, &e);
    ck_assert_msg(ok, "exact vs reference: %s [%s, threads=%d]",
                  ref_errors_format(&e, err, sizeof err), ref_describe(&l, &p, desc, sizeof desc),
                  threads);
    /* The comparison is meaningful: the reference gradients are not all zero. */
    ck_assert_msg(e.ref_grad_max > 1e-3, "degenerate case: max|grad| %g [%s]", e.ref_grad_max,
                  desc);
    ref_problem_free(&p);
    ref_layer_free(&l);
}

START_TEST(test_exact_vs_reference)
{
    const exact_case *k = &cases[_i];
    run_case(&k->c, k->cross, k->batch, k->len_q, k->len_kv, k->threads, 1000 + (uint64_t)_i);
}
END_TEST

/* Every length of the block-boundary list on one causal config with everything on. */
static const int lengths[] = {1, 2, 3, 63, 64, 65, 127, 128, 129, 255, 256, 257};
#define N_LENGTHS ((int)(sizeof lengths / sizeof lengths[0]))

START_TEST(test_exact_block_boundaries_self)
{
    const ref_config c = {.d_model = 4, .n_heads = 2, .n_kv_heads = 1, .rank = 2, .targets = 15,
                          .causal = 1, .out_proj = 1, .bias = 1};
    run_case(&c, 0, 1, lengths[_i], 0, 1 + (_i & 1), 2000 + (uint64_t)_i);
}
END_TEST

/* Cross-attention, causal: len_kv on the list, len_q = len_kv and len_q = 1, 2, 65. */
START_TEST(test_exact_block_boundaries_cross)
{
    const ref_config c = {.d_model = 4, .n_heads = 2, .rank = 2, .targets = 7, .causal = 1};
    const int lkv = lengths[_i];
    const int lqs[4] = {lkv, 1, 2, 65};
    for (int i = 0; i < 4; i++)
        if (lqs[i] <= lkv)
            run_case(&c, 1, 1, lqs[i], lkv, 2, 3000 + (uint64_t)(_i * 4 + i));
    /* Non-causal, keys on the list against 64 queries. */
    const ref_config nc = {.d_model = 4, .rank = 2, .targets = 3};
    run_case(&nc, 1, 1, 64, lkv, 1, 4000 + (uint64_t)_i);
}
END_TEST

/* Tile boundaries of the FA-2 order (src/backend/exact.c): 256 x 256 tiles, query
 * chunks of 1024 rows in the key-split backward, the fused AVX-512 tiles for head_dim
 * 16 and 64 and the BLIS tiles for head_dim 24. The double reference is O(L^2 * d),
 * so d_model is small and a run has at most 2 heads over 1 kv head. */
static const int tile_lengths[] = {255, 256, 257, 511, 512, 513, 1023, 1024, 1025};
#define N_TILE_LENGTHS ((int)(sizeof tile_lengths / sizeof tile_lengths[0]))
static const int tile_head_dims[] = {16, 64, 24};

/* A config with head_dim hd independent of d_model: one head (batch 1, so with 2
 * threads the backward splits the key blocks over slots) or 2 heads over 1 kv head
 * (GQA; batch 2, one task per worker with 2 threads). */
static ref_config tile_config(int hd, int gqa, int causal)
{
    ref_config c = {.d_model = 4, .n_heads = gqa ? 2 : 1, .n_kv_heads = 1, .head_dim = hd,
                    .rank = 2, .targets = 7, .causal = causal, .out_proj = 1};
    return c;
}

/* Self-attention, one head, batch 1, 2 threads (key-split backward): head_dim 16 and
 * 24 at every length, causal and not (_i < 36); head_dim 64 at every length, causal
 * and not alternating (causal at 1023 and 1025). */
START_TEST(test_exact_tiles_self_split)
{
    int hd, li, causal;
    if (_i < 4 * N_TILE_LENGTHS) {
        hd = _i < 2 * N_TILE_LENGTHS ? 16 : 24;
        li = (_i / 2) % N_TILE_LENGTHS;
        causal = _i & 1;
    } else {
        hd = 64;
        li = _i - 4 * N_TILE_LENGTHS;
        causal = (li + 1) & 1;
    }
    const ref_config c = tile_config(hd, 0, causal);
    run_case(&c, 0, 1, tile_lengths[li], 0, 2, 7000 + (uint64_t)_i);
}
END_TEST
#define N_TILES_SELF_SPLIT (5 * N_TILE_LENGTHS)

/* Self-attention, GQA 2/1, batch 2, with 1 thread (serial backward) or 2 (one task per
 * worker): lengths 255..513 with every head_dim (_i < 18, each head_dim meeting every
 * combination of causal and thread count), then 1024 with head_dim 24 and 1025 with
 * head_dim 16. */
START_TEST(test_exact_tiles_self_gqa)
{
    int hdi, li;
    if (_i < 18) {
        hdi = _i / 6;
        li = _i % 6;
    } else {
        li = 7 + (_i - 18);
        hdi = li == 7 ? 2 : 0;
    }
    const int causal = (li + hdi) & 1, threads = 1 + ((li / 2 + hdi) & 1);
    const ref_config c = tile_config(tile_head_dims[hdi], 1, causal);
    run_case(&c, 0, 2, tile_lengths[li], 0, threads, 8000 + (uint64_t)_i);
}
END_TEST
#define N_TILES_SELF_GQA 20

/* One head, batch 1, 2 threads, causal: lengths around 2048 (two full query chunks of
 * the key-split backward, and one row more). */
START_TEST(test_exact_tiles_self_long)
{
    static const int ls[2] = {2047, 2049};
    const ref_config c = tile_config(16, 0, 1);
    run_case(&c, 0, 1, ls[_i], 0, 2, 9000 + (uint64_t)_i);
}
END_TEST

/* Cross-attention with len_q != len_kv around the tile and chunk boundaries (causal
 * only with len_q <= len_kv: the diagonal is offset by len_kv - len_q). gqa: 2 heads
 * over 1 kv head; batch 1 with 2 threads is the key-split backward (one head: also
 * with GQA, whose dQ partials are 2 heads wide), batch 2 one task per worker. */
typedef struct tile_cross_case {
    int len_q, len_kv, causal, hd, gqa, batch, threads;
} tile_cross_case;
static const tile_cross_case tile_cross_cases[] = {
    /* causal, len_q < len_kv */
    {255, 256, 1, 16, 0, 1, 2},
    {256, 257, 1, 64, 0, 1, 2},
    {257, 513, 1, 24, 0, 1, 2},
    {511, 513, 1, 16, 1, 2, 2},
    {512, 1024, 1, 16, 0, 1, 2},
    {513, 1025, 1, 24, 0, 1, 1},
    {1023, 1024, 1, 16, 0, 1, 2},
    {1024, 1025, 1, 24, 0, 1, 2},
    {255, 1025, 1, 64, 0, 1, 2},
    {1, 1025, 1, 16, 0, 1, 2},
    {257, 1023, 1, 24, 1, 2, 2},
    {1023, 1025, 1, 16, 0, 1, 1},
    {513, 1025, 1, 16, 1, 1, 2},
    /* non-causal, both orders */
    {1025, 255, 0, 16, 0, 1, 2},
    {1024, 257, 0, 64, 0, 1, 2},
    {1025, 513, 0, 24, 0, 1, 2},
    {1023, 511, 0, 16, 1, 2, 1},
    {513, 1025, 0, 16, 0, 1, 2},
    {256, 1023, 0, 24, 0, 1, 2},
    {257, 512, 0, 16, 0, 1, 1},
    {1025, 1024, 0, 24, 0, 1, 2},
    {1024, 1, 0, 64, 0, 1, 2},
    {511, 257, 0, 24, 1, 2, 2},
    {1025, 257, 0, 24, 1, 1, 2},
};
#define N_TILE_CROSS ((int)(sizeof tile_cross_cases / sizeof tile_cross_cases[0]))

START_TEST(test_exact_tiles_cross)
{
    const tile_cross_case *k = &tile_cross_cases[_i];
    const ref_config c = tile_config(k->hd, k->gqa, k->causal);
    run_case(&c, 1, k->batch, k->len_q, k->len_kv, k->threads, 10000 + (uint64_t)_i);
}
END_TEST

/* The key-split backward is bitwise deterministic at a fixed thread count: two runs at
 * L = 1025, 2 threads (5 key blocks over 5 slots, two query chunks) give the same out,
 * dx and gradients. Fused (16, 64) and BLIS (24) tiles, causal and not. */
START_TEST(test_exact_tiles_split_deterministic)
{
    const ref_config c = tile_config(tile_head_dims[_i / 2], 0, _i & 1);
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 11000 + (uint64_t)_i, 1.5, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 1, 1025, 0, 11100 + (uint64_t)_i), 0);
    lib_result r[2];
    for (int run = 0; run < 2; run++) {
        lora_adapter *ad = NULL;
        ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_EXACT, 2, &ad), LORA_OK);
        ck_assert_int_eq(lib_run(ad, &l, &p, &r[run]), LORA_OK);
        lora_adapter_destroy(ad);
    }
    char desc[512];
    ck_assert_msg(lib_result_same(&r[0], &r[1]), "two runs differ [%s, threads=2]",
                  ref_describe(&l, &p, desc, sizeof desc));
    lib_result_free(&r[0]);
    lib_result_free(&r[1]);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* Scores of about +-1e4: the softmax subtracts the row max, outputs stay finite and
 * equal the reference. */
START_TEST(test_exact_large_logits)
{
    const ref_config c = {.d_model = 4, .n_heads = 1, .rank = 2, .targets = 7, .causal = _i,
                          .out_proj = 1};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 77, 1.0, 0.5);
    /* Scale W_Q and W_K by 256 (a power of two keeps them float-exact). */
    for (int t = REF_Q; t <= REF_K; t++)
        for (int64_t i = 0; i < l.out[t] * l.in[t]; i++)
            l.w[t][i] *= 256.0;
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, 40, 0, 78), 0);
    /* The logits really are large: base parts of Q and K (B*A is small next to them). */
    double smax = 0.0;
    for (int64_t b = 0; b < p.batch; b++)
        for (int64_t i = 0; i < p.len_q; i++)
            for (int64_t j = 0; j < p.len_q; j++) {
                const double *xi = p.xq + (b * p.len_q + i) * 4, *xj = p.xq + (b * p.len_q + j) * 4;
                double s = 0.0;
                for (int o = 0; o < 4; o++) {
                    double qi = 0.0, kj = 0.0;
                    for (int m = 0; m < 4; m++) {
                        qi += xi[m] * l.w[REF_Q][o * 4 + m];
                        kj += xj[m] * l.w[REF_K][o * 4 + m];
                    }
                    s += qi * kj;
                }
                s *= l.softmax_scale;
                smax = fabs(s) > smax ? fabs(s) : smax;
            }
    ck_assert_msg(smax > 5e3, "logits only reach %g", smax);

    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_EXACT, 1, &ad), LORA_OK);
    ref_errors e;
    char err[512], desc[512];
    ck_assert_int_eq(ref_compare_adapter(ad, &l, &p, &e), LORA_OK);
    /* Finite (a NaN/Inf reads as an infinite error) and equal to the reference. out and
     * V's factors (through P only) at the usual 1e-4. Float32 scores of size |S| carry
     * an absolute error of about |S|*FLT_EPSILON, which is what the probabilities'
     * relative error becomes: everything through dS (Q, K factors, dx) gets
     * 4*max|S|*FLT_EPSILON (about 1e-2 here), the conditioning of the problem. */
    const double tol_ds = 4.0 * smax * FLT_EPSILON;
    ref_describe(&l, &p, desc, sizeof desc);
    ref_errors_format(&e, err, sizeof err);
    ck_assert_msg(isfinite(e.max), "non-finite results: %s [%s]", err, desc);
    ck_assert_msg(e.out <= TOL_F32 && e.da[REF_V] <= TOL_F32 && e.db[REF_V] <= TOL_F32,
                  "large logits, out / V: %s [%s] (max|score| %g)", err, desc, smax);
    ck_assert_msg(e.max <= tol_ds, "large logits, through dS: %s [%s] (max|score| %g, tol %g)",
                  err, desc, smax, tol_ds);
    lora_adapter_destroy(ad);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* Every caller buffer (x, xkv, dout, out, dx, dxkv, weights, factors, gradients) ends
 * at a guard page: the library must not read or write past the shapes lora.h gives. */
static const exact_case guard_cases[] = {
    {{.d_model = 4, .n_heads = 2, .rank = 2, .targets = 7, .causal = 1}, 1, 1, 1, 3, 1},
    {{.d_model = 4, .n_heads = 2, .rank = 2, .targets = 7, .causal = 1}, 1, 1, 1, 1, 2},
    {{.d_model = 4, .rank = 2, .targets = 3}, 1, 1, 64, 2, 1},
    {{.d_model = 8, .rank = 2, .targets = 1}, 0, 1, 1, 0, 1},
    {{.d_model = 6, .n_heads = 3, .n_kv_heads = 1, .head_dim = 4, .rank = 3, .targets = 4},
     0, 1, 3, 0, 2},
    {{.d_model = 8, .n_heads = 4, .n_kv_heads = 2, .head_dim = 3, .rank = 2, .targets = 9,
      .out_proj = 1, .bias = 1},
     0, 1, 65, 0, 1},
    {{.d_model = 12, .n_heads = 4, .n_kv_heads = 2, .head_dim = 5, .rank = 3, .targets = 14,
      .out_proj = 1, .causal = 1, .bias = 1},
     0, 3, 5, 0, 2},
    {{.d_model = 6, .n_heads = 3, .head_dim = 4, .rank = 2, .targets = 15, .causal = 1,
      .out_proj = 1},
     1, 2, 1, 70, 2},
};

START_TEST(test_exact_stays_inside_caller_buffers)
{
    static const int tb[4] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V, LORA_TARGET_O};
    const exact_case *k = &guard_cases[_i];
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &k->c), 0);
    ref_layer_randomize(&l, 6000 + (uint64_t)_i, 1.5, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, k->cross, k->batch, k->len_q, k->len_kv, 5), 0);
    /* Adapter from guarded copies of every weight. */
    lora_config *cfg = cfg_new(l.cfg.d_model);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, l.n_heads), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, l.n_kv_heads), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_HEAD_DIM, l.head_dim), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RANK, l.rank), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_TARGETS, l.targets), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_CAUSAL, l.cfg.causal), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_OUT_PROJ, l.cfg.out_proj), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_BACKEND, LORA_BACKEND_EXACT), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_THREADS, k->threads), LORA_OK);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    lora_config_destroy(cfg);
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_has_proj(&l, t))
            continue;
        const size_t nw = (size_t)(l.out[t] * l.in[t]), no = (size_t)l.out[t];
        float *w = guarded_alloc(nw), *b = l.bias[t] ? guarded_alloc(no) : NULL;
        ref_to_float(l.w[t], w, nw);
        if (b)
            ref_to_float(l.bias[t], b, no);
        ck_assert_int_eq(lora_adapter_set_base(ad, tb[t], w, b), LORA_OK);
        guarded_free(w, nw);
        guarded_free(b, no);
        if (!ref_is_adapted(&l, t))
            continue;
        const size_t na = (size_t)(l.rank * l.in[t]), nb = (size_t)(l.out[t] * l.rank);
        float *a = guarded_alloc(na), *bb = guarded_alloc(nb);
        ref_to_float(l.a[t], a, na);
        ref_to_float(l.b[t], bb, nb);
        ck_assert_int_eq(lora_adapter_set_param(ad, tb[t], LORA_A, a, na), LORA_OK);
        ck_assert_int_eq(lora_adapter_set_param(ad, tb[t], LORA_B, bb, nb), LORA_OK);
        guarded_free(a, na);
        guarded_free(bb, nb);
    }
    const size_t d = (size_t)l.cfg.d_model;
    const size_t nxq = (size_t)(p.batch * p.len_q) * d, nxkv = (size_t)(p.batch * p.len_kv) * d;
    const size_t nout = (size_t)(p.batch * p.len_q * ref_out_cols(&l));
    float *xq = guarded_alloc(nxq), *xkv = k->cross ? guarded_alloc(nxkv) : xq;
    float *out = guarded_alloc(nout), *dout = guarded_alloc(nout);
    float *dxq = guarded_alloc(nxq), *dxkv = guarded_alloc(nxkv);
    ref_to_float(p.xq, xq, nxq);
    if (k->cross)
        ref_to_float(p.xkv, xkv, nxkv);
    ref_to_float(p.dout, dout, nout);
    if (k->cross) {
        ck_assert_int_eq(lora_forward_cross(ad, xq, xkv, p.batch, p.len_q, p.len_kv, out), LORA_OK);
        ck_assert_int_eq(lora_backward_cross(ad, dout, dxq, dxkv), LORA_OK);
    } else {
        ck_assert_int_eq(lora_forward(ad, xq, p.batch, p.len_q, out), LORA_OK);
        ck_assert_int_eq(lora_backward(ad, dout, dxq), LORA_OK);
    }
    /* Results are right too (same weights as the reference). */
    double *rout = malloc(nout * sizeof(double));
    ck_assert_ptr_nonnull(rout);
    ref_forward(&l, p.xq, p.xkv, p.batch, p.len_q, p.len_kv, rout);
    const double e = ref_rel_err_f(out, rout, nout, REF_REL_FLOOR * ref_max_abs(rout, nout));
    ck_assert_msg(e <= TOL_F32, "guarded case %d: out rel err %g", _i, e);
    for (int t = 0; t < REF_NPROJ; t++)
        if (ref_is_adapted(&l, t)) {
            const size_t na = (size_t)(l.rank * l.in[t]), nb = (size_t)(l.out[t] * l.rank);
            float *ga = guarded_alloc(na), *gb = guarded_alloc(nb);
            ck_assert_int_eq(lora_adapter_get_grad(ad, tb[t], LORA_A, ga, na), LORA_OK);
            ck_assert_int_eq(lora_adapter_get_param(ad, tb[t], LORA_B, gb, nb), LORA_OK);
            guarded_free(ga, na);
            guarded_free(gb, nb);
        }
    free(rout);
    guarded_free(xq, nxq);
    if (k->cross)
        guarded_free(xkv, nxkv);
    guarded_free(out, nout);
    guarded_free(dout, nout);
    guarded_free(dxq, nxq);
    guarded_free(dxkv, nxkv);
    lora_adapter_destroy(ad);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

Suite *exact_suite(void)
{
    Suite *s = suite_create("exact");
    TCase *tc = tcase_create("vs_reference");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_exact_vs_reference, 0, N_CASES);
    suite_add_tcase(s, tc);
    tc = tcase_create("block_boundaries");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_exact_block_boundaries_self, 0, N_LENGTHS);
    tcase_add_loop_test(tc, test_exact_block_boundaries_cross, 0, N_LENGTHS);
    suite_add_tcase(s, tc);
    tc = tcase_create("tile_boundaries");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_exact_tiles_self_split, 0, N_TILES_SELF_SPLIT);
    tcase_add_loop_test(tc, test_exact_tiles_self_gqa, 0, N_TILES_SELF_GQA);
    tcase_add_loop_test(tc, test_exact_tiles_self_long, 0, 2);
    tcase_add_loop_test(tc, test_exact_tiles_cross, 0, N_TILE_CROSS);
    tcase_add_loop_test(tc, test_exact_tiles_split_deterministic, 0, 6);
    suite_add_tcase(s, tc);
    tc = tcase_create("large_logits");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_exact_large_logits, 0, 2);
    suite_add_tcase(s, tc);
    tc = tcase_create("caller_buffers");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_exact_stays_inside_caller_buffers, 0,
                        (int)(sizeof guard_cases / sizeof guard_cases[0]));
    suite_add_tcase(s, tc);
    return s;
}
