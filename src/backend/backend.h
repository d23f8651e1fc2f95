/* The attention-core backend layer: every backend computes softmax attention and its
 * gradient for all (batch, head) pairs of one call, behind one table of functions, and
 * answers a planning question (can it run, at what cost, with what error, with which
 * parameters); the dispatcher picks per kv-head group from the answers. Projections
 * and LoRA terms live in src/layer; a backend sees only Q, K, V. */
#ifndef LORA_BACKEND_H
#define LORA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "../../include/lora.h" /* enum values only: ids, statuses, parameters */
#include "../linalg/linalg.h"

/* A backend's private parameters for one run (POLY: its degree), written by its plan
 * and read by its kernels. The dispatcher only copies and compares them, so a plan
 * fills every byte (start from all zeros). */
typedef struct attn_params {
    int64_t word[2];
} attn_params;

/* A call's per-row arguments (lora_attn_args, resolved: in self-attention the key
 * side already points at the query side's arrays). NULL fields take their defaults:
 * q_len, kv_len (batch) all rows valid (right padding: rows i < q_len[b] are);
 * q_pos (batch, len_q) (len_kv - len_q) + i; kv_pos (batch, len_kv) j; q_seg, kv_seg
 * (batch, len) one segment. */
typedef struct attn_mask {
    const int64_t *q_len, *kv_len;
    const int64_t *q_pos, *kv_pos;
    const int32_t *q_seg, *kv_seg;
} attn_mask;

/* One call's attention problem. Q, dQ, O, dO rows have ldq/ldo floats, K, V, dK, dV
 * rows ldkv; head h occupies columns h*head_dim .. (h+1)*head_dim - 1; batch element b
 * starts at row b*len_q (queries) or b*len_kv (keys). Query head h reads kv head
 * h / (n_heads / n_kv_heads).
 * Visibility (attn_pair_visible): query i of batch element b sees key j iff both rows
 * are valid, their segments are equal and, with d = pos_i - pos_j, causal: 0 <= d
 * (and d < window when window > 0); non-causal with a window: |d| < window. A query
 * that sees no key has output 0 and gradient 0. */
typedef struct attn_problem {
    int64_t batch, len_q, len_kv;
    int64_t n_heads, n_kv_heads, head_dim;
    int64_t ldq, ldkv, ldo;
    float softmax_scale;
    float softcap;      /* > 0: S <- softcap·tanh(S/softcap) after the scale, before masking */
    int causal;         /* with default positions: key j visible to query i iff
                           j <= i + (len_kv - len_q) */
    int64_t window;     /* 0 = none */
    const attn_mask *mask; /* NULL: every field default */
    int threads;
    const la_ctx *la;
    attn_params params;   /* the running backend's, from its plan (set per run) */
    int64_t measure_rows; /* > 0: sample this many rows per head for attn_measure */
} attn_problem;

/* Per-row statistic a forward leaves for its backward: batch*n_heads*len_q floats,
 * index (b*n_heads + h)*len_q + i. The exact backend keeps the row log-sum-exp. */
static inline size_t attn_row_stat_count(const attn_problem *p)
{
    return (size_t)p->batch * (size_t)p->n_heads * (size_t)p->len_q;
}

/* What a call asks of its attention, for the backends' plans. */
typedef struct attn_options {
    int backend;      /* LORA_BACKEND_AUTO: the dispatcher picks; else the id to run */
    double tolerance; /* the largest certified error AUTO accepts (LORA_CFG_TOLERANCE) */
    /* The resolved configuration, for a backend's own LORA_CFG_* parameters. */
    const void *config;
    int (*get_int)(const void *config, int param, int64_t *value);
} attn_options;

/* A backend's answer to "can you run this problem at this score bound, at what cost,
 * with what error, with which parameters". */
typedef struct attn_offer {
    int status;       /* LORA_OK: can run; else why not (a LORA_ERR_* with a message) */
    double eta;       /* certified bound on the probabilities' entrywise relative error:
                         0 exact, +inf none */
    double flops;     /* modelled flops of one forward + backward */
    double cost;      /* flops weighted by the kernels' speed relative to exact's (what
                         AUTO compares) */
    int64_t order;    /* what the reports show: approximation order (POLY: the degree) */
    int64_t features; /* and feature columns; both 0 for exact attention */
    attn_params params;
} attn_offer;

typedef struct attn_backend {
    const char *name;
    int id;          /* lora_backend value */
    int approximate; /* has an error LORA_CFG_MEASURE_ROWS measures */
    /* The planning question for p (any number of kv-head groups) whose score bound
     * (attn_score_bound) is r: fills *offer. When offer->status is not LORA_OK, says
     * why in why (why_size bytes). Pure: no allocation, no globals. */
    void (*plan)(const attn_problem *p, double r, const attn_options *o, attn_offer *offer,
                 char *why, size_t why_size);
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

/* Every backend (table.c), NULL-terminated, in order of preference at equal cost;
 * exact attention is first and plans every problem. */
extern const attn_backend *const attn_backends[];

/* The backend of a lora_backend id, or NULL. */
const attn_backend *attn_backend_of(int id);

/* R ≥ max |S_ij − c_i| over every (batch, head) of p, with c_i = β·q_i·k̄ the shift of
 * key centring: β·max_i‖q_i‖₂·max_j‖k_j − k̄‖₂ per head, maxed. O(L·d) per head. k̄ is
 * the key mean rounded to float, the one the polynomial features subtract (a bound
 * from the double mean misses scores up to 2R when the keys' spread is about one ulp
 * of their mean).
 * group_r (n_kv_heads entries) receives the same maximum per kv-head group; the score
 * bound is what every backend's plan starts from. mean: scratch of head_dim doubles. */
double attn_score_bound(const attn_problem *p, const float *q, const float *k,
                        double *mean, double *group_r);

/* One kv-head group's part of a plan: the backend that runs it, with its parameters
 * and what its offer reported. */
typedef struct attn_group_plan {
    const attn_backend *backend;
    attn_params params;
    double eta, flops;
    int64_t order, features;
} attn_group_plan;

/* Plans every kv-head group g of p at its score bound group_r[g] (dispatch.c). AUTO
 * (o->backend) asks every backend and keeps the cheapest whose certified error meets
 * o->tolerance; exact attention always does, so AUTO always plans. A forced backend
 * runs every group if it can run the whole layer at the largest bound, else its
 * status is returned with its reason in err (err_size bytes). */
int attn_dispatch_plan(const attn_problem *p, const double *group_r, const attn_options *o,
                       attn_group_plan *groups, char *err, size_t err_size);
/* Backend id's offer for all of p at score bound r (what the estimator reports). */
void attn_dispatch_offer(const attn_problem *p, int id, double r, const attn_options *o,
                         attn_offer *offer);

/* Running a plan (groups: n_kv_heads entries). Consecutive groups with the same
 * backend and parameters run as one problem; the row statistics
 * (attn_row_stat_count(p) floats) are laid out run after run, so a backward must get
 * the plan of its forward. ws: at least attn_dispatch_workspace bytes. */
size_t attn_dispatch_workspace(const attn_problem *p, const attn_group_plan *groups);
void attn_dispatch_forward(const attn_problem *p, const attn_group_plan *groups,
                           const float *q, const float *k, const float *v, float *o,
                           float *row_stat, void *ws);
void attn_dispatch_backward(const attn_problem *p, const attn_group_plan *groups,
                            const float *q, const float *k, const float *v, const float *o,
                            const float *row_stat, const float *do_, float *dq, float *dk,
                            float *dv, void *ws);
/* attn_measure over the groups of approximate backends (the output without do_, dq
 * with it): the largest of their relative errors, or -1 when none ran or
 * p->measure_rows is 0. */
double attn_dispatch_measure(const attn_problem *p, const attn_group_plan *groups,
                             const float *q, const float *k, const float *v,
                             const float *o, const float *do_, const float *dq,
                             float *scratch);

/* The measured error of an approximate backend: exact rows (in double) for
 * p->measure_rows sampled queries per (batch, head). Without do_: *out_err = max |o −
 * o_exact| / max |o_exact| over those rows. With do_: *dq_err, the same for dq.
 * scratch: attn_measure_scratch_floats(p) floats. */
size_t attn_measure_scratch_floats(const attn_problem *p);
void attn_measure(const attn_problem *p, const float *q, const float *k, const float *v,
                  const float *o, const float *do_, const float *dq, float *scratch,
                  double *out_err, double *dq_err);

/* The resolved per-row arguments of batch element b (attn_mask, defaults applied). */
static inline int64_t attn_q_len(const attn_problem *p, int64_t b)
{
    return p->mask && p->mask->q_len ? p->mask->q_len[b] : p->len_q;
}
static inline int64_t attn_kv_len(const attn_problem *p, int64_t b)
{
    return p->mask && p->mask->kv_len ? p->mask->kv_len[b] : p->len_kv;
}
static inline int64_t attn_q_pos(const attn_problem *p, int64_t b, int64_t i)
{
    return p->mask && p->mask->q_pos ? p->mask->q_pos[b * p->len_q + i]
                                     : (p->len_kv - p->len_q) + i;
}
static inline int64_t attn_kv_pos(const attn_problem *p, int64_t b, int64_t j)
{
    return p->mask && p->mask->kv_pos ? p->mask->kv_pos[b * p->len_kv + j] : j;
}
static inline int32_t attn_q_seg(const attn_problem *p, int64_t b, int64_t i)
{
    return p->mask && p->mask->q_seg ? p->mask->q_seg[b * p->len_q + i] : 0;
}
static inline int32_t attn_kv_seg(const attn_problem *p, int64_t b, int64_t j)
{
    return p->mask && p->mask->kv_seg ? p->mask->kv_seg[b * p->len_kv + j] : 0;
}

/* Whether the position difference d = pos_i - pos_j passes causality and the window. */
static inline int attn_distance_visible(const attn_problem *p, int64_t d)
{
    if (p->causal)
        return d >= 0 && (p->window <= 0 || d < p->window);
    return p->window <= 0 || (d < p->window && -d < p->window);
}

/* Whether query i of batch element b sees key j (the rule of attn_problem). */
static inline int attn_pair_visible(const attn_problem *p, int64_t b, int64_t i, int64_t j)
{
    return i < attn_q_len(p, b) && j < attn_kv_len(p, b) &&
           attn_q_seg(p, b, i) == attn_kv_seg(p, b, j) &&
           attn_distance_visible(p, attn_q_pos(p, b, i) - attn_kv_pos(p, b, j));
}

/* A segment of batch element b as runs of rows: its valid queries [qs, qs + nq) and
 * valid keys [ks, ks + nk) (nk = 0: it has none). */
typedef struct attn_run {
    int64_t qs, nq, ks, nk;
} attn_run;

/* The next run of batch element b from rows *i (queries) and *j (keys), both 0 at the
 * start; returns 0 after the last. Meaningful when segment ids never decrease along
 * the valid rows on either side (attn_segments_ascend): then each segment is one run
 * per side and the runs pair up in order. */
static inline int attn_next_run(const attn_problem *p, int64_t b, int64_t *i, int64_t *j,
                                attn_run *run)
{
    const int64_t nq = attn_q_len(p, b), nk = attn_kv_len(p, b);
    if (*i >= nq)
        return 0;
    const int32_t s = attn_q_seg(p, b, *i);
    run->qs = *i;
    while (*i < nq && attn_q_seg(p, b, *i) == s)
        (*i)++;
    run->nq = *i - run->qs;
    while (*j < nk && attn_kv_seg(p, b, *j) < s)
        (*j)++;
    run->ks = *j;
    while (*j < nk && attn_kv_seg(p, b, *j) == s)
        (*j)++;
    run->nk = *j - run->ks;
    return 1;
}

/* Whether p's segment ids never decrease along the valid query rows nor along the
 * valid key rows of any batch element; if not, *b and *row (and *keys: on the key
 * side) name the first row whose id is smaller than its predecessor's. */
int attn_segments_ascend(const attn_problem *p, int64_t *b, int64_t *row, int *keys);

/* The (query, key) pairs the mask leaves for the cost models: batch·len_q·len_kv
 * without one; with one, Σ nq·nk over the segment runs of the valid rows (all valid
 * pairs when segment ids do not ascend). Causal halves either. */
double attn_visible_pairs(const attn_problem *p);

/* LORA_COMPUTE_BF16 in exact attention (exact_bf16.c): 1 when p's tiles take bf16
 * operands (bf16 compute on a head_dim the fused tiles run); the factor on exact
 * attention's modelled cost (1 in fp32); scratch floats per worker for the bf16 tile
 * products of tiles up to `tile` rows and columns (0 when fp32). */
int attn_exact_bf16(const attn_problem *p);
double attn_exact_cost_ratio(const attn_problem *p);
size_t attn_exact_bf16_tile_floats(const attn_problem *p, int64_t tile);

#endif
