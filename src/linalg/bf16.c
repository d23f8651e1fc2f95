/* bf16 products with fp32 accumulation on AVX512_BF16 (bf16.h). One register kernel
 * serves the projections and the attention tiles:
 *
 *   C[j·scj + 16·v + l] = alpha·Σ_p ⟨A pair (p, 16·v + l), B pair (p, j)⟩  (+ beta·C)
 *
 * A is packed as [pair p][lane] 32-bit words, each the bf16 values of k = 2p and 2p + 1
 * side by side (what VDPBF16PS multiplies and adds into one fp32 lane), so a k pair of
 * MV·16 lanes is MV vector loads; B's words are broadcast one at a time from any word
 * layout (word (p, j) at bp[j·bsj + p·bsk]). MV·NB = 24 accumulators stay in registers:
 * per pair MV loads, NB broadcasts and MV·NB VDPBF16PS, twice the multiply-adds of the
 * fp32 kernel (avx512_kernels.h) per instruction. Rounding to bf16 happens while
 * packing, round to nearest even (VCVTNE2PS2BF16), as torch's conversion. An odd k's
 * last pair is padded with 0. */
#include "bf16.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define LA_HAVE_BF16_KERNELS 1
#include <immintrin.h>
#define LA_BF16_TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16")))
#endif

#define BF_MV 4 /* vectors of 16 lanes per register block */
#define BF_NB 6 /* broadcast columns per register block */

/* Projection blocking: a KC × NC block of W (512 KB of bf16 pairs) stays in L2 while
 * blocks of MC rows of X (96 KB) pass over it; a strip of 64 of its columns stays in
 * L1/L2 while the rows go by. C is read and written once per KC, X read once per NC
 * columns: both passes are memory-bound, so both blocks are wide (KC 512 measured
 * 1.2-1.4x faster than 256 on 2048³). KC is even so pairs never straddle. */
#ifndef BF_KC /* -D overrides, for experiments */
#define BF_KC 512
#endif
#ifndef BF_NC
#define BF_NC 512
#endif
#ifndef BF_MC
#define BF_MC 96
#endif

int la_cpu_bf16(void)
{
    const char *off = getenv("LORA_DISABLE_BF16");
    if (off && off[0] && strcmp(off, "0") != 0)
        return 0;
#ifdef LA_HAVE_BF16_KERNELS
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

static int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

/* The tile scratch: a header naming the kept operands, then LA_BF16_KEPT kept A
 * slots, one A slot for the others, the B slot and LA_BF16_OPERANDS operand areas,
 * each `slot` words. */
typedef struct kept_operand {
    const float *a;
    int64_t sa, m, k;
} kept_operand;

typedef struct tile_header {
    kept_operand kept[LA_BF16_KEPT];
    int64_t next;   /* slot the next kept operand replaces (round robin) */
    int64_t slot;   /* words per slot */
} tile_header;

#define TILE_HEADER_WORDS ((sizeof(tile_header) + 63) / 64 * 16)

static size_t tile_slot_words(int64_t most)
{
    return (size_t)round16((most + 1) / 2 * round16(most));
}

size_t la_bf16_tile_scratch_floats(int64_t most)
{
    return TILE_HEADER_WORDS + (LA_BF16_KEPT + 2 + LA_BF16_OPERANDS) * tile_slot_words(most);
}

uint32_t *la_bf16_tile_operand(float *scratch, int i)
{
    const tile_header *h = (const tile_header *)scratch;
    return (uint32_t *)scratch + TILE_HEADER_WORDS + (LA_BF16_KEPT + 2 + i) * h->slot;
}

/* Per part: the W block (KC/2 pairs × NC lanes) and the X block (MC rows × KC/2). */
#define BF_PART_WORDS ((size_t)(BF_KC / 2) * BF_NC + (size_t)BF_MC * (BF_KC / 2))

size_t la_bf16_gemm_w_scratch_floats(int nthreads)
{
    return (size_t)(nthreads > 1 ? nthreads : 1) * BF_PART_WORDS;
}

#ifdef LA_HAVE_BF16_KERNELS
static inline __attribute__((always_inline)) LA_BF16_TARGET __mmask16 lanes_mask(int64_t n)
{
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n > 0 ? n : 0)) - 1u);
}

/* Two rows of 16 floats to 16 bf16 pair words (lo in the low half). */
static inline __attribute__((always_inline)) LA_BF16_TARGET __m512i pair_words(__m512 lo, __m512 hi)
{
    /* [0..15] = bf16(lo), [16..31] = bf16(hi); interleave into words (lo_l, hi_l). */
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25,
                                         9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2,
                                         17, 1, 16, 0);
    return _mm512_permutexvar_epi16(idx, both);
}

/* 16 consecutive elements of a weight (float, bf16 or half) from element i, as float;
 * lanes outside mk are 0. */
static inline __attribute__((always_inline)) LA_BF16_TARGET __m512 load16(la_wmat w, size_t i,
                                                                   __mmask16 mk)
{
    if (w.dtype == LA_F32)
        return _mm512_maskz_loadu_ps(mk, (const float *)w.data + i);
    const __m256i h = _mm256_maskz_loadu_epi16(mk, (const uint16_t *)w.data + i);
    if (w.dtype == LA_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

/* dst[p] = pair (src[2p], src[2p + 1]) for p < (k + 1) / 2 (an odd k's pad is 0): the
 * k consecutive elements of a row from element i0. */
static LA_BF16_TARGET void pack_row(la_wmat src, size_t i0, int64_t k, uint32_t *dst)
{
    int64_t t = 0;
    if (src.dtype == LA_F32) { /* whole chunks without masks (masked loads are slower) */
        const float *s = (const float *)src.data + i0;
        for (; t + 32 <= k; t += 32) {
            const __m512 lo = _mm512_loadu_ps(s + t), hi = _mm512_loadu_ps(s + t + 16);
            _mm512_storeu_si512(dst + t / 2, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
    for (; t < k; t += 32) {
        const int64_t left = k - t;
        const __m512 lo = load16(src, i0 + (size_t)t, lanes_mask(left));
        const __m512 hi = load16(src, i0 + (size_t)t + 16, lanes_mask(left - 16));
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo); /* already in order */
        _mm512_mask_storeu_epi32(dst + t / 2, lanes_mask((left + 1) / 2), both);
    }
}

/* dst[p·ld + l] = pair (row 2p, row 2p + 1) at lane l < n (0 for n <= l < round16(n)),
 * rows at element stride rs from element i0; p < (k + 1) / 2. */
static LA_BF16_TARGET void pack_rows_interleaved(la_wmat src, size_t i0, size_t rs, int64_t k,
                                          int64_t n, uint32_t *dst, int64_t ld)
{
    for (int64_t p = 0; p < (k + 1) / 2; p++) {
        const size_t r0 = i0 + (size_t)(2 * p) * rs;
        const int odd_pad = 2 * p + 1 >= k;
        int64_t l = 0;
        if (src.dtype == LA_F32 && !odd_pad) { /* whole vectors without masks */
            const float *s0 = (const float *)src.data + r0, *s1 = s0 + rs;
            for (; l + 16 <= n; l += 16)
                _mm512_storeu_si512(dst + p * ld + l, pair_words(_mm512_loadu_ps(s0 + l),
                                                                 _mm512_loadu_ps(s1 + l)));
        }
        for (; l < n; l += 16) {
            const __mmask16 mk = lanes_mask(n - l);
            const __m512 lo = load16(src, r0 + (size_t)l, mk);
            const __m512 hi = odd_pad ? _mm512_setzero_ps() : load16(src, r0 + rs + (size_t)l, mk);
            _mm512_storeu_si512(dst + p * ld + l, pair_words(lo, hi));
        }
    }
}

static inline __attribute__((always_inline)) LA_BF16_TARGET void
bf16_block(const int MV, const int NB, int64_t pairs, const uint32_t *ap, int64_t sap,
           const uint32_t *bp, int64_t bsj, int64_t bsk, float *c, int64_t scj, float alpha,
           int accumulate, float beta, __mmask16 last)
{
    __m512 acc[BF_MV][BF_NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 4
        for (int v = 0; v < MV; v++)
            acc[v][j] = _mm512_setzero_ps();
    const uint32_t *bj[BF_NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; j++)
        bj[j] = bp + j * bsj;
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh av[BF_MV];
#pragma GCC unroll 4
        for (int v = 0; v < MV; v++)
            av[v] = (__m512bh)_mm512_loadu_si512(ap + p * sap + 16 * v);
#pragma GCC unroll 8
        for (int j = 0; j < NB; j++) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)bj[j][p * bsk]);
#pragma GCC unroll 4
            for (int v = 0; v < MV; v++)
                acc[v][j] = _mm512_dpbf16_ps(acc[v][j], av[v], b);
        }
    }
    const __m512 al = _mm512_set1_ps(alpha), be = _mm512_set1_ps(beta);
#pragma GCC unroll 8
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 4
        for (int v = 0; v < MV; v++) {
            const __mmask16 mk = v == MV - 1 ? last : (__mmask16)0xFFFF;
            float *cp = c + j * scj + 16 * v;
            __m512 r = _mm512_mul_ps(acc[v][j], al);
            if (accumulate)
                r = _mm512_fmadd_ps(be, _mm512_maskz_loadu_ps(mk, cp), r);
            _mm512_mask_storeu_ps(cp, mk, r);
        }
}

#define BF_CASE(MV_, NB_)                                                                   \
    case (MV_)*8 + (NB_):                                                                  \
        bf16_block(MV_, NB_, pairs, ap, sap, bp, bsj, bsk, c, scj, alpha, accumulate, beta, \
                   last);                                                                  \
        return;
#define BF_CASES(MV_)                                                                       \
    BF_CASE(MV_, 1) BF_CASE(MV_, 2) BF_CASE(MV_, 3) BF_CASE(MV_, 4) BF_CASE(MV_, 5)        \
    BF_CASE(MV_, 6)

/* The block for 1 <= mv <= BF_MV, 1 <= nb <= BF_NB given at run time. */
static LA_BF16_TARGET void bf16_block_any(int mv, int nb, int64_t pairs, const uint32_t *ap,
                                   int64_t sap, const uint32_t *bp, int64_t bsj,
                                   int64_t bsk, float *c, int64_t scj, float alpha,
                                   int accumulate, float beta, __mmask16 last)
{
    switch (mv * 8 + nb) {
        BF_CASES(1)
        BF_CASES(2)
        BF_CASES(3)
        BF_CASES(4)
    default: return;
    }
}

/* C (lanes × n, lanes <= round16 of the packed width sap, column j at c + j·scj) from
 * packed A and B: register blocks run down the columns within each strip of BF_MV
 * vectors. Lanes past `lanes` are not stored. */
static LA_BF16_TARGET void bf16_product(int64_t lanes, int64_t n, int64_t pairs, const uint32_t *ap,
                                 int64_t sap, const uint32_t *bp, int64_t bsj, int64_t bsk,
                                 float *c, int64_t scj, float alpha, int accumulate,
                                 float beta)
{
    const int64_t vecs = (lanes + 15) / 16;
    for (int64_t v0 = 0; v0 < vecs; v0 += BF_MV) {
        const int mv = (int)(vecs - v0 < BF_MV ? vecs - v0 : BF_MV);
        const __mmask16 last = lanes_mask(lanes - 16 * (v0 + mv - 1));
        for (int64_t j0 = 0; j0 < n; j0 += BF_NB) {
            const int nb = (int)(n - j0 < BF_NB ? n - j0 : BF_NB);
            bf16_block_any(mv, nb, pairs, ap + 16 * v0, sap, bp + j0 * bsj, bsj, bsk,
                           c + j0 * scj + 16 * v0, scj, alpha, accumulate, beta, last);
        }
    }
}

/* The packed A of a tile product: a kept copy when there is one, else packed now (into
 * a kept slot when a_kept). */
static LA_BF16_TARGET const uint32_t *packed_a(tile_header *h, const float *a, int64_t sa,
                                               int64_t m, int64_t k, int a_kept)
{
    uint32_t *slots = (uint32_t *)h + TILE_HEADER_WORDS;
    int64_t s = LA_BF16_KEPT; /* the slot of other operands */
    if (a_kept) {
        for (int64_t i = 0; i < LA_BF16_KEPT; i++) {
            const kept_operand *o = &h->kept[i];
            if (o->a == a && o->sa == sa && o->m == m && o->k == k)
                return slots + i * h->slot;
        }
        s = h->next;
        h->next = (h->next + 1) % LA_BF16_KEPT;
        h->kept[s] = (kept_operand){a, sa, m, k};
    }
    uint32_t *ap = slots + s * h->slot;
    pack_rows_interleaved(la_wmat_of_f32(a), 0, (size_t)sa, k, m, ap, m);
    return ap;
}

/* The product of a packed B: word (p, j) at bp[j·pairs + p] when brows, else at
 * bp[p·round16(n) + j]. */
static LA_BF16_TARGET void packed_product(int brows, int64_t m, int64_t n, int64_t k,
                                          float alpha, const float *a, int64_t sa,
                                          const uint32_t *bp, float *c, int64_t scj,
                                          int accumulate, int a_kept, float *scratch)
{
    const int64_t pairs = (k + 1) / 2, np = round16(n);
    const uint32_t *ap = packed_a((tile_header *)scratch, a, sa, m, k, a_kept);
    if (brows)
        bf16_product(m, n, pairs, ap, m, bp, pairs, 1, c, scj, alpha, accumulate, 1.0f);
    else
        bf16_product(m, n, pairs, ap, m, bp, 1, np, c, scj, alpha, accumulate, 1.0f);
}

#define BF_ROWS_AHEAD 8

static LA_BF16_TARGET void tile_product(int brows, int64_t m, int64_t n, int64_t k, float alpha,
                                 const float *a, int64_t sa, const float *b, int64_t sb,
                                 float *c, int64_t scj, int accumulate, int a_kept,
                                 float *scratch)
{
    const int64_t pairs = (k + 1) / 2, np = round16(n);
    tile_header *h = (tile_header *)scratch;
    uint32_t *bp = (uint32_t *)scratch + TILE_HEADER_WORDS + (LA_BF16_KEPT + 1) * h->slot;
    if (brows)
        for (int64_t j = 0; j < n; j++) {
            /* rows of Q, dO, K come from beyond L2: fetch a few rows ahead */
            if (j + BF_ROWS_AHEAD < n)
                for (int64_t t = 0; t < k; t += 16)
                    _mm_prefetch((const char *)(b + (j + BF_ROWS_AHEAD) * sb + t), _MM_HINT_T0);
            pack_row(la_wmat_of_f32(b), (size_t)(j * sb), k, bp + j * pairs);
        }
    else
        pack_rows_interleaved(la_wmat_of_f32(b), 0, (size_t)sb, k, n, bp, np);
    packed_product(brows, m, n, k, alpha, a, sa, bp, c, scj, accumulate, a_kept, scratch);
}


/* exp(max(x, -87)) in fp32 to about 3e-6 relative (2^f by its Taylor series to f^5 on
 * |f| <= 1/2, then scaled by 2^n): these probabilities are rounded to bf16 (2^-9)
 * right after, and a one-pass kernel in registers is what removes the softmax's cost
 * around the bf16 products. NaN (from -inf - -inf) gives exp(-87). */
static inline __attribute__((always_inline)) LA_BF16_TARGET __m512 fast_exp(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147181f));
    __m512 p = _mm512_set1_ps(1.0f / 120.0f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* exp(x - shift) flushed to 0 below `flush` */
static inline __attribute__((always_inline)) LA_BF16_TARGET __m512 prob(__m512 x, __m512 shift,
                                                                          __m512 flush)
{
    const __m512 e = fast_exp(_mm512_sub_ps(x, shift));
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(e, flush, _CMP_GE_OQ), e);
}

static LA_BF16_TARGET void exp_pairs(const float *lo, const float *hi, const float *shift, int64_t n,
                                     float flush, float *sum, uint32_t *dst)
{
    const __m512 fl = _mm512_set1_ps(flush);
    for (int64_t l = 0; l < n; l += 16) {
        const __mmask16 mk = lanes_mask(n - l);
        const __m512 sh = _mm512_maskz_loadu_ps(mk, shift + l);
        const __m512 a = _mm512_maskz_mov_ps(mk, prob(_mm512_maskz_loadu_ps(mk, lo + l), sh, fl));
        __m512 b = _mm512_setzero_ps();
        __m512 acc = _mm512_add_ps(_mm512_maskz_loadu_ps(mk, sum + l), a);
        if (hi) {
            b = _mm512_maskz_mov_ps(mk, prob(_mm512_maskz_loadu_ps(mk, hi + l), sh, fl));
            acc = _mm512_add_ps(acc, b);
        }
        _mm512_mask_storeu_ps(sum + l, mk, acc);
        _mm512_storeu_si512(dst + l, pair_words(a, b));
    }
}

/* One row of the backward: P and dS = (dp - shift)·P, the bf16 row of dS into ds_row
 * ((n + 1) / 2 words); P, dS returned through p_out, ds_out (n floats). */
static LA_BF16_TARGET void prob_row(const float *s, const float *dp, float lse, float shift,
                                    int64_t n, float flush, float *p_out, float *ds_out,
                                    uint16_t *ds_row)
{
    const __m512 fl = _mm512_set1_ps(flush), ls = _mm512_set1_ps(lse);
    const __m512 sh = _mm512_set1_ps(shift);
    const int64_t even = (n + 1) / 2 * 2;
    for (int64_t l = 0; l < n; l += 16) {
        const __mmask16 mk = lanes_mask(n - l);
        const __m512 pv = _mm512_maskz_mov_ps(mk, prob(_mm512_maskz_loadu_ps(mk, s + l), ls, fl));
        const __m512 dv = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, dp + l), sh), pv);
        _mm512_storeu_ps(p_out + l, pv);
        _mm512_storeu_ps(ds_out + l, dv);
        _mm256_mask_storeu_epi16(ds_row + l, lanes_mask(even - l),
                                 (__m256i)_mm512_cvtneps_pbh(dv));
    }
}

static LA_BF16_TARGET void probs_pair(const float *s0, const float *s1, const float *dp0,
                                      const float *dp1, const float *lse, const float *shift,
                                      int64_t n, float flush, uint32_t *p_dst, uint32_t *ds_dst,
                                      uint32_t *ds_rows)
{
    float p[2][BF16_ROW_MAX], ds[2][BF16_ROW_MAX];
    const int64_t pairs = (n + 1) / 2, np = round16(n);
    prob_row(s0, dp0, lse[0], shift[0], n, flush, p[0], ds[0], (uint16_t *)ds_rows);
    if (s1)
        prob_row(s1, dp1, lse[1], shift[1], n, flush, p[1], ds[1],
                 (uint16_t *)(ds_rows + pairs));
    for (int64_t l = 0; l < np; l += 16) {
        const __m512 p1 = s1 ? _mm512_loadu_ps(p[1] + l) : _mm512_setzero_ps();
        const __m512 d1 = s1 ? _mm512_loadu_ps(ds[1] + l) : _mm512_setzero_ps();
        _mm512_storeu_si512(p_dst + l, pair_words(_mm512_loadu_ps(p[0] + l), p1));
        _mm512_storeu_si512(ds_dst + l, pair_words(_mm512_loadu_ps(ds[0] + l), d1));
    }
}
#endif

void la_bf16_exp_pairs(const float *lo, const float *hi, const float *shift, int64_t n, float flush,
                       float *sum, uint32_t *dst)
{
#ifdef LA_HAVE_BF16_KERNELS
    exp_pairs(lo, hi, shift, n, flush, sum, dst);
#else
    (void)lo, (void)hi, (void)shift, (void)n, (void)flush, (void)sum, (void)dst;
#endif
}

void la_bf16_probs_pair(const float *s0, const float *s1, const float *dp0, const float *dp1,
                        const float *lse, const float *shift, int64_t n, float flush,
                        uint32_t *p_dst, uint32_t *ds_dst, uint32_t *ds_rows)
{
#ifdef LA_HAVE_BF16_KERNELS
    probs_pair(s0, s1, dp0, dp1, lse, shift, n, flush, p_dst, ds_dst, ds_rows);
#else
    (void)s0, (void)s1, (void)dp0, (void)dp1, (void)lse, (void)shift, (void)n, (void)flush;
    (void)p_dst, (void)ds_dst, (void)ds_rows;
#endif
}

void la_bf16_tile_product_packed(int brows, int64_t m, int64_t n, int64_t k, float alpha,
                                 const float *a, int64_t sa, const uint32_t *bp, float *c,
                                 int64_t scj, int accumulate, int a_kept, float *scratch)
{
#ifdef LA_HAVE_BF16_KERNELS
    packed_product(brows, m, n, k, alpha, a, sa, bp, c, scj, accumulate, a_kept, scratch);
#else
    (void)brows, (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)sa, (void)bp;
    (void)c, (void)scj, (void)accumulate, (void)a_kept, (void)scratch;
#endif
}

void la_bf16_tile_product(int brows, int64_t m, int64_t n, int64_t k, float alpha,
                          const float *a, int64_t sa, const float *b, int64_t sb, float *c,
                          int64_t scj, int accumulate, int a_kept, float *scratch)
{
#ifdef LA_HAVE_BF16_KERNELS
    tile_product(brows, m, n, k, alpha, a, sa, b, sb, c, scj, accumulate, a_kept, scratch);
#else
    (void)brows, (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)sa, (void)b;
    (void)sb, (void)c, (void)scj, (void)accumulate, (void)a_kept, (void)scratch;
#endif
}

void la_bf16_tile_forget(float *scratch, int64_t most)
{
    tile_header *h = (tile_header *)scratch;
    memset(h, 0, sizeof *h);
    h->slot = (int64_t)tile_slot_words(most);
}

/* ---- projections ------------------------------------------------------------------- */

typedef struct bf16_gemm_job {
    la_trans tw;
    int64_t m, n, k; /* C (m, n) = alpha·X (m, k)·op(W) + beta·C */
    int64_t in, ldx, ldc;
    float alpha, beta;
    const float *x;
    la_wmat w;
    float *c, *scratch;
    int split_rows;  /* parts take rows of C, else columns */
} bf16_gemm_job;

#ifdef LA_HAVE_BF16_KERNELS
/* Words (p, l) of op(W)'s block: k rows k0.., n columns j0.., at wp[p·ld + l]. */
static LA_BF16_TARGET void pack_w_block(const bf16_gemm_job *j, int64_t k0, int64_t kc, int64_t j0,
                                 int64_t nc, uint32_t *wp, int64_t ld)
{
    if (j->tw == LA_N) { /* op(W) = W: row k of W is row k of op(W) */
        pack_rows_interleaved(j->w, (size_t)(k0 * j->in + j0), (size_t)j->in, kc, nc, wp, ld);
        return;
    }
    /* op(W) = Wᵀ: column l of the block is row j0 + l of W, its pairs consecutive.
     * Sixteen rows at a time are converted, then transposed 16 words per store (a
     * store per word at a stride of ld would hit one L1 set over and over). */
    uint32_t rows[16][BF_KC / 2];
    const int64_t pairs = (kc + 1) / 2;
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7,
                                                            6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(BF_KC / 2));
    for (int64_t l0 = 0; l0 < nc; l0 += 16) {
        for (int64_t r = 0; r < 16; r++) {
            if (l0 + r < nc)
                pack_row(j->w, (size_t)((j0 + l0 + r) * j->in + k0), kc, rows[r]);
            else
                memset(rows[r], 0, sizeof rows[r]);
        }
        for (int64_t p = 0; p < pairs; p++)
            _mm512_storeu_si512(wp + p * ld + l0,
                                _mm512_i32gather_epi32(idx, (const int *)rows[0] + p, 4));
    }
}

/* Rows of X are read KC floats at a time at a stride of a whole row, which the hardware
 * prefetchers follow poorly (the pass over X was memory-latency bound): the row
 * BF_PREFETCH_ROWS ahead is asked for while one is converted. */
#define BF_PREFETCH_ROWS 4

static inline void prefetch_row(const bf16_gemm_job *j, int64_t row, int64_t r_hi,
                                int64_t k0, int64_t kc)
{
    if (row >= r_hi)
        return;
    const char *p = (const char *)(j->x + row * j->ldx + k0);
    for (int64_t b = 0; b < kc * (int64_t)sizeof(float); b += 64)
        __builtin_prefetch(p + b, 0, 3);
}

/* Rows [r_lo, r_hi) and columns [c_lo, c_hi) of C, blocked as the header says. */
static LA_BF16_TARGET void gemm_range(const bf16_gemm_job *j, int64_t r_lo, int64_t r_hi,
                               int64_t c_lo, int64_t c_hi, uint32_t *wp, uint32_t *xp)
{
    for (int64_t j0 = c_lo; j0 < c_hi; j0 += BF_NC) {
        const int64_t nc = c_hi - j0 < BF_NC ? c_hi - j0 : BF_NC, ncp = round16(nc);
        for (int64_t k0 = 0; k0 < j->k; k0 += BF_KC) {
            const int64_t kc = j->k - k0 < BF_KC ? j->k - k0 : BF_KC, pairs = (kc + 1) / 2;
            pack_w_block(j, k0, kc, j0, nc, wp, ncp);
            const int first = k0 == 0;
            for (int64_t i0 = r_lo; i0 < r_hi; i0 += BF_MC) {
                const int64_t mc = r_hi - i0 < BF_MC ? r_hi - i0 : BF_MC;
                for (int64_t i = 0; i < mc; i++) {
                    prefetch_row(j, i0 + i + BF_PREFETCH_ROWS, r_hi, k0, kc);
                    pack_row(la_wmat_of_f32(j->x), (size_t)((i0 + i) * j->ldx + k0), kc,
                             xp + i * pairs);
                }
                const int acc = !first || j->beta != 0.0f;
                bf16_product(nc, mc, pairs, wp, ncp, xp, pairs, 1, j->c + i0 * j->ldc + j0,
                             j->ldc, j->alpha, acc, first ? j->beta : 1.0f);
            }
        }
    }
}

/* pool_fn: part `part` takes a contiguous range of rows (units of BF_NB) or of columns
 * (units of 16·BF_MV). */
static LA_BF16_TARGET void gemm_part(void *arg, int part, int parts)
{
    const bf16_gemm_job *j = arg;
    const int64_t unit = j->split_rows ? BF_NB : 16 * BF_MV;
    const int64_t len = j->split_rows ? j->m : j->n, units = (len + unit - 1) / unit;
    int64_t lo, hi;
    pool_static_range(units, part, parts, &lo, &hi);
    lo *= unit;
    hi = hi * unit < len ? hi * unit : len;
    if (lo >= hi)
        return;
    uint32_t *wp = (uint32_t *)(j->scratch + (size_t)part * BF_PART_WORDS);
    uint32_t *xp = wp + (size_t)(BF_KC / 2) * BF_NC;
    if (j->split_rows)
        gemm_range(j, lo, hi, 0, j->n, wp, xp);
    else
        gemm_range(j, 0, j->m, lo, hi, wp, xp);
}
#endif

void la_bf16_gemm_w(const la_ctx *ctx, int nthreads, la_trans tw, int64_t m, int64_t out,
                    int64_t in, float alpha, const float *x, int64_t ldx, la_wmat w,
                    float beta, float *c, int64_t ldc, float *scratch)
{
    bf16_gemm_job j = {.tw = tw, .m = m, .n = tw == LA_T ? out : in, .k = tw == LA_T ? in : out,
                       .in = in, .ldx = ldx, .ldc = ldc, .alpha = alpha, .beta = beta, .x = x,
                       .w = w, .c = c, .scratch = scratch};
#ifdef LA_HAVE_BF16_KERNELS
    /* Parts take columns (each packs only its share of W, the larger operand to
     * convert) unless that leaves a part under two register strips. */
    int64_t parts = nthreads < ctx->threads ? nthreads : ctx->threads;
    j.split_rows = j.n < 2 * 16 * BF_MV * parts;
    const int64_t units = j.split_rows ? (j.m + BF_NB - 1) / BF_NB
                                       : (j.n + 16 * BF_MV - 1) / (16 * BF_MV);
    const double flops = 2.0 * (double)m * (double)j.n * (double)j.k;
    parts = parts < units ? parts : units;
    if ((double)parts * 4e6 > flops)
        parts = (int64_t)(flops / 4e6);
    if (parts <= 1)
        gemm_part(&j, 0, 1);
    else
        pool_run(ctx->pool, (int)parts, gemm_part, &j);
#else
    (void)ctx, (void)nthreads, (void)j;
#endif
}
