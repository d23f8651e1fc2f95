/* Exact softmax attention (MATH §2), blocked over query rows: each block of ATTN_BQ
 * queries forms its scores against the visible keys with one BLIS product, so the
 * working memory is O(ATTN_BQ·len_kv) per worker, never O(len_q·len_kv). The forward
 * keeps one log-sum-exp per row; the backward recomputes the probabilities from it. */
#include <math.h>
#include <string.h>

#include "backend.h"

#ifdef _OPENMP
#include <omp.h>
#define WORKER_ID() ((size_t)omp_get_thread_num())
#else
#define WORKER_ID() ((size_t)0)
#endif

#define ATTN_BQ 64

/* Work is split over (batch, kv head) tasks: all query heads of one kv group write
 * the same dK, dV rows, so one task owns them and no reduction is needed. */
static int64_t task_count(const attn_problem *p) { return p->batch * p->n_kv_heads; }

static int worker_count(const attn_problem *p)
{
    int64_t t = task_count(p);
    return (int)(t < p->threads ? t : p->threads);
}

static size_t exact_workspace_size(const attn_problem *p)
{
    /* Two (ATTN_BQ × len_kv) blocks per worker: probabilities and their gradient. */
    return (size_t)worker_count(p) * 2u * ATTN_BQ * (size_t)p->len_kv * sizeof(float);
}

typedef struct head_view {
    const float *q, *k, *v, *o, *do_;
    float *out, *dq, *dk, *dv;
    float *lse;
    const float *lse_in;
} head_view;

/* Scores of query rows [i0, i0+bq) against keys [0, nk), scaled, into s (bq × nk). */
static void block_scores(const attn_problem *p, int bt, const float *q, const float *k,
                         int64_t i0, int64_t bq, int64_t nk, float *s)
{
    la_gemm(p->la, bt, LA_N, LA_T, bq, nk, p->head_dim, p->softmax_scale, q + i0 * p->ldq,
            p->ldq, k, p->ldkv, 0.0f, s, nk);
}

static void exact_forward_task(const attn_problem *p, int64_t task, int bt, float *s,
                               const float *q, const float *k, const float *v, float *o,
                               float *row_stat)
{
    const int64_t b = task / p->n_kv_heads, kvh = task % p->n_kv_heads;
    const int64_t group = p->n_heads / p->n_kv_heads, d = p->head_dim;
    const float *kh = k + b * p->len_kv * p->ldkv + kvh * d;
    const float *vh = v + b * p->len_kv * p->ldkv + kvh * d;
    for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
        const float *qh = q + b * p->len_q * p->ldq + h * d;
        float *oh = o + b * p->len_q * p->ldo + h * d;
        float *lse = row_stat + (b * p->n_heads + h) * p->len_q;
        for (int64_t i0 = 0; i0 < p->len_q; i0 += ATTN_BQ) {
            const int64_t bq = p->len_q - i0 < ATTN_BQ ? p->len_q - i0 : ATTN_BQ;
            const int64_t nk = attn_visible_keys(p, i0 + bq - 1);
            block_scores(p, bt, qh, kh, i0, bq, nk, s);
            for (int64_t r = 0; r < bq; r++) {
                float *row = s + r * nk;
                const int64_t vis = attn_visible_keys(p, i0 + r);
                float mx = row[0];
                for (int64_t j = 1; j < vis; j++)
                    mx = row[j] > mx ? row[j] : mx;
                float sum = 0.0f;
                for (int64_t j = 0; j < vis; j++) {
                    row[j] = expf(row[j] - mx);
                    sum += row[j];
                }
                const float inv = 1.0f / sum;
                for (int64_t j = 0; j < vis; j++)
                    row[j] *= inv;
                for (int64_t j = vis; j < nk; j++)
                    row[j] = 0.0f;
                lse[i0 + r] = mx + logf(sum);
            }
            la_gemm(p->la, bt, LA_N, LA_N, bq, d, nk, 1.0f, s, nk, vh, p->ldkv, 0.0f,
                    oh + i0 * p->ldo, p->ldo);
        }
    }
}

static void exact_backward_task(const attn_problem *p, int64_t task, int bt, float *s,
                                float *ds, const float *q, const float *k, const float *v,
                                const float *o, const float *row_stat, const float *do_,
                                float *dq, float *dk, float *dv)
{
    const int64_t b = task / p->n_kv_heads, kvh = task % p->n_kv_heads;
    const int64_t group = p->n_heads / p->n_kv_heads, d = p->head_dim;
    const float *kh = k + b * p->len_kv * p->ldkv + kvh * d;
    const float *vh = v + b * p->len_kv * p->ldkv + kvh * d;
    float *dkh = dk + b * p->len_kv * p->ldkv + kvh * d;
    float *dvh = dv + b * p->len_kv * p->ldkv + kvh * d;
    for (int64_t j = 0; j < p->len_kv; j++) {
        memset(dkh + j * p->ldkv, 0, (size_t)d * sizeof(float));
        memset(dvh + j * p->ldkv, 0, (size_t)d * sizeof(float));
    }
    for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
        const float *qh = q + b * p->len_q * p->ldq + h * d;
        const float *oh = o + b * p->len_q * p->ldo + h * d;
        const float *doh = do_ + b * p->len_q * p->ldo + h * d;
        float *dqh = dq + b * p->len_q * p->ldq + h * d;
        const float *lse = row_stat + (b * p->n_heads + h) * p->len_q;
        for (int64_t i0 = 0; i0 < p->len_q; i0 += ATTN_BQ) {
            const int64_t bq = p->len_q - i0 < ATTN_BQ ? p->len_q - i0 : ATTN_BQ;
            const int64_t nk = attn_visible_keys(p, i0 + bq - 1);
            block_scores(p, bt, qh, kh, i0, bq, nk, s);
            /* dP = dO·Vᵀ */
            la_gemm(p->la, bt, LA_N, LA_T, bq, nk, d, 1.0f, doh + i0 * p->ldo, p->ldo, vh,
                    p->ldkv, 0.0f, ds, nk);
            for (int64_t r = 0; r < bq; r++) {
                float *prow = s + r * nk, *dsrow = ds + r * nk;
                const int64_t i = i0 + r, vis = attn_visible_keys(p, i);
                const float *o_i = oh + i * p->ldo, *do_i = doh + i * p->ldo;
                float rho = 0.0f; /* ρ_i = ⟨dO_i, O_i⟩ = Σ_j P_ij·dP_ij */
                for (int64_t c = 0; c < d; c++)
                    rho += do_i[c] * o_i[c];
                const float l = lse[i];
                for (int64_t j = 0; j < vis; j++) {
                    prow[j] = expf(prow[j] - l);
                    dsrow[j] = prow[j] * (dsrow[j] - rho);
                }
                for (int64_t j = vis; j < nk; j++) {
                    prow[j] = 0.0f;
                    dsrow[j] = 0.0f;
                }
            }
            /* dQ = β·dS·K, dK += β·dSᵀ·Q, dV += Pᵀ·dO */
            la_gemm(p->la, bt, LA_N, LA_N, bq, d, nk, p->softmax_scale, ds, nk, kh, p->ldkv,
                    0.0f, dqh + i0 * p->ldq, p->ldq);
            la_gemm(p->la, bt, LA_T, LA_N, nk, d, bq, p->softmax_scale, ds, nk,
                    qh + i0 * p->ldq, p->ldq, 1.0f, dkh, p->ldkv);
            la_gemm(p->la, bt, LA_T, LA_N, nk, d, bq, 1.0f, s, nk, doh + i0 * p->ldo,
                    p->ldo, 1.0f, dvh, p->ldkv);
        }
    }
}

/* With fewer tasks than threads, tasks run one after another and BLIS gets the
 * threads; otherwise each worker runs whole tasks with single-threaded products.
 * Either way a task's arithmetic does not depend on scheduling, so results are
 * bitwise reproducible for a given thread count. */
static void exact_forward(const attn_problem *p, const float *q, const float *k,
                          const float *v, float *o, float *row_stat, void *ws)
{
    const int64_t tasks = task_count(p);
    const int workers = worker_count(p);
    const size_t block = 2u * ATTN_BQ * (size_t)p->len_kv;
    if (workers <= 1 || tasks < p->threads) {
        for (int64_t t = 0; t < tasks; t++)
            exact_forward_task(p, t, p->threads, (float *)ws, q, k, v, o, row_stat);
        return;
    }
#pragma omp parallel num_threads(workers)
    {
        float *s = (float *)ws + WORKER_ID() * block;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++)
            exact_forward_task(p, t, 1, s, q, k, v, o, row_stat);
    }
}

static void exact_backward(const attn_problem *p, const float *q, const float *k,
                           const float *v, const float *o, const float *row_stat,
                           const float *do_, float *dq, float *dk, float *dv, void *ws)
{
    const int64_t tasks = task_count(p);
    const int workers = worker_count(p);
    const size_t half = ATTN_BQ * (size_t)p->len_kv;
    if (workers <= 1 || tasks < p->threads) {
        float *s = (float *)ws;
        for (int64_t t = 0; t < tasks; t++)
            exact_backward_task(p, t, p->threads, s, s + half, q, k, v, o, row_stat, do_,
                                dq, dk, dv);
        return;
    }
#pragma omp parallel num_threads(workers)
    {
        float *s = (float *)ws + WORKER_ID() * 2u * half;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++)
            exact_backward_task(p, t, 1, s, s + half, q, k, v, o, row_stat, do_, dq, dk,
                                dv);
    }
}

const attn_backend attn_backend_exact = {
    .name = "exact",
    .id = 1, /* LORA_BACKEND_EXACT */
    .workspace_size = exact_workspace_size,
    .forward = exact_forward,
    .backward = exact_backward,
};
