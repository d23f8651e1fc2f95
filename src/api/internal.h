/* Handle layouts and helpers shared by the API layer (the only code that sees the
 * public ABI). */
#ifndef LORA_INTERNAL_H
#define LORA_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "../../include/lora.h"
#include "../backend/backend.h"
#include "../layer/layer.h"
#include "../linalg/linalg.h"
#include "config_params.h"

#define LORA_ERRMSG_SIZE 256
/* Largest accepted dimension (d_model, heads, head_dim, rank); products of dimensions
 * are also checked against size_t. */
#define LORA_MAX_DIM (INT64_C(1) << 24)

/* Every allocation the library makes goes through this: the default (posix_memalign,
 * already 64-byte aligned and padded) or a user's lora_allocator, which may return
 * memory of any alignment: then `wrap` is set and lora_mem_alloc over-allocates,
 * aligns and records the user's pointer in front of the block (alloc.c). */
typedef struct lora_mem {
    void *(*alloc)(void *opaque, size_t size);
    void (*free)(void *opaque, void *ptr);
    void *opaque;
    int wrap;
} lora_mem;

void *lora_mem_alloc(const lora_mem *m, size_t size);   /* 64-byte aligned, NULL on fail */
void *lora_mem_calloc(const lora_mem *m, size_t count, size_t size);
void lora_mem_free(const lora_mem *m, void *ptr);
extern const lora_mem lora_mem_default;

/* Config values, one field per row of config_params.h; set[p] marks the explicit ones
 * so derived defaults follow D_MODEL etc. */
typedef struct lora_config_values {
#define CFG_FIELD(num, name, field, type, low, high, def, flags) CFG_CTYPE_##type field;
    LORA_CONFIG_PARAMS(CFG_FIELD)
#undef CFG_FIELD
    unsigned char set[LORA_CFG_PARAM_END];
} lora_config_values;

struct lora_config {
    lora_mem mem;
    lora_config_values v;
    char err[LORA_ERRMSG_SIZE];
};

/* Resolves derived defaults and checks that the values fit together. On failure
 * writes a message into err and returns a status. */
int lora_config_resolve(const lora_config_values *in, lora_config_values *out, char *err);
int lora_config_values_get_int(const lora_config_values *v, int param, int64_t *value);
int lora_config_values_get_double(const lora_config_values *v, int param, double *value);

/* A growable, 64-byte aligned scratch buffer owned by a handle. */
typedef struct lora_buf {
    void *ptr;
    size_t size;
} lora_buf;
/* Grows b to at least size bytes (contents lost). 0 on success, LORA_ERR_NOMEM else. */
int lora_buf_reserve(const lora_mem *m, lora_buf *b, size_t size);
void lora_buf_free(const lora_mem *m, lora_buf *b);

typedef enum { SAVED_NONE = 0, SAVED_SELF = 1, SAVED_CROSS = 2 } lora_saved_kind;

struct lora_adapter {
    lora_mem mem;
    lora_config_values cfg; /* resolved */
    layer layer;
    la_ctx la;
    int threads;
    /* forward state */
    lora_saved_kind saved;
    attn_problem problem;
    layer_acts acts;
    lora_buf acts_buf;
    lora_buf scratch;
    lora_buf estimate_buf; /* lora_threshold_estimate's workspace (layer_qkv_stats) */
    double eta;            /* largest certified η of the saved forward (0 exact) */
    /* Per kv-head group (n_kv_heads each, one block): the score bounds and backends
     * of the last plan, and the plan the saved forward ran. */
    double *group_r;
    attn_group_plan *plan_groups, *saved_groups;
    lora_run_info info;
    char err[LORA_ERRMSG_SIZE];
    /* serving: borrowed bases (serving.c), the merged-weight cache (merge.c) */
    unsigned char base_borrowed[PROJ_COUNT]; /* weight/bias of proj t are the caller's */
    float *merged[PROJ_COUNT]; /* W + s·B·A of adapted projections, NULL = none */
    int merged_valid;          /* merged[] matches the current base and factors */
    lora_buf infer_buf;        /* lora_forward_merged's activations and scratch */
    /* 0.2 attention (attention.c): RoPE's inverse frequencies (ROPE_DIM/2, NULL without
     * RoPE; layer.rope_freqs points here) and the count of training forwards, which
     * keys the dropout masks. */
    double *rope_freqs;
    uint64_t training_forwards;
};

/* Called by everything that changes a base weight, a factor or the scale: drops the
 * saved forward and the merged-weight cache (params_changed.c). */
void lora_adapter_params_changed(lora_adapter *ad);
/* Frees what merge.c owns (merged weights, inference buffer); adapter_free_members. */
void lora_adapter_free_merged(lora_adapter *ad);

/* Flat views (flat.c). Floats of all factors of a layer (= of all its gradients). */
size_t lora_factor_floats(const layer *l);
/* Visits the factors (grad = 0) or gradients (grad = 1) in flat order: Q, K, V, O
 * (adapted ones), A then B; fn(ctx, block, len, offset in the flat vector) per block. */
typedef void (*lora_block_fn)(void *ctx, float *data, size_t len, size_t offset);
void lora_for_each_factor(const lora_adapter *ad, int grad, lora_block_fn fn, void *ctx);
/* Block functions: copy a block to / from the flat vector ctx (float *). */
void lora_flat_copy_out(void *ctx, float *data, size_t len, size_t offset);
void lora_flat_copy_in(void *ctx, float *data, size_t len, size_t offset);

/* The backend decision for one call, per kv-head group (AUTO, or a forced backend),
 * and what the run info reports of it. */
typedef struct lora_plan {
    attn_group_plan *groups; /* per kv group (the handle's plan_groups) */
    int64_t poly_groups;     /* kv groups on an approximate backend (POLY) */
    int64_t run_order;       /* over those: the largest order (POLY degree), its */
    int64_t run_features;    /* feature count, and the largest certified η (0 */
    double run_eta;          /* when every group runs exact) */
    double score_bound;      /* R, the largest over the groups */
} lora_plan;

/* Decides the backends from the projected Q and K of problem p (attn_dispatch_plan).
 * Errors: a forced backend's reason it cannot run (POLY: TOLERANCE when no degree
 * certifies the tolerance, UNSUPPORTED when the degree's features exceed the limits),
 * NOMEM. */
int lora_plan_call(lora_adapter *ad, const attn_problem *p, const float *q,
                   const float *k, lora_plan *plan);

/* One forward call's arguments. kind SAVED_SELF / SAVED_CROSS: a training forward
 * (keeps activations for its backward); SAVED_NONE: inference (lora_forward_merged). */
typedef struct lora_forward_args {
    const float *xq, *xkv; /* xkv == xq for self-attention */
    int64_t batch, len_q, len_kv;
    float *out;
    int self;
    lora_saved_kind kind;
} lora_forward_args;
/* Validates a call's inputs and output pointer, filling the attention problem. */
int lora_forward_begin(lora_adapter *ad, const lora_forward_args *a, attn_problem *p);
/* The forward core (compute.c), for layer l (the adapter's own, or merge.c's copy with
 * merged weights): copies the inputs into acts (carved from acts_buf), projects,
 * plans, reserves scratch, attends, checks that out is finite (NONFINITE, out
 * untouched, otherwise) and records the run. */
int lora_forward_layer(lora_adapter *ad, const layer *l, const lora_forward_args *a,
                       attn_problem *p, lora_buf *acts_buf, layer_acts *acts,
                       lora_plan *plan);

/* Validates a forward's inputs (pointers, shapes, base weights, finiteness) and fills
 * the attention problem. xkv == xq for self-attention. */
int lora_check_inputs(lora_adapter *ad, const float *xq, const float *xkv, int64_t batch,
                      int64_t len_q, int64_t len_kv, int self, attn_problem *p);

/* RoPE's frequency table from ROPE_THETA (attention.c); LORA_ERR_NOMEM or LORA_OK. */
int lora_rope_init(lora_adapter *ad);

/* PROJ_* index of a lora_target value (one bit), or -1. */
int lora_target_index(int target);
/* "Q", "K", "V", "O" by PROJ_* index, for messages. */
extern const char *const lora_proj_names[PROJ_COUNT];
/* The error buffer of a handle reached through a const pointer: scratch that
 * accessors may write. */
static inline char *lora_err_buf(const lora_adapter *ad) { return ((lora_adapter *)ad)->err; }
/* Validates a base weight (and optional bias) for target as set_base does; on success
 * *proj is its PROJ_* index. */
int lora_check_base(lora_adapter *ad, int target, const float *weight, const float *bias,
                    int *proj);
/* Floats at the front of the handle's scratch for library-owned copies of the caller's
 * gemm operands (BLIS kernels may read a float past an operand's end: only padded
 * library buffers are safe, docs/reliability.md): out, or dout in a backward
 * (rows_q, out width); then for kind SELF dx (rows_q, d_model), for kind CROSS dxq and
 * dxkv (rows_kv, d_model), then for both the gradients' values before the backward
 * (lora_factor_floats); SAVED_NONE (inference) has out only. A multiple of 16 floats
 * (64 bytes), so the layer's scratch after it keeps its alignment. */
size_t lora_io_floats(const layer *l, const attn_problem *p, lora_saved_kind kind);
/* Reserves the handle's scratch: io_floats (lora_io_floats), then layer_attend /
 * layer_backward's with plan's backends. */
int lora_reserve_scratch(lora_adapter *ad, const layer *l, const attn_problem *p,
                         const lora_plan *plan, size_t io_floats);
/* Records in ad->info what a forward with plan ran. */
void lora_record_run(lora_adapter *ad, const lora_plan *plan, double measured_out);

/* Writes a printf-style message into a handle's error buffer and returns status. */
int lora_set_error(char *err, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Index of the first non-finite entry of x[0..n), or -1. */
#define lora_find_nonfinite la_find_nonfinite

#endif
