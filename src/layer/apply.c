/* Tasks of the multi-tenant LoRA delta (apply.h). Per task, the tenant's rows of x
 * gathered into a panel X_t, T = X_t·A_tᵀ through la_gemm_w (its register kernel reads
 * A once when the rows are few), then Y_t += s·T·B_tᵀ on one of two routes chosen by
 * the task's row count only:
 * - a few rows (decode: a handful of tokens per tenant) on AVX-512: a register kernel
 *   adding into y's rows in place, reading B once;
 * - otherwise: a BLIS product into a panel whose rows are added back into y. */
#include "apply.h"

#include <string.h>

#include "../linalg/avx512_kernels.h"
#include "../linalg/typed.h"

/* Tasks of at most this many rows take the register kernels (with AVX-512). */
#define APPLY_SMALL_ROWS 16
/* Floats streamed per part below which one more part does not pay (64 KiB). */
#define APPLY_PART_MIN_FLOATS 16384
/* Scratch floats a task's panels aim at (4 MiB): bounds block_rows. */
#define APPLY_PANEL_FLOATS (INT64_C(1) << 20)

static size_t pad16(size_t n) { return (n + 15) & ~(size_t)15; }

int64_t apply_block_rows(int64_t in, int64_t out, int64_t max_rank)
{
    int64_t rows = APPLY_PANEL_FLOATS / (in + out + max_rank);
    rows = rows < 16 ? 16 : rows > 256 ? 256 : rows;
    return rows & ~INT64_C(15);
}

size_t apply_part_floats(int64_t rows, int64_t in, int64_t out, int64_t max_rank)
{
    int64_t a, b, c;
    if (__builtin_mul_overflow(rows, in, &a) || __builtin_mul_overflow(rows, out, &b) ||
        __builtin_mul_overflow(rows, max_rank, &c) || a > INT64_MAX / 4 || b > INT64_MAX / 4 ||
        c > INT64_MAX / 4)
        return 0;
    return pad16((size_t)a) + pad16((size_t)b) + pad16((size_t)c);
}

#ifdef LA_HAVE_AVX512_KERNELS
/* y_i[j] += s·(t_i·b_j) for nr rows: 16 outputs at a time, B's 16 rows (16·rank
 * contiguous floats) read once per output block and reused from L1 for every row. */
LA_AVX512 static void small_yb(const float *t, int nr, const float *b, int64_t rank,
                               int64_t out, float s, float *const *yr)
{
    const int64_t kfull = rank & ~INT64_C(15);
    const __mmask16 ktail = (__mmask16)((1u << (rank - kfull)) - 1u);
    const __m512 sv = _mm512_set1_ps(s);
    for (int64_t j0 = 0; j0 < out; j0 += 16) {
        const int64_t nl = out - j0 < 16 ? out - j0 : 16;
        const float *bl[16];
#pragma GCC unroll 16
        for (int l = 0; l < 16; l++) /* absent outputs repeat the last row, masked below */
            bl[l] = b + (j0 + (l < nl ? l : nl - 1)) * rank;
        for (int i = 0; i < nr; i++) {
            const float *ti = t + i * rank;
            __m512 v[16];
#pragma GCC unroll 16
            for (int l = 0; l < 16; l++)
                v[l] = _mm512_setzero_ps();
            for (int64_t kc = 0; kc < kfull; kc += 16) {
                const __m512 tv = _mm512_loadu_ps(ti + kc);
#pragma GCC unroll 16
                for (int l = 0; l < 16; l++)
                    v[l] = _mm512_fmadd_ps(_mm512_loadu_ps(bl[l] + kc), tv, v[l]);
            }
            if (ktail) {
                const __m512 tv = _mm512_maskz_loadu_ps(ktail, ti + kfull);
#pragma GCC unroll 16
                for (int l = 0; l < 16; l++)
                    v[l] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(ktail, bl[l] + kfull), tv,
                                           v[l]);
            }
            const __mmask16 m = (__mmask16)((1u << nl) - 1u);
            float *yj = yr[i] + j0;
            const __m512 yv = _mm512_maskz_loadu_ps(m, yj);
            _mm512_mask_storeu_ps(yj, m, _mm512_fmadd_ps(sv, la_hsum16(v), yv));
        }
    }
}
#endif

/* One task: X_t (its rows of x gathered), T = X_t·A_tᵀ (la_gemm_w: A is read once),
 * then y += s·T·B_tᵀ in place for a few rows, else through a panel and BLIS. Scratch:
 * x panel (panel_rows, in), y panel (panel_rows, out), T (panel_rows, rank). */
static void run_task(const apply_job *j, const apply_task *tk, float *ws)
{
    const apply_tenant *tn = &j->tenants[tk->tenant];
    const int64_t in = j->in, out = j->out, n = tk->rows, r = tn->rank;
    const int64_t *rows = j->order + tk->start;
    float *xp = ws;
    float *yp = xp + pad16((size_t)(j->panel_rows * in));
    float *tp = yp + pad16((size_t)(j->panel_rows * out));
    for (int64_t i = 0; i < n; i++)
        memcpy(xp + i * in, j->x + rows[i] * in, (size_t)in * sizeof(float));
    la_gemm_w(j->la, 1, LA_T, n, r, in, 1.0f, xp, in, la_wmat_of_f32(tn->a), 0.0f, tp, r,
              NULL);
#ifdef LA_HAVE_AVX512_KERNELS
    if (j->la->avx512 && n <= APPLY_SMALL_ROWS) {
        float *yr[APPLY_SMALL_ROWS];
        for (int64_t i = 0; i < n; i++)
            yr[i] = j->y + rows[i] * out;
        small_yb(tp, (int)n, tn->b, r, out, tn->scale, yr);
        return;
    }
#endif
    la_gemm(j->la, 1, LA_N, LA_T, n, out, r, tn->scale, tp, r, tn->b, r, 0.0f, yp, out);
    for (int64_t i = 0; i < n; i++) {
        float *yr = j->y + rows[i] * out;
        const float *src = yp + i * out;
        for (int64_t c = 0; c < out; c++)
            yr[c] += src[c];
    }
}

int apply_parts(const apply_job *job, int threads)
{
    int64_t floats = 0; /* what the tasks stream: factors, then x and y rows */
    for (int64_t t = 0; t < job->n_tasks; t++) {
        const apply_task *tk = &job->tasks[t];
        floats += (job->tenants[tk->tenant].rank + tk->rows) * (job->in + job->out);
    }
    int64_t parts = 1 + floats / APPLY_PART_MIN_FLOATS;
    parts = parts < job->n_tasks ? parts : job->n_tasks;
    return (int)(parts < threads ? parts : threads);
}

void apply_part(void *job, int part, int parts)
{
    apply_job *j = job;
    (void)parts;
    float *ws = j->scratch + (size_t)part * j->part_floats;
    for (int64_t t; (t = pool_queue_take(&j->queue)) < j->n_tasks;)
        run_task(j, &j->tasks[t], ws);
}
