/* The LoRA attention layer: frozen projections with LoRA terms around an attention
 * backend (MATH §1-2). Pure computation: callers own every buffer, sized by the
 * *_size functions here. */
#ifndef LORA_LAYER_H
#define LORA_LAYER_H

#include <stddef.h>
#include <stdint.h>

#include "../backend/backend.h"
#include "../linalg/typed.h"

enum { PROJ_Q = 0, PROJ_K = 1, PROJ_V = 2, PROJ_O = 3, PROJ_COUNT = 4 };

/* One projection y = x·(W + s·B·A)ᵀ + bias. */
typedef struct layer_proj {
    int64_t in, out;
    la_wmat weight; /* (out, in): float, bf16 or half; weight.data NULL until set */
    float *bias;   /* (out) or NULL */
    int adapted;   /* has LoRA factors */
    float *a, *b;  /* (rank, in), (out, rank) */
    float *da, *db;
} layer_proj;

typedef struct layer {
    int64_t d_model, n_heads, n_kv_heads, head_dim, q_dim, kv_dim, rank;
    float lora_scale;    /* s = alpha/r or alpha/√r */
    float softmax_scale; /* β */
    int causal, out_proj;
    /* RoPE (LORA_ROPE_*): the first rope_dim dims of each Q and K head turn by
     * position·rope_freqs[i] (rope_dim/2 inverse frequencies, owned by the adapter) */
    int rope;
    int64_t rope_dim;
    const double *rope_freqs;
    int64_t window;   /* LORA_CFG_WINDOW */
    float softcap;    /* LORA_CFG_SOFTCAP */
    double dropout;   /* LORA_CFG_DROPOUT: p of the LoRA branches' input dropout */
    uint64_t seed;    /* LORA_CFG_SEED: keys the dropout masks */
    layer_proj proj[PROJ_COUNT];
} layer;

/* Activations a forward leaves for its backward. For self-attention xkv == xq. */
typedef struct layer_acts {
    int64_t batch, len_q, len_kv;
    float *xq, *xkv;         /* inputs (batch·len, d_model) */
    float *q, *k, *v;        /* projections (rows, q_dim / kv_dim) */
    float *attn;             /* attention output C (batch·len_q, q_dim) */
    float *row_stat;         /* backend's per-row statistic */
    float *xa[PROJ_COUNT];   /* X·Aᵀ (rows, rank) of adapted projections (the dropped X
                                when dropout is on) */
    float *wpanel;           /* la_gemm_w's scratch for 16-bit base weights, or NULL */
    /* Dropout: on for a training forward with p > 0; the masks are a function of the
     * layer's seed, forward_count, target, row and column (layer_dropout_keep), so the
     * backward regenerates its forward's masks instead of storing them. drop_buf:
     * LAYER_DROP_ROWS rows of the widest adapted input, the dropped rows of one block. */
    int dropout;
    uint64_t forward_count;
    float *drop_buf;
    /* The call's per-row arguments, copied (the problem of a saved forward points here;
     * the arrays live in the caller's activation buffer after the layer's). */
    attn_mask mask;
} layer_acts;

/* Rows of one block of dropped inputs. */
#define LAYER_DROP_ROWS 256

/* Whether element (row, col) of target t's LoRA input is kept in training forward
 * forward_count of a layer seeded `seed` with dropout p: a counter-based hash
 * (docs/math.md#dropout) of those five values, so a mask needs no storage and no
 * order of evaluation. */
int layer_dropout_keep(uint64_t seed, uint64_t forward_count, int t, int64_t row,
                       int64_t col, double p);

/* Floats of activation storage for a call; self != 0 shares xq as xkv. Carve with
 * layer_acts_carve. Returns 0 when the count overflows size_t. */
size_t layer_acts_floats(const layer *l, const attn_problem *p, int self);
void layer_acts_carve(const layer *l, const attn_problem *p, int self, float *buf,
                      layer_acts *a);

/* Floats of scratch layer_forward / layer_backward need beyond the backend's own. */
size_t layer_scratch_floats(const layer *l, const attn_problem *p);

/* Forward in two steps, so the backends can be chosen from Q and K in between.
 * layer_project: a->q, a->k, a->v from a->xq, a->xkv (the inputs).
 * layer_attend: attention, each kv-head group on the backend its plan names (plan:
 * n_kv_heads entries, attn_dispatch_forward), and the output projection; out is
 * (batch·len_q, d_model) with out_proj, else (batch·len_q, q_dim). ws:
 * layer_scratch_floats floats, then attn_dispatch_workspace bytes. */
void layer_project(const layer *l, const attn_problem *p, layer_acts *a);
/* y (rows, out) = x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ of projection t (PROJ_*), no dropout; xa
 * (rows, rank) receives x·Aᵀ when t is adapted. wpanel: la_gemm_w_scratch_floats for
 * these rows (NULL when 0). x must be a library buffer (BLIS may read past its end). */
void layer_project_rows(const layer *l, int t, const la_ctx *la, int nt, const float *x,
                        int64_t rows, float *y, float *xa, float *wpanel);
/* RoPE's rotation of Q rows q (batch·len_q, q_dim) and K rows k (batch·len_kv, kv_dim)
 * by the positions of p (attn_q_pos, attn_kv_pos); inverse = 1 turns back (the
 * transpose: the backward of dQ, dK). No-op without RoPE. */
void layer_rope(const layer *l, const attn_problem *p, float *q, float *k, int inverse);
/* Turns `heads` consecutive heads of one row x by position pos (no-op without RoPE). */
void layer_rope_row(const layer *l, const la_ctx *la, int64_t pos, float *x, int64_t heads);
void layer_attend(const layer *l, const attn_group_plan *plan, const attn_problem *p,
                  layer_acts *a, float *out, float *ws, double *measured);

/* Accumulates dA, dB of adapted projections; dxq, dxkv (NULL or input-shaped) are
 * overwritten; dout is the caller's own copy (rows of padded queries are zeroed in it,
 * so their dout is ignored); for self-attention pass the same pointer as dxq and dxkv.
 * plan: the forward's. eta: the largest certified relative error of the attention probabilities
 * over the kv groups (0 when all ran exact). Certified absolute error bounds on every
 * returned gradient entry (MATH §4, docs/math.md; arithmetic outside η exact):
 * *grad_bound against the exact gradient for this dout; *loss_grad_bound against the
 * gradient of the true ½·Σ(out − Y)² when dout = out~ − Y came from lora_mse_loss on
 * the approximate output. *measured (both steps): attn_dispatch_measure's sampled
 * error. */
void layer_backward(const layer *l, const attn_group_plan *plan, const attn_problem *p,
                    const layer_acts *a, float *dout, float *dxq, float *dxkv,
                    float *ws, double eta, double *grad_bound, double *loss_grad_bound,
                    double *measured);

/* What the threshold estimator needs of self-attention's Q, K, V on x (p->batch ×
 * p->len_q rows, of which the valid ones count: p->mask's lengths), computed without
 * storing them: max |entry| of each (bias and LoRA included, Q and K turned by RoPE at
 * p's positions; index PROJ_Q/K/V) and the score bounds R of attn_score_bound per
 * kv-head group (group_r, n_kv_heads entries) and over all (score_bound), with the key
 * mean taken as x̄·W_Kᵀ + b_K (equal to the mean key up to rounding), or under RoPE
 * as the mean of the turned keys. */
typedef struct layer_qkv_stats_result {
    double max_abs[3];
    double score_bound;
    double *group_r; /* the caller's array */
} layer_qkv_stats_result;
/* ws: layer_qkv_stats_floats floats (0: the size overflows). Returns -1, or the
 * PROJ_* index of a projection whose merged weight W + s·B·A is not finite (out is
 * then not filled). */
size_t layer_qkv_stats_floats(const layer *l, const attn_problem *p);
int layer_qkv_stats(const layer *l, const attn_problem *p, const float *x, float *ws,
                    layer_qkv_stats_result *out);

#endif
