/* The threshold estimator and the per-call backend decision (MATH §3-5): the paper's
 * Γ statistics and the score bound R, handed to the dispatcher (src/backend), whose
 * backends plan each kv-head group and report degree, features, η and cost. */
#include <math.h>
#include <string.h>

#include "internal.h"

static int config_int(const void *config, int param, int64_t *value)
{
    return lora_config_values_get_int(config, param, value);
}

static attn_options options_of(const lora_adapter *ad, int64_t backend)
{
    return (attn_options){.backend = (int)backend, .tolerance = ad->cfg.tolerance,
                          .config = &ad->cfg, .get_int = config_int};
}

/* The plan for the score bounds in ad->group_r under the given backend setting, and
 * the run info's summary of it. */
static int plan_for_bounds(lora_adapter *ad, const attn_problem *p, int64_t backend,
                           lora_plan *plan)
{
    memset(plan, 0, sizeof *plan);
    for (int64_t g = 0; g < p->n_kv_heads; g++)
        plan->score_bound = fmax(plan->score_bound, ad->group_r[g]);
    const attn_options o = options_of(ad, backend);
    const int st = attn_dispatch_plan(p, ad->group_r, &o, ad->plan_groups, ad->err,
                                      LORA_ERRMSG_SIZE);
    if (st != LORA_OK)
        return st;
    plan->groups = ad->plan_groups;
    plan->run_backend = LORA_BACKEND_EXACT;
    for (int64_t g = 0; g < p->n_kv_heads; g++) {
        const attn_group_plan *gp = &plan->groups[g];
        if (!gp->backend->approximate)
            continue;
        if (plan->poly_groups++ == 0)
            plan->run_backend = gp->backend->id;
        if (gp->order > plan->run_order) {
            plan->run_order = gp->order;
            plan->run_features = gp->features;
        }
        plan->run_eta = fmax(plan->run_eta, gp->eta);
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
    attn_score_bound(p, q, k, ad->scratch.ptr, ad->group_r);
    return plan_for_bounds(ad, p, ad->cfg.backend, plan);
}

/* Modelled flops of a plan (the sum over its kv-head groups). */
static double plan_flops(const attn_problem *p, const lora_plan *plan)
{
    double f = 0.0;
    for (int64_t g = 0; g < p->n_kv_heads; g++)
        f += plan->groups[g].flops;
    return f;
}

/* flops_poly: what AUTO runs when it runs POLY on some group (those groups at their own
 * degrees, the rest EXACT); else what POLY would run on every group at its own degree
 * (forced POLY's plan), INFINITY when some group has no degree. */
static double report_flops_poly(lora_adapter *ad, const attn_problem *p,
                                const lora_plan *auto_plan)
{
    if (auto_plan->poly_groups > 0)
        return plan_flops(p, auto_plan);
    lora_plan forced;
    return plan_for_bounds(ad, p, LORA_BACKEND_POLY, &forced) == LORA_OK
               ? plan_flops(p, &forced)
               : INFINITY;
}

/* The report's degree, features, η and flops: the offers of POLY and EXACT for the
 * whole layer at its largest score bound. */
static void report_offers(const lora_adapter *ad, const attn_problem *p, double r,
                          lora_threshold_report *rep)
{
    const attn_options o = options_of(ad, LORA_BACKEND_AUTO);
    attn_offer poly, exact;
    attn_dispatch_offer(p, LORA_BACKEND_POLY, r, &o, &poly);
    attn_dispatch_offer(p, LORA_BACKEND_EXACT, r, &o, &exact);
    const int runs = poly.status == LORA_OK;
    rep->poly_degree = runs ? poly.order : 0;
    rep->poly_rank = runs ? poly.features : 0;
    rep->error_bound = runs ? poly.eta : INFINITY;
    rep->flops_exact = exact.flops;
    rep->flops_poly = runs ? poly.flops : INFINITY;
}

/* lora_threshold_estimate(_ex): mask NULL or the call's resolved per-row arguments. */
static int estimate(lora_adapter *ad, const attn_mask *mask, const float *x, int64_t batch,
                    int64_t seq_len, lora_threshold_report *report)
{
    if (!report)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "report is NULL");
    const size_t want = report->struct_size;
    if (want < offsetof(lora_threshold_report, flops_poly) + sizeof(double))
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "report->struct_size = %zu is smaller than the first version",
                              want);
    attn_problem p;
    int st = lora_check_inputs(ad, x, x, batch, seq_len, seq_len, 1, &p);
    if (st == LORA_OK && mask && (st = lora_mask_check(ad, &p, mask, 1)) == LORA_OK)
        p.mask = mask; /* statistics over valid rows, RoPE at the positions; the plans */
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
    r.recommended_backend = plan.run_backend;
    r.poly_groups = plan.poly_groups;
    r.gamma_q = stats.max_abs[PROJ_Q];
    r.gamma_k = stats.max_abs[PROJ_K];
    r.gamma_v = stats.max_abs[PROJ_V];
    const double ln_l = log(seq_len > 1 ? (double)seq_len : 2.0);
    r.gamma_ratio = (r.gamma_q > r.gamma_k ? r.gamma_q : r.gamma_k) / sqrt(ln_l);
    r.score_bound = plan.score_bound;
    report_offers(ad, &p, plan.score_bound, &r);
    r.flops_poly = report_flops_poly(ad, &p, &plan);
    r.struct_size = (uint32_t)(want < sizeof r ? want : sizeof r);
    memcpy(report, &r, r.struct_size);
    ad->err[0] = '\0';
    return LORA_OK;
}

LORA_API int lora_threshold_estimate(lora_adapter *ad, const float *x, int64_t batch,
                                     int64_t seq_len, lora_threshold_report *report)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    return estimate(ad, NULL, x, batch, seq_len, report);
}

LORA_API int lora_threshold_estimate_ex(lora_adapter *ad, const lora_attn_args *args,
                                        const float *x, int64_t batch, int64_t seq_len,
                                        lora_threshold_report *report)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    lora_attn_args call;
    attn_mask mask;
    const int st = lora_read_attn_args(ad, args, &call);
    if (st != LORA_OK)
        return st;
    const int has_mask = lora_mask_resolve(&call, 1, &mask);
    return estimate(ad, has_mask ? &mask : NULL, x, batch, seq_len, report);
}
