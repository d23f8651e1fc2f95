/* The attention-core backend layer: every backend computes softmax attention and its
 * gradient for all (batch, head) pairs of one call, behind one table of functions.
 * Projections and LoRA terms live in src/layer; a backend sees only Q, K, V. */
#ifndef LORA_BACKEND_H
#define LORA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "../linalg/linalg.h"

/* One call's attention problem. Q, dQ, O, dO rows have ldq/ldo floats, K, V, dK, dV
 * rows ldkv; head h occupies columns h*head_dim .. (h+1)*head_dim - 1; batch element b
 * starts at row b*len_q (queries) or b*len_kv (keys). Query head h reads kv head
 * h / (n_heads / n_kv_heads). */
typedef struct attn_problem {
    int64_t batch, len_q, len_kv;
    int64_t n_heads, n_kv_heads, head_dim;
    int64_t ldq, ldkv, ldo;
    float softmax_scale;
    int causal; /* key j visible to query i iff j <= i + (len_kv - len_q) */
    int threads;
    const la_ctx *la;
    int poly_degree; /* POLY only: even degree g (set per run by route.c) */
    int64_t measure_rows; /* > 0: sample this many rows per head for attn_measure */
} attn_problem;

/* Per-row statistic a forward leaves for its backward: batch*n_heads*len_q floats,
 * index (b*n_heads + h)*len_q + i. The exact backend keeps the row log-sum-exp. */
static inline size_t attn_row_stat_count(const attn_problem *p)
{
    return (size_t)p->batch * (size_t)p->n_heads * (size_t)p->len_q;
}

typedef struct attn_backend {
    const char *name;
    int id; /* lora_backend value */
    /* Bytes of scratch forward or backward needs (64-byte aligned by the caller). */
    size_t (*workspace_size)(const attn_problem *p);
    /* o = softmax(scale·Q·Kᵀ)·V per head; fills row_stat. Cannot fail. */
    void (*forward)(const attn_problem *p, const float *q, const float *k,
                    const float *v, float *o, float *row_stat, void *ws);
    /* dq, dk, dv (overwritten) from do_ and the saved forward (q, k, v, o, row_stat). */
    void (*backward)(const attn_problem *p, const float *q, const float *k,
                     const float *v, const float *o, const float *row_stat,
                     const float *do_, float *dq, float *dk, float *dv, void *ws);
} attn_backend;

extern const attn_backend attn_backend_exact;
extern const attn_backend attn_backend_poly;

/* A call split over backends by kv-head group (route.c): degree[g] (n_kv_heads
 * entries) is the POLY degree of kv group g and its query heads, 0 for EXACT. The
 * row statistics (attn_row_stat_count(p) floats) are laid out per run of equal
 * degree, so a backward must get the degrees of its forward. ws: at least
 * attn_route_workspace bytes. */
size_t attn_route_workspace(const attn_problem *p, const int *degree);
void attn_route_forward(const attn_problem *p, const int *degree, const float *q,
                        const float *k, const float *v, float *o, float *row_stat, void *ws);
void attn_route_backward(const attn_problem *p, const int *degree, const float *q,
                         const float *k, const float *v, const float *o,
                         const float *row_stat, const float *do_, float *dq, float *dk,
                         float *dv, void *ws);
/* attn_measure over the POLY groups (the output without do_, dq with it): the largest
 * of their relative errors, or -1 when none ran POLY or p->measure_rows is 0. */
double attn_route_measure(const attn_problem *p, const int *degree, const float *q,
                          const float *k, const float *v, const float *o, const float *do_,
                          const float *dq, float *scratch);

/* The measured error of an approximate backend: exact rows (in double) for
 * p->measure_rows sampled queries per (batch, head). Without do_: *out_err = max |o −
 * o_exact| / max |o_exact| over those rows. With do_: *dq_err, the same for dq.
 * scratch: attn_measure_scratch_floats(p) floats. */
size_t attn_measure_scratch_floats(const attn_problem *p);
void attn_measure(const attn_problem *p, const float *q, const float *k, const float *v,
                  const float *o, const float *do_, const float *dq, float *scratch,
                  double *out_err, double *dq_err);

/* Number of keys visible to query row i (causal alignment of attn_problem). */
static inline int64_t attn_visible_keys(const attn_problem *p, int64_t i)
{
    if (!p->causal)
        return p->len_kv;
    int64_t n = i + 1 + (p->len_kv - p->len_q);
    return n < 0 ? 0 : (n > p->len_kv ? p->len_kv : n);
}

#endif
