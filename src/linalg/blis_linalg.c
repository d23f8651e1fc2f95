/* BLIS behind la_*. Every call goes through the expert (_ex) interface with a per-call
 * runtime carrying the caller's thread count, so BLIS's global thread setting is never
 * read or written. */
#include "linalg.h"

#include <blis.h>

void la_ctx_init(la_ctx *ctx, int threads)
{
    bli_init();
    ctx->cntx = NULL;
    ctx->threads = threads > 0 ? threads : 1;
    ctx->arch = "blis-default";
#if defined(LORA_BLIS_STATIC) && defined(__x86_64__)
    /* BLIS 0.9 classifies AVX-512 server CPUs of this family as haswell; its skx
     * kernels run sgemm about 1.8x faster on them. The lookup is only reachable when
     * libblis.a is linked in (libblis.so does not export it). */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
        cntx_t *skx = bli_gks_lookup_nat_cntx(BLIS_ARCH_SKX);
        if (skx != NULL) {
            ctx->cntx = skx;
            ctx->arch = "skx";
        }
    }
    if (ctx->cntx == NULL) {
        ctx->cntx = bli_gks_query_cntx();
        ctx->arch = bli_arch_string(bli_arch_query_id());
    }
#endif
}

void la_gemm(const la_ctx *ctx, int nthreads, la_trans ta, la_trans tb, int64_t m,
             int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
             const float *b, int64_t ldb, float beta, float *c, int64_t ldc)
{
    if (m <= 0 || n <= 0)
        return;
    if (k <= 0) { /* op(A)·op(B) is empty: C = beta·C */
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++)
                c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
        return;
    }
    rntm_t rntm;
    bli_rntm_init(&rntm);
    bli_rntm_set_num_threads(nthreads > 0 ? nthreads : 1, &rntm);
    float al = alpha, be = beta;
    /* Row-major storage: row stride ld, column stride 1. */
    bli_sgemm_ex(ta == LA_T ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE,
                 tb == LA_T ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, (dim_t)m, (dim_t)n,
                 (dim_t)k, &al, (float *)a, (inc_t)lda, 1, (float *)b, (inc_t)ldb, 1, &be,
                 c, (inc_t)ldc, 1, (cntx_t *)ctx->cntx, &rntm);
}
