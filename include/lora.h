/*
 * liblora: LoRA fine-tuning of transformer attention layers.
 *
 * Implements "Computational Limits of Low-Rank Adaptation (LoRA) Fine-Tuning for
 * Transformer Models" (Hu, Su, Kuo, Song, Liu; arXiv 2406.03136): an exact attention
 * gradient backend and the paper's nearly-linear polynomial-method backend, chosen
 * per call from a threshold estimate.
 *
 * Conventions (all of them, once):
 * - Every function that can fail returns an int holding a lora_status; LORA_OK is 0.
 *   Output parameters come first after the handle. Nothing aborts, exits or prints,
 *   with one exception: BLIS (inside) aborts if its own malloc fails. It allocates only
 *   while its buffer pools grow (the first products of the process, or more at once
 *   than before): one forward and backward at start-up, at full concurrency, avoids
 *   it (docs/threading.md).
 * - Tensors are dense, row-major float32 and owned by the caller. The library copies
 *   what it keeps. Shapes are written (rows, cols) or (batch, L, cols).
 * - Orientation is torch.nn.Linear / PEFT: a weight W is (out, in) and y = x·Wᵀ + b;
 *   LoRA factors are A (r, in) and B (out, r); the adapted weight is W + s·B·A with
 *   s = alpha/r (alpha/√r with rsLoRA).
 * - Threads: distinct handles are independent. A function that takes a handle as
 *   const (lora_config_get_*, lora_adapter_create's cfg, lora_adapter_get_*,
 *   lora_adapter_param_shape, lora_adapter_param_count, lora_adapter_merge/unmerge,
 *   lora_tape_create, lora_optimizer_create(_set), lora_optimizer_get_*, lora_apply's
 *   tenants, lora_*_last_error) never writes to it, not even an error message: any
 *   number of threads may call these on one handle at once, also while other threads
 *   create adapters from the same config or run lora_apply over the same tenants. A
 *   failed const call is reported by its status alone (each function's Errors line
 *   lists the causes): the handle's last_error keeps what it held and is not that
 *   call's detail (lora_apply_with_error writes lora_apply's into the caller's buffer).
 *   A call taking a handle as non-const (setters, forward, backward, optimizer steps,
 *   destroy) needs that handle to itself: no other call on it may run meanwhile
 *   (lora_apply states one exception). There is no process-global mutable state. An
 *   adapter's worker threads (LORA_CFG_THREADS) are its own: started on first use,
 *   joined by lora_adapter_destroy; concurrent calls that find them busy run on the
 *   calling thread alone, with the same results. fork() is safe (the child starts its
 *   own workers); when threads cannot be created, calls run on fewer with the same
 *   results (docs/threading.md).
 * - ABI: handles are opaque, enum and #define values are frozen (append only), and
 *   public structs are append-only and carry struct_size. Only lora_* symbols are
 *   exported. See docs/abi.md.
 */
#ifndef LORA_H
#define LORA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Export ---------------------------------------------------------------------- */
/* A vendoring build may define LORA_API itself (e.g. empty, for a static build). */
#ifndef LORA_API
#  if defined(_WIN32) && defined(LORA_BUILDING_DLL)
#    define LORA_API __declspec(dllexport)
#  elif defined(__GNUC__) && __GNUC__ >= 4
#    define LORA_API __attribute__((visibility("default")))
#  else
#    define LORA_API
#  endif
#endif

/* ---- Version ----------------------------------------------------------------------- */
/* The only place the version is written; the Makefile reads it from here. */
#define LORA_VERSION_MAJOR 0
#define LORA_VERSION_MINOR 1
#define LORA_VERSION_PATCH 0
#define LORA_VERSION_NUMBER \
    (LORA_VERSION_MAJOR * 10000 + LORA_VERSION_MINOR * 100 + LORA_VERSION_PATCH)

/* MAJOR*10000 + MINOR*100 + PATCH of the library actually loaded (compare with
 * LORA_VERSION_NUMBER to detect a header/library mismatch). Thread-safe. */
LORA_API uint32_t lora_version_number(void);
/* "MAJOR.MINOR.PATCH"; static storage, never NULL. Thread-safe. */
LORA_API const char *lora_version_string(void);

/* ---- Status codes -------------------------------------------------------------------- */
typedef enum lora_status {
    LORA_OK = 0,
    LORA_ERR_INVALID_ARG = 1, /* NULL pointer, out-of-range value, unknown enum/param */
    LORA_ERR_SHAPE = 2,       /* dimensions inconsistent, zero, negative or too large */
    LORA_ERR_NOMEM = 3,       /* an allocation failed; nothing was changed */
    LORA_ERR_NONFINITE = 4,   /* NaN or Inf in an input that must be finite */
    LORA_ERR_UNSUPPORTED = 5, /* valid request this build or backend cannot do */
    LORA_ERR_STATE = 6,       /* call out of order (e.g. backward before forward) */
    LORA_ERR_IO = 7,          /* file could not be opened, read or written */
    LORA_ERR_FORMAT = 8,      /* malformed file */
    LORA_ERR_TOLERANCE = 9    /* approximate backend forced, tolerance cannot be met */
} lora_status;

/* Short English text for a status ("invalid argument", ...); "unknown status" for a
 * value outside the enum. Static storage, never NULL. Thread-safe. */
LORA_API const char *lora_status_string(int status);

/* ---- Configuration --------------------------------------------------------------------- */
/* A config is a bag of (param, value) pairs, read once by lora_adapter_create (which
 * copies it). Setters check each value on its own; lora_adapter_create checks that the
 * values fit together. */
typedef struct lora_config lora_config;

typedef enum lora_config_param {
    LORA_CFG_D_MODEL = 1,       /* int > 0, required */
    LORA_CFG_N_HEADS = 2,       /* int > 0, default 1 */
    LORA_CFG_N_KV_HEADS = 3,    /* int > 0 dividing N_HEADS (GQA/MQA), default N_HEADS */
    LORA_CFG_HEAD_DIM = 4,      /* int > 0, default D_MODEL / N_HEADS */
    LORA_CFG_TARGETS = 5,       /* non-empty bitmask of lora_target, default Q|V */
    LORA_CFG_RANK = 6,          /* int > 0, default 8 */
    LORA_CFG_ALPHA = 7,         /* double (finite), default RANK, i.e. s = 1 */
    LORA_CFG_RSLORA = 8,        /* 0/1: s = alpha/sqrt(r) instead of alpha/r, default 0 */
    LORA_CFG_SOFTMAX_SCALE = 9, /* double > 0, default 1/sqrt(HEAD_DIM) */
    LORA_CFG_CAUSAL = 10,       /* 0/1, default 0. Cross-attention: key j is visible to
                                   query i when j <= i + (len_kv - len_q) (bottom-right
                                   aligned); len_q > len_kv is then LORA_ERR_SHAPE. */
    LORA_CFG_BACKEND = 11,      /* lora_backend, default LORA_BACKEND_AUTO */
    LORA_CFG_TOLERANCE = 12,    /* double > 0: certified bound eta on the entrywise
                                   relative error of the approximate attention
                                   probabilities, |F~ - F| <= eta*F. Default 1e-3 */
    LORA_CFG_POLY_DEGREE = 13,  /* 0 = chosen from TOLERANCE, else an even degree >= 2 */
    LORA_CFG_THREADS = 14,      /* 0 = library default (all cores), else exact count */
    LORA_CFG_SEED = 15,         /* uint64 seed for initialisation (cast), default 0 */
    LORA_CFG_INIT = 16,         /* lora_init, default LORA_INIT_KAIMING_ZERO */
    LORA_CFG_OUT_PROJ = 17,     /* 0/1: the layer has an output projection W_O, default 0 */
    LORA_CFG_MEASURE_ROWS = 18, /* int >= 0, default 0: when POLY runs, sample this many
                                   query rows per (batch, head), compute their exact
                                   attention rows (O(rows*L*HEAD_DIM)) and report the
                                   measured error in lora_run_info */
    /* 19-24: attention as real models compute it (docs/models.md). 25: bf16 products
     * (docs/compute.md); on a CPU without AVX512_BF16, lora_adapter_create refuses
     * LORA_COMPUTE_BF16 with LORA_ERR_UNSUPPORTED (lora_config_validate says why); the
     * environment variable LORA_DISABLE_BF16=1, read at create, masks the instructions. */
    LORA_CFG_ROPE = 19,         /* lora_rope, default LORA_ROPE_NONE: rotary position
                                   embedding of Q and K after projection (bias and LoRA
                                   included), per head, before the scores */
    LORA_CFG_ROPE_THETA = 20,   /* double > 0, default 10000: inv_freq[i] =
                                   THETA^(-2i/ROPE_DIM), i < ROPE_DIM/2 */
    LORA_CFG_ROPE_DIM = 21,     /* even int in [2, HEAD_DIM] (the upper bound checked by
                                   lora_adapter_create), default HEAD_DIM: only the first
                                   ROPE_DIM dims of each head rotate (partial rotary) */
    LORA_CFG_WINDOW = 22,       /* int >= 0, default 0 = none. Causal: key j is visible to
                                   query i only when 0 <= pos_i - pos_j < WINDOW;
                                   non-causal: |pos_i - pos_j| < WINDOW */
    LORA_CFG_SOFTCAP = 23,      /* double >= 0, default 0 = none: S <- c*tanh(S/c) after
                                   the softmax scale, before masking (Gemma 2) */
    LORA_CFG_DROPOUT = 24,      /* double in [0, 1), default 0: PEFT's lora_dropout on the
                                   input of every LoRA branch (inverted scaling 1/(1-p)),
                                   mask from SEED and the training-forward count;
                                   inference forwards never drop */
    LORA_CFG_COMPUTE = 25       /* lora_compute, default LORA_COMPUTE_F32 */
} lora_config_param;

typedef enum lora_target {
    LORA_TARGET_Q = 1,
    LORA_TARGET_K = 2,
    LORA_TARGET_V = 4,
    LORA_TARGET_O = 8 /* needs LORA_CFG_OUT_PROJ = 1 */
} lora_target;

typedef enum lora_backend {
    LORA_BACKEND_AUTO = 0,  /* choose per call from the threshold estimate */
    LORA_BACKEND_EXACT = 1, /* exact softmax attention, O(L^2) time */
    LORA_BACKEND_POLY = 2   /* polynomial method, nearly linear in L, approximate */
} lora_backend;

typedef enum lora_rope {
    LORA_ROPE_NONE = 0,       /* no rotary embedding */
    LORA_ROPE_HALF = 1,       /* HF Llama / GPT-NeoX "rotate_half": dim i pairs with
                                 i + ROPE_DIM/2 */
    LORA_ROPE_INTERLEAVED = 2 /* GPT-J / Meta checkpoints / GGUF llama: dim 2i pairs
                                 with 2i+1 */
} lora_rope;

typedef enum lora_compute {
    LORA_COMPUTE_F32 = 0, /* products in fp32 */
    LORA_COMPUTE_BF16 = 1 /* products take bf16 operands with fp32 accumulation;
                             statistics, factors, gradients and state stay fp32.
                             Which products: the base projections X*W^T and dY*W, and
                             exact attention's QK^T, PV, dO*V^T, dS*K, dS^T*Q, P^T*dO;
                             the LoRA products (rank r) and POLY stay fp32
                             (docs/compute.md) */
} lora_compute;

typedef enum lora_init {
    LORA_INIT_KAIMING_ZERO = 0, /* A ~ Kaiming-uniform (a = sqrt(5)), B = 0: as PEFT */
    LORA_INIT_GAUSSIAN = 1,     /* A ~ N(0, (1/r)^2), B = 0: PEFT's "gaussian" */
    LORA_INIT_ZERO = 2          /* A = 0, B = 0 */
} lora_init;

/* Creates a config holding every default. *out is NULL on failure.
 * Errors: INVALID_ARG (out NULL), NOMEM. */
LORA_API int lora_config_create(lora_config **out);
/* Frees a config. NULL is a no-op. */
LORA_API void lora_config_destroy(lora_config *cfg);
/* Sets an integer parameter. Errors: INVALID_ARG (NULL cfg, unknown param, a param
 * that takes a double, value out of range); the config is then unchanged. */
LORA_API int lora_config_set_int(lora_config *cfg, int param, int64_t value);
/* Sets a double parameter (ALPHA, SOFTMAX_SCALE, TOLERANCE, ROPE_THETA, SOFTCAP,
 * DROPOUT). Errors as set_int; a non-finite value is LORA_ERR_NONFINITE. ALPHA,
 * SOFTMAX_SCALE and SOFTCAP are computed in float: a value that does not fit one
 * (|value| > FLT_MAX, or nonzero below FLT_MIN) is LORA_ERR_INVALID_ARG. */
LORA_API int lora_config_set_double(lora_config *cfg, int param, double value);
/* Reads a parameter's effective value: an unset derived default is resolved from the
 * other values (HEAD_DIM = D_MODEL / N_HEADS, ...) and reads as 0 while it cannot be.
 * Errors: INVALID_ARG (NULL, unknown param, or wrong type). */
LORA_API int lora_config_get_int(const lora_config *cfg, int param, int64_t *value);
LORA_API int lora_config_get_double(const lora_config *cfg, int param, double *value);
/* Checks that the values fit together as lora_adapter_create does, and resolves
 * nothing. Returns the status create would return for them (NOMEM aside) and keeps the
 * reason, readable with lora_config_last_error. */
LORA_API int lora_config_validate(lora_config *cfg);
/* Detail of the last failed non-const call on this config ("" if none; const calls
 * such as the getters write no message). Owned by the config, valid until its next
 * non-const call. */
LORA_API const char *lora_config_last_error(const lora_config *cfg);

/* Memory hooks (as zstd's ZSTD_customMem). Every allocation liblora makes for a config
 * and for the adapters created from it goes through alloc and free; nothing is
 * allocated through any other route (BLIS's own internal buffers aside, the worker
 * threads' stacks, and cJSON's parse trees while an adapter file is read or written:
 * cJSON's hooks are global).
 * - alloc(user_data, size) returns size bytes or NULL; a NULL becomes LORA_ERR_NOMEM
 *   and the failed call changes nothing. It need not align: the library asks for up to
 *   192 bytes more and aligns every buffer to 64 bytes itself. free(user_data, ptr)
 *   receives exactly the pointers alloc returned, never NULL.
 * - Both functions must be set (or both NULL for the default allocator).
 * - They are called from the thread calling into liblora, never from its worker
 *   threads; handles used from several threads at once call them concurrently.
 * - The struct is copied: it need not outlive the call; user_data must outlive every
 *   handle using it. */
typedef struct lora_allocator {
    void *(*alloc)(void *user_data, size_t size);
    void (*free)(void *user_data, void *ptr);
    void *user_data;
} lora_allocator;

/* lora_config_create, with the config itself and every adapter created from it (see
 * lora_adapter_create) allocated through *allocator. allocator NULL, or both functions
 * NULL, is the default allocator (lora_config_create).
 * Errors: INVALID_ARG (out NULL, exactly one of alloc/free NULL), NOMEM. */
LORA_API int lora_config_create_with_allocator(lora_config **out,
                                               const lora_allocator *allocator);

/* ---- Adapter ----------------------------------------------------------------------------- */
/* One attention layer: frozen base projections W_Q, W_K, W_V (and W_O) with optional
 * frozen biases, plus trainable LoRA factors on the configured targets, their
 * gradients, and the state a backward needs from its forward. */
typedef struct lora_adapter lora_adapter;

typedef enum lora_factor { LORA_A = 0, LORA_B = 1 } lora_factor;

/* Creates an adapter from cfg (copied; cfg may be destroyed afterwards). LoRA factors
 * are initialised from LORA_CFG_INIT and LORA_CFG_SEED; gradients are zero; base
 * weights are unset. The adapter allocates through cfg's allocator
 * (lora_config_create_with_allocator) for its whole life.
 * Shapes, with q_dim = N_HEADS*HEAD_DIM and kv_dim = N_KV_HEADS*HEAD_DIM:
 *   W_Q (q_dim, D_MODEL)   W_K, W_V (kv_dim, D_MODEL)   W_O (D_MODEL, q_dim)
 * Errors: INVALID_ARG (NULL, D_MODEL unset, inconsistent values: N_KV_HEADS not
 * dividing N_HEADS, TARGET_O without OUT_PROJ, ...), SHAPE (sizes overflow), NOMEM.
 * cfg is only read, so several threads may create adapters from one config at once;
 * lora_config_validate tells why a config is refused. */
LORA_API int lora_adapter_create(lora_adapter **out, const lora_config *cfg);
/* Frees an adapter and everything it owns. NULL is a no-op. */
LORA_API void lora_adapter_destroy(lora_adapter *ad);

/* Copies a frozen base projection. target is one lora_target value (not a mask).
 * weight: (out, in) as above; bias: (out) or NULL for none. Setting a base again
 * replaces it; the next backward then needs a new forward (LORA_ERR_STATE).
 * Errors: INVALID_ARG (NULL ad/weight, bad target, TARGET_O without OUT_PROJ),
 * NONFINITE, NOMEM. */
LORA_API int lora_adapter_set_base(lora_adapter *ad, int target, const float *weight,
                                   const float *bias);

/* Replaces RoPE's inverse frequencies (THETA^(-2i/ROPE_DIM) by default) with inv_freq:
 * the route to linear, NTK, Llama 3 and YaRN scaling (docs/models.md). n must be
 * ROPE_DIM/2; values finite and >= 0 (copied). Pair i of every Q and K head then turns
 * by position*inv_freq[i] (angles in double). Drops the saved forward. Saved files
 * record a table other than THETA's, and loads restore it (docs/format-gguf.md).
 * Errors: INVALID_ARG (NULL, adapter without RoPE, wrong n, a negative value),
 * NONFINITE. */
LORA_API int lora_adapter_set_rope_freqs(lora_adapter *ad, const double *inv_freq, size_t n);

/* Copies LoRA factor `which` of `target` in (set) or out (get), or its accumulated
 * gradient out (get_grad). count must equal the factor's element count (r*in for A,
 * out*r for B; see lora_adapter_param_shape). set_param invalidates the saved forward.
 * Errors: INVALID_ARG (NULL, bad target/which, target not adapted, wrong count),
 * NONFINITE (set_param). */
LORA_API int lora_adapter_set_param(lora_adapter *ad, int target, int which,
                                    const float *src, size_t count);
LORA_API int lora_adapter_get_param(const lora_adapter *ad, int target, int which,
                                    float *dst, size_t count);
LORA_API int lora_adapter_get_grad(const lora_adapter *ad, int target, int which,
                                   float *dst, size_t count);
/* Shape of LoRA factor `which` of `target`: A is (rank, in), B is (out, rank).
 * Errors: INVALID_ARG (NULL, bad target/which, target not adapted). */
LORA_API int lora_adapter_param_shape(const lora_adapter *ad, int target, int which,
                                      int64_t *rows, int64_t *cols);
/* Resets every gradient to zero. Errors: INVALID_ARG (NULL). */
LORA_API int lora_adapter_zero_grad(lora_adapter *ad);
/* Reads a parameter of the adapter's (resolved) configuration, as
 * lora_config_get_int / _get_double. */
LORA_API int lora_adapter_get_config_int(const lora_adapter *ad, int param,
                                         int64_t *value);
LORA_API int lora_adapter_get_config_double(const lora_adapter *ad, int param,
                                            double *value);
/* Detail of the last failed non-const call on this adapter ("" if none; const calls
 * such as the getters write no message). Owned by the adapter, valid until its next
 * non-const call. NULL ad gives a static message. */
LORA_API const char *lora_adapter_last_error(const lora_adapter *ad);

/* Caller-owned storage for LoRA factor `which` of `target` and its gradient, used in
 * place with no copy (a numpy array, a torch.nn.Parameter and its .grad). param: NULL =
 * the adapter's own storage, else `count` floats (the factor's shape, row-major) whose
 * current values become the factor. grad: NULL = own storage, else `count` floats whose
 * current values become the accumulated gradient. Switching a borrowed buffer back to
 * own storage (NULL) copies its current values over. Borrowing new memory for the
 * factor is a parameter change (older tapes become stale); giving the buffer it already
 * uses (to borrow a new gradient buffer) is not.
 * Lifetime rule (as lora_adapter_set_base_borrowed): the buffers must stay valid until
 * ad is destroyed or this factor is borrowed again. The library writes them in place:
 * set_param, set_params_flat, copy_params and optimizer steps write param; backward,
 * zero_grad and set_grads_flat write grad. Give each buffer a few bytes of slack if it
 * may end at a page boundary (BLIS may read a float past an operand, docs/reliability.md).
 * Writes by the caller: the caller may change a borrowed factor between calls (an
 * optimizer step in another framework) without telling the library. Whenever a call
 * depends on earlier values (a backward of a recorded tape, lora_forward_merged's cached
 * merged weights) the library first compares a 64-bit fingerprint of the borrowed
 * factors with the one it last saw; a change counts as lora_adapter_set_param (older
 * tapes are LORA_ERR_STATE, merged weights are rebuilt). The check reads rank*(in+out)
 * floats per borrowed factor, far below a forward's cost, and cannot be forgotten the
 * way an explicit "parameters changed" call could. Writes into a borrowed gradient need
 * no notice.
 * Errors: INVALID_ARG (NULL ad, bad target/which, target not adapted, wrong count,
 * param == grad), NONFINITE (a NaN/Inf in param or grad); nothing changes then. */
LORA_API int lora_adapter_borrow_factor(lora_adapter *ad, int target, int which,
                                        float *param, float *grad, size_t count);

/* What the last forward or backward on an adapter ran. */
typedef struct lora_run_info {
    uint32_t struct_size;  /* caller sets sizeof(lora_run_info); fields only appended */
    int32_t backend;       /* LORA_BACKEND_POLY when POLY ran on at least one kv-head
                              group (see poly_groups), else _EXACT (0 before any
                              forward) */
    int64_t poly_degree;   /* largest even degree g POLY ran at, 0 for EXACT */
    int64_t poly_rank;     /* its feature columns k = binom(g + HEAD_DIM, HEAD_DIM) */
    double error_bound;    /* largest certified eta over the POLY groups: |F~ - F| <=
                              eta*F entrywise, float32 rounding of the features
                              included; the attention output then has |O~ - O| <=
                              eta*max|V|. 0 for EXACT */
    double grad_bound;     /* after backward: certified bound on the absolute error of
                              every returned gradient entry (dA, dB, dx) against the
                              exact gradient FOR THE dout GIVEN to this backward (other
                              arithmetic exact; docs/math.md). It does not cover the
                              error that dout itself carries when computed from POLY's
                              output: see loss_grad_bound. Includes RoPE's turning
                              back of dQ, dK (up to sqrt 2) and dropout's 1/(1 - p).
                              0 for EXACT */
    double score_bound;    /* R >= max |S_ij - c_i| of the last forward (see
                              lora_threshold_report); computed for every backend */
    double measured_out_error; /* with LORA_CFG_MEASURE_ROWS and POLY: max |O~ - O| /
                              max |O| over the sampled rows of the attention output
                              (the largest over runs of POLY groups); -1 when not
                              measured */
    double measured_dq_error;  /* after backward, the same for dL/dQ rows; -1 when not
                              measured */
    int64_t poly_groups;   /* kv-head groups (each with its N_HEADS / N_KV_HEADS query
                              heads) that ran POLY, each at the degree its own score
                              bound needs; the others ran EXACT */
    double loss_grad_bound; /* after backward: certified bound on the absolute error of
                              every returned gradient entry against the gradient of the
                              TRUE loss 1/2*sum (out - target)^2 when dout = out~ -
                              target came from lora_mse_loss on this forward's (POLY)
                              output out~: grad_bound plus the exact gradient map
                              applied to |out~ - out| <= eta*max|V| (times W_O's
                              largest row l1 norm with OUT_PROJ). For a loss whose
                              dout is c*(out~ - target) (lora_mse_loss_mean: c = 2/n)
                              the bound is grad_bound + c*(loss_grad_bound -
                              grad_bound). 0 for EXACT, 0 after a forward */
    int32_t attention_compute; /* LORA_COMPUTE_BF16 when the last forward's EXACT groups
                              took bf16 operands (LORA_CFG_COMPUTE = BF16 and HEAD_DIM a
                              multiple of 16); else LORA_COMPUTE_F32: F32 mode, every
                              group on POLY (POLY always computes in fp32), or a
                              HEAD_DIM the bf16 tiles do not take. The projections
                              follow LORA_CFG_COMPUTE alone */
} lora_run_info;

/* Fills *info (up to info->struct_size bytes). Errors: INVALID_ARG (NULL, struct_size
 * smaller than the first version of the struct). */
LORA_API int lora_adapter_get_run_info(const lora_adapter *ad, lora_run_info *info);

/* ---- Compute ----------------------------------------------------------------------------- */
/* Flags of a forward's per-call arguments (the flags field of the 0.2 per-call
 * argument struct). */
typedef enum lora_forward_flag {
    LORA_FWD_INFER = 1 /* save nothing for backward, no dropout: parameters, gradients
                          and every saved forward stay untouched */
} lora_forward_flag;

/* Self-attention forward.
 * x:   (batch, seq_len, D_MODEL), finite.
 * out: (batch, seq_len, D_MODEL) with OUT_PROJ, else (batch, seq_len, q_dim).
 * Keeps what backward needs (a copy of x and the activations: O(batch*seq_len*width)).
 * Errors: INVALID_ARG (NULL), SHAPE (batch or seq_len < 1, sizes overflow), STATE (a
 * base weight unset), NONFINITE (x, or an output entry that overflows float: finite
 * inputs too large for the layer), NOMEM, TOLERANCE (POLY forced, unreachable).
 * On failure out is unspecified (untouched for NONFINITE) and the adapter keeps its
 * parameters and gradients (the saved forward is dropped). */
LORA_API int lora_forward(lora_adapter *ad, const float *x, int64_t batch,
                          int64_t seq_len, float *out);
/* Backward of the last lora_forward. dout has out's shape, finite. Adds dL/dA and
 * dL/dB of every target into the adapter's gradients (accumulates, as torch; see
 * lora_adapter_zero_grad). dx: NULL or (batch, seq_len, D_MODEL), overwritten with
 * dL/dx. May be called more than once per forward.
 * Errors: INVALID_ARG (NULL ad/dout), STATE (no saved lora_forward), NONFINITE (dout,
 * or a gradient or dx entry that overflows float), NOMEM; on failure the gradients and
 * dx are unchanged and the saved forward is kept. */
LORA_API int lora_backward(lora_adapter *ad, const float *dout, float *dx);
/* Cross-attention: queries from xq (batch, len_q, D_MODEL), keys and values from xkv
 * (batch, len_kv, D_MODEL). out is (batch, len_q, ...) as for lora_forward. Causal
 * alignment: see LORA_CFG_CAUSAL. Errors as lora_forward. */
LORA_API int lora_forward_cross(lora_adapter *ad, const float *xq, const float *xkv,
                                int64_t batch, int64_t len_q, int64_t len_kv,
                                float *out);
/* Backward of the last lora_forward_cross (LORA_ERR_STATE after a lora_forward).
 * dxq, dxkv: NULL or their input's shape, overwritten. */
LORA_API int lora_backward_cross(lora_adapter *ad, const float *dout, float *dxq,
                                 float *dxkv);
/* The paper's loss: *loss = 1/2 * sum_i (out_i - target_i)^2 accumulated in double;
 * dout (NULL or n floats) = out - target. Errors: INVALID_ARG (NULL, n = 0),
 * NONFINITE (out or target, or a dout entry that overflows float; *loss and dout are
 * then unchanged). Thread-safe (no handle). */
LORA_API int lora_mse_loss(const float *out, const float *target, size_t n,
                           double *loss, float *dout);
/* torch.nn.MSELoss's mean reduction: *loss = (1/n) * sum_i (out_i - target_i)^2
 * accumulated in double; dout (NULL or n floats) = (2/n) * (out - target), its gradient.
 * Learning rates tuned with torch.nn.MSELoss carry over. Errors as lora_mse_loss.
 * Thread-safe (no handle). */
LORA_API int lora_mse_loss_mean(const float *out, const float *target, size_t n,
                                double *loss, float *dout);

/* ---- Per-call arguments and tapes (0.2) -------------------------------------------- */
/* A tape holds what one training forward saved for its backward, so any number of
 * forwards can be in flight (layer reuse, weight tying, chosen/rejected pairs,
 * activation checkpointing): each backward reads its own tape. The adapter's own saved
 * forward (lora_forward / lora_backward) is a built-in tape.
 * - A tape belongs to the adapter it was created for; using it with another adapter is
 *   LORA_ERR_STATE (the tape names its adapter by an id, not by address).
 * - A backward whose tape was recorded before the adapter's parameters or base weights
 *   changed (set_param, set_params_flat, an optimizer step, set_base, copy_params, ...)
 *   is LORA_ERR_STATE, never a silently wrong gradient. A tape may be backwarded more
 *   than once; recording into it again replaces what it held.
 * - Memory: a tape's activations (O(batch*len*width), as lora_forward keeps) come from
 *   the adapter's allocator, held by the tape until lora_tape_destroy. Destroying the
 *   adapter first is allowed: its tapes then only accept lora_tape_destroy (the
 *   allocator's user_data must still be valid). */
typedef struct lora_tape lora_tape;

typedef struct lora_attn_args {
    uint32_t struct_size;  /* sizeof(lora_attn_args); fields only appended */
    uint32_t flags;        /* lora_forward_flag bits: LORA_FWD_INFER = 1: save nothing
                              for backward, no dropout; parameters, gradients and every
                              saved forward stay untouched */
    const int64_t *q_lens; /* NULL or (batch): valid query rows per batch element (right
                              padding). Padded rows: their rows of out are 0 (after W_O
                              and its bias too), their dout is ignored, they are never
                              attended, their dx rows are 0 */
    const int64_t *kv_lens; /* NULL or (batch): valid keys; NULL in self-attention means
                              q_lens */
    const int64_t *q_pos;  /* NULL or (batch, len_q) positions used by RoPE, causal and
                              WINDOW. Default: (len_kv - len_q) + i */
    const int64_t *kv_pos; /* NULL or (batch, len_kv). Default: j */
    const int32_t *q_seg;  /* NULL or (batch, len_q): query i sees key j only when
                              q_seg == kv_seg (packed sequences) */
    const int32_t *kv_seg; /* NULL or (batch, len_kv); NULL in self-attention means q_seg */
    lora_tape *tape;       /* NULL: the adapter's own saved forward (as lora_forward);
                              else this tape keeps what the backward needs */
} lora_attn_args;

/* Creates an empty tape for ad (it holds no forward until lora_forward_ex records one).
 * Allocates through ad's allocator. *out is NULL on failure.
 * Errors: INVALID_ARG (out or ad NULL), NOMEM (ad is const: no message, see Threads
 * at the top). */
LORA_API int lora_tape_create(lora_tape **out, const lora_adapter *ad);
/* Frees a tape and its activations (also after its adapter was destroyed). NULL is a
 * no-op. */
LORA_API void lora_tape_destroy(lora_tape *tape);

/* Forward with per-call arguments. xq (batch, len_q, D_MODEL); xkv NULL =
 * self-attention on xq (then len_kv must equal len_q), else (batch, len_kv, D_MODEL);
 * out as lora_forward's. args NULL = all defaults: then this equals lora_forward /
 * lora_forward_cross bitwise. A training forward (no LORA_FWD_INFER) records into
 * args->tape, or into the adapter's own saved forward when that is NULL.
 * args->struct_size: at least the 0.2 size; a larger struct is accepted when the bytes
 * beyond the fields this library knows are zero (UNSUPPORTED otherwise).
 * The mask fields (q_lens ... kv_seg) are checked: lengths in 0 .. len (SHAPE), in
 * self-attention kv_lens equal to q_lens (SHAPE), positions within +-2^52
 * (INVALID_ARG). Both backends run them. POLY needs each packed sequence's rows
 * together in ascending segment ids and, when causal, positions that never decrease
 * within a sequence; other layouts run on EXACT (AUTO; forced POLY: UNSUPPORTED naming
 * the array), as do WINDOW and SOFTCAP.
 * Errors: as lora_forward, plus INVALID_ARG (struct_size too small, unknown flags),
 * SHAPE (xkv NULL with len_kv != len_q), STATE (args->tape of another adapter),
 * UNSUPPORTED. A refused args struct changes nothing; otherwise on failure the tape it
 * records into holds no forward (as lora_forward). */
LORA_API int lora_forward_ex(lora_adapter *ad, const lora_attn_args *args, const float *xq,
                             const float *xkv, int64_t batch, int64_t len_q, int64_t len_kv,
                             float *out);
/* Backward of the forward recorded in tape (NULL: the adapter's own saved forward, of
 * either kind). dout has that forward's out shape. Gradients accumulate as
 * lora_backward's. For a self-attention forward dxkv must be NULL and dxq (NULL or
 * (batch, len, D_MODEL)) receives the whole dL/dx; for cross-attention dxq and dxkv are
 * NULL or distinct buffers of their input's shape. The tape is kept.
 * Errors: INVALID_ARG (ad or dout NULL, dxkv set for a self-attention tape, dxq == dxkv),
 * STATE (the tape holds no forward, was recorded before a parameter or base change, or
 * belongs to another adapter), NONFINITE, NOMEM; on failure the gradients and dx are
 * unchanged. */
LORA_API int lora_backward_ex(lora_adapter *ad, lora_tape *tape, const float *dout,
                              float *dxq, float *dxkv);

/* ---- Threshold estimator ------------------------------------------------------------ */
/* What the paper's threshold says about one input, and what AUTO would do with it.
 * The polynomial backend pays when the score bound R is small (degree g stays low),
 * the head is narrow (k = binom(g + HEAD_DIM, HEAD_DIM) columns) and L is long. */
typedef struct lora_threshold_report {
    uint32_t struct_size;        /* caller sets sizeof(lora_threshold_report); fields are
                                    only appended */
    int32_t recommended_backend; /* what LORA_BACKEND_AUTO runs for this input:
                                    LORA_BACKEND_POLY when it runs POLY on at least one
                                    kv-head group (poly_groups), else _EXACT */
    double gamma_q, gamma_k, gamma_v; /* max |entry| of Q, K, V as the forward computes
                                    them (adapted weights, bias included): the paper's Γ */
    double gamma_ratio;          /* max(gamma_q, gamma_k) / sqrt(ln L), L = seq_len
                                    (ln 2 for L = 1): the paper's statistic */
    double score_bound;          /* R >= max |S_ij - c_i| over heads and batch, softmax
                                    scale included; c_i = β·q_i·mean_j(k_j), the exact
                                    per-row shift of key centring (the mean over the
                                    batch element's valid keys, all segments) */
    int64_t poly_degree;         /* even degree POLY needs at R (the most any kv-head
                                    group needs): LORA_CFG_POLY_DEGREE if set, else the
                                    smallest meeting TOLERANCE (0: none within limits) */
    int64_t poly_rank;           /* feature columns k = binom(g + HEAD_DIM, HEAD_DIM) */
    double error_bound;          /* certified eta at that degree: |F~ - F| <= eta*F */
    double flops_exact, flops_poly; /* modelled flops of one forward+backward of the
                                    attention core (projections excluded): EXACT on
                                    every group; and what AUTO runs when poly_groups > 0
                                    (those groups on POLY at their own degrees, the
                                    others EXACT), else POLY on every group at its own
                                    degree (INFINITY when a group has none) */
    int64_t poly_groups;         /* kv-head groups AUTO runs on POLY: a group goes POLY
                                    when a degree certifies TOLERANCE at its own R and
                                    its modelled POLY flops times the calibrated rate
                                    ratio of its HEAD_DIM (docs/backends.md) are below
                                    its EXACT flops */
} lora_threshold_report;

/* Estimates the threshold statistics for self-attention on x (batch, seq_len, D_MODEL)
 * with the adapter's current weights. Does not touch the saved forward or gradients.
 * Cost O(batch*seq_len*D_MODEL*(Q_DIM + 2*KV_DIM)): one product with the merged
 * weights [W_Q; W_K; W_V] + s*B*A in row blocks, Q, K, V never stored, plus
 * O(L*HEAD_DIM) per head. score_bound equals a forward's up to float rounding.
 * Errors: as lora_forward (INVALID_ARG, SHAPE, STATE, NONFINITE, NOMEM), NONFINITE
 * when a merged weight overflows, and INVALID_ARG when report->struct_size is smaller
 * than its first version. */
LORA_API int lora_threshold_estimate(lora_adapter *ad, const float *x, int64_t batch,
                                     int64_t seq_len, lora_threshold_report *report);
/* lora_threshold_estimate for the self-attention call lora_forward_ex(ad, args, x, NULL,
 * batch, seq_len, seq_len, ...) would make: the statistics over the valid rows
 * (q_lens), Q and K turned by RoPE at args' positions, and what AUTO would do with
 * them: the flops of both backends count the valid rows and, for EXACT, the pairs
 * within segments; layouts POLY refuses (lora_forward_ex) plan EXACT. args NULL equals
 * lora_threshold_estimate; args->flags and args->tape are ignored. Errors: as
 * lora_threshold_estimate and lora_forward_ex's argument checks. */
LORA_API int lora_threshold_estimate_ex(lora_adapter *ad, const lora_attn_args *args,
                                        const float *x, int64_t batch, int64_t seq_len,
                                        lora_threshold_report *report);

/* ---- Optimizer ------------------------------------------------------------------------ */
/* Updates every LoRA factor of an adapter from its accumulated gradients, with state
 * (moments, step count) inside an opaque handle. The update rules are PyTorch's
 * (torch.optim.AdamW, torch.optim.SGD, torch.nn.utils.clip_grad_norm_); see
 * docs/training.md. Parameters are zstd-style (param, value) pairs, like the config. */
typedef struct lora_optimizer lora_optimizer;

typedef enum lora_optimizer_kind {
    LORA_OPTIMIZER_ADAMW = 0, /* AdamW, decoupled weight decay, bias correction (amsgrad
                                 off), as torch.optim.AdamW */
    LORA_OPTIMIZER_SGD = 1    /* SGD with optional momentum/Nesterov and L2 weight decay
                                 added to the gradient, as torch.optim.SGD */
} lora_optimizer_kind;

typedef enum lora_optimizer_param {
    LORA_OPT_LR = 1,            /* double >= 0, default 1e-3 */
    LORA_OPT_BETA1 = 2,         /* AdamW: double in [0, 1), default 0.9 */
    LORA_OPT_BETA2 = 3,         /* AdamW: double in [0, 1), default 0.999 */
    LORA_OPT_EPS = 4,           /* AdamW: double >= 0, default 1e-8 */
    LORA_OPT_WEIGHT_DECAY = 5,  /* double >= 0. AdamW: p -= lr*wd*p before the update,
                                   default 0.01. SGD: g += wd*p, default 0 */
    LORA_OPT_MOMENTUM = 6,      /* SGD: double >= 0, default 0 (plain SGD) */
    LORA_OPT_DAMPENING = 7,     /* SGD: double in [0, 1], default 0 */
    LORA_OPT_NESTEROV = 8,      /* SGD: int 0/1, default 0; needs MOMENTUM > 0 and
                                   DAMPENING = 0 at the step */
    LORA_OPT_MAX_GRAD_NORM = 9, /* double >= 0: before the update, scale all gradients by
                                   min(1, max/(norm + 1e-6)) where norm is their global L2
                                   norm (clip_grad_norm_); 0 = no clipping (default) */
    LORA_OPT_STEP = 10,         /* int, read-only: steps taken since create or reset */
    LORA_OPT_GRAD_NORM = 11     /* double, read-only: global L2 norm of the gradients at
                                   the last step, before clipping; -1 before any step */
} lora_optimizer_param;

/* Creates an optimizer of `kind` (lora_optimizer_kind) for adapters shaped like ad
 * (same targets, rank and projection sizes); state zero, step 0. It allocates through
 * ad's allocator and keeps no pointer to ad. *out is NULL on failure.
 * Errors: INVALID_ARG (NULL, unknown kind), NOMEM (ad is const: no message, see
 * Threads at the top). */
LORA_API int lora_optimizer_create(lora_optimizer **out, const lora_adapter *ad, int kind);
/* Frees an optimizer. NULL is a no-op. */
LORA_API void lora_optimizer_destroy(lora_optimizer *opt);
/* Set a parameter; may be called between steps (learning-rate schedules). Errors:
 * INVALID_ARG (NULL, unknown or read-only param, param of the other kind, wrong type,
 * out of range), NONFINITE (set_double); the optimizer is then unchanged. */
LORA_API int lora_optimizer_set_int(lora_optimizer *opt, int param, int64_t value);
LORA_API int lora_optimizer_set_double(lora_optimizer *opt, int param, double value);
/* Read a parameter (STEP and GRAD_NORM included). Errors: INVALID_ARG (NULL, unknown
 * param, wrong type, param of the other kind). */
LORA_API int lora_optimizer_get_int(const lora_optimizer *opt, int param, int64_t *value);
LORA_API int lora_optimizer_get_double(const lora_optimizer *opt, int param,
                                       double *value);
/* One update of every LoRA factor of ad from its gradients (as accumulated by
 * lora_backward; the gradients themselves are not modified, clipping included: call
 * lora_adapter_zero_grad before the next accumulation). Increments STEP, sets GRAD_NORM,
 * drops ad's saved forward. Arithmetic is double per element; state is double.
 * Errors: INVALID_ARG (NULL, ad shaped unlike the optimizer's adapter, an optimizer made
 * for a set of more than one adapter, NESTEROV without MOMENTUM > 0 and DAMPENING = 0),
 * NONFINITE (a gradient is NaN/Inf, or an update would
 * make a parameter non-finite). On failure nothing changes (adapter and state). The
 * message is in lora_optimizer_last_error. */
LORA_API int lora_optimizer_step(lora_optimizer *opt, lora_adapter *ad);
/* Zeroes the state (moments, momentum buffers) and the step count; keeps parameters.
 * Errors: INVALID_ARG (NULL). */
LORA_API int lora_optimizer_reset(lora_optimizer *opt);
/* Detail of the last failed non-const call on this optimizer ("" if none; the getters
 * write no message); NULL gives a static message. */
LORA_API const char *lora_optimizer_last_error(const lora_optimizer *opt);

/* All LoRA factors (or their gradients) of an adapter as one flat vector, for
 * data-parallel averaging (one MPI_Allreduce), checkpoints and bindings. Order: targets
 * Q, K, V, O (adapted ones only), for each A (rank, in) then B (out, rank), row-major.
 * *count receives the total number of floats. set_params_flat checks every value
 * before copying (NONFINITE) and drops the saved forward; set_grads_flat overwrites
 * the accumulated gradients (NONFINITE checked too).
 * Errors: INVALID_ARG (NULL, count not equal to lora_adapter_param_count), NONFINITE. */
LORA_API int lora_adapter_param_count(const lora_adapter *ad, size_t *count);
LORA_API int lora_adapter_get_params_flat(const lora_adapter *ad, float *dst, size_t count);
LORA_API int lora_adapter_set_params_flat(lora_adapter *ad, const float *src, size_t count);
LORA_API int lora_adapter_get_grads_flat(const lora_adapter *ad, float *dst, size_t count);
LORA_API int lora_adapter_set_grads_flat(lora_adapter *ad, const float *src, size_t count);

/* One optimizer over a set of adapters (the LoRA layers of a whole model), as
 * torch.optim over model.parameters(): the state covers every factor of the set, and
 * LORA_OPT_MAX_GRAD_NORM clips by the global L2 norm over all of them (PyTorch's
 * clip_grad_norm_(model.parameters())); GRAD_NORM reports that norm. lora_optimizer_create
 * is this with the set of one adapter. The optimizer keeps the shapes of adapters[0..n-1],
 * in order, and no pointer to them; it allocates through adapters[0]'s allocator.
 * Errors: INVALID_ARG (out or adapters NULL, n = 0, an entry NULL or repeated, unknown
 * kind), NOMEM; *out is NULL on failure (the adapters are const: no message, see
 * Threads at the top). */
LORA_API int lora_optimizer_create_set(lora_optimizer **out,
                                       const lora_adapter *const *adapters, size_t n,
                                       int kind);
/* One update of every factor of the set from the gradients (see lora_optimizer_step):
 * adapters[i] must be shaped as the i-th adapter given at creation, n the same count,
 * no entry repeated. lora_optimizer_step(opt, ad) works only for a set of one.
 * Errors as lora_optimizer_step, plus INVALID_ARG (adapters NULL, n unlike the
 * creation's, an entry NULL or repeated). On failure no adapter and no state changes. */
LORA_API int lora_optimizer_step_set(lora_optimizer *opt, lora_adapter *const *adapters,
                                     size_t n);

/* ---- Merge and serving ----------------------------------------------------------------- */
/* Merges target's LoRA term into a caller-owned weight, in place: weight (out, in),
 * holding W on entry, receives W + s*B*A (s = alpha/r, or alpha/sqrt(r) with rsLoRA, in
 * double); unmerge subtracts it back. Each entry's r-term sum and the addition are done
 * in double and rounded to float once. As PEFT's safe_merge, every result is checked
 * before anything is written: a NaN/Inf in weight or in a result is LORA_ERR_NONFINITE
 * and leaves weight untouched.
 * Round trip: unmerge(merge(W)) = W' with, entrywise and with eps = FLT_EPSILON = 2^-23,
 *     |W' - W| <= eps*(1 + 2^-22)*(|W| + s*(|B|*|A|)) + 2^-148
 * where |B|*|A| is the product of the entrywise absolute values (derivation and
 * measurements in docs/training.md). With B = 0 the round trip is exact.
 * count must be out*in of target. The adapter is not changed (weight may be its base
 * weight's buffer only when that is borrowed, and merging into a borrowed base breaks
 * the borrow's lifetime rule while adapters use it).
 * Errors: INVALID_ARG (NULL, bad target, target not adapted, wrong count), NONFINITE. */
LORA_API int lora_adapter_merge(const lora_adapter *ad, int target, float *weight,
                                size_t count);
LORA_API int lora_adapter_unmerge(const lora_adapter *ad, int target, float *weight,
                                  size_t count);

/* Inference forward with merged weights: the same output as lora_forward (up to float
 * rounding) computed as x*(W + s*B*A)^T + bias, with no LoRA branch. The adapter keeps
 * its merged weights (one (out, in) float matrix per adapted projection, made as
 * lora_adapter_merge makes them) and rebuilds them only after its base or factors
 * change. Saves no activations: the saved forward, the gradients and the parameters are
 * untouched, so it may be interleaved with training steps. Shapes, backend choice,
 * run info and errors as lora_forward / lora_forward_cross (NONFINITE also when a
 * merged weight overflows). */
LORA_API int lora_forward_merged(lora_adapter *ad, const float *x, int64_t batch,
                                 int64_t seq_len, float *out);
LORA_API int lora_forward_merged_cross(lora_adapter *ad, const float *xq, const float *xkv,
                                       int64_t batch, int64_t len_q, int64_t len_kv,
                                       float *out);

/* Uses a caller-owned frozen base projection without copying it, so many adapters
 * share one base (multi-adapter serving). Arguments and checks as
 * lora_adapter_set_base (the buffers are read once for NaN/Inf).
 * Lifetime rule: weight (and bias, if not NULL) must stay valid and unchanged until
 * ad is destroyed or this target's base is replaced (set_base or set_base_borrowed
 * again). The library never writes to them. Several threads may run forwards of
 * different adapters borrowing the same buffers at once.
 * Errors: as lora_adapter_set_base (NOMEM aside). */
LORA_API int lora_adapter_set_base_borrowed(lora_adapter *ad, int target,
                                            const float *weight, const float *bias);

/* Element types of base weights (lora_adapter_set_base_typed). 16-bit values are in
 * host byte order (little-endian on x86-64 and AArch64 Linux): a safetensors or GGUF
 * tensor's bytes as stored. */
typedef enum lora_dtype {
    LORA_DTYPE_F32 = 0,  /* float */
    LORA_DTYPE_BF16 = 1, /* bfloat16: the top 16 bits of a float */
    LORA_DTYPE_F16 = 2   /* IEEE 754 binary16 (half) */
} lora_dtype;

/* Flags of lora_adapter_set_base_typed. */
#define LORA_BASE_BORROW 1u /* use the caller's buffers without copying (the lifetime rule
                               of lora_adapter_set_base_borrowed applies) */

/* Sets a frozen base projection whose weight is stored as `dtype`: a server keeps its
 * checkpoint in bf16 and shares it between adapters at half the memory of float.
 * weight: (out, in) elements of dtype; bias: (out) floats or NULL. flags 0 copies both
 * (the copy keeps the dtype: a bf16 base costs 2 bytes per weight), LORA_BASE_BORROW
 * borrows them. Products convert the weight to float on the fly and accumulate in
 * float; LoRA factors, activations and gradients stay float. The result equals that of
 * a float base holding the same (converted, exact) values up to float rounding, in
 * lora_forward, lora_backward (dx, dA, dB), lora_forward_merged (whose merged weights
 * are float: out*in*4 bytes per adapted projection) and lora_threshold_estimate.
 * x*W^T with up to 16 rows on AVX-512 reads the weight once, converting in registers;
 * other products (more rows, dx, no AVX-512) convert it in row panels of up to 4 MiB
 * of float, kept with the forward's activations.
 * lora_adapter_set_base(ad, t, w, b) is this with LORA_DTYPE_F32 and flags 0;
 * lora_adapter_set_base_borrowed with LORA_BASE_BORROW. Setting a base drops the saved
 * forward and the merged weights, as lora_adapter_set_base does.
 * Errors: INVALID_ARG (NULL ad/weight, bad target, TARGET_O without OUT_PROJ, a flag
 * other than LORA_BASE_BORROW), UNSUPPORTED (dtype not a lora_dtype value of this
 * version), NONFINITE (a NaN/Inf weight, in its own dtype's encoding, or bias), NOMEM;
 * the adapter is then unchanged. */
LORA_API int lora_adapter_set_base_typed(lora_adapter *ad, int target, const void *weight,
                                         int dtype, const float *bias, uint32_t flags);

/* Hot swap: copies src's LoRA factors and scaling (alpha, rsLoRA) into dst, leaving
 * dst's base weights, backend settings, buffers and gradients alone; dst's saved
 * forward is dropped. A server keeps one working adapter per thread (borrowing the
 * base) and copies the requested tenant's factors in, O(rank*(in+out)) per target;
 * or it keeps one adapter per tenant, all borrowing the base, and calls the one it
 * needs. Errors: INVALID_ARG (NULL, src and dst differ in targets, rank or projection
 * sizes; the message is in dst). */
LORA_API int lora_adapter_copy_params(lora_adapter *dst, const lora_adapter *src);

/* Many tenants in one batch (the CPU counterpart of Punica's SGMV / S-LoRA): for each
 * row r of x (rows, in) whose tenant t = tenant_of_row[r] is >= 0,
 *     y[r] += s_t * (x[r] * A_t^T) * B_t^T
 * with tenant t's factors A_t (rank_t, in), B_t (out, rank_t) and scale s_t of `target`
 * (one lora_target value); rows with -1 are neither read nor written. Every tenant must
 * adapt `target` with the same (in, out); ranks and scales may differ. Base weights and
 * biases are not involved (add the shared base projection yourself, once for the whole
 * batch). Rows are grouped by tenant inside, so each tenant's factors are read once per
 * call, not once per row. y must not overlap x. rows = 0 is a no-op (tenant_of_row, x
 * and y may then be NULL). The result is bitwise the same for any number of threads.
 * Threads: the tenants are only read (nothing is written to them, not even an error
 * message), so any number of threads may call lora_apply on the same tenants at once,
 * also while those tenants run calls that leave their factors and scale alone
 * (forwards, merges, getters); a call changing a tenant (set_param, copy_params into
 * it, an optimizer step, destroy) needs it to itself. It allocates transient workspace
 * through tenants[0]'s allocator and runs on tenants[0]'s worker threads (its
 * LORA_CFG_THREADS); while those are busy (a concurrent lora_apply with the same
 * tenants[0], or a call running on tenants[0]) it runs on the calling thread alone,
 * with the same result. See docs/serving.md.
 * Errors: INVALID_ARG (tenants, tenant_of_row, x or y NULL, n_tenants 0 or > 2^31-1,
 * a tenants[i] NULL, bad target, a tenant not adapting target, a tenant id outside
 * [-1, n_tenants)), SHAPE (tenants differ in (in, out), rows < 0, sizes overflow),
 * NONFINITE (NaN/Inf in an x row that is read), NOMEM. On failure y is unchanged. The
 * detail of a failure is written nowhere; use lora_apply_with_error to get it. */
LORA_API int lora_apply(const lora_adapter *const *tenants, size_t n_tenants, int target,
                        const int32_t *tenant_of_row, const float *x, int64_t rows,
                        float *y);
/* lora_apply that also writes the failure's detail into the caller's buffer: error
 * (error_size bytes, NUL-terminated, truncated to fit) receives "" on success. error
 * NULL or error_size 0: nothing is written. The buffer is the caller's, so concurrent
 * calls with distinct buffers never race. */
LORA_API int lora_apply_with_error(const lora_adapter *const *tenants, size_t n_tenants,
                                   int target, const int32_t *tenant_of_row, const float *x,
                                   int64_t rows, float *y, char *error, size_t error_size);

/* ---- Decoding with a KV cache (0.2) --------------------------------------------------- */
/* A KV cache holds, for each of `batch` sequences, the keys and values (after
 * projection, bias, LoRA and RoPE) of the tokens decoded so far: kv heads only (GQA),
 * float32. lora_decode appends new tokens and attends over them, so generating a token
 * costs one pass over the weights and the sequence's cache, not a forward over the
 * whole context.
 *
 * Memory: 2 * batch * n_kv_heads * slots * head_dim floats (slots rounded up to 16),
 * from the adapter's allocator (the config's lora_allocator, if any), where slots =
 * capacity, or WINDOW when the adapter has 0 < WINDOW < capacity: then the cache is a
 * ring that keeps only the last WINDOW tokens of each sequence (the only ones a new
 * token can see), and capacity bounds the length (the positions) only. */
typedef struct lora_kv_cache lora_kv_cache;

/* Room for `capacity` tokens for each of `batch` sequences, shaped for ad (its KV heads,
 * HEAD_DIM and WINDOW); all sequences empty. ad is only read: the cache does not refer
 * to it afterwards and may serve any adapter of the same KV heads and HEAD_DIM (and,
 * for a ring, WINDOW).
 * Errors: INVALID_ARG (out or ad NULL), SHAPE (batch or capacity < 1, sizes overflow),
 * NOMEM; *out is then NULL. No message is written (ad is const). */
LORA_API int lora_kv_cache_create(lora_kv_cache **out, const lora_adapter *ad,
                                  int64_t batch, int64_t capacity);
/* NULL is a no-op. */
LORA_API void lora_kv_cache_destroy(lora_kv_cache *cache);
/* Empties sequence b (b = -1: all). Errors: INVALID_ARG (cache NULL, b outside
 * [-1, batch)). */
LORA_API int lora_kv_cache_reset(lora_kv_cache *cache, int64_t b);
/* *len = tokens sequence b holds (its next position). Only reads cache. Errors:
 * INVALID_ARG (NULL, b outside [0, batch)). */
LORA_API int lora_kv_cache_length(const lora_kv_cache *cache, int64_t b, int64_t *len);

/* x: (batch, n_new, D_MODEL) with the cache's batch. Sequence b's new tokens take
 * positions len_b .. len_b + n_new - 1; their K and V (projection, bias, LoRA, RoPE at
 * those positions) are appended; the new queries attend causally over the sequence's
 * cached and new tokens (and WINDOW: key j visible to query i when 0 <= pos_i - pos_j <
 * WINDOW; SOFTCAP applies). out: (batch, n_new, D_MODEL) with OUT_PROJ, else (batch,
 * n_new, n_heads * HEAD_DIM), as lora_forward's rows for those tokens. Decoding a
 * sequence token by token (or in any split into calls) gives the rows of one causal
 * lora_forward_ex of the whole sequence, up to float rounding; decoding is causal
 * whatever LORA_CFG_CAUSAL says. Saves nothing for backward, never drops (dropout is
 * for training), and leaves the parameters, gradients, tapes and run info untouched; it
 * grows the adapter's working memory. The result is bitwise the same for any THREADS:
 * the attention runs on the adapter's worker pool, one (sequence, kv head) at a time,
 * reading that head's cache once. With bf16/f16 base weights the projections convert
 * on the fly (lora_adapter_set_base_typed).
 * Errors: INVALID_ARG (NULL), SHAPE (n_new < 1, the cache's KV heads or HEAD_DIM unlike
 * ad's, a sequence's length + n_new over capacity: nothing is appended to any
 * sequence, sizes overflow), INVALID_ARG (a ring cache made for another WINDOW), STATE
 * (a base weight not set), NONFINITE (NaN/Inf in x, or a result that overflows float),
 * NOMEM. A failed call changes neither the cache nor out. Message:
 * lora_adapter_last_error(ad). */
LORA_API int lora_decode(lora_adapter *ad, lora_kv_cache *cache, const float *x,
                         int64_t n_new, float *out);

/* Extras of a decode step (zero-initialise, set struct_size, fill what you need; fields
 * past struct_size take their defaults, unknown nonzero bytes of a newer header are
 * UNSUPPORTED). */
typedef struct lora_decode_args {
    uint32_t struct_size;  /* sizeof(lora_decode_args); fields only appended */
    uint32_t flags;        /* must be 0 */
    const int64_t *n_tokens; /* NULL or (batch): sequence b takes n_tokens[b] in
                                [0, n_new] new tokens, rows 0 .. n_tokens[b] - 1 of its
                                block of x; its other rows are not read and their out rows
                                are 0; 0 leaves the sequence alone. Continuous batching:
                                one call prefills new requests and steps running ones.
                                NULL: n_new each */
    /* Many tenants in one batch: every sequence b with tenant_of_seq[b] = t >= 0 uses
     * tenants[t]'s LoRA factors and scale (any targets and ranks), -1 the base alone; ad
     * supplies the base weights and biases, the attention settings (RoPE and its
     * frequencies, WINDOW, SOFTCAP, softmax scale), the working memory and the threads,
     * and its own factors are not used. The base projections run once for the whole
     * batch; each tenant's LoRA terms are added through lora_apply (its factors read
     * once per projection per step). Tenants are only read (several threads may decode
     * with the same tenants at once, each with its own ad and cache). Each tenant must
     * match ad in D_MODEL, N_HEADS, N_KV_HEADS, HEAD_DIM and OUT_PROJ (SHAPE otherwise);
     * nothing else of a tenant is read (its base weights need not be set). tenants NULL:
     * ad's own LoRA terms for every sequence. */
    const lora_adapter *const *tenants;
    size_t n_tenants;             /* 1 .. 2^31-1 when tenants is set */
    const int32_t *tenant_of_seq; /* (batch) when tenants is set */
} lora_decode_args;

/* lora_decode with args (NULL: lora_decode). Errors as lora_decode, plus INVALID_ARG
 * (struct_size smaller than the first version, flags, n_tokens[b] outside [0, n_new],
 * tenants without tenant_of_seq or the reverse, n_tenants 0 or too large, a tenant
 * NULL, a tenant id outside [-1, n_tenants)), SHAPE (a tenant's geometry unlike ad's),
 * UNSUPPORTED (unknown fields). */
LORA_API int lora_decode_ex(lora_adapter *ad, const lora_decode_args *args,
                            lora_kv_cache *cache, const float *x, int64_t n_new, float *out);

/* ---- I/O ----------------------------------------------------------------------------- */
/* Adapter files hold the LoRA factors (not the base weights) of several layers: an
 * adapter set is an array of adapters with one layer index each (int64 >= 0, distinct,
 * < 2^31). Every adapter of a set must have the same targets, rank, alpha and rsLoRA.
 * Formats: docs/format-peft.md, docs/format-gguf.md.
 *
 * Saving writes F32 tensors to a temporary file beside each file it replaces (fsynced,
 * then renamed into place; the directory is fsynced), keeping the replaced file's
 * permission bits; a path that is a symlink is written through (the link stays, the
 * file it leads to is replaced; a link that leads nowhere is IO). A failed save leaves
 * the old files as they were and removes what it created. On failure the message is in
 * lora_adapter_last_error(adapters[0]) (when adapters and adapters[0] are not NULL).
 * Errors: INVALID_ARG (NULL, count 0, bad or duplicate layer, adapters that differ),
 * UNSUPPORTED (GGUF: alpha = 0, which llama.cpp reads as "scale 1"), IO, NOMEM.
 *
 * Files record the layer's geometry (D_MODEL, heads, KV heads, HEAD_DIM, RoPE layout,
 * theta and width, CAUSAL, OUT_PROJ; keys "liblora.*"), which every adapter of a set
 * must share (INVALID_ARG). Q/K rows follow each format's convention: PEFT holds
 * Hugging Face's (rotate_half) order; a GGUF of an architecture llama.cpp runs with its
 * NORM RoPE ("llama" and its family) holds the interleaved order convert_hf_to_gguf.py
 * permutes into. The Q and K lora_B rows of an adapter (HF order unless its ROPE is
 * INTERLEAVED) are permuted into the file's order on save and back on load
 * (docs/format-gguf.md lists the architectures).
 *
 * Loading creates one adapter per layer found, in increasing layer order, from a copy
 * of cfg whose RANK, ALPHA, RSLORA and TARGETS are replaced by the file's (cfg supplies
 * everything else: D_MODEL, heads, OUT_PROJ, backend, threads, allocator, ...). Base
 * weights are unset. Call first with adapters NULL and capacity 0 to get *count (the
 * file is fully checked then too); with capacity < the layer count it fails with
 * INVALID_ARG and sets *count. On failure no adapter is left created and the message
 * is in lora_config_last_error(cfg) (cfg is otherwise unchanged).
 * Errors: INVALID_ARG (NULL, capacity), IO (cannot open or read), FORMAT (malformed,
 * truncated or inconsistent file), UNSUPPORTED (well-formed but beyond liblora: tensors
 * of non-attention modules, DoRA, rank/alpha patterns, other dtypes), SHAPE (factor
 * sizes do not match cfg's layer, or cfg contradicts the recorded geometry: the message
 * names the key; files without it are not checked), NONFINITE (NaN/Inf in a factor),
 * NOMEM. */

/* PEFT directory: adapter_config.json (r, lora_alpha, use_rslora, target_modules,
 * layers_to_transform, ...) and adapter_model.safetensors with tensors
 * base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight,
 * lora_A (r, in), lora_B (out, r). dir is created if missing (parent must exist); both
 * files are written to temporaries before either is renamed into place, and the
 * safetensors __metadata__ records r, lora_alpha and use_rslora: loading refuses
 * (FORMAT, naming the field) a config that contradicts them, so new weights are never
 * paired with an old config. Loading accepts F32, F16, BF16 and F64 tensors (converted
 * to float). */
LORA_API int lora_save_peft(const char *dir, lora_adapter *const *adapters,
                            const int64_t *layers, size_t count);
LORA_API int lora_load_peft(lora_adapter **adapters, int64_t *layers, size_t capacity,
                            size_t *count, const char *dir, lora_config *cfg);

/* llama.cpp GGUF LoRA adapter (GGUF v3): general.type = "adapter", adapter.type =
 * "lora", adapter.lora.alpha (F32), general.architecture (architecture, NULL =
 * "llama"; it decides the Q/K row order, recorded as liblora.qk_rows), tensors blk.{i}.attn_{q,k,v,output}.weight.lora_a with ggml shape
 * [in, r] and .lora_b with [r, out], i.e. row-major (r, in) and (out, r) as PEFT.
 * GGUF has no rsLoRA flag: an rsLoRA adapter is saved with alpha*sqrt(r) (same scale)
 * and loads as plain LoRA. Loading accepts F32, F16 and BF16 tensors, GGUF v2 and v3. */
LORA_API int lora_save_gguf(const char *path, lora_adapter *const *adapters,
                            const int64_t *layers, size_t count, const char *architecture);
LORA_API int lora_load_gguf(lora_adapter **adapters, int64_t *layers, size_t capacity,
                            size_t *count, const char *path, lora_config *cfg);

/* Options of a save (zero-initialise, set struct_size, fill what you need). Fields past
 * struct_size take their defaults; a struct_size smaller than the first version is
 * LORA_ERR_INVALID_ARG, and a larger one (a newer header) is accepted when the bytes this
 * library does not know are zero (else LORA_ERR_UNSUPPORTED). */
typedef struct lora_save_options {
    uint32_t struct_size;                /* sizeof(lora_save_options); fields only appended */
    const char *base_model_name_or_path; /* NULL (default): none. The model the adapter
                                            applies to, a Hugging Face id ("org/name") or
                                            a path: 1 to 1024 bytes of UTF-8 without
                                            control characters. PEFT: adapter_config.json's
                                            base_model_name_or_path (null when NULL).
                                            GGUF: general.base_model.count = 1 and
                                            general.base_model.0.name (the string as
                                            given), plus .repo_url for an "org/name" id
                                            or an http(s) URL */
    const char *architecture;            /* GGUF general.architecture (as lora_save_gguf's
                                            argument; NULL = "llama"), which also decides
                                            the file's Q/K row order (docs/format-gguf.md).
                                            PEFT ignores it */
} lora_save_options;

/* lora_save_peft and lora_save_gguf with options (NULL = all defaults: then they equal
 * lora_save_peft and lora_save_gguf(..., NULL)). Errors as theirs, plus INVALID_ARG
 * (struct_size, a base_model_name_or_path that is empty, too long, not UTF-8 or holds a
 * control character) and UNSUPPORTED (unknown nonzero fields past this version). */
LORA_API int lora_save_peft_ex(const char *dir, lora_adapter *const *adapters,
                               const int64_t *layers, size_t count,
                               const lora_save_options *options);
LORA_API int lora_save_gguf_ex(const char *path, lora_adapter *const *adapters,
                               const int64_t *layers, size_t count,
                               const lora_save_options *options);

#ifdef __cplusplus
}
#endif

#endif /* LORA_H */
