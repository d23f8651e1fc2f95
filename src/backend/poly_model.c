#include "poly_model.h"

#include <math.h>
#include <string.h>

double poly_taylor_delta(int g, double r)
{
    /* R^(g+1)/(g+1)! as a running product: no overflow for the degrees allowed. */
    double t = 1.0;
    for (int i = 1; i <= g + 1; i++)
        t *= r / (double)i;
    return exp(r) * t;
}

double poly_eta(int g, double r)
{
    const double d = poly_taylor_delta(g, r);
    return d < 1.0 ? 2.0 * d / (1.0 - d) : INFINITY;
}

int poly_degree_for(double r, double tol, int64_t d)
{
    for (int g = 2; g <= POLY_MAX_DEGREE && poly_rank(g, d) > 0; g += 2)
        if (poly_taylor_delta(g, r) * (2.0 + tol) <= tol)
            return g;
    return 0;
}

int64_t poly_rank(int g, int64_t d)
{
    /* binom(g + d, g) = Π_{i=1..g} (d + i)/i, exact in integers at every step. */
    if (d > POLY_MAX_RANK)
        return -1;
    int64_t k = 1; /* k <= 2^22 and d + i < 2^23 before each step: no overflow */
    for (int64_t i = 1; i <= g; i++) {
        k = k * (d + i) / i;
        if (k > POLY_MAX_RANK)
            return -1;
    }
    return k * (d + 1) * (d + 1) > POLY_MAX_STATE ? -1 : k;
}

LA_VECTOR_CLONES double poly_score_bound(const attn_problem *p, const float *q,
                                         const float *k, double *mean, double *group_r)
{
    const int64_t d = p->head_dim, group = p->n_heads / p->n_kv_heads;
    double r = 0.0;
    for (int64_t g = 0; g < p->n_kv_heads; g++)
        group_r[g] = 0.0;
    for (int64_t b = 0; b < p->batch; b++)
        for (int64_t g = 0; g < p->n_kv_heads; g++) {
            const float *kh = k + b * p->len_kv * p->ldkv + g * d;
            memset(mean, 0, (size_t)d * sizeof *mean);
            for (int64_t j = 0; j < p->len_kv; j++)
                for (int64_t c = 0; c < d; c++)
                    mean[c] += kh[j * p->ldkv + c];
            for (int64_t c = 0; c < d; c++)
                mean[c] /= (double)p->len_kv;
            double kmax = 0.0;
            for (int64_t j = 0; j < p->len_kv; j++) {
                double s = 0.0;
#pragma omp simd reduction(+ : s)
                for (int64_t c = 0; c < d; c++) {
                    const double x = kh[j * p->ldkv + c] - mean[c];
                    s += x * x;
                }
                kmax = s > kmax ? s : kmax;
            }
            for (int64_t h = g * group; h < (g + 1) * group; h++) {
                const float *qh = q + b * p->len_q * p->ldq + h * d;
                double qmax = 0.0;
                for (int64_t i = 0; i < p->len_q; i++) {
                    double s = 0.0;
#pragma omp simd reduction(+ : s)
                    for (int64_t c = 0; c < d; c++)
                        s += (double)qh[i * p->ldq + c] * qh[i * p->ldq + c];
                    qmax = s > qmax ? s : qmax;
                }
                const double rh = fabs((double)p->softmax_scale) * sqrt(qmax * kmax);
                group_r[g] = rh > group_r[g] ? rh : group_r[g];
                r = rh > r ? rh : r;
            }
        }
    return r;
}

double attn_flops_exact(const attn_problem *p)
{
    /* 4·Lq·Lkv·d forward, 8·Lq·Lkv·d backward per head; causal halves it. */
    const double per_head = 12.0 * (double)p->len_q * (double)p->len_kv * (double)p->head_dim;
    return (double)p->batch * (double)p->n_heads * per_head * (p->causal ? 0.5 : 1.0);
}

double attn_flops_poly(const attn_problem *p, int g)
{
    const double d = (double)p->head_dim, k = (double)poly_rank(g, p->head_dim);
    const double lq = (double)p->len_q, lkv = (double)p->len_kv;
    /* Per query row: features, forward product, dQ contraction, suffix-state update.
     * Per key row: features, forward state, prefix state, dK/dV emission. Causal adds
     * one diagonal block of POLY_BLOCK rows per row. */
    double fwd = lq * 2.0 * k * (d + 1) + lkv * 2.0 * k * (d + 1);
    double bwd = (lq + lkv) * 2.0 * k * (d + 1) * d + (lq + lkv) * 2.0 * k * (d + 1) * (d + 1);
    double feat = 3.0 * (lq + lkv) * 3.0 * k;
    double diag = p->causal ? lq * 64.0 * (3.0 * 2.0 * k + 8.0 * d) : 0.0;
    return (double)p->batch * (double)p->n_heads * (fwd + bwd + feat + diag);
}
