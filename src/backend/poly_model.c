#include "poly_model.h"

#include <math.h>
#include <stdio.h>

#include "poly_calibration.h"

double poly_taylor_delta(int g, double r)
{
    /* R^(g+1)/(g+1)! as a running product: no overflow for the degrees allowed. */
    double t = 1.0;
    for (int i = 1; i <= g + 1; i++)
        t *= r / (double)i;
    return exp(r) * t;
}

double poly_round_delta(int g, double r, int64_t k, int64_t len_kv)
{
    const double u = 0x1p-24;
    const double n = 13.0 * g + (double)k + 64.0 + ceil((double)len_kv / 64.0) + 4.0;
    return n * u < 1.0 ? n * u / (1.0 - n * u) * exp(2.0 * r) : INFINITY;
}

double poly_delta(int g, double r, int64_t k, int64_t len_kv)
{
    return poly_taylor_delta(g, r) + poly_round_delta(g, r, k, len_kv);
}

double poly_eta(int g, double r, int64_t k, int64_t len_kv)
{
    const double d = poly_delta(g, r, k, len_kv);
    return d < 1.0 ? 2.0 * d / (1.0 - d) : INFINITY;
}

int64_t poly_sum_keys(const attn_problem *p)
{
    if (p->causal && p->mask && (p->mask->q_pos || p->mask->kv_pos))
        return 2 * p->len_kv + p->len_q + 2 * 64;
    return p->len_kv;
}

int poly_degree_for(const attn_problem *p, double r, double tol)
{
    for (int g = 2; g <= POLY_MAX_DEGREE; g += 2) {
        const int64_t k = poly_feature_count(g, p->head_dim);
        if (k <= 0)
            break;
        if (poly_delta(g, r, k, poly_sum_keys(p)) * (2.0 + tol) <= tol)
            return g;
    }
    return 0;
}

int64_t poly_binom(int g, int64_t d, int64_t limit)
{
    /* binom(g + d, g) = Π_{i=1..g} (d + i)/i, exact in integers at every step. */
    if (d > limit)
        return -1;
    int64_t k = 1; /* k <= limit <= 2^22 and d + i < 2^23 before each step: no overflow */
    for (int64_t i = 1; i <= g; i++) {
        k = k * (d + i) / i;
        if (k > limit)
            return -1;
    }
    return k;
}

int64_t poly_feature_count(int g, int64_t d)
{
    const int64_t k = poly_binom(g, d, POLY_MAX_FEATURES);
    return k > 0 && poly_binom(g + 1, d, POLY_MAX_BACKWARD_FEATURES) > 0 ? k : -1;
}

/* Backward flops per (query, key) row pair of the two variants; the JACOBIAN
 * variant's state products are only d + 1 deep and its contraction a sparse gather,
 * which run at about half the wide products' rate below head_dim 63 (measured at
 * head_dim 8-16 with the products 64 rows wide; docs/backends.md), so its flops count
 * twice there. */
static double backward_pair_flops(double k, double k1, double d, int variant, int weighted)
{
    const double d1 = d + 1.0, cols = d * d1 + d;
    const double shared = 6.0 * k1 + 4.0 * k1 * d1; /* features, both states' updates */
    if (variant == POLY_BACKWARD_EXPANDED)
        return shared + 2.0 * k * d * d1 + 2.0 * k * cols + 4.0 * d * d1;
    const double slow = weighted && d1 < 64.0 ? 2.0 : 1.0;
    return shared + slow * (4.0 * k1 * d1 + 6.0 * k * d);
}

int poly_backward_variant(const attn_problem *p, int g)
{
    const double d = (double)p->head_dim, k = (double)poly_feature_count(g, p->head_dim);
    const double k1 = (double)poly_binom(g + 1, p->head_dim, POLY_MAX_BACKWARD_FEATURES);
    const int expanded_fits = k * (d * (d + 1.0) + d) <= (double)POLY_MAX_EXPANDED;
    return expanded_fits && backward_pair_flops(k, k1, d, POLY_BACKWARD_EXPANDED, 1) <=
                                backward_pair_flops(k, k1, d, POLY_BACKWARD_JACOBIAN, 1)
               ? POLY_BACKWARD_EXPANDED
               : POLY_BACKWARD_JACOBIAN;
}

double poly_flops(const attn_problem *p, int g)
{
    const double d = (double)p->head_dim, k = (double)poly_feature_count(g, p->head_dim);
    const double k1 = (double)poly_binom(g + 1, p->head_dim, POLY_MAX_BACKWARD_FEATURES);
    /* valid rows only: padding is never swept */
    double lq = 0.0, lkv = 0.0;
    for (int64_t b = 0; b < p->batch; b++) {
        lq += (double)attn_q_len(p, b);
        lkv += (double)attn_kv_len(p, b);
    }
    lq /= (double)p->batch;
    lkv /= (double)p->batch;
    const double rows = lq + lkv;
    /* Forward, per row: degree-g features; keys into the k × (d+1) state, queries out
     * of it. Backward: per row pair the chosen variant's (the products with the
     * k' × (d+1) states, the Jacobian), counted over max(Lq, Lkv) pairs. Causal adds
     * one diagonal block of POLY_BLOCK rows per query row. */
    const double fwd = rows * (3.0 * k + 2.0 * k * (d + 1.0));
    const double bwd = 0.5 * rows *
                       backward_pair_flops(k, k1, d, poly_backward_variant(p, g), 0);
    const double diag = p->causal ? lq * 64.0 * (3.0 * 2.0 * k + 8.0 * d) : 0.0;
    return (double)p->batch * (double)p->n_heads * (fwd + bwd + diag);
}

/* The first row r >= 1 of batch element b (keys: on the key side) whose position is
 * below row r − 1's in the same segment, or 0 when there is none. */
static int64_t descending_position(const attn_problem *p, int64_t b, int keys)
{
    const int64_t n = keys ? attn_kv_len(p, b) : attn_q_len(p, b);
    for (int64_t r = 1; r < n; r++) {
        const int same = keys ? attn_kv_seg(p, b, r) == attn_kv_seg(p, b, r - 1)
                              : attn_q_seg(p, b, r) == attn_q_seg(p, b, r - 1);
        const int lower = keys ? attn_kv_pos(p, b, r) < attn_kv_pos(p, b, r - 1)
                               : attn_q_pos(p, b, r) < attn_q_pos(p, b, r - 1);
        if (same && lower)
            return r;
    }
    return 0;
}

/* Why the sweep cannot run p (into why), or 0 when it can. WINDOW and SOFTCAP are not
 * sums of kernel values over prefixes (EXACT runs them). The sweep takes each segment
 * as one run of rows per side, so segment ids must not decrease along the valid rows;
 * causal visibility must be a prefix of a run's keys that grows with the query, so
 * positions must not decrease within a segment on either side. */
static int mask_refusal(const attn_problem *p, char *why, size_t why_size)
{
    const char *tail = "; use LORA_BACKEND_EXACT (AUTO does)";
    if (p->window > 0 || p->softcap > 0.0f) {
        snprintf(why, why_size, "%s: the polynomial backend cannot compute it%s",
                 p->window > 0 ? "LORA_CFG_WINDOW" : "LORA_CFG_SOFTCAP", tail);
        return 1;
    }
    int64_t b, row;
    int keys;
    if (!attn_segments_ascend(p, &b, &row, &keys)) {
        snprintf(why, why_size,
                 "args->%s[%lld, %lld] is smaller than the segment id before it: the "
                 "polynomial backend needs each packed sequence's rows together, in "
                 "ascending segment ids%s",
                 keys ? "kv_seg" : "q_seg", (long long)b, (long long)row, tail);
        return 1;
    }
    for (b = 0; p->causal && p->mask && b < p->batch; b++)
        for (keys = 0; keys <= 1; keys++)
            if ((row = descending_position(p, b, keys)) > 0) {
                snprintf(why, why_size,
                         "args->%s[%lld, %lld] is smaller than the position before it in "
                         "its segment: causal attention in the polynomial backend needs "
                         "positions that never decrease within a sequence%s",
                         keys ? "kv_pos" : "q_pos", (long long)b, (long long)row, tail);
                return 1;
            }
    return 0;
}

double poly_cost_ratio(int64_t head_dim)
{
    return poly_calibrated_ratio(head_dim);
}

void poly_plan(const attn_problem *p, double r, const attn_options *o, attn_offer *offer,
               char *why, size_t why_size)
{
    int64_t fixed = 0; /* LORA_CFG_POLY_DEGREE: 0 = from the tolerance */
    if (o->get_int && o->get_int(o->config, LORA_CFG_POLY_DEGREE, &fixed) != LORA_OK)
        fixed = 0;
    const int64_t d = p->head_dim;
    const int g = fixed > 0 ? (int)fixed : poly_degree_for(p, r, o->tolerance);
    const int64_t k = g > 0 ? poly_feature_count(g, d) : -1;
    memset(offer, 0, sizeof *offer);
    offer->eta = offer->flops = offer->cost = INFINITY;
    if (mask_refusal(p, why, why_size)) {
        offer->status = LORA_ERR_UNSUPPORTED;
        return;
    }
    if (g == 0) {
        offer->status = LORA_ERR_TOLERANCE;
        snprintf(why, why_size,
                 "no even degree within limits (k <= %lld features, %lld for the backward) "
                 "certifies tolerance %g at score bound R = %g (float32 rounding alone "
                 "gives eta >= %.3g there); lower R, raise LORA_CFG_TOLERANCE or set "
                 "LORA_CFG_POLY_DEGREE",
                 (long long)POLY_MAX_FEATURES, (long long)POLY_MAX_BACKWARD_FEATURES,
                 o->tolerance, r,
                 2.0 * poly_round_delta(2, r, poly_feature_count(2, d), poly_sum_keys(p)));
        return;
    }
    if (k <= 0) {
        offer->status = LORA_ERR_UNSUPPORTED;
        snprintf(why, why_size,
                 "degree %d with head_dim %lld needs more than %lld feature columns (or "
                 "more than %lld of degree %d for the backward)",
                 g, (long long)d, (long long)POLY_MAX_FEATURES,
                 (long long)POLY_MAX_BACKWARD_FEATURES, g + 1);
        return;
    }
    const poly_params pp = {.degree = g, .variant = poly_backward_variant(p, g),
                            .features = k};
    memcpy(&offer->params, &pp, sizeof pp);
    offer->status = LORA_OK;
    offer->eta = poly_eta(g, r, k, poly_sum_keys(p));
    offer->flops = poly_flops(p, g);
    offer->cost = offer->flops * poly_cost_ratio(d);
    offer->order = g;
    offer->features = k;
}
