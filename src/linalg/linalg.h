/* Dense linear algebra for liblora. The only interface to BLIS: no other file
 * includes blis.h, so the BLIS build (static/shared, kernel context) is private here. */
#ifndef LORA_LINALG_H
#define LORA_LINALG_H

#include <stdint.h>

/* Chosen once per adapter: the BLIS kernel context and the thread count for products. */
typedef struct la_ctx {
    void *cntx;      /* cntx_t*; NULL lets BLIS pick (shared-library builds) */
    int threads;     /* threads a product may use when the caller gives it all */
    const char *arch; /* name of the kernel set in use, for diagnostics */
} la_ctx;

typedef enum la_trans { LA_N = 0, LA_T = 1 } la_trans;

/* Fills ctx: initialises BLIS (idempotent, thread-safe inside BLIS) and picks the
 * fastest kernel context this CPU runs. Never fails. */
void la_ctx_init(la_ctx *ctx, int threads);

/* Row-major C (m×n) = alpha·op(A)·op(B) + beta·C with op(A) (m×k), op(B) (k×n);
 * lda, ldb, ldc are row strides of the matrices as stored. nthreads: threads BLIS may
 * use for this one call (1 inside an already parallel region). beta = 0 ignores C. */
void la_gemm(const la_ctx *ctx, int nthreads, la_trans ta, la_trans tb, int64_t m,
             int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
             const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

#endif
