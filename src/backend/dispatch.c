/* The dispatch: the score bound every plan starts from, AUTO's choice per kv-head
 * group among the backends of the table, and running a plan. A run is a maximal range
 * of consecutive groups with one backend and one set of parameters; it is an ordinary
 * attention problem over fewer heads (the strides stay those of the whole layer), so
 * each backend runs it unchanged. Row statistics are laid out run after run. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "backend.h"

LA_VECTOR_CLONES double attn_score_bound(const attn_problem *p, const float *q,
                                         const float *k, double *mean, double *group_r)
{
    const int64_t d = p->head_dim, group = p->n_heads / p->n_kv_heads;
    double r = 0.0;
    for (int64_t g = 0; g < p->n_kv_heads; g++)
        group_r[g] = 0.0;
    for (int64_t b = 0; b < p->batch; b++)
        for (int64_t g = 0; g < p->n_kv_heads; g++) {
            /* valid rows only (padding is never attended), all segments together: the
             * centring poly.c applies, valid for every visible pair */
            const int64_t nq = attn_q_len(p, b), nk = attn_kv_len(p, b);
            const float *kh = k + b * p->len_kv * p->ldkv + g * d;
            memset(mean, 0, (size_t)d * sizeof *mean);
            for (int64_t j = 0; j < nk; j++)
                for (int64_t c = 0; c < d; c++)
                    mean[c] += kh[j * p->ldkv + c];
            /* the mean the features subtract: rounded to float as in poly.c */
            for (int64_t c = 0; c < d; c++)
                mean[c] = (double)(float)(mean[c] / (double)(nk > 0 ? nk : 1));
            double kmax = 0.0;
            for (int64_t j = 0; j < nk; j++) {
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
                for (int64_t i = 0; i < nq; i++) {
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

int attn_segments_ascend(const attn_problem *p, int64_t *b, int64_t *row, int *keys)
{
    if (!p->mask || (!p->mask->q_seg && !p->mask->kv_seg))
        return 1;
    for (*b = 0; *b < p->batch; (*b)++) {
        for (*row = 1, *keys = 0; *row < attn_q_len(p, *b); (*row)++)
            if (attn_q_seg(p, *b, *row) < attn_q_seg(p, *b, *row - 1))
                return 0;
        for (*row = 1, *keys = 1; *row < attn_kv_len(p, *b); (*row)++)
            if (attn_kv_seg(p, *b, *row) < attn_kv_seg(p, *b, *row - 1))
                return 0;
    }
    return 1;
}

double attn_visible_pairs(const attn_problem *p)
{
    const double half = p->causal ? 0.5 : 1.0;
    int64_t bad_b, bad_row;
    int keys;
    if (!p->mask)
        return (double)p->batch * (double)p->len_q * (double)p->len_kv * half;
    const int runs = attn_segments_ascend(p, &bad_b, &bad_row, &keys);
    double pairs = 0.0;
    for (int64_t b = 0; b < p->batch; b++) {
        if (!runs) {
            pairs += (double)attn_q_len(p, b) * (double)attn_kv_len(p, b);
            continue;
        }
        attn_run run;
        for (int64_t i = 0, j = 0; attn_next_run(p, b, &i, &j, &run);)
            pairs += (double)run.nq * (double)run.nk;
    }
    return pairs * half;
}

/* ---- planning ---- */

/* Kv-head groups [g0, g1) of p as a problem of their own (strides unchanged). */
static attn_problem groups_of(const attn_problem *p, int64_t g0, int64_t g1)
{
    attn_problem s = *p;
    s.n_kv_heads = g1 - g0;
    s.n_heads = s.n_kv_heads * (p->n_heads / p->n_kv_heads);
    return s;
}

static attn_group_plan group_plan(const attn_backend *b, const attn_offer *offer)
{
    return (attn_group_plan){.backend = b, .params = offer->params, .eta = offer->eta,
                             .flops = offer->flops, .order = offer->order,
                             .features = offer->features};
}

void attn_dispatch_offer(const attn_problem *p, int id, double r, const attn_options *o,
                         attn_offer *offer)
{
    const attn_backend *b = attn_backend_of(id);
    memset(offer, 0, sizeof *offer);
    if (b)
        b->plan(p, r, o, offer, NULL, 0);
    else
        offer->status = LORA_ERR_UNSUPPORTED;
}

/* AUTO for one group: every backend's offer, the cheapest whose certified error meets
 * the tolerance; on equal cost the earlier in the table. Exact always qualifies. */
static attn_group_plan auto_plan(const attn_problem *group, double r, const attn_options *o)
{
    attn_group_plan best = {0};
    double best_cost = INFINITY;
    for (const attn_backend *const *b = attn_backends; *b; b++) {
        attn_offer offer;
        memset(&offer, 0, sizeof offer);
        (*b)->plan(group, r, o, &offer, NULL, 0);
        if (offer.status == LORA_OK && offer.eta <= o->tolerance &&
            (!best.backend || offer.cost < best_cost)) {
            best = group_plan(*b, &offer);
            best_cost = offer.cost;
        }
    }
    return best;
}

int attn_dispatch_plan(const attn_problem *p, const double *group_r, const attn_options *o,
                       attn_group_plan *groups, char *err, size_t err_size)
{
    const attn_backend *forced = NULL;
    if (o->backend != LORA_BACKEND_AUTO) {
        forced = attn_backend_of(o->backend);
        if (!forced) {
            snprintf(err, err_size, "no backend has id %d", o->backend);
            return LORA_ERR_UNSUPPORTED;
        }
        /* The whole layer at its largest bound: a forced backend that cannot run it
         * says why once, for the layer. */
        double r = 0.0;
        for (int64_t g = 0; g < p->n_kv_heads; g++)
            r = fmax(r, group_r[g]);
        attn_offer offer;
        memset(&offer, 0, sizeof offer);
        forced->plan(p, r, o, &offer, err, err_size);
        if (offer.status != LORA_OK)
            return offer.status;
    }
    for (int64_t g = 0; g < p->n_kv_heads; g++) {
        const attn_problem one = groups_of(p, g, g + 1);
        if (!forced) {
            groups[g] = auto_plan(&one, group_r[g], o);
            if (!groups[g].backend) { /* unreachable while exact is in the table */
                snprintf(err, err_size, "no backend can run kv-head group %lld",
                         (long long)g);
                return LORA_ERR_UNSUPPORTED;
            }
            continue;
        }
        attn_offer offer;
        memset(&offer, 0, sizeof offer);
        forced->plan(&one, group_r[g], o, &offer, err, err_size);
        if (offer.status != LORA_OK)
            return offer.status;
        groups[g] = group_plan(forced, &offer);
    }
    return LORA_OK;
}

/* ---- running a plan ---- */

static int same_run(const attn_group_plan *a, const attn_group_plan *b)
{
    return a->backend == b->backend && memcmp(&a->params, &b->params, sizeof a->params) == 0;
}

/* The run starting at kv group g0: its sub-problem, and the group after it. */
static attn_problem run_at(const attn_problem *p, const attn_group_plan *groups, int64_t g0,
                           int64_t *g1)
{
    int64_t end = g0 + 1;
    while (end < p->n_kv_heads && same_run(&groups[end], &groups[g0]))
        end++;
    *g1 = end;
    attn_problem s = groups_of(p, g0, end);
    s.params = groups[g0].params;
    return s;
}

/* Offsets of a run's data: query-shaped (q, o, dq, do) and key-shaped (k, v, dk, dv)
 * columns, and its row statistics. */
typedef struct run_offsets {
    size_t q, kv, stat;
} run_offsets;

static run_offsets offsets_of(const attn_problem *p, int64_t g0)
{
    const int64_t heads_before = g0 * (p->n_heads / p->n_kv_heads);
    return (run_offsets){
        .q = (size_t)(heads_before * p->head_dim),
        .kv = (size_t)(g0 * p->head_dim),
        .stat = (size_t)(p->batch * p->len_q * heads_before),
    };
}

size_t attn_dispatch_workspace(const attn_problem *p, const attn_group_plan *groups)
{
    size_t most = 0;
    for (int64_t g0 = 0, g1; g0 < p->n_kv_heads; g0 = g1) {
        const attn_problem s = run_at(p, groups, g0, &g1);
        const size_t n = groups[g0].backend->workspace_size(&s);
        most = n > most ? n : most;
    }
    return most;
}

void attn_dispatch_forward(const attn_problem *p, const attn_group_plan *groups,
                           const float *q, const float *k, const float *v, float *o,
                           float *row_stat, void *ws)
{
    for (int64_t g0 = 0, g1; g0 < p->n_kv_heads; g0 = g1) {
        const attn_problem s = run_at(p, groups, g0, &g1);
        const run_offsets at = offsets_of(p, g0);
        groups[g0].backend->forward(&s, q + at.q, k + at.kv, v + at.kv, o + at.q,
                                    row_stat + at.stat, ws);
    }
}

void attn_dispatch_backward(const attn_problem *p, const attn_group_plan *groups,
                            const float *q, const float *k, const float *v, const float *o,
                            const float *row_stat, const float *do_, float *dq, float *dk,
                            float *dv, void *ws)
{
    for (int64_t g0 = 0, g1; g0 < p->n_kv_heads; g0 = g1) {
        const attn_problem s = run_at(p, groups, g0, &g1);
        const run_offsets at = offsets_of(p, g0);
        groups[g0].backend->backward(&s, q + at.q, k + at.kv, v + at.kv, o + at.q,
                                     row_stat + at.stat, do_ + at.q, dq + at.q, dk + at.kv,
                                     dv + at.kv, ws);
    }
}

double attn_dispatch_measure(const attn_problem *p, const attn_group_plan *groups,
                             const float *q, const float *k, const float *v,
                             const float *o, const float *do_, const float *dq,
                             float *scratch)
{
    double worst = -1.0;
    if (p->measure_rows <= 0)
        return worst;
    for (int64_t g0 = 0, g1; g0 < p->n_kv_heads; g0 = g1) {
        const attn_problem s = run_at(p, groups, g0, &g1);
        if (!groups[g0].backend->approximate)
            continue; /* exact groups have no error to measure */
        const run_offsets at = offsets_of(p, g0);
        double e;
        attn_measure(&s, q + at.q, k + at.kv, v + at.kv, o + at.q, do_ ? do_ + at.q : NULL,
                     dq ? dq + at.q : NULL, scratch, do_ ? NULL : &e, do_ ? &e : NULL);
        worst = e > worst ? e : worst;
    }
    return worst;
}
