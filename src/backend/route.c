/* One call's attention split over backends by kv-head group: AUTO runs POLY on the
 * groups whose own score bound certifies the tolerance cheaply and EXACT on the rest.
 * A run is a maximal range of consecutive groups with one degree; it is an ordinary
 * attention problem over fewer heads (the strides stay those of the whole layer), so
 * each backend runs it unchanged. Row statistics are laid out run after run. */
#include "backend.h"

static const attn_backend *backend_of(int degree)
{
    return degree > 0 ? &attn_backend_poly : &attn_backend_exact;
}

/* The run starting at kv group g0: its sub-problem, and the group after it. */
static attn_problem run_at(const attn_problem *p, const int *degree, int64_t g0, int64_t *g1)
{
    int64_t end = g0 + 1;
    while (end < p->n_kv_heads && degree[end] == degree[g0])
        end++;
    *g1 = end;
    attn_problem s = *p;
    s.n_kv_heads = end - g0;
    s.n_heads = s.n_kv_heads * (p->n_heads / p->n_kv_heads);
    s.poly_degree = degree[g0];
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

size_t attn_route_workspace(const attn_problem *p, const int *degree)
{
    size_t most = 0;
    for (int64_t g0 = 0, g1; g0 < p->n_kv_heads; g0 = g1) {
        const attn_problem s = run_at(p, degree, g0, &g1);
        const size_t n = backend_of(s.poly_degree)->workspace_size(&s);
        most = n > most ? n : most;
    }
    return most;
}

void attn_route_forward(const attn_problem *p, const int *degree, const float *q,
                        const float *k, const float *v, float *o, float *row_stat, void *ws)
{
    for (int64_t g0 = 0, g1; g0 < p->n_kv_heads; g0 = g1) {
        const attn_problem s = run_at(p, degree, g0, &g1);
        const run_offsets at = offsets_of(p, g0);
        backend_of(s.poly_degree)
            ->forward(&s, q + at.q, k + at.kv, v + at.kv, o + at.q, row_stat + at.stat, ws);
    }
}

void attn_route_backward(const attn_problem *p, const int *degree, const float *q,
                         const float *k, const float *v, const float *o,
                         const float *row_stat, const float *do_, float *dq, float *dk,
                         float *dv, void *ws)
{
    for (int64_t g0 = 0, g1; g0 < p->n_kv_heads; g0 = g1) {
        const attn_problem s = run_at(p, degree, g0, &g1);
        const run_offsets at = offsets_of(p, g0);
        backend_of(s.poly_degree)
            ->backward(&s, q + at.q, k + at.kv, v + at.kv, o + at.q, row_stat + at.stat,
                       do_ + at.q, dq + at.q, dk + at.kv, dv + at.kv, ws);
    }
}

double attn_route_measure(const attn_problem *p, const int *degree, const float *q,
                          const float *k, const float *v, const float *o, const float *do_,
                          const float *dq, float *scratch)
{
    double worst = -1.0;
    if (p->measure_rows <= 0)
        return worst;
    for (int64_t g0 = 0, g1; g0 < p->n_kv_heads; g0 = g1) {
        const attn_problem s = run_at(p, degree, g0, &g1);
        if (s.poly_degree == 0)
            continue; /* exact groups have no error to measure */
        const run_offsets at = offsets_of(p, g0);
        double e;
        attn_measure(&s, q + at.q, k + at.kv, v + at.kv, o + at.q, do_ ? do_ + at.q : NULL,
                     dq ? dq + at.q : NULL, scratch, do_ ? NULL : &e, do_ ? &e : NULL);
        worst = e > worst ? e : worst;
    }
    return worst;
}
