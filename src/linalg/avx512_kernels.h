/* AVX-512 register-blocked product kernels for the fused attention tiles
 * (src/backend/exact.c). One kernel shape covers every tile product there:
 *
 *   C[j·scj + 16·v + l] = alpha·Σ_k A[k·sa + 16·v + l]·B(k, j)  (+ C when accumulate)
 *
 * for v < MV vectors of 16 floats along C's contiguous dimension and j < NB columns.
 * A holds MV·16 contiguous floats per k (loaded as vectors); B is read one element at a
 * time and broadcast, so it can sit in any layout: B(k, j) = b[j·sb + k] ("B rows", a
 * row per column j, as K, Q or dO rows) or b[k·sb + j] ("B columns"). Nothing is
 * packed, so the operands are the tiles as the softmax leaves them. MV·NB accumulators
 * stay in registers (MV = 4, NB = 6: 24 of the 32 zmm registers); each k costs MV
 * vector loads, NB broadcasts and MV·NB FMAs, FMA-bound on cores with two FMA units
 * (measured 140-150 GFLOP/s on one Sapphire Rapids core, as BLIS's skx sgemm).
 *
 * Only for code compiled for AVX-512 (every function here has the target attribute);
 * callers check the CPU first (la_ctx.avx512). */
#ifndef LORA_AVX512_KERNELS_H
#define LORA_AVX512_KERNELS_H

#if defined(__x86_64__) && defined(__GNUC__)
#define LA_HAVE_AVX512_KERNELS 1

#include <immintrin.h>
#include <stdint.h>

#define LA_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
#define LA_KERNEL_NB 6 /* columns per register block */
#define LA_KERNEL_MV 4 /* vectors per register block */

static inline __attribute__((always_inline)) LA_AVX512 void
la_kernel_block(const int MV, const int NB, const int brows, int64_t k, const float *a,
                int64_t sa, const float *b, int64_t sb, float *c, int64_t scj, float alpha,
                int accumulate)
{
    __m512 acc[LA_KERNEL_MV][LA_KERNEL_NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 4
        for (int v = 0; v < MV; v++)
            acc[v][j] = _mm512_setzero_ps();
    const float *bp[LA_KERNEL_NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; j++)
        bp[j] = brows ? b + j * sb : b + j;
    for (int64_t kk = 0; kk < k; kk++) {
        __m512 av[LA_KERNEL_MV];
#pragma GCC unroll 4
        for (int v = 0; v < MV; v++)
            av[v] = _mm512_loadu_ps(a + kk * sa + 16 * v);
#pragma GCC unroll 8
        for (int j = 0; j < NB; j++) {
            const __m512 bj = _mm512_set1_ps(brows ? bp[j][kk] : bp[0][kk * sb + j]);
#pragma GCC unroll 4
            for (int v = 0; v < MV; v++)
                acc[v][j] = _mm512_fmadd_ps(av[v], bj, acc[v][j]);
        }
    }
    const __m512 al = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 4
        for (int v = 0; v < MV; v++) {
            float *cp = c + j * scj + 16 * v;
            __m512 r = _mm512_mul_ps(acc[v][j], al);
            if (accumulate)
                r = _mm512_add_ps(r, _mm512_loadu_ps(cp));
            _mm512_storeu_ps(cp, r);
        }
}

/* The kernel for 1 <= mv <= LA_KERNEL_MV, 1 <= nb <= LA_KERNEL_NB given at run time. */
#define LA_KERNEL_CASE(MV_, NB_)                                                            \
    case (MV_)*8 + (NB_):                                                                  \
        la_kernel_block(MV_, NB_, brows, k, a, sa, b, sb, c, scj, alpha, accumulate);      \
        return;
#define LA_KERNEL_CASES(MV_)                                                                \
    LA_KERNEL_CASE(MV_, 1) LA_KERNEL_CASE(MV_, 2) LA_KERNEL_CASE(MV_, 3)                   \
    LA_KERNEL_CASE(MV_, 4) LA_KERNEL_CASE(MV_, 5) LA_KERNEL_CASE(MV_, 6)

static inline __attribute__((always_inline)) LA_AVX512 void
la_kernel_any(int mv, int nb, const int brows, int64_t k, const float *a, int64_t sa,
              const float *b, int64_t sb, float *c, int64_t scj, float alpha, int accumulate)
{
    switch (mv * 8 + nb) {
        LA_KERNEL_CASES(1)
        LA_KERNEL_CASES(2)
        LA_KERNEL_CASES(3)
        LA_KERNEL_CASES(4)
    default: return;
    }
}

/* C (n columns of m floats, column j at c + j·scj; m a multiple of 16) = alpha·A·B
 * (+ C), A: k rows of m floats at stride sa, B as above. Register blocks run down the
 * columns within each strip of LA_KERNEL_MV vectors, so that strip of A stays in L1. */
static LA_AVX512 __attribute__((unused)) void
la_tile_product(int brows, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                int64_t sa, const float *b, int64_t sb, float *c, int64_t scj, int accumulate)
{
    for (int64_t v0 = 0; v0 < m / 16; v0 += LA_KERNEL_MV) {
        const int mv = (int)(m / 16 - v0 < LA_KERNEL_MV ? m / 16 - v0 : LA_KERNEL_MV);
        for (int64_t j0 = 0; j0 < n; j0 += LA_KERNEL_NB) {
            const int nb = (int)(n - j0 < LA_KERNEL_NB ? n - j0 : LA_KERNEL_NB);
            const float *bj = brows ? b + j0 * sb : b + j0;
            if (brows)
                la_kernel_any(mv, nb, 1, k, a + 16 * v0, sa, bj, sb, c + j0 * scj + 16 * v0,
                              scj, alpha, accumulate);
            else
                la_kernel_any(mv, nb, 0, k, a + 16 * v0, sa, bj, sb, c + j0 * scj + 16 * v0,
                              scj, alpha, accumulate);
        }
    }
}

/* The horizontal sums of v[0..15], in order, as one vector: pairs, then quads within
 * 128-bit lanes, then across lanes (a fixed tree: deterministic). */
static inline __attribute__((always_inline)) LA_AVX512 __m512 la_hsum16(const __m512 *v)
{
    __m512 s[8], w[4];
#pragma GCC unroll 8
    for (int p = 0; p < 8; p++) /* per lane: v2p, v2p+1, v2p, v2p+1 partials */
        s[p] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]),
                             _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]));
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) /* per lane: v4q .. v4q+3 partials */
        w[q] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * q], s[2 * q + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(s[2 * q], s[2 * q + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(z01, z23, _MM_SHUFFLE(3, 1, 3, 1)));
}

#endif
#endif
