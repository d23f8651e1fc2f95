#include "poly_model.h"

#include <math.h>
#include <stdio.h>

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
    for (int g = 2; g <= POLY_MAX_DEGREE && poly_feature_count(g, d) > 0; g += 2)
        if (poly_taylor_delta(g, r) * (2.0 + tol) <= tol)
            return g;
    return 0;
}

int64_t poly_feature_count(int g, int64_t d)
{
    /* binom(g + d, g) = Π_{i=1..g} (d + i)/i, exact in integers at every step. */
    if (d > POLY_MAX_FEATURES)
        return -1;
    int64_t k = 1; /* k <= 2^22 and d + i < 2^23 before each step: no overflow */
    for (int64_t i = 1; i <= g; i++) {
        k = k * (d + i) / i;
        if (k > POLY_MAX_FEATURES)
            return -1;
    }
    return k * (d + 1) * (d + 1) > POLY_MAX_STATE ? -1 : k;
}

double poly_flops(const attn_problem *p, int g)
{
    const double d = (double)p->head_dim, k = (double)poly_feature_count(g, p->head_dim);
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

void poly_plan(const attn_problem *p, double r, const attn_options *o, attn_offer *offer,
               char *why, size_t why_size)
{
    int64_t fixed = 0; /* LORA_CFG_POLY_DEGREE: 0 = from the tolerance */
    if (o->get_int && o->get_int(o->config, LORA_CFG_POLY_DEGREE, &fixed) != LORA_OK)
        fixed = 0;
    const int64_t d = p->head_dim;
    const int g = fixed > 0 ? (int)fixed : poly_degree_for(r, o->tolerance, d);
    const int64_t k = g > 0 ? poly_feature_count(g, d) : -1;
    memset(offer, 0, sizeof *offer);
    offer->eta = offer->flops = offer->cost = INFINITY;
    const char *extra = attn_extra_option(p);
    if (extra) { /* the kernels compute plain or causal attention with default positions */
        offer->status = LORA_ERR_UNSUPPORTED;
        snprintf(why, why_size,
                 "%s: the polynomial backend cannot compute it; use LORA_BACKEND_EXACT "
                 "(AUTO does)",
                 extra);
        return;
    }
    if (g == 0) {
        offer->status = LORA_ERR_TOLERANCE;
        snprintf(why, why_size,
                 "no even degree within limits (k <= %lld features, state <= %lld floats) "
                 "certifies tolerance %g at score bound R = %g; lower R, raise "
                 "LORA_CFG_TOLERANCE or set LORA_CFG_POLY_DEGREE",
                 (long long)POLY_MAX_FEATURES, (long long)POLY_MAX_STATE, o->tolerance, r);
        return;
    }
    if (k <= 0) {
        offer->status = LORA_ERR_UNSUPPORTED;
        snprintf(why, why_size,
                 "degree %d with head_dim %lld needs more than %lld feature columns or a "
                 "state above %lld floats",
                 g, (long long)d, (long long)POLY_MAX_FEATURES, (long long)POLY_MAX_STATE);
        return;
    }
    const poly_params pp = {.degree = g, .features = k};
    memcpy(&offer->params, &pp, sizeof pp);
    offer->status = LORA_OK;
    offer->eta = poly_eta(g, r);
    offer->flops = poly_flops(p, g);
    offer->cost = offer->flops * POLY_COST_RATIO;
    offer->order = g;
    offer->features = k;
}
