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

/* ---- tapes (tape.c) ---- */
/* Per-call extras a forward keeps for its backward beyond the activations: what the
 * call's arguments (lora_attn_args) and the adapter's counters were at that forward. */
typedef struct lora_call_state {
    uint64_t training_forward; /* the adapter's training-forward count at this forward
                                  (the dropout stream's key) */
} lora_call_state;

/* Everything one training forward saves for its backward. The adapter's own saved
 * forward (lora_forward / lora_backward) is one embedded in the handle; lora_tape_create
 * makes more. A tape copies its adapter's allocator and names the adapter by id, never
 * by pointer, so it neither dangles nor matches a later adapter at the same address. */
struct lora_tape {
    lora_mem mem;            /* the adapter's allocator (its activations come from it) */
    uint64_t owner_id;       /* lora_adapter.id of the adapter it belongs to */
    uint64_t generation;     /* the adapter's params_generation at the forward */
    lora_saved_kind kind;    /* SAVED_NONE: holds no forward */
    attn_problem problem;
    layer_acts acts;         /* carved from acts_buf */
    lora_buf acts_buf;
    attn_group_plan *groups; /* n_kv_heads entries: the plan the forward ran */
    double eta;              /* largest certified η of that plan (0 exact) */
    lora_call_state call;
};

struct lora_adapter {
    lora_mem mem;
    lora_config_values cfg; /* resolved */
    layer layer;
    la_ctx la;
    int threads;
    uint64_t id;                /* names the handle to its tapes (lora_new_handle_id) */
    uint64_t params_generation; /* bumped by lora_adapter_params_changed: a tape recorded
                                   under another value is stale */
    uint64_t training_forwards; /* training forwards recorded so far */
    lora_tape tape;             /* the built-in tape (lora_forward's saved forward); its
                                   groups are the third block of group_r */
    lora_buf scratch;
    lora_buf estimate_buf; /* lora_threshold_estimate's workspace (layer_qkv_stats) */
    /* Per kv-head group (n_kv_heads each, one block): the score bounds and backends
     * of the last plan (and the built-in tape's groups). */
    double *group_r;
    attn_group_plan *plan_groups;
    lora_run_info info;
    char err[LORA_ERRMSG_SIZE];
    /* serving: borrowed bases (serving.c), the merged-weight cache (merge.c) */
    unsigned char base_borrowed[PROJ_COUNT]; /* weight/bias of proj t are the caller's */
    float *merged[PROJ_COUNT]; /* W + s·B·A of adapted projections, NULL = none */
    int merged_valid;          /* merged[] matches the current base and factors */
    lora_buf infer_buf;        /* transient activations of forwards that save nothing
                                  (lora_forward_merged, LORA_FWD_INFER) */
    /* caller-owned factor and gradient storage (borrow.c): layer.proj[t].a/b/da/db
     * point either into own_factors[t] or to the caller's buffers */
    float *own_factors[PROJ_COUNT]; /* own a, b, da, db of projection t: one block */
    int factors_borrowed;           /* some factor's values live in caller memory */
    uint64_t borrowed_print;        /* their fingerprint when the library last saw them */
    /* 0.2 attention (attention.c): RoPE's inverse frequencies (ROPE_DIM/2, NULL without
     * RoPE; layer.rope_freqs points here). */
    double *rope_freqs;
};

/* Called by everything that changes a base weight, a factor or the scale: drops the
 * built-in tape, makes every other tape stale (params_generation) and drops the
 * merged-weight cache (params_changed.c). */
void lora_adapter_params_changed(lora_adapter *ad);
/* Notices writes the caller made into borrowed factors since the library last looked
 * (a fingerprint of their values) and then calls lora_adapter_params_changed. Every
 * entry point that uses derived state (a tape, the merged weights) calls it first. */
void lora_adapter_sync_borrowed(lora_adapter *ad);
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
    int run_backend;         /* the lora_backend the run reports: the approximate
                                backend of the first such group, else EXACT */
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
    const attn_mask *mask; /* NULL: no per-call arguments; else resolved, the caller's
                              arrays (copied into the activations by the forward) */
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

/* ---- tapes (tape.c) ---- */
/* A 64-bit id for a new handle, unlikely to repeat within a process (OS randomness,
 * else clocks and addresses mixed); never 0. */
uint64_t lora_new_handle_id(const void *salt);
/* Initialises t empty for ad (the built-in tape: groups is the handle's block). */
void lora_tape_init(lora_tape *t, const lora_adapter *ad, attn_group_plan *groups);
/* STATE (message in err) unless t belongs to ad. */
int lora_tape_check_owner(const lora_adapter *ad, const lora_tape *t, char *err);
/* STATE (message in ad->err) unless t holds a forward recorded under ad's current
 * parameters (builtin: the message names the 0.1 call to make). */
int lora_tape_check_replay(lora_adapter *ad, const lora_tape *t);
/* Records into t a finished forward of ad (its acts are already in t->acts). */
void lora_tape_record(lora_tape *t, lora_adapter *ad, const attn_problem *p,
                      const lora_plan *plan, lora_saved_kind kind);

/* Validates a forward's inputs (pointers, shapes, base weights, finiteness) and fills
 * the attention problem. xkv == xq for self-attention. */
int lora_check_inputs(lora_adapter *ad, const float *xq, const float *xkv, int64_t batch,
                      int64_t len_q, int64_t len_kv, int self, attn_problem *p);

/* RoPE's frequency table from ROPE_THETA (attention.c); LORA_ERR_NOMEM or LORA_OK. */
int lora_rope_init(lora_adapter *ad);
/* ad's RoPE table when lora_adapter_set_rope_freqs made it differ from THETA's (files
 * record it), else NULL; *n its length. */
const double *lora_rope_custom_freqs(const lora_adapter *ad, size_t *n);
/* Per-call arguments (attention.c). lora_mask_resolve: the mask fields of args with
 * the self-attention defaults (the key side takes the query side's arrays); returns 0
 * when every field is NULL. lora_mask_check: the values against p's shapes (lengths in
 * 0 .. len, self-attention kv_lens equal to q_lens, |positions| <= 2^52), with a
 * message naming the field. lora_mask_floats / lora_mask_copy: the arrays copied
 * into a float buffer (8-byte aligned), dst pointing at the copies. */
int lora_mask_resolve(const lora_attn_args *args, int self, attn_mask *m);
/* Reads the caller's lora_attn_args into *dst (compute.c): struct_size and flags
 * checked, zero past the caller's size. args NULL: all defaults. */
int lora_read_attn_args(lora_adapter *ad, const lora_attn_args *args, lora_attn_args *dst);
int lora_mask_check(lora_adapter *ad, const attn_problem *p, const attn_mask *m, int self);
size_t lora_mask_floats(const attn_problem *p, const attn_mask *m);
void lora_mask_copy(const attn_problem *p, const attn_mask *src, float *buf, attn_mask *dst);

/* PROJ_* index of a lora_target value (one bit), or -1. */
int lora_target_index(int target);
/* "Q", "K", "V", "O" by PROJ_* index, for messages. */
extern const char *const lora_proj_names[PROJ_COUNT];
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

/* Writes a printf-style message into a handle's error buffer and returns status. err
 * NULL writes nothing: a call on a const handle passes NULL (lora.h, Threads), since
 * it never writes to the handle. */
int lora_set_error(char *err, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Reads a caller's versioned args struct (its first field struct_size) into dst, which
 * holds the known bytes this library has: dst is zero-filled past what the caller's
 * struct holds, and a larger struct is accepted when the bytes beyond known are zero (a
 * newer caller asking for something this build lacks is refused, not ignored). args
 * NULL leaves dst zero. Errors: INVALID_ARG (struct_size < first), UNSUPPORTED. */
int lora_read_args_struct(char *err, const void *args, uint32_t struct_size, void *dst,
                          size_t known, size_t first, const char *type);
/* Index of the first non-finite entry of x[0..n), or -1. */
#define lora_find_nonfinite la_find_nonfinite

#endif
