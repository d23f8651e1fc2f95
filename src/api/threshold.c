/* The threshold estimator and the per-call backend decision (MATH §3-5): the paper's
 * Γ statistics, the score bound R, the Taylor degree meeting the tolerance, and the
 * cost model that makes AUTO pick POLY only where it certifiably pays. */
#include <math.h>
#include <string.h>

#include "../backend/poly_model.h"
#include "internal.h"

/* The degree a group at score bound r uses: the explicit one, else the smallest that
 * meets the tolerance (0: none within limits). */
static int degree_at(const lora_adapter *ad, double r, int64_t head_dim)
{
    return ad->cfg.poly_degree > 0 ? (int)ad->cfg.poly_degree
                                   : poly_degree_for(r, ad->cfg.tolerance, head_dim);
}

/* Features of degree g at head_dim (0: none, or beyond the limits). */
static int64_t rank_at(int g, int64_t head_dim)
{
    const int64_t k = g > 0 ? poly_rank(g, head_dim) : 0;
    return k > 0 ? k : 0;
}

/* The plan for the score bounds in ad->group_r under the given backend setting: each
 * kv-head group runs POLY at its own degree, or EXACT. */
static int plan_for_bounds(lora_adapter *ad, const attn_problem *p, int64_t backend,
                           lora_plan *plan)
{
    memset(plan, 0, sizeof *plan);
    const int64_t d = p->head_dim, groups = p->n_kv_heads;
    const double tol = ad->cfg.tolerance;
    for (int64_t g = 0; g < groups; g++)
        plan->score_bound = fmax(plan->score_bound, ad->group_r[g]);
    /* The layer as a whole (at the largest R): the report, and forced POLY's errors;
     * degrees only grow with R, so every group has a degree when this one does. */
    plan->degree = degree_at(ad, plan->score_bound, d);
    plan->rank = rank_at(plan->degree, d);
    plan->eta = plan->degree > 0 ? poly_eta(plan->degree, plan->score_bound) : INFINITY;
    plan->flops_exact = attn_flops_exact(p);
    plan->flops_poly = plan->rank > 0 ? attn_flops_poly(p, plan->degree) : INFINITY;
    if (backend == LORA_BACKEND_POLY && plan->degree == 0)
        return lora_set_error(ad->err, LORA_ERR_TOLERANCE,
                              "no even degree within limits (k <= %lld features, state "
                              "<= %lld floats) certifies tolerance %g at score bound "
                              "R = %g; lower R, raise LORA_CFG_TOLERANCE or set "
                              "LORA_CFG_POLY_DEGREE",
                              (long long)POLY_MAX_RANK, (long long)POLY_MAX_STATE, tol,
                              plan->score_bound);
    if (backend == LORA_BACKEND_POLY && plan->rank == 0)
        return lora_set_error(ad->err, LORA_ERR_UNSUPPORTED,
                              "degree %d with head_dim %lld needs more than %lld feature "
                              "columns or a state above %lld floats",
                              plan->degree, (long long)d, (long long)POLY_MAX_RANK,
                              (long long)POLY_MAX_STATE);
    plan->group_degree = ad->plan_degree;
    for (int64_t g = 0; g < groups; g++) {
        const int deg = degree_at(ad, ad->group_r[g], d);
        const int64_t k = rank_at(deg, d);
        const double eta = k > 0 ? poly_eta(deg, ad->group_r[g]) : INFINITY;
        int run = 0;
        if (backend == LORA_BACKEND_POLY)
            run = deg;
        else if (backend != LORA_BACKEND_EXACT) /* AUTO: certified and cheaper */
            run = k > 0 && eta <= tol &&
                          attn_flops_poly(p, deg) * POLY_COST_RATIO < plan->flops_exact
                      ? deg
                      : 0;
        ad->plan_degree[g] = run;
        if (run > 0) {
            plan->poly_groups++;
            if (run > plan->run_degree) {
                plan->run_degree = run;
                plan->run_rank = k;
            }
            plan->run_eta = fmax(plan->run_eta, eta);
        }
    }
    return LORA_OK;
}

int lora_plan_call(lora_adapter *ad, const attn_problem *p, const float *q,
                   const float *k, lora_plan *plan)
{
    /* R needs head_dim doubles of scratch: the handle's scratch buffer serves. */
    if (lora_buf_reserve(&ad->mem, &ad->scratch, (size_t)p->head_dim * sizeof(double)) !=
        LORA_OK)
        return lora_set_error(ad->err, LORA_ERR_NOMEM, "cannot allocate scratch");
    poly_score_bound(p, q, k, ad->scratch.ptr, ad->group_r);
    return plan_for_bounds(ad, p, ad->cfg.backend, plan);
}


LORA_API int lora_threshold_estimate(lora_adapter *ad, const float *x, int64_t batch,
                                     int64_t seq_len, lora_threshold_report *report)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    if (!report)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "report is NULL");
    const size_t want = report->struct_size;
    if (want < offsetof(lora_threshold_report, flops_poly) + sizeof(double))
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "report->struct_size = %zu is smaller than the first version",
                              want);
    attn_problem p;
    int st = lora_check_inputs(ad, x, x, batch, seq_len, seq_len, 1, &p);
    if (st != LORA_OK)
        return st;
    /* The projections' statistics block by block in the handle's own buffer: the saved
     * forward stays intact and Q, K, V are never stored. */
    const layer *l = &ad->layer;
    const size_t floats = layer_qkv_stats_floats(l, &p);
    size_t bytes;
    if (floats == 0 || __builtin_mul_overflow(floats, sizeof(float), &bytes))
        return lora_set_error(ad->err, LORA_ERR_SHAPE, "estimate buffer size overflows");
    if (lora_buf_reserve(&ad->mem, &ad->estimate_buf, bytes) != LORA_OK)
        return lora_set_error(ad->err, LORA_ERR_NOMEM,
                              "cannot allocate %zu bytes for the estimate", bytes);
    layer_qkv_stats_result stats = {.group_r = ad->group_r};
    const int bad = layer_qkv_stats(l, &p, x, ad->estimate_buf.ptr, &stats);
    if (bad >= 0)
        return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                              "W_%s + s*B*A has a non-finite entry", lora_proj_names[bad]);
    /* The plan as AUTO would make it, whatever backend is configured. */
    lora_plan plan;
    st = plan_for_bounds(ad, &p, LORA_BACKEND_AUTO, &plan);
    if (st != LORA_OK)
        return st;

    lora_threshold_report r;
    memset(&r, 0, sizeof r);
    r.recommended_backend = plan.poly_groups > 0 ? LORA_BACKEND_POLY : LORA_BACKEND_EXACT;
    r.poly_groups = plan.poly_groups;
    r.gamma_q = stats.max_abs[PROJ_Q];
    r.gamma_k = stats.max_abs[PROJ_K];
    r.gamma_v = stats.max_abs[PROJ_V];
    const double ln_l = log(seq_len > 1 ? (double)seq_len : 2.0);
    r.gamma_ratio = (r.gamma_q > r.gamma_k ? r.gamma_q : r.gamma_k) / sqrt(ln_l);
    r.score_bound = plan.score_bound;
    r.poly_degree = plan.rank > 0 ? plan.degree : 0;
    r.poly_rank = r.poly_degree > 0 ? plan.rank : 0;
    r.error_bound = r.poly_degree > 0 ? plan.eta : INFINITY;
    r.flops_exact = plan.flops_exact;
    r.flops_poly = plan.flops_poly;
    r.struct_size = (uint32_t)(want < sizeof r ? want : sizeof r);
    memcpy(report, &r, r.struct_size);
    ad->err[0] = '\0';
    return LORA_OK;
}
