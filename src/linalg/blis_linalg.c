/* BLIS behind la_*. Every call goes through the expert (_ex) interface with a per-call
 * runtime (one thread; la_gemm splits larger products over the adapter's pool) and
 * the context chosen in la_ctx_init, so BLIS's global thread setting and its CPU
 * detection are never relied on. */
#include "linalg.h"
#include "gemm_split.h"

#include <blis.h>

#if defined(LORA_BLIS_LOOKUP_WEAK)
/* Defined when the final link has libblis.a; NULL with libblis.so (src/build_config.h). */
#pragma weak bli_gks_lookup_nat_cntx
#define BLIS_LOOKUP_LINKED (&bli_gks_lookup_nat_cntx != NULL)
#else
#define BLIS_LOOKUP_LINKED 1
#endif

void la_ctx_init(la_ctx *ctx, int threads)
{
    bli_init();
    ctx->cntx = NULL;
    ctx->pool = NULL;
    ctx->threads = threads > 0 ? threads : 1;
    ctx->arch = "blis-default";
    ctx->avx512 = 0;
    ctx->bf16 = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    ctx->avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#endif
#if (defined(LORA_BLIS_STATIC) || defined(LORA_BLIS_LOOKUP_WEAK)) && defined(__x86_64__)
    /* BLIS 0.9 classifies AVX-512 server CPUs of this family as haswell; its skx
     * kernels run sgemm about 1.8x faster on them. The lookup is only reachable when
     * libblis.a is linked in (libblis.so does not export it). */
    if (ctx->avx512 && BLIS_LOOKUP_LINKED) {
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

/* One single-threaded BLIS call. */
static void gemm_one(const la_ctx *ctx, la_trans ta, la_trans tb, int64_t m, int64_t n,
                     int64_t k, float alpha, const float *a, int64_t lda, const float *b,
                     int64_t ldb, float beta, float *c, int64_t ldc)
{
    rntm_t rntm;
    bli_rntm_init(&rntm);
    bli_rntm_set_num_threads(1, &rntm);
    float al = alpha, be = beta;
    /* Row-major storage: row stride ld, column stride 1. */
    bli_sgemm_ex(ta == LA_T ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE,
                 tb == LA_T ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, (dim_t)m, (dim_t)n,
                 (dim_t)k, &al, (float *)a, (inc_t)lda, 1, (float *)b, (inc_t)ldb, 1, &be,
                 c, (inc_t)ldc, 1, (cntx_t *)ctx->cntx, &rntm);
}

/* A product split into `step`-long ranges of its rows or columns (la_gemm). */
typedef struct gemm_split {
    const la_ctx *ctx;
    la_trans ta, tb;
    int64_t m, n, k;
    float alpha;
    const float *a;
    int64_t lda;
    const float *b;
    int64_t ldb;
    float beta;
    float *c;
    int64_t ldc;
    int split_rows;
    int64_t step, len;
} gemm_split;

/* Range t of the split: one single-threaded BLIS call. */
static void gemm_part(void *arg, int t, int parts)
{
    (void)parts;
    const gemm_split *g = arg;
    const int64_t lo = t * g->step, cnt = lo + g->step < g->len ? g->step : g->len - lo;
    if (g->split_rows) /* rows lo.. of op(A) and C */
        gemm_one(g->ctx, g->ta, g->tb, cnt, g->n, g->k, g->alpha,
                 g->ta == LA_T ? g->a + lo : g->a + lo * g->lda, g->lda, g->b, g->ldb,
                 g->beta, g->c + lo * g->ldc, g->ldc);
    else /* columns lo.. of op(B) and C */
        gemm_one(g->ctx, g->ta, g->tb, g->m, cnt, g->k, g->alpha, g->a, g->lda,
                 g->tb == LA_T ? g->b + lo * g->ldb : g->b + lo, g->ldb, g->beta, g->c + lo,
                 g->ldc);
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
    /* Threads split the rows or the columns of C (whichever is longer) into contiguous
     * ranges, one single-threaded BLIS call each. BLIS's own threading is not used: its
     * barriers spin without yielding, which stalls badly on a loaded machine, and small
     * products are not worth splitting at all. Every entry of C is computed by the same
     * kernel and summation order whatever the split. */
    const double flops = 2.0 * (double)m * (double)n * (double)k;
    int64_t nt = nthreads > 1 ? nthreads : 1;
    if ((double)nt * LA_MIN_FLOPS_PER_THREAD > flops)
        nt = (int64_t)(flops / LA_MIN_FLOPS_PER_THREAD);
    const int split_rows = m >= n;
    const int64_t len = split_rows ? m : n;
    const int64_t chunk =
        nt > 1 ? (len + nt - 1) / nt + LA_SPLIT_ALIGN - 1 : len;
    const int64_t step = nt > 1 ? chunk - chunk % LA_SPLIT_ALIGN : len;
    nt = (len + step - 1) / step;
    if (nt <= 1) {
        gemm_one(ctx, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    gemm_split job = {ctx, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
                      split_rows, step, len};
    pool_run(ctx->pool, (int)nt, gemm_part, &job);
}
