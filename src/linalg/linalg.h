/* Dense linear algebra for liblora. The only interface to BLIS: no other file
 * includes blis.h, so the BLIS build (static/shared, kernel context) is private here. */
#ifndef LORA_LINALG_H
#define LORA_LINALG_H

#include "../build_config.h"

#include <stddef.h>
#include <stdint.h>

#include "pool.h"

/* Chosen once per adapter: the BLIS kernel context, the thread count for products and
 * the adapter's worker pool. */
typedef struct la_ctx {
    void *cntx;      /* cntx_t*; NULL lets BLIS pick (shared-library builds) */
    int threads;     /* threads a product may use when the caller gives it all */
    pool *pool;      /* the adapter's workers (NULL: everything on the calling thread) */
    const char *arch; /* name of the kernel set in use, for diagnostics */
    int avx512;       /* the CPU runs AVX-512 F/DQ/BW/VL (avx512_kernels.h may be used) */
    int bf16;         /* LORA_COMPUTE_BF16: projections and exact attention tiles take bf16
                         operands (bf16.h); set by the adapter, 0 from la_ctx_init */
} la_ctx;

typedef enum la_trans { LA_N = 0, LA_T = 1 } la_trans;

/* Fills ctx: initialises BLIS (idempotent, thread-safe inside BLIS) and picks the
 * fastest kernel context this CPU runs; ctx->pool is NULL until the caller sets it.
 * Never fails. */
void la_ctx_init(la_ctx *ctx, int threads);

/* Row-major C (m×n) = alpha·op(A)·op(B) + beta·C with op(A) (m×k), op(B) (k×n);
 * lda, ldb, ldc are row strides of the matrices as stored. nthreads: most threads this
 * one call may use (1 inside an already parallel region); products under about 4 MFLOP
 * a thread use fewer. The result does not depend on nthreads. beta = 0 ignores C. */
void la_gemm(const la_ctx *ctx, int nthreads, la_trans ta, la_trans tb, int64_t m,
             int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
             const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

/* For loops over whole activations: clones for AVX-512 and AVX2 chosen at load time,
 * since the baseline x86-64 build would use 4-wide SSE. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LA_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LA_VECTOR_CLONES
#endif

/* max_i |x_i| (0 for n = 0). */
float la_max_abs(const float *x, size_t n);
/* Index of the first NaN or ±Inf in x[0..n), or -1. */
int64_t la_find_nonfinite(const float *x, size_t n);

#endif
