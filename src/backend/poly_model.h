/* The approximation theory behind the polynomial backend (MATH §3-4): Taylor degree
 * for a tolerance, the certified error, feature counts, the score bound R and the
 * cost model AUTO uses. Pure functions, no allocation. */
#ifndef LORA_POLY_MODEL_H
#define LORA_POLY_MODEL_H

#include <stdint.h>

#include "backend.h"

/* Degrees above this are never chosen (k grows as binom(g + d, d)). */
#define POLY_MAX_DEGREE 20
/* Feature columns above this make POLY pointless (its cost per row, ~8·k·(d+1)²
 * flops, then exceeds exact attention's up to L in the millions). */
#define POLY_MAX_RANK (INT64_C(1) << 16)
/* Floats of one k × (d+1)² running state (128 MiB) above which POLY is not run. */
#define POLY_MAX_STATE (INT64_C(1) << 25)

/* δ(g, R) = e^R·R^(g+1)/(g+1)!: relative error of the degree-g Taylor polynomial of
 * exp on [-R, R]. */
double poly_taylor_delta(int g, double r);
/* η = 2δ/(1-δ): entrywise relative error of the normalised probabilities; +inf when
 * δ >= 1. */
double poly_eta(int g, double r);
/* Smallest even g <= POLY_MAX_DEGREE whose η meets tol at score bound r, or 0.
 * Degrees whose poly_rank is out of limits count as not meeting it. */
int poly_degree_for(double r, double tol, int64_t d);
/* k = binom(g + d, d), or -1 when above POLY_MAX_RANK or when the k × (d+1)² state
 * exceeds POLY_MAX_STATE. */
int64_t poly_rank(int g, int64_t d);

/* R ≥ max |S_ij − c_i| over every (batch, head) of p, with c_i = β·q_i·k̄ the shift of
 * key centring: β·max_i‖q_i‖₂·max_j‖k_j − k̄‖₂ per head, maxed. O(L·d) per head.
 * group_r (n_kv_heads entries) receives the same maximum per kv-head group.
 * mean: scratch of head_dim doubles. */
double poly_score_bound(const attn_problem *p, const float *q, const float *k,
                        double *mean, double *group_r);

/* Modelled flops of one forward+backward of the attention core. */
double attn_flops_exact(const attn_problem *p);
double attn_flops_poly(const attn_problem *p, int g);
/* Relative speed of the two kernels' flops (poly's skinny products and feature maps
 * reach a lower fraction of peak than exact's blocked products); calibrated with
 * `make bench` (test/bench/bench_poly.c). AUTO picks POLY when
 * flops_poly·POLY_COST_RATIO < flops_exact. */
#define POLY_COST_RATIO 2.0

#endif
