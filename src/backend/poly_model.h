/* The approximation theory behind the polynomial backend (MATH §3-4): Taylor degree
 * for a tolerance, the certified error, feature counts, the cost model, and the plan
 * that turns them into an offer for the dispatcher. Pure functions, no allocation. */
#ifndef LORA_POLY_MODEL_H
#define LORA_POLY_MODEL_H

#include <stdint.h>
#include <string.h>

#include "backend.h"

/* Degrees above this are never chosen (k grows as binom(g + d, d)). */
#define POLY_MAX_DEGREE 20
/* Feature columns above this make POLY pointless (its cost per row then exceeds exact
 * attention's up to L in the millions). */
#define POLY_MAX_FEATURES (INT64_C(1) << 16)
/* The backward differentiates the degree-(g+1) features: their count k' = binom(g + 1 +
 * d, d) above this (each worker holds two 64-row blocks of them, 64 MiB) is not run. */
#define POLY_MAX_BACKWARD_FEATURES (INT64_C(1) << 17)

/* δ(g, R) = e^R·R^(g+1)/(g+1)!: relative error of the degree-g Taylor polynomial of
 * exp on [-R, R]. */
double poly_taylor_delta(int g, double r);
/* The float32 evaluation's share (docs/math.md, "Rounding"): γ_n·e^(2R), γ_n = n·u/(1 −
 * n·u), u = 2^-24, n = 13g + k + 64 + ⌈len_kv/64⌉ + 4 the roundings one kernel value
 * φ(q)·φ(k) goes through (feature chains, the contraction over k features, the key
 * sums in blocks of 64, the normalisation). e^(2R) bounds Σ_a |φ_a(q)·φ_a(k)| over
 * exp(s): the Taylor terms of a negative score alternate. +inf when n·u >= 1. */
double poly_round_delta(int g, double r, int64_t k, int64_t len_kv);
/* δ' = δ(g, R) + the rounding share: the certified relative error of one kernel value
 * as computed. */
double poly_delta(int g, double r, int64_t k, int64_t len_kv);
/* η = 2δ'/(1-δ'): entrywise relative error of the normalised probabilities; +inf when
 * δ' >= 1. */
double poly_eta(int g, double r, int64_t k, int64_t len_kv);
/* The key count the rounding share is taken at (poly_round_delta's len_kv): len_kv,
 * or, causal with explicit positions, 2·len_kv + len_q + 128: a query's normaliser may
 * then gather its keys through one state update per query block besides the key
 * blocks, and through a diagonal of several key blocks. */
int64_t poly_sum_keys(const attn_problem *p);
/* Smallest even g <= POLY_MAX_DEGREE whose η meets tol at score bound r for p (its
 * head_dim and poly_sum_keys), or 0. Degrees whose feature count is out of limits count as
 * not meeting it. */
int poly_degree_for(const attn_problem *p, double r, double tol);
/* Floats of the expanded state (k × (d(d+1) + d)) above which EXPANDED is not used. */
#define POLY_MAX_EXPANDED (INT64_C(1) << 25)
/* binom(g + d, d), or -1 when above limit. */
int64_t poly_binom(int g, int64_t d, int64_t limit);
/* k = binom(g + d, d) feature columns, or -1 when above POLY_MAX_FEATURES or when the
 * backward's k' = binom(g + 1 + d, d) exceeds POLY_MAX_BACKWARD_FEATURES. */
int64_t poly_feature_count(int g, int64_t d);

/* The backward variant the cost model prefers at degree g. */
int poly_backward_variant(const attn_problem *p, int g);
/* Modelled flops of one forward+backward of the attention core at degree g with that
 * backward variant. */
double poly_flops(const attn_problem *p, int g);
/* EXACT's flop rate over POLY's at this head_dim (poly's skinny products and feature
 * maps reach another fraction of peak than exact's blocked products): the table of
 * src/backend/poly_calibration.h, fitted by `make calibrate`. POLY's offered cost is
 * poly_flops·poly_cost_ratio, so AUTO picks it when that is below exact's flops. */
double poly_cost_ratio(int64_t head_dim);

/* How the backward applies the Jacobian of the degree-(g+1) features to its k' × (d+1)
 * states (src/backend/poly.c): EXPANDED multiplies the features with the state expanded
 * through the Jacobian (k × d(d+1), wide products), JACOBIAN multiplies the state with
 * the rows first (k' × rows, products only d + 1 deep) and contracts sparsely (k·d per
 * row): fewer flops, at a lower rate when d + 1 is small. */
enum { POLY_BACKWARD_EXPANDED = 0, POLY_BACKWARD_JACOBIAN = 1 };

/* POLY's private parameters (attn_params): the degree, its feature count and the
 * backward variant. */
typedef struct poly_params {
    int32_t degree, variant;
    int64_t features;
} poly_params;
_Static_assert(sizeof(poly_params) <= sizeof(attn_params), "poly_params outgrows attn_params");

static inline poly_params poly_params_of(const attn_params *a)
{
    poly_params pp;
    memcpy(&pp, a, sizeof pp);
    return pp;
}

/* The planning question (attn_backend.plan): the degree is LORA_CFG_POLY_DEGREE when
 * set, else the smallest meeting the tolerance at r. Cannot run (LORA_ERR_TOLERANCE)
 * when no degree within limits meets it, nor (LORA_ERR_UNSUPPORTED) when the degree's
 * features exceed the limits. */
void poly_plan(const attn_problem *p, double r, const attn_options *o, attn_offer *offer,
               char *why, size_t why_size);

#endif
