/* Frozen weights stored as float32, bfloat16 or IEEE half (servers keep checkpoints in
 * bf16): one matrix type and the few operations the layer needs on it. 16-bit values
 * are in host byte order. Products convert on the fly and accumulate in float32:
 * - x·Wᵀ with few rows (decode) on AVX-512, any dtype: a kernel reading W once,
 *   converting in registers;
 * - otherwise: BLIS, on W itself (float) or on W converted a row panel at a time into
 *   the caller's scratch.
 * bf16 → float is exact (a 16-bit shift), and so is half → float. */
#ifndef LORA_TYPED_H
#define LORA_TYPED_H

#include <stddef.h>
#include <stdint.h>

#include "linalg.h"

typedef enum la_dtype { LA_F32 = 0, LA_BF16 = 1, LA_F16 = 2 } la_dtype;

/* A row-major weight W (out, in) of one dtype; data NULL when unset. */
typedef struct la_wmat {
    const void *data;
    la_dtype dtype;
} la_wmat;

static inline la_wmat la_wmat_of_f32(const float *w)
{
    la_wmat m = {w, LA_F32};
    return m;
}

/* The float data of an LA_F32 matrix, else NULL. */
static inline const float *la_wmat_f32(la_wmat w)
{
    return w.dtype == LA_F32 ? (const float *)w.data : NULL;
}

/* Bytes of one element. */
size_t la_dtype_size(la_dtype dtype);

/* dst (n, cols) = rows r0 .. r0+n-1 of W (cols wide), as float. */
void la_wmat_rows(la_wmat w, int64_t cols, int64_t r0, int64_t n, float *dst);
/* Element i (row-major) as float; for the bounds' scalar loops, not for products. */
float la_wmat_at(la_wmat w, size_t i);
/* max |w_i| over the first n elements (0 for n = 0). */
float la_wmat_max_abs(la_wmat w, size_t n);
/* Index of the first NaN or ±Inf among the first n elements, or -1. */
int64_t la_wmat_find_nonfinite(la_wmat w, size_t n);

/* Floats of scratch la_gemm_w needs for this product (0 when it needs none: float
 * weights, or few rows on the register route). */
size_t la_gemm_w_scratch_floats(const la_ctx *ctx, la_trans tw, int64_t m, la_dtype dtype,
                                int64_t out, int64_t in);

/* Products with W (out, in), alpha·X·op(W) + beta·C, row strides ldx, ldc:
 *   tw = LA_T: X (m, in), C (m, out): the projection x·Wᵀ;
 *   tw = LA_N: X (m, out), C (m, in): the input gradient dY·W.
 * panel: la_gemm_w_scratch_floats floats (may be NULL when that is 0). X must be a
 * library buffer (BLIS may read a float past its end). The result does not depend on
 * nthreads. */
void la_gemm_w(const la_ctx *ctx, int nthreads, la_trans tw, int64_t m, int64_t out,
               int64_t in, float alpha, const float *x, int64_t ldx, la_wmat w, float beta,
               float *c, int64_t ldc, float *panel);

#endif
