/* Weights in float32, bf16 or half (typed.h). */
#include "typed.h"

#include <string.h>

#include "avx512_kernels.h"
#include "pool.h"

/* The dot-product route's pseudo-dtype (stream_block): bf16 W on AVX512_BF16. */
#define LA_BF16_DOT 3
/* Products with at most this many rows stream W through registers (with AVX-512). */
#define LA_STREAM_ROWS 16
/* Bytes of W per part of a register-route product (256 KiB). */
#define LA_STREAM_PART_BYTES (INT64_C(1) << 18)
/* Floats of one converted row panel of W (4 MiB): wide enough that BLIS's packing of X,
 * repeated per panel, stays a small part of the product. */
#define LA_PANEL_FLOATS (INT64_C(1) << 20)

size_t la_dtype_size(la_dtype dtype) { return dtype == LA_F32 ? 4 : 2; }

static inline float bf16_to_float(uint16_t h)
{
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float half_to_float(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t bits = sign | (e == 31 ? 0x7f800000u : (e + 112u) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    if (e == 0) { /* zero or subnormal: m·2^-24, exact in float */
        f = (float)m * 0x1p-24f;
        f = sign ? -f : f;
    }
    return f;
}

LA_VECTOR_CLONES static void convert(la_dtype dtype, const uint16_t *src, size_t n, float *dst)
{
    if (dtype == LA_BF16)
        for (size_t i = 0; i < n; i++)
            dst[i] = bf16_to_float(src[i]);
    else
        for (size_t i = 0; i < n; i++)
            dst[i] = half_to_float(src[i]);
}

void la_wmat_rows(la_wmat w, int64_t cols, int64_t r0, int64_t n, float *dst)
{
    const size_t start = (size_t)(r0 * cols), count = (size_t)(n * cols);
    if (w.dtype == LA_F32)
        memcpy(dst, (const float *)w.data + start, count * sizeof(float));
    else
        convert(w.dtype, (const uint16_t *)w.data + start, count, dst);
}

float la_wmat_at(la_wmat w, size_t i)
{
    if (w.dtype == LA_F32)
        return ((const float *)w.data)[i];
    const uint16_t h = ((const uint16_t *)w.data)[i];
    return w.dtype == LA_BF16 ? bf16_to_float(h) : half_to_float(h);
}

/* The exponent bits of an Inf/NaN of a 16-bit dtype. */
static uint16_t special_exponent(la_dtype dtype)
{
    return dtype == LA_BF16 ? 0x7f80u : 0x7c00u;
}

LA_VECTOR_CLONES static uint16_t max_magnitude16(const uint16_t *x, size_t n)
{
    uint16_t m = 0; /* finite magnitudes order as their bit patterns */
    for (size_t i = 0; i < n; i++) {
        const uint16_t a = x[i] & 0x7fffu;
        m = a > m ? a : m;
    }
    return m;
}

float la_wmat_max_abs(la_wmat w, size_t n)
{
    if (w.dtype == LA_F32)
        return la_max_abs((const float *)w.data, n);
    const uint16_t m = max_magnitude16((const uint16_t *)w.data, n);
    return w.dtype == LA_BF16 ? bf16_to_float(m) : half_to_float(m);
}

int64_t la_wmat_find_nonfinite(la_wmat w, size_t n)
{
    if (w.dtype == LA_F32)
        return la_find_nonfinite((const float *)w.data, n);
    const uint16_t *x = w.data, e = special_exponent(w.dtype);
    int bad = 0;
    for (size_t i = 0; i < n; i++)
        bad |= (x[i] & e) == e;
    if (!bad)
        return -1;
    for (size_t i = 0; i < n; i++)
        if ((x[i] & e) == e)
            return (int64_t)i;
    return -1;
}

static int64_t panel_rows(int64_t out, int64_t in)
{
    int64_t rows = LA_PANEL_FLOATS / (in > 0 ? in : 1);
    rows = rows < 16 ? 16 : rows;
    return rows > out ? out : rows;
}

/* The register route: x·Wᵀ with few rows on AVX-512 (any dtype: BLIS's packing of a
 * float W costs more than the product when x has a row or two). */
static int streams(const la_ctx *ctx, la_trans tw, int64_t m)
{
#ifdef LA_HAVE_AVX512_KERNELS
    return tw == LA_T && ctx->avx512 && m <= LA_STREAM_ROWS;
#else
    (void)ctx, (void)tw, (void)m;
    return 0;
#endif
}

size_t la_gemm_w_scratch_floats(const la_ctx *ctx, la_trans tw, int64_t m, la_dtype dtype,
                                int64_t out, int64_t in)
{
    if (dtype == LA_F32 || m <= 0 || out <= 0 || in <= 0 || streams(ctx, tw, m))
        return 0;
    return (size_t)(panel_rows(out, in) * in);
}

#ifdef LA_HAVE_AVX512_KERNELS
/* 16 elements of W at element c of row p (the first `mask` lanes when partial) as
 * floats; DT is LA_F32 or LA_F16 (bf16 takes stream_block_bf16 or dot_block). */
static inline __attribute__((always_inline)) LA_AVX512 __m512
load_w(const int DT, const void *p, int64_t c, __mmask16 mask, int partial)
{
    if (DT == LA_F32)
        return partial ? _mm512_maskz_loadu_ps(mask, (const float *)p + c)
                       : _mm512_loadu_ps((const float *)p + c);
    const uint16_t *q = (const uint16_t *)p + c;
    const __m256i h = partial ? _mm256_maskz_loadu_epi16(mask, q)
                              : _mm256_loadu_si256((const __m256i *)(const void *)q);
    return _mm512_cvtph_ps(h);
}

/* x[c .. c+31] as two vectors, the first n (<= 32) elements loaded, the rest 0. */
static inline __attribute__((always_inline)) LA_AVX512 void
load_x32(const float *x, int64_t c, int64_t n, __m512 *a, __m512 *b)
{
    const __mmask16 m0 = n >= 16 ? 0xffffu : (__mmask16)((1u << n) - 1u);
    const __mmask16 m1 = n >= 32 ? 0xffffu : n <= 16 ? 0 : (__mmask16)((1u << (n - 16)) - 1u);
    *a = _mm512_maskz_loadu_ps(m0, x + c);
    *b = _mm512_maskz_loadu_ps(m1, x + c + 16);
}

/* x_i[c .. c+31] (the first `n` of them, the rest 0) as its even and odd elements:
 * the order of bf16 W loaded as 16 pairs (pair_halves). */
static inline __attribute__((always_inline)) LA_AVX512 void
x_pairs(const float *x, int64_t c, int64_t n, __m512 *even, __m512 *odd)
{
    __m512 a, b;
    load_x32(x, c, n, &a, &b);
    const __m512i ie = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i io = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    *even = _mm512_permutex2var_ps(a, ie, b);
    *odd = _mm512_permutex2var_ps(a, io, b);
}

/* 32 bf16 of a W row (16 pairs, one 32-bit lane each) as floats, exactly: the even
 * elements shifted up, the odd ones masked in place (no widening shuffle). */
static inline __attribute__((always_inline)) LA_AVX512 void
pair_halves(__m512i v, __m512 *even, __m512 *odd)
{
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}

/* stream_block for bf16 W, 32 columns a step: lane l of a chain sums columns 2l and
 * 2l+1 of every step. */
static inline __attribute__((always_inline)) LA_AVX512 void
stream_block_bf16(const int GW, const int GX, const void *const *wr, const float *const *xr,
                  int64_t in, __m512 *acc)
{
    for (int64_t c = 0; c < in; c += 32) {
        const int64_t n = in - c < 32 ? in - c : 32;
        const __mmask32 wm = n == 32 ? 0xffffffffu : (__mmask32)((1u << n) - 1u);
        __m512 xe[LA_STREAM_ROWS / 4], xo[LA_STREAM_ROWS / 4];
#pragma GCC unroll 4
        for (int i = 0; i < GX; i++)
            x_pairs(xr[i], c, n, &xe[i], &xo[i]);
#pragma GCC unroll 16
        for (int jw = 0; jw < GW; jw++) {
            const uint16_t *q = (const uint16_t *)wr[jw] + c;
            __m512 we, wo;
            pair_halves(n == 32 ? _mm512_loadu_si512((const void *)q)
                                : _mm512_maskz_loadu_epi16(wm, q),
                        &we, &wo);
#pragma GCC unroll 4
            for (int i = 0; i < GX; i++)
                acc[jw * GX + i] =
                    _mm512_fmadd_ps(wo, xo[i], _mm512_fmadd_ps(we, xe[i], acc[jw * GX + i]));
        }
    }
}

#define LA_AVX512_BF16 \
    __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16")))
/* The bf16 dot-product route (vdpbf16ps) for one or two rows of x: x is split exactly
 * into three bf16 parts (8 + 8 + 8 significand bits: truncate, subtract, truncate,
 * subtract), so every product w·x_part is exact and only the float sums round, as on
 * the converting routes. A step takes 32 columns; lane l sums columns 2l and 2l+1. */
static inline __attribute__((always_inline)) LA_AVX512_BF16 void
x_split3(const float *x, int64_t c, int64_t n, __m512bh *hi, __m512bh *mid, __m512bh *lo)
{
    const __m512i top = _mm512_set1_epi32((int)0xffff0000u);
    __m512 a, b;
    load_x32(x, c, n, &a, &b);
    __m512bh *parts[3] = {hi, mid, lo};
    for (int k = 0; k < 3; k++) { /* the last part has at most 8 bits left: exact */
        const __m512 ta = k < 2 ? _mm512_castsi512_ps(
                                      _mm512_and_si512(_mm512_castps_si512(a), top))
                                : a;
        const __m512 tb = k < 2 ? _mm512_castsi512_ps(
                                      _mm512_and_si512(_mm512_castps_si512(b), top))
                                : b;
        *parts[k] = _mm512_cvtne2ps_pbh(tb, ta); /* columns c .. c+15 first */
        a = _mm512_sub_ps(a, ta);
        b = _mm512_sub_ps(b, tb);
    }
}

static inline __attribute__((always_inline)) LA_AVX512_BF16 void
dot_block(const int GW, const int GX, const void *const *wr, const float *const *xr,
          int64_t in, __m512 *acc_out)
{
    __m512 acc[16];
#pragma GCC unroll 16
    for (int l = 0; l < 16; l++)
        acc[l] = _mm512_setzero_ps();
    for (int64_t c = 0; c < in; c += 32) {
        const int64_t n = in - c < 32 ? in - c : 32;
        const __mmask32 wm = n == 32 ? 0xffffffffu : (__mmask32)((1u << n) - 1u);
        __m512bh xh[2], xm[2], xl[2];
#pragma GCC unroll 2
        for (int i = 0; i < GX; i++)
            x_split3(xr[i], c, n, &xh[i], &xm[i], &xl[i]);
#pragma GCC unroll 16
        for (int jw = 0; jw < GW; jw++) {
            const uint16_t *q = (const uint16_t *)wr[jw] + c;
            const __m512bh wv = (__m512bh)(n == 32 ? _mm512_loadu_si512((const void *)q)
                                                   : _mm512_maskz_loadu_epi16(wm, q));
#pragma GCC unroll 2
            for (int i = 0; i < GX; i++) { /* small parts first */
                __m512 *a = &acc[jw * GX + i];
                *a = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_dpbf16_ps(*a, wv, xl[i]), wv,
                                                       xm[i]),
                                      wv, xh[i]);
            }
        }
    }
#pragma GCC unroll 16
    for (int l = 0; l < 16; l++)
        acc_out[l] = acc[l];
}

/* Out of line: the caller is compiled without avx512bf16. */
static LA_AVX512_BF16 void dot_block_16x1(const void *const *wr, const float *const *xr,
                                          int64_t in, __m512 *acc)
{
    dot_block(16, 1, wr, xr, in, acc);
}
static LA_AVX512_BF16 void dot_block_8x2(const void *const *wr, const float *const *xr,
                                         int64_t in, __m512 *acc)
{
    dot_block(8, 2, wr, xr, in, acc);
}

/* acc[jw·GX + i] = Σ_c w_jw[c]·x_i[c] for GW rows of W and GX rows of x (GW·GX = 16):
 * sixteen independent chains, each summing its columns in order. */
static inline __attribute__((always_inline)) LA_AVX512 void
stream_block(const int GW, const int GX, const int DT, const void *const *wr,
             const float *const *xr, int64_t in, __m512 *acc)
{
#pragma GCC unroll 16
    for (int l = 0; l < 16; l++)
        acc[l] = _mm512_setzero_ps();
    if (DT == LA_BF16_DOT) {
        if (GX == 1)
            dot_block_16x1(wr, xr, in, acc);
        else
            dot_block_8x2(wr, xr, in, acc);
        return;
    }
    if (DT == LA_BF16) {
        stream_block_bf16(GW, GX, wr, xr, in, acc);
        return;
    }
    const int64_t full = in & ~INT64_C(15);
    const __mmask16 tail = (__mmask16)((1u << (in - full)) - 1u);
    for (int64_t c = 0; c < full; c += 16) {
        __m512 xv[LA_STREAM_ROWS];
#pragma GCC unroll 16
        for (int i = 0; i < GX; i++)
            xv[i] = _mm512_loadu_ps(xr[i] + c);
#pragma GCC unroll 16
        for (int jw = 0; jw < GW; jw++) {
            const __m512 wv = load_w(DT, wr[jw], c, 0, 0);
#pragma GCC unroll 16
            for (int i = 0; i < GX; i++)
                acc[jw * GX + i] = _mm512_fmadd_ps(wv, xv[i], acc[jw * GX + i]);
        }
    }
    if (tail) {
        __m512 xv[LA_STREAM_ROWS];
#pragma GCC unroll 16
        for (int i = 0; i < GX; i++)
            xv[i] = _mm512_maskz_loadu_ps(tail, xr[i] + full);
#pragma GCC unroll 16
        for (int jw = 0; jw < GW; jw++) {
            const __m512 wv = load_w(DT, wr[jw], full, tail, 1);
#pragma GCC unroll 16
            for (int i = 0; i < GX; i++)
                acc[jw * GX + i] = _mm512_fmadd_ps(wv, xv[i], acc[jw * GX + i]);
        }
    }
}

/* One register-route product C (m, out) = alpha·X·Wᵀ + beta·C, m <= LA_STREAM_ROWS. */
typedef struct stream_job {
    int64_t m, out, in, ldx, ldc;
    float alpha, beta;
    const float *x;
    const void *w;
    la_dtype dtype;
    int bf16_dot; /* the CPU has AVX512_BF16 */
    float *c;
} stream_job;

/* Columns j_lo .. j_hi-1 of C: W is read from memory once (a group of GW rows stays in
 * L1/L2 while every group of GX rows of x passes over it). Missing rows of a partial
 * group repeat the last one, unstored. Every entry's sum is the same whatever the
 * column range, so any split of the columns gives bitwise the same C. */
static inline __attribute__((always_inline)) LA_AVX512 void
stream_cols(const int GW, const int GX, const int DT, const stream_job *j, int64_t j_lo,
            int64_t j_hi)
{
    const int64_t m = j->m, in = j->in, esize = DT == LA_F32 ? 4 : 2;
    for (int64_t j0 = j_lo; j0 < j_hi; j0 += GW) {
        const void *wr[16];
        for (int jw = 0; jw < GW; jw++)
            wr[jw] = (const unsigned char *)j->w +
                     (j0 + jw < j_hi ? j0 + jw : j_hi - 1) * in * esize;
        for (int64_t i0 = 0; i0 < m; i0 += GX) {
            const float *xr[LA_STREAM_ROWS];
            for (int i = 0; i < GX; i++)
                xr[i] = j->x + (i0 + i < m ? i0 + i : m - 1) * j->ldx;
            __m512 acc[16];
            stream_block(GW, GX, DT, wr, xr, in, acc);
            float sums[16];
            _mm512_storeu_ps(sums, la_hsum16(acc));
            for (int jw = 0; jw < GW && j0 + jw < j_hi; jw++)
                for (int i = 0; i < GX && i0 + i < m; i++) {
                    float *cp = j->c + (i0 + i) * j->ldc + j0 + jw;
                    const float v = j->alpha * sums[jw * GX + i];
                    *cp = j->beta == 0.0f ? v : v + j->beta * *cp;
                }
        }
    }
}

/* Parts for a register-route product on up to nthreads threads: one per 256 KiB of W
 * (below that, waking a thread costs about what it saves), at most one per 16-column
 * block. row_bytes: bytes of one row of W. */
static int stream_parts(int64_t out, int64_t row_bytes, int nthreads)
{
    int64_t parts = 1 + out * row_bytes / LA_STREAM_PART_BYTES;
    const int64_t blocks = (out + 15) / 16;
    parts = parts < blocks ? parts : blocks;
    return (int)(parts < nthreads ? parts : nthreads);
}

/* The register block by the row count (every accumulator busy), then the dtype. */
#define STREAM_SHAPES(DT)                                                                  \
    do {                                                                                   \
        if (j->m == 1)                                                                     \
            stream_cols(16, 1, DT, j, lo, hi);                                             \
        else if (j->m == 2)                                                                \
            stream_cols(8, 2, DT, j, lo, hi);                                              \
        else                                                                               \
            stream_cols(4, 4, DT, j, lo, hi);                                              \
    } while (0)

/* pool_fn shape: part `part` of `parts` takes a contiguous range of 16-column blocks. */
static LA_AVX512 void stream_part(void *job, int part, int parts)
{
    const stream_job *j = job;
    const int64_t blocks = (j->out + 15) / 16;
    const int64_t lo = blocks * part / parts * 16;
    int64_t hi = blocks * (part + 1) / parts * 16;
    hi = hi < j->out ? hi : j->out;
    if (lo >= hi)
        return;
    if (j->dtype == LA_BF16 && j->m <= 2 && j->bf16_dot) {
        if (j->m == 1)
            stream_cols(16, 1, LA_BF16_DOT, j, lo, hi);
        else
            stream_cols(8, 2, LA_BF16_DOT, j, lo, hi);
    } else if (j->dtype == LA_BF16)
        STREAM_SHAPES(LA_BF16);
    else if (j->dtype == LA_F16)
        STREAM_SHAPES(LA_F16);
    else
        STREAM_SHAPES(LA_F32);
}
#endif

void la_gemm_w(const la_ctx *ctx, int nthreads, la_trans tw, int64_t m, int64_t out,
               int64_t in, float alpha, const float *x, int64_t ldx, la_wmat w, float beta,
               float *c, int64_t ldc, float *panel)
{
    if (m <= 0 || out <= 0 || in <= 0) { /* nothing to read: la_gemm's empty cases */
        la_gemm(ctx, nthreads, LA_N, LA_N, m, tw == LA_T ? out : in, 0, alpha, x, ldx, NULL,
                1, beta, c, ldc);
        return;
    }
#ifdef LA_HAVE_AVX512_KERNELS
    if (streams(ctx, tw, m)) {
        stream_job job = {.m = m, .out = out, .in = in, .ldx = ldx, .ldc = ldc,
                          .alpha = alpha, .beta = beta, .x = x, .w = w.data,
                          .dtype = w.dtype,
                          .bf16_dot = w.dtype == LA_BF16 && __builtin_cpu_supports("avx512bf16"),
                          .c = c};
        /* Parts over the columns of C: any split gives the same C (stream_cols). */
        pool_run(ctx->pool, stream_parts(out, in * (int64_t)la_dtype_size(w.dtype), nthreads),
                 stream_part, &job);
        return;
    }
#endif
    const float *wf = la_wmat_f32(w);
    if (wf) {
        if (tw == LA_T)
            la_gemm(ctx, nthreads, LA_N, LA_T, m, out, in, alpha, x, ldx, wf, in, beta, c, ldc);
        else
            la_gemm(ctx, nthreads, LA_N, LA_N, m, in, out, alpha, x, ldx, wf, in, beta, c, ldc);
        return;
    }
    const int64_t rows = panel_rows(out, in);
    for (int64_t j0 = 0; j0 < out; j0 += rows) {
        const int64_t n = out - j0 < rows ? out - j0 : rows;
        la_wmat_rows(w, in, j0, n, panel);
        if (tw == LA_T) /* columns j0.. of C */
            la_gemm(ctx, nthreads, LA_N, LA_T, m, n, in, alpha, x, ldx, panel, in, beta,
                    c + j0, ldc);
        else /* W's rows j0.. are a slice of the sum over out */
            la_gemm(ctx, nthreads, LA_N, LA_N, m, in, n, alpha, x + j0, ldx, panel, in,
                    j0 == 0 ? beta : 1.0f, c, ldc);
    }
}
