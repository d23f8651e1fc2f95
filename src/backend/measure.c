/* Exact attention rows for a sample of queries, in double: the measured error of an
 * approximate backend at O(rows·L·d) per head (LORA_CFG_MEASURE_ROWS). */
#include <math.h>

#include "backend.h"

size_t attn_measure_scratch_floats(const attn_problem *p)
{
    return p->measure_rows > 0 ? 2u * ((size_t)p->len_kv + 2u * (size_t)p->head_dim) : 0;
}

/* Evenly spread sample: row s of m among n valid rows. */
static int64_t sample_row(int64_t n, int64_t s, int64_t m)
{
    return (int64_t)(((double)s + 0.5) * (double)n / (double)m);
}

/* prob (double, len_kv entries, 0 where masked) = softmax row i of batch element b;
 * o_row = Σ_j P_ij V_j (0 when the row sees no key). Returns the keys to sum over. */
static int64_t exact_row(const attn_problem *p, int64_t b, const float *qi, const float *kh,
                         const float *vh, int64_t i, double *prob, double *o_row)
{
    const int64_t d = p->head_dim, n = p->len_kv;
    double mx = -INFINITY, sum = 0.0;
    for (int64_t j = 0; j < n; j++) {
        prob[j] = -INFINITY;
        if (!attn_pair_visible(p, b, i, j))
            continue;
        double s = 0.0;
        for (int64_t c = 0; c < d; c++)
            s += (double)qi[c] * kh[j * p->ldkv + c];
        prob[j] = s * p->softmax_scale;
        mx = prob[j] > mx ? prob[j] : mx;
    }
    for (int64_t j = 0; j < n; j++) {
        prob[j] = prob[j] == -INFINITY ? 0.0 : exp(prob[j] - mx);
        sum += prob[j];
    }
    for (int64_t c = 0; c < d; c++)
        o_row[c] = 0.0;
    for (int64_t j = 0; j < n && sum > 0.0; j++) {
        prob[j] /= sum;
        for (int64_t c = 0; c < d; c++)
            o_row[c] += prob[j] * vh[j * p->ldkv + c];
    }
    return n;
}

void attn_measure(const attn_problem *p, const float *q, const float *k, const float *v,
                  const float *o, const float *do_, const float *dq, float *scratch,
                  double *out_err, double *dq_err)
{
    const int64_t d = p->head_dim, group = p->n_heads / p->n_kv_heads;
    double *prob = (double *)scratch, *o_row = prob + p->len_kv, *dq_row = o_row + d;
    double max_diff = 0.0, max_ref = 0.0;
    for (int64_t b = 0; b < p->batch; b++)
        for (int64_t h = 0; h < p->n_heads; h++) {
            const float *kh = k + b * p->len_kv * p->ldkv + (h / group) * d;
            const float *vh = v + b * p->len_kv * p->ldkv + (h / group) * d;
            const int64_t nq = attn_q_len(p, b);
            const int64_t m = p->measure_rows < nq ? p->measure_rows : nq;
            for (int64_t s = 0; s < m; s++) {
                const int64_t i = sample_row(nq, s, m);
                const int64_t row = b * p->len_q + i;
                const float *qi = q + row * p->ldq + h * d;
                const int64_t vis = exact_row(p, b, qi, kh, vh, i, prob, o_row);
                if (!do_) {
                    const float *oi = o + row * p->ldo + h * d;
                    for (int64_t c = 0; c < d; c++) {
                        max_diff = fmax(max_diff, fabs(oi[c] - o_row[c]));
                        max_ref = fmax(max_ref, fabs(o_row[c]));
                    }
                    continue;
                }
                /* dq_i = β·Σ_j P_ij·(dO_i·V_j − ρ_i)·K_j, ρ_i = ⟨dO_i, O_i⟩ */
                const float *gi = do_ + row * p->ldo + h * d, *dqi = dq + row * p->ldq + h * d;
                double rho = 0.0;
                for (int64_t c = 0; c < d; c++) {
                    rho += (double)gi[c] * o_row[c];
                    dq_row[c] = 0.0;
                }
                for (int64_t j = 0; j < vis; j++) {
                    double dp = 0.0;
                    for (int64_t c = 0; c < d; c++)
                        dp += (double)gi[c] * vh[j * p->ldkv + c];
                    const double ds = prob[j] * (dp - rho) * p->softmax_scale;
                    for (int64_t c = 0; c < d; c++)
                        dq_row[c] += ds * kh[j * p->ldkv + c];
                }
                for (int64_t c = 0; c < d; c++) {
                    max_diff = fmax(max_diff, fabs(dqi[c] - dq_row[c]));
                    max_ref = fmax(max_ref, fabs(dq_row[c]));
                }
            }
        }
    const double err = max_ref > 0.0 ? max_diff / max_ref : max_diff;
    if (do_)
        *dq_err = err;
    else
        *out_err = err;
}
