/* errors_suite: every bad input of every entry point.
 *
 * The bad-input table (bad_rows below) is the one place listing them: one row per
 * (entry point, state before the call, bad argument) with the exact status wanted.
 * Each row runs as its own test on a fresh fixture and checks: the status; a non-empty
 * last-error message where a handle exists (for lora_adapter_create, the one
 * lora_config_validate gives); gradients untouched by the failed call; a config left
 * unchanged; and, afterwards, the adapter still matching the double reference. Input
 * and output buffers end at a guard page, so reading or writing past them faults. A
 * control test runs every row's call without its bad argument and wants LORA_OK, so a
 * row fails for the reason it names. test_every_entry_point_has_rows fails when
 * include/lora.h declares a function no row calls: a new entry point adds its rows
 * here (an EP_ value, its name, its good arguments in build_args and a case in invoke).
 *
 * Not detectable, so not in the table: use of a handle after destroy (and double
 * destroy) is undefined behaviour, caught by `make check-asan` and `make
 * check-valgrind` in callers' tests, not by a status.
 *
 * The tests after the table check behaviour beyond one call: a failed forward drops the
 * saved forward, a good estimate keeps it, const calls (failing or not) leave the
 * handle's message alone. Tests whose name starts with "bug_" reproduce known library
 * bugs: each quotes the contract it checks and fails until the library is fixed. */
#include <dirent.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "suites.h"

/* The public header, read by test_every_entry_point_has_rows (tests run from the
 * repository root, as `make check` does). */
#ifndef LORA_TEST_HEADER
#define LORA_TEST_HEADER "include/lora.h"
#endif

/* ---- entry points ------------------------------------------------------------------- */

typedef enum entry_point {
    EP_VERSION_NUMBER, EP_VERSION_STRING, EP_STATUS_STRING,
    EP_CONFIG_CREATE, EP_CONFIG_CREATE_WITH_ALLOCATOR, EP_CONFIG_DESTROY,
    EP_CONFIG_SET_INT, EP_CONFIG_SET_DOUBLE, EP_CONFIG_GET_INT, EP_CONFIG_GET_DOUBLE,
    EP_CONFIG_VALIDATE, EP_CONFIG_LAST_ERROR,
    EP_ADAPTER_CREATE, EP_ADAPTER_DESTROY, EP_SET_BASE, EP_SET_PARAM, EP_GET_PARAM,
    EP_GET_GRAD, EP_PARAM_SHAPE, EP_ZERO_GRAD, EP_GET_CONFIG_INT, EP_GET_CONFIG_DOUBLE,
    EP_ADAPTER_LAST_ERROR, EP_GET_RUN_INFO,
    EP_FORWARD, EP_BACKWARD, EP_FORWARD_CROSS, EP_BACKWARD_CROSS, EP_MSE_LOSS,
    EP_THRESHOLD_ESTIMATE,
    EP_OPT_CREATE, EP_OPT_DESTROY, EP_OPT_SET_INT, EP_OPT_SET_DOUBLE, EP_OPT_GET_INT,
    EP_OPT_GET_DOUBLE, EP_OPT_STEP, EP_OPT_RESET, EP_OPT_LAST_ERROR,
    EP_PARAM_COUNT, EP_GET_PARAMS_FLAT, EP_SET_PARAMS_FLAT, EP_GET_GRADS_FLAT,
    EP_SET_GRADS_FLAT,
    EP_MERGE, EP_UNMERGE, EP_FORWARD_MERGED, EP_FORWARD_MERGED_CROSS, EP_SET_BASE_BORROWED,
    EP_COPY_PARAMS,
    EP_SAVE_PEFT, EP_LOAD_PEFT, EP_SAVE_GGUF, EP_LOAD_GGUF,
    EP_OPT_CREATE_SET, EP_OPT_STEP_SET, EP_MSE_LOSS_MEAN,
    EP_FORWARD_EX, EP_BACKWARD_EX, EP_TAPE_CREATE, EP_TAPE_DESTROY, EP_BORROW_FACTOR,
    EP_SET_BASE_TYPED, EP_APPLY, EP_APPLY_WITH_ERROR,
    EP_SAVE_PEFT_EX, EP_SAVE_GGUF_EX,
    EP_SET_ROPE_FREQS, EP_THRESHOLD_ESTIMATE_EX,
    EP_KV_CACHE_CREATE, EP_KV_CACHE_DESTROY, EP_KV_CACHE_RESET, EP_KV_CACHE_LENGTH,
    EP_DECODE, EP_DECODE_EX,
    EP_COUNT
} entry_point;

static const char *const ep_names[EP_COUNT] = {
    [EP_VERSION_NUMBER] = "lora_version_number",
    [EP_VERSION_STRING] = "lora_version_string",
    [EP_STATUS_STRING] = "lora_status_string",
    [EP_CONFIG_CREATE] = "lora_config_create",
    [EP_CONFIG_CREATE_WITH_ALLOCATOR] = "lora_config_create_with_allocator",
    [EP_CONFIG_DESTROY] = "lora_config_destroy",
    [EP_CONFIG_SET_INT] = "lora_config_set_int",
    [EP_CONFIG_SET_DOUBLE] = "lora_config_set_double",
    [EP_CONFIG_GET_INT] = "lora_config_get_int",
    [EP_CONFIG_GET_DOUBLE] = "lora_config_get_double",
    [EP_CONFIG_VALIDATE] = "lora_config_validate",
    [EP_CONFIG_LAST_ERROR] = "lora_config_last_error",
    [EP_ADAPTER_CREATE] = "lora_adapter_create",
    [EP_ADAPTER_DESTROY] = "lora_adapter_destroy",
    [EP_SET_BASE] = "lora_adapter_set_base",
    [EP_SET_PARAM] = "lora_adapter_set_param",
    [EP_GET_PARAM] = "lora_adapter_get_param",
    [EP_GET_GRAD] = "lora_adapter_get_grad",
    [EP_PARAM_SHAPE] = "lora_adapter_param_shape",
    [EP_ZERO_GRAD] = "lora_adapter_zero_grad",
    [EP_GET_CONFIG_INT] = "lora_adapter_get_config_int",
    [EP_GET_CONFIG_DOUBLE] = "lora_adapter_get_config_double",
    [EP_ADAPTER_LAST_ERROR] = "lora_adapter_last_error",
    [EP_GET_RUN_INFO] = "lora_adapter_get_run_info",
    [EP_FORWARD] = "lora_forward",
    [EP_BACKWARD] = "lora_backward",
    [EP_FORWARD_CROSS] = "lora_forward_cross",
    [EP_BACKWARD_CROSS] = "lora_backward_cross",
    [EP_MSE_LOSS] = "lora_mse_loss",
    [EP_THRESHOLD_ESTIMATE] = "lora_threshold_estimate",
    [EP_OPT_CREATE] = "lora_optimizer_create",
    [EP_OPT_DESTROY] = "lora_optimizer_destroy",
    [EP_OPT_SET_INT] = "lora_optimizer_set_int",
    [EP_OPT_SET_DOUBLE] = "lora_optimizer_set_double",
    [EP_OPT_GET_INT] = "lora_optimizer_get_int",
    [EP_OPT_GET_DOUBLE] = "lora_optimizer_get_double",
    [EP_OPT_STEP] = "lora_optimizer_step",
    [EP_OPT_RESET] = "lora_optimizer_reset",
    [EP_OPT_LAST_ERROR] = "lora_optimizer_last_error",
    [EP_PARAM_COUNT] = "lora_adapter_param_count",
    [EP_GET_PARAMS_FLAT] = "lora_adapter_get_params_flat",
    [EP_SET_PARAMS_FLAT] = "lora_adapter_set_params_flat",
    [EP_GET_GRADS_FLAT] = "lora_adapter_get_grads_flat",
    [EP_SET_GRADS_FLAT] = "lora_adapter_set_grads_flat",
    [EP_MERGE] = "lora_adapter_merge",
    [EP_UNMERGE] = "lora_adapter_unmerge",
    [EP_FORWARD_MERGED] = "lora_forward_merged",
    [EP_FORWARD_MERGED_CROSS] = "lora_forward_merged_cross",
    [EP_SET_BASE_BORROWED] = "lora_adapter_set_base_borrowed",
    [EP_COPY_PARAMS] = "lora_adapter_copy_params",
    [EP_SAVE_PEFT] = "lora_save_peft",
    [EP_LOAD_PEFT] = "lora_load_peft",
    [EP_SAVE_GGUF] = "lora_save_gguf",
    [EP_LOAD_GGUF] = "lora_load_gguf",
    [EP_OPT_CREATE_SET] = "lora_optimizer_create_set",
    [EP_OPT_STEP_SET] = "lora_optimizer_step_set",
    [EP_MSE_LOSS_MEAN] = "lora_mse_loss_mean",
    [EP_FORWARD_EX] = "lora_forward_ex",
    [EP_BACKWARD_EX] = "lora_backward_ex",
    [EP_TAPE_CREATE] = "lora_tape_create",
    [EP_TAPE_DESTROY] = "lora_tape_destroy",
    [EP_BORROW_FACTOR] = "lora_adapter_borrow_factor",
    [EP_SET_BASE_TYPED] = "lora_adapter_set_base_typed",
    [EP_APPLY] = "lora_apply",
    [EP_APPLY_WITH_ERROR] = "lora_apply_with_error",
    [EP_SAVE_PEFT_EX] = "lora_save_peft_ex",
    [EP_SAVE_GGUF_EX] = "lora_save_gguf_ex",
    [EP_SET_ROPE_FREQS] = "lora_adapter_set_rope_freqs",
    [EP_THRESHOLD_ESTIMATE_EX] = "lora_threshold_estimate_ex",
    [EP_KV_CACHE_CREATE] = "lora_kv_cache_create",
    [EP_KV_CACHE_DESTROY] = "lora_kv_cache_destroy",
    [EP_KV_CACHE_RESET] = "lora_kv_cache_reset",
    [EP_KV_CACHE_LENGTH] = "lora_kv_cache_length",
    [EP_DECODE] = "lora_decode",
    [EP_DECODE_EX] = "lora_decode_ex",
};

/* The saves (all take an adapter set; the _ex ones options too). */
static int ep_is_save(int ep)
{
    return ep == EP_SAVE_PEFT || ep == EP_SAVE_GGUF || ep == EP_SAVE_PEFT_EX ||
           ep == EP_SAVE_GGUF_EX;
}

/* ---- states before the call --------------------------------------------------------- */

typedef enum pre_state {
    PRE_NONE,        /* no handle */
    PRE_CFG,         /* config: D_MODEL 8, THREADS 1 (cfg_new) */
    PRE_CFG_EMPTY,   /* config without D_MODEL */
    PRE_CFG_KV,      /* N_HEADS 4, N_KV_HEADS 3: does not divide */
    PRE_CFG_INDIV,   /* D_MODEL 10, N_HEADS 4, HEAD_DIM unset */
    PRE_CFG_O,       /* TARGETS Q|K|V|O without OUT_PROJ */
    PRE_CFG_HUGE,    /* every dimension at its maximum: sizes overflow */
    PRE_SELF,        /* the tfx fixture (self, causal) after forward + backward */
    PRE_CROSS,       /* the tfx fixture (cross, causal) after forward_cross + backward */
    PRE_NOT_SAVED,   /* PRE_SELF, then set_param dropped the saved forward */
    PRE_NO_BASE_Q,   /* a fixture adapter with every base but W_Q set */
    PRE_NO_BASE_K,
    PRE_NO_BASE_V,
    PRE_NO_BASE_O,
    PRE_QV,          /* default targets Q|V, no output projection */
    PRE_OPT,         /* PRE_SELF plus an AdamW optimizer for its adapter */
    PRE_OPT_SGD,     /* PRE_SELF plus an SGD optimizer */
    PRE_OPT_NESTEROV, /* PRE_OPT_SGD with NESTEROV = 1 and MOMENTUM 0 */
    PRE_COUNT
} pre_state;

static int pre_is_config(int pre) { return pre >= PRE_CFG && pre <= PRE_CFG_HUGE; }
static int pre_is_adapter(int pre) { return pre >= PRE_SELF && pre <= PRE_OPT_NESTEROV; }
static int pre_is_opt(int pre) { return pre >= PRE_OPT && pre <= PRE_OPT_NESTEROV; }
static int pre_no_base(int pre) { return pre >= PRE_NO_BASE_Q && pre <= PRE_NO_BASE_O; }

/* ---- mutations: the one bad argument of a row ------------------------------------ */

typedef enum mut_kind {
    MK_NONE,       /* the state is what is wrong */
    MK_HANDLE,     /* the handle (ad or cfg) is NULL */
    MK_OUT,        /* a create's out parameter is NULL */
    MK_PTR_NULL,   /* float buffer k is NULL */
    MK_NAN_FIRST,  /* float buffer k holds a NaN at index 0 */
    MK_INF_LAST,   /* float buffer k holds -Inf at its last index */
    MK_VPTR_NULL,  /* non-float out pointer k (value, rows/cols, report, info, loss) NULL */
    MK_INT,        /* integer argument k = v */
    MK_DOUBLE,     /* the double argument = d */
    MK_STRUCT_SIZE, /* struct_size of the report / run info / save options = v */
    MK_HOOK_NULL,  /* allocator hook k (0 alloc, 1 free) NULL */
    MK_ALIAS,      /* backward_cross: dxkv is the same buffer as dxq */
    MK_AD2_NULL,   /* the second adapter (copy_params src, optimizer_step ad) is NULL */
    MK_OTHER_AD,   /* the second adapter is shaped differently (rank 3) */
    MK_FILE_MISSING, /* save: the parent directory does not exist; load: no file */
    MK_FILE_GARBAGE, /* load: the file (GGUF, safetensors or, k = 1, the JSON) is text */
    MK_FILE_TRUNC, /* load: the file is cut in half */
    MK_CFG_MISMATCH, /* load: cfg's D_MODEL is 16, not the file's 8 */
    MK_LAYER,      /* save: layers[0] = v */
    MK_DUP_LAYER,  /* save: two adapters with the same layer index */
    MK_FIRST_AD_NULL, /* save: adapters[0] is NULL */
    MK_DCOUNT,     /* count = the good count + v */
    MK_ARGS_FLAGS, /* forward_ex: args.flags = v */
    MK_ARGS_MASK,  /* forward_ex: mask field k (q_lens, kv_lens, q_pos, kv_pos, q_seg,
                      kv_seg) set */
    MK_ARGS_TAIL,  /* forward_ex: struct_size past the struct, a nonzero byte there */
    MK_TAPE,       /* the tape: k = 0 another adapter's, 1 empty, 2 recorded before a
                      set_param */
    MK_SELF_DXKV,  /* backward_ex of a self-attention forward with dxkv set */
    MK_TENANT,     /* lora_apply: tenant_of_row[0] = v */
    MK_BAD_BASE_MODEL /* save_*_ex: base_model_name_or_path holds a control character */
} mut_kind;

typedef struct mutation {
    int kind, k;
    int64_t v;
    double d;
} mutation;

#define M_NONE {MK_NONE, 0, 0, 0.0}
#define M_HANDLE {MK_HANDLE, 0, 0, 0.0}
#define M_OUT {MK_OUT, 0, 0, 0.0}
#define M_NULL(k) {MK_PTR_NULL, (k), 0, 0.0}
#define M_NAN(k) {MK_NAN_FIRST, (k), 0, 0.0}
#define M_INF(k) {MK_INF_LAST, (k), 0, 0.0}
#define M_VNULL(k) {MK_VPTR_NULL, (k), 0, 0.0}
#define M_INT(k, v) {MK_INT, (k), (v), 0.0}
#define M_DBL(d) {MK_DOUBLE, 0, 0, (d)}
#define M_SIZE(v) {MK_STRUCT_SIZE, 0, (v), 0.0}
#define M_HOOK(k) {MK_HOOK_NULL, (k), 0, 0.0}
#define M_ALIAS {MK_ALIAS, 0, 0, 0.0}
#define M_AD2 {MK_AD2_NULL, 0, 0, 0.0}
#define M_OTHER_AD {MK_OTHER_AD, 0, 0, 0.0}
#define M_MISSING {MK_FILE_MISSING, 0, 0, 0.0}
#define M_GARBAGE(k) {MK_FILE_GARBAGE, (k), 0, 0.0}
#define M_TRUNC {MK_FILE_TRUNC, 0, 0, 0.0}
#define M_CFG_MISMATCH {MK_CFG_MISMATCH, 0, 0, 0.0}
#define M_LAYER(v) {MK_LAYER, 0, (v), 0.0}
#define M_DUP {MK_DUP_LAYER, 0, 0, 0.0}
#define M_AD0 {MK_FIRST_AD_NULL, 0, 0, 0.0}
#define M_DCOUNT(v) {MK_DCOUNT, 2, (v), 0.0}
#define M_FLAGS(v) {MK_ARGS_FLAGS, 0, (v), 0.0}
#define M_MASK(k) {MK_ARGS_MASK, (k), 0, 0.0}
#define M_TAIL {MK_ARGS_TAIL, 0, 0, 0.0}
#define M_TAPE(k) {MK_TAPE, (k), 0, 0.0}
#define M_SELF_DXKV {MK_SELF_DXKV, 0, 0, 0.0}
#define M_TENANT(v) {MK_TENANT, 0, (v), 0.0}
#define M_BASE_MODEL {MK_BAD_BASE_MODEL, 0, 0, 0.0}

/* Wanted results besides lora_status values. */
enum { W_STRING = -1, /* a non-NULL, non-empty static string */
       W_VOID = -2,   /* returns nothing; must not crash */
       W_VERSION = -3 /* lora_version_number() == LORA_VERSION_NUMBER */ };

typedef struct bad_row {
    int ep, pre;
    mutation m, m2; /* m2: a second change (e.g. the target whose buffer is bad) */
    int want;
    const char *what;
} bad_row;

#define ROW(ep, pre, m, want, what) {(ep), (pre), m, M_NONE, (want), (what)}
#define ROW2(ep, pre, m2, m, want, what) {(ep), (pre), m, m2, (want), (what)}

#define INV LORA_ERR_INVALID_ARG
#define SHP LORA_ERR_SHAPE
#define NONF LORA_ERR_NONFINITE
#define STATE LORA_ERR_STATE
#define TQ LORA_TARGET_Q
#define TK LORA_TARGET_K
#define TV LORA_TARGET_V
#define TO LORA_TARGET_O
#define BIG (INT64_C(1) << 32)

/* Integer arguments, by entry point: set_int/get_int(param i0, value i1), set_double
 * (param i0), set_base(target i0), set/get_param, get_grad and borrow_factor (target
 * i0, which i1, count i2), param_shape (target i0, which i1), get_config_* (param i0), forward and
 * estimate (batch i0, seq_len i1), forward_cross (batch i0, len_q i1, len_kv i2),
 * mse_loss and mse_loss_mean (n i0), status_string (status i0), optimizer_create_set
 * (kind i0, n i2), optimizer_step_set (n i2), forward_ex (batch i0, len_q i1, len_kv i2).
 * Float buffers: set_base (weight 0, bias 1), set_param/get_* (src/dst 0),
 * borrow_factor (param 0, grad 1), forward
 * (x 0, out 1), backward (dout 0, dx 1), forward_cross (xq 0, xkv 1, out 2),
 * backward_cross and backward_ex (dout 0, dxq 1, dxkv 2), forward_ex (xq 0, xkv 1,
 * out 2), mse_loss (out 0, target 1, dout 2),
 * estimate (x 0). Other pointers: get_int/get_double/get_config_* value (0),
 * (kind i0, n i2), optimizer_step_set (n i2), set_base_typed (target i0, dtype i1,
 * flags i2), apply (target i0, rows i1, n_tenants i2).
 * Float buffers: set_base (weight 0, bias 1), set_param/get_* (src/dst 0), forward
 * (x 0, out 1), backward (dout 0, dx 1), forward_cross (xq 0, xkv 1, out 2),
 * backward_cross (dout 0, dxq 1, dxkv 2), mse_loss (out 0, target 1, dout 2),
 * estimate (x 0), apply (x 0, y 1). Other pointers: apply's tenants (0) and
 * tenant_of_row (1), get_int/get_double/get_config_* value (0),
 * param_shape rows (0) and cols (1), estimate report (0), run info (0), loss (0). */
static const bad_row bad_rows[] = {
    /* ---- version and status strings: no bad input exists; they never fail ---- */
    ROW(EP_VERSION_NUMBER, PRE_NONE, M_NONE, W_VERSION, "no arguments"),
    ROW(EP_VERSION_STRING, PRE_NONE, M_NONE, W_STRING, "no arguments"),
    ROW(EP_STATUS_STRING, PRE_NONE, M_INT(0, -1), W_STRING, "status -1"),
    ROW(EP_STATUS_STRING, PRE_NONE, M_INT(0, 10), W_STRING, "status past the enum"),
    ROW(EP_STATUS_STRING, PRE_NONE, M_INT(0, INT_MIN), W_STRING, "status INT_MIN"),
    ROW(EP_STATUS_STRING, PRE_NONE, M_INT(0, INT_MAX), W_STRING, "status INT_MAX"),

    /* ---- config ---- */
    ROW(EP_CONFIG_CREATE, PRE_NONE, M_OUT, INV, "out NULL"),
    ROW(EP_CONFIG_CREATE_WITH_ALLOCATOR, PRE_NONE, M_OUT, INV, "out NULL"),
    ROW(EP_CONFIG_CREATE_WITH_ALLOCATOR, PRE_NONE, M_HOOK(0), INV, "alloc NULL, free set"),
    ROW(EP_CONFIG_CREATE_WITH_ALLOCATOR, PRE_NONE, M_HOOK(1), INV, "free NULL, alloc set"),
    ROW(EP_CONFIG_DESTROY, PRE_NONE, M_HANDLE, W_VOID, "NULL is a no-op"),
    ROW(EP_CONFIG_LAST_ERROR, PRE_NONE, M_HANDLE, W_STRING, "NULL config"),
    ROW(EP_CONFIG_SET_INT, PRE_CFG, M_HANDLE, INV, "cfg NULL"),
    ROW(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, 0), INV, "param 0"),
    ROW(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, -1), INV, "param -1"),
    ROW(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, CFG_PARAM_UNKNOWN), INV, "first unknown param"),
    ROW(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, INT_MAX), INV, "param INT_MAX"),
    ROW(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_ALPHA), INV, "double param ALPHA"),
    ROW(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_TOLERANCE), INV, "double param TOLERANCE"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_D_MODEL), M_INT(1, 0), INV, "D_MODEL 0"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_D_MODEL), M_INT(1, -8), INV, "D_MODEL -8"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_D_MODEL), M_INT(1, (INT64_C(1) << 24) + 1),
         INV, "D_MODEL 2^24 + 1"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_D_MODEL), M_INT(1, INT64_MAX), INV,
         "D_MODEL INT64_MAX"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_N_HEADS), M_INT(1, 0), INV, "N_HEADS 0"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_N_KV_HEADS), M_INT(1, -1), INV,
         "N_KV_HEADS -1"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_HEAD_DIM), M_INT(1, INT64_MIN), INV,
         "HEAD_DIM INT64_MIN"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_TARGETS), M_INT(1, 0), INV, "TARGETS 0"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_TARGETS), M_INT(1, 16), INV,
         "TARGETS unknown bit 16"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_RANK), M_INT(1, 0), INV, "RANK 0"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_RANK), M_INT(1, BIG), INV, "RANK 2^32"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_RSLORA), M_INT(1, 2), INV, "RSLORA 2"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_CAUSAL), M_INT(1, -1), INV, "CAUSAL -1"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_BACKEND), M_INT(1, 3), INV,
         "unknown backend 3"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_BACKEND), M_INT(1, -1), INV,
         "unknown backend -1"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_POLY_DEGREE), M_INT(1, 3), INV,
         "odd POLY_DEGREE"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_POLY_DEGREE), M_INT(1, 1000), INV,
         "POLY_DEGREE 1000"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_THREADS), M_INT(1, -1), INV,
         "THREADS -1"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_THREADS), M_INT(1, 1 << 20), INV,
         "THREADS 2^20"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_INIT), M_INT(1, 3), INV, "unknown init 3"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_OUT_PROJ), M_INT(1, 2), INV,
         "OUT_PROJ 2"),
    ROW2(EP_CONFIG_SET_INT, PRE_CFG, M_INT(0, LORA_CFG_MEASURE_ROWS), M_INT(1, -1), INV,
         "MEASURE_ROWS -1"),
    ROW(EP_CONFIG_SET_DOUBLE, PRE_CFG, M_HANDLE, INV, "cfg NULL"),
    ROW(EP_CONFIG_SET_DOUBLE, PRE_CFG, M_INT(0, 0), INV, "param 0"),
    ROW(EP_CONFIG_SET_DOUBLE, PRE_CFG, M_INT(0, CFG_PARAM_UNKNOWN), INV, "first unknown param"),
    ROW(EP_CONFIG_SET_DOUBLE, PRE_CFG, M_INT(0, LORA_CFG_RANK), INV, "integer param RANK"),
    ROW(EP_CONFIG_SET_DOUBLE, PRE_CFG, M_DBL(NAN), NONF, "ALPHA NaN"),
    ROW(EP_CONFIG_SET_DOUBLE, PRE_CFG, M_DBL(INFINITY), NONF, "ALPHA +Inf"),
    ROW2(EP_CONFIG_SET_DOUBLE, PRE_CFG, M_INT(0, LORA_CFG_TOLERANCE), M_DBL(-INFINITY), NONF,
         "TOLERANCE -Inf"),
    ROW2(EP_CONFIG_SET_DOUBLE, PRE_CFG, M_INT(0, LORA_CFG_TOLERANCE), M_DBL(0.0), INV,
         "TOLERANCE 0"),
    ROW2(EP_CONFIG_SET_DOUBLE, PRE_CFG, M_INT(0, LORA_CFG_TOLERANCE), M_DBL(-1e-3), INV,
         "TOLERANCE < 0"),
    ROW2(EP_CONFIG_SET_DOUBLE, PRE_CFG, M_INT(0, LORA_CFG_SOFTMAX_SCALE), M_DBL(-0.0), INV,
         "SOFTMAX_SCALE -0"),
    ROW2(EP_CONFIG_SET_DOUBLE, PRE_CFG, M_INT(0, LORA_CFG_SOFTMAX_SCALE), M_DBL(NAN), NONF,
         "SOFTMAX_SCALE NaN"),
    ROW(EP_CONFIG_GET_INT, PRE_CFG, M_HANDLE, INV, "cfg NULL"),
    ROW(EP_CONFIG_GET_INT, PRE_CFG, M_VNULL(0), INV, "value NULL"),
    ROW(EP_CONFIG_GET_INT, PRE_CFG, M_INT(0, 0), INV, "param 0"),
    ROW(EP_CONFIG_GET_INT, PRE_CFG, M_INT(0, CFG_PARAM_UNKNOWN), INV, "first unknown param"),
    ROW(EP_CONFIG_GET_INT, PRE_CFG, M_INT(0, LORA_CFG_ALPHA), INV, "double param ALPHA"),
    ROW(EP_CONFIG_GET_DOUBLE, PRE_CFG, M_HANDLE, INV, "cfg NULL"),
    ROW(EP_CONFIG_GET_DOUBLE, PRE_CFG, M_VNULL(0), INV, "value NULL"),
    ROW(EP_CONFIG_GET_DOUBLE, PRE_CFG, M_INT(0, -5), INV, "param -5"),
    ROW(EP_CONFIG_GET_DOUBLE, PRE_CFG, M_INT(0, LORA_CFG_D_MODEL), INV, "integer param"),
    ROW(EP_CONFIG_VALIDATE, PRE_CFG, M_HANDLE, INV, "cfg NULL"),
    ROW(EP_CONFIG_VALIDATE, PRE_CFG_EMPTY, M_NONE, INV, "D_MODEL unset"),
    ROW(EP_CONFIG_VALIDATE, PRE_CFG_KV, M_NONE, INV, "N_KV_HEADS does not divide N_HEADS"),
    ROW(EP_CONFIG_VALIDATE, PRE_CFG_INDIV, M_NONE, INV, "D_MODEL not divisible by N_HEADS"),
    ROW(EP_CONFIG_VALIDATE, PRE_CFG_O, M_NONE, INV, "TARGET_O without OUT_PROJ"),
    ROW(EP_CONFIG_VALIDATE, PRE_CFG_HUGE, M_NONE, SHP, "sizes overflow"),

    /* ---- adapter ---- */
    ROW(EP_ADAPTER_CREATE, PRE_CFG, M_OUT, INV, "out NULL"),
    ROW(EP_ADAPTER_CREATE, PRE_CFG, M_HANDLE, INV, "cfg NULL"),
    ROW(EP_ADAPTER_CREATE, PRE_CFG_EMPTY, M_NONE, INV, "D_MODEL unset"),
    ROW(EP_ADAPTER_CREATE, PRE_CFG_KV, M_NONE, INV, "N_KV_HEADS does not divide N_HEADS"),
    ROW(EP_ADAPTER_CREATE, PRE_CFG_INDIV, M_NONE, INV, "D_MODEL not divisible by N_HEADS"),
    ROW(EP_ADAPTER_CREATE, PRE_CFG_O, M_NONE, INV, "TARGET_O without OUT_PROJ"),
    ROW(EP_ADAPTER_CREATE, PRE_CFG_HUGE, M_NONE, SHP, "sizes overflow"),
    ROW(EP_ADAPTER_DESTROY, PRE_NONE, M_HANDLE, W_VOID, "NULL is a no-op"),
    ROW(EP_ADAPTER_LAST_ERROR, PRE_NONE, M_HANDLE, W_STRING, "NULL adapter"),
    ROW(EP_SET_BASE, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_SET_BASE, PRE_SELF, M_NULL(0), INV, "weight NULL"),
    ROW(EP_SET_BASE, PRE_SELF, M_INT(0, 0), INV, "target 0"),
    ROW(EP_SET_BASE, PRE_SELF, M_INT(0, 3), INV, "target mask Q|K"),
    ROW(EP_SET_BASE, PRE_SELF, M_INT(0, 16), INV, "target 16"),
    ROW(EP_SET_BASE, PRE_SELF, M_INT(0, -1), INV, "target -1"),
    ROW(EP_SET_BASE, PRE_QV, M_INT(0, TO), INV, "TARGET_O without OUT_PROJ"),
    ROW2(EP_SET_BASE, PRE_SELF, M_INT(0, TQ), M_NAN(0), NONF, "NaN in W_Q"),
    ROW2(EP_SET_BASE, PRE_SELF, M_INT(0, TK), M_INF(0), NONF, "-Inf in W_K"),
    ROW2(EP_SET_BASE, PRE_SELF, M_INT(0, TV), M_NAN(0), NONF, "NaN in W_V"),
    ROW2(EP_SET_BASE, PRE_SELF, M_INT(0, TO), M_INF(0), NONF, "-Inf in W_O"),
    ROW2(EP_SET_BASE, PRE_SELF, M_INT(0, TQ), M_INF(1), NONF, "-Inf in the bias of Q"),
    ROW2(EP_SET_BASE, PRE_SELF, M_INT(0, TK), M_NAN(1), NONF, "NaN in the bias of K"),
    ROW2(EP_SET_BASE, PRE_SELF, M_INT(0, TO), M_NAN(1), NONF, "NaN in the bias of O"),
    ROW(EP_SET_PARAM, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_SET_PARAM, PRE_SELF, M_NULL(0), INV, "src NULL"),
    ROW(EP_SET_PARAM, PRE_SELF, M_INT(0, 0), INV, "target 0"),
    ROW(EP_SET_PARAM, PRE_SELF, M_INT(0, 5), INV, "target mask Q|V"),
    ROW(EP_SET_PARAM, PRE_SELF, M_INT(0, 1000), INV, "target 1000"),
    ROW(EP_SET_PARAM, PRE_SELF, M_INT(1, 2), INV, "which 2"),
    ROW(EP_SET_PARAM, PRE_SELF, M_INT(1, -1), INV, "which -1"),
    ROW(EP_SET_PARAM, PRE_SELF, M_INT(2, 0), INV, "count 0"),
    ROW(EP_SET_PARAM, PRE_SELF, M_INT(2, 15), INV, "count one short"),
    ROW(EP_SET_PARAM, PRE_SELF, M_INT(2, 17), INV, "count one over"),
    ROW(EP_SET_PARAM, PRE_SELF, M_INT(2, -1), INV, "count SIZE_MAX"),
    ROW2(EP_SET_PARAM, PRE_SELF, M_INT(0, TK), M_INT(1, LORA_B), INV,
         "B of K with A of Q's count"),
    ROW(EP_SET_PARAM, PRE_QV, M_INT(0, TK), INV, "K not adapted"),
    ROW(EP_SET_PARAM, PRE_QV, M_INT(0, TO), INV, "O not adapted"),
    ROW(EP_SET_PARAM, PRE_SELF, M_NAN(0), NONF, "NaN in A of Q"),
    ROW2(EP_SET_PARAM, PRE_SELF, M_INT(0, TO), M_INF(0), NONF, "-Inf in A of O"),
    ROW2(EP_SET_PARAM, PRE_SELF, M_INT(1, LORA_B), M_NAN(0), NONF, "NaN in B of Q"),
    ROW2(EP_SET_PARAM, PRE_CROSS, M_INT(1, LORA_B), M_INF(0), NONF, "-Inf in B of Q (cross)"),
    ROW(EP_BORROW_FACTOR, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_BORROW_FACTOR, PRE_SELF, M_INT(0, 0), INV, "target 0"),
    ROW(EP_BORROW_FACTOR, PRE_SELF, M_INT(0, 3), INV, "target mask Q|K"),
    ROW(EP_BORROW_FACTOR, PRE_SELF, M_INT(1, 2), INV, "which 2"),
    ROW(EP_BORROW_FACTOR, PRE_SELF, M_INT(2, 15), INV, "count one short"),
    ROW(EP_BORROW_FACTOR, PRE_SELF, M_INT(2, -1), INV, "count SIZE_MAX"),
    ROW(EP_BORROW_FACTOR, PRE_QV, M_INT(0, TK), INV, "K not adapted"),
    ROW(EP_BORROW_FACTOR, PRE_SELF, M_ALIAS, INV, "param and grad the same buffer"),
    ROW(EP_BORROW_FACTOR, PRE_SELF, M_NAN(0), NONF, "NaN in param"),
    ROW(EP_BORROW_FACTOR, PRE_SELF, M_INF(1), NONF, "-Inf in grad"),
    ROW(EP_GET_PARAM, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_GET_PARAM, PRE_SELF, M_NULL(0), INV, "dst NULL"),
    ROW(EP_GET_PARAM, PRE_SELF, M_INT(0, 6), INV, "target mask K|V"),
    ROW(EP_GET_PARAM, PRE_SELF, M_INT(1, 7), INV, "which 7"),
    ROW(EP_GET_PARAM, PRE_SELF, M_INT(2, 8), INV, "count 8 for 16"),
    ROW(EP_GET_PARAM, PRE_SELF, M_INT(2, -1), INV, "count SIZE_MAX"),
    ROW(EP_GET_PARAM, PRE_QV, M_INT(0, TK), INV, "K not adapted"),
    ROW(EP_GET_GRAD, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_GET_GRAD, PRE_SELF, M_NULL(0), INV, "dst NULL"),
    ROW(EP_GET_GRAD, PRE_SELF, M_INT(0, 32), INV, "target 32"),
    ROW(EP_GET_GRAD, PRE_SELF, M_INT(1, INT_MIN), INV, "which INT_MIN"),
    ROW(EP_GET_GRAD, PRE_SELF, M_INT(2, 32), INV, "count 32 for 16"),
    ROW(EP_GET_GRAD, PRE_QV, M_INT(0, TO), INV, "O not adapted"),
    ROW(EP_PARAM_SHAPE, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_PARAM_SHAPE, PRE_SELF, M_VNULL(0), INV, "rows NULL"),
    ROW(EP_PARAM_SHAPE, PRE_SELF, M_VNULL(1), INV, "cols NULL"),
    ROW(EP_PARAM_SHAPE, PRE_SELF, M_INT(0, 0), INV, "target 0"),
    ROW(EP_PARAM_SHAPE, PRE_SELF, M_INT(1, 2), INV, "which 2"),
    ROW(EP_PARAM_SHAPE, PRE_QV, M_INT(0, TK), INV, "K not adapted"),
    ROW(EP_ZERO_GRAD, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_GET_CONFIG_INT, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_GET_CONFIG_INT, PRE_SELF, M_VNULL(0), INV, "value NULL"),
    ROW(EP_GET_CONFIG_INT, PRE_SELF, M_INT(0, 1000), INV, "param 1000"),
    ROW(EP_GET_CONFIG_INT, PRE_SELF, M_INT(0, LORA_CFG_ALPHA), INV, "double param ALPHA"),
    ROW(EP_GET_CONFIG_DOUBLE, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_GET_CONFIG_DOUBLE, PRE_SELF, M_VNULL(0), INV, "value NULL"),
    ROW(EP_GET_CONFIG_DOUBLE, PRE_SELF, M_INT(0, 0), INV, "param 0"),
    ROW(EP_GET_CONFIG_DOUBLE, PRE_SELF, M_INT(0, LORA_CFG_RANK), INV, "integer param RANK"),
    ROW(EP_GET_RUN_INFO, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_GET_RUN_INFO, PRE_SELF, M_VNULL(0), INV, "info NULL"),
    ROW(EP_GET_RUN_INFO, PRE_SELF, M_SIZE(0), INV, "struct_size 0"),
    ROW(EP_GET_RUN_INFO, PRE_SELF, M_SIZE(4), INV, "struct_size 4"),

    /* ---- compute ---- */
    ROW(EP_FORWARD, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_FORWARD, PRE_SELF, M_NULL(0), INV, "x NULL"),
    ROW(EP_FORWARD, PRE_SELF, M_NULL(1), INV, "out NULL"),
    ROW(EP_FORWARD, PRE_SELF, M_INT(0, 0), SHP, "batch 0"),
    ROW(EP_FORWARD, PRE_SELF, M_INT(0, -1), SHP, "batch -1"),
    ROW(EP_FORWARD, PRE_SELF, M_INT(0, INT64_MIN), SHP, "batch INT64_MIN"),
    ROW(EP_FORWARD, PRE_SELF, M_INT(1, 0), SHP, "seq_len 0"),
    ROW(EP_FORWARD, PRE_SELF, M_INT(1, -1), SHP, "seq_len -1"),
    ROW(EP_FORWARD, PRE_SELF, M_INT(0, INT64_MAX / 2), SHP, "batch INT64_MAX/2 overflows"),
    ROW(EP_FORWARD, PRE_SELF, M_INT(1, INT64_MAX), SHP, "seq_len INT64_MAX overflows"),
    ROW2(EP_FORWARD, PRE_SELF, M_INT(0, BIG), M_INT(1, BIG), SHP, "2^32 x 2^32 overflows"),
    ROW2(EP_FORWARD, PRE_SELF, M_INT(0, 3), M_INT(1, INT64_MAX / 3 + 1), SHP,
         "batch*seq_len just past INT64_MAX"),
    ROW(EP_FORWARD, PRE_SELF, M_NAN(0), NONF, "NaN in x[0]"),
    ROW(EP_FORWARD, PRE_SELF, M_INF(0), NONF, "-Inf in the last x"),
    ROW(EP_FORWARD, PRE_NO_BASE_Q, M_NONE, STATE, "W_Q unset"),
    ROW(EP_FORWARD, PRE_NO_BASE_K, M_NONE, STATE, "W_K unset"),
    ROW(EP_FORWARD, PRE_NO_BASE_V, M_NONE, STATE, "W_V unset"),
    ROW(EP_FORWARD, PRE_NO_BASE_O, M_NONE, STATE, "W_O unset (OUT_PROJ)"),
    ROW(EP_BACKWARD, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_BACKWARD, PRE_SELF, M_NULL(0), INV, "dout NULL"),
    ROW(EP_BACKWARD, PRE_SELF, M_NAN(0), NONF, "NaN in dout[0]"),
    ROW(EP_BACKWARD, PRE_SELF, M_INF(0), NONF, "-Inf in the last dout"),
    ROW(EP_BACKWARD, PRE_NOT_SAVED, M_NONE, STATE, "no saved forward (set_param dropped it)"),
    ROW(EP_BACKWARD, PRE_CROSS, M_NONE, STATE, "after forward_cross"),
    ROW(EP_BACKWARD, PRE_NO_BASE_Q, M_NONE, STATE, "never a forward"),
    ROW(EP_FORWARD_CROSS, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_FORWARD_CROSS, PRE_CROSS, M_NULL(0), INV, "xq NULL"),
    ROW(EP_FORWARD_CROSS, PRE_CROSS, M_NULL(1), INV, "xkv NULL"),
    ROW(EP_FORWARD_CROSS, PRE_CROSS, M_NULL(2), INV, "out NULL"),
    ROW(EP_FORWARD_CROSS, PRE_CROSS, M_INT(0, 0), SHP, "batch 0"),
    ROW(EP_FORWARD_CROSS, PRE_CROSS, M_INT(1, 0), SHP, "len_q 0"),
    ROW(EP_FORWARD_CROSS, PRE_CROSS, M_INT(1, -3), SHP, "len_q -3"),
    ROW(EP_FORWARD_CROSS, PRE_CROSS, M_INT(2, 0), SHP, "len_kv 0"),
    ROW(EP_FORWARD_CROSS, PRE_CROSS, M_INT(2, -1), SHP, "len_kv -1"),
    ROW(EP_FORWARD_CROSS, PRE_CROSS, M_INT(0, INT64_MAX / 2), SHP, "batch overflows"),
    ROW(EP_FORWARD_CROSS, PRE_CROSS, M_INT(2, INT64_MAX), SHP, "len_kv overflows"),
    ROW2(EP_FORWARD_CROSS, PRE_CROSS, M_INT(1, 1), M_INT(2, INT64_MAX / 2), SHP,
         "len_kv INT64_MAX/2 overflows"),
    ROW2(EP_FORWARD_CROSS, PRE_CROSS, M_INT(1, 7), M_INT(2, 5), SHP,
         "causal: len_q 7 > len_kv 5"),
    ROW2(EP_FORWARD_CROSS, PRE_CROSS, M_INT(1, 2), M_INT(2, 1), SHP,
         "causal: len_q 2 > len_kv 1"),
    ROW(EP_FORWARD_CROSS, PRE_CROSS, M_NAN(0), NONF, "NaN in xq"),
    ROW(EP_FORWARD_CROSS, PRE_CROSS, M_INF(1), NONF, "-Inf in the last xkv"),
    ROW(EP_FORWARD_CROSS, PRE_CROSS, M_NAN(1), NONF, "NaN in xkv[0]"),
    ROW(EP_FORWARD_CROSS, PRE_NO_BASE_V, M_NONE, STATE, "W_V unset"),
    ROW(EP_BACKWARD_CROSS, PRE_CROSS, M_HANDLE, INV, "ad NULL"),
    ROW(EP_BACKWARD_CROSS, PRE_CROSS, M_NULL(0), INV, "dout NULL"),
    ROW(EP_BACKWARD_CROSS, PRE_CROSS, M_ALIAS, INV, "dxq and dxkv the same buffer"),
    ROW(EP_BACKWARD_CROSS, PRE_CROSS, M_NAN(0), NONF, "NaN in dout"),
    ROW(EP_BACKWARD_CROSS, PRE_CROSS, M_INF(0), NONF, "-Inf in the last dout"),
    ROW(EP_BACKWARD_CROSS, PRE_SELF, M_NONE, STATE, "after a self forward"),
    ROW(EP_BACKWARD_CROSS, PRE_NO_BASE_K, M_NONE, STATE, "never a forward"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_HANDLE, INV, "ad NULL"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_NULL(0), INV, "xq NULL"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_NULL(2), INV, "out NULL"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_NULL(1), SHP, "xkv NULL (self) with len_kv != len_q"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_INT(0, 0), SHP, "batch 0"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_INT(2, INT64_MAX), SHP, "len_kv overflows"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_NAN(0), NONF, "NaN in xq"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_INF(1), NONF, "-Inf in the last xkv"),
    ROW(EP_FORWARD_EX, PRE_NO_BASE_K, M_NONE, STATE, "W_K unset"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_SIZE(0), INV, "args->struct_size 0"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_SIZE(8), INV, "args->struct_size 8"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_TAIL, LORA_ERR_UNSUPPORTED, "unknown nonzero tail"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_FLAGS(2), INV, "unknown flag 2"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_FLAGS(-1), INV, "every flag bit"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_MASK(0), SHP, "q_lens -1"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_MASK(1), SHP, "kv_lens -1"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_MASK(2), INV, "q_pos 2^62"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_MASK(3), INV, "kv_pos -2^62"),
    ROW(EP_FORWARD_EX, PRE_CROSS, M_TAPE(0), STATE, "tape of another adapter"),
    ROW(EP_BACKWARD_EX, PRE_CROSS, M_HANDLE, INV, "ad NULL"),
    ROW(EP_BACKWARD_EX, PRE_CROSS, M_NULL(0), INV, "dout NULL"),
    ROW(EP_BACKWARD_EX, PRE_CROSS, M_ALIAS, INV, "dxq and dxkv the same buffer"),
    ROW(EP_BACKWARD_EX, PRE_SELF, M_SELF_DXKV, INV, "dxkv set for a self-attention tape"),
    ROW(EP_BACKWARD_EX, PRE_CROSS, M_NAN(0), NONF, "NaN in dout"),
    ROW(EP_BACKWARD_EX, PRE_SELF, M_INF(0), NONF, "-Inf in the last dout"),
    ROW(EP_BACKWARD_EX, PRE_NOT_SAVED, M_NONE, STATE, "built-in tape dropped by set_param"),
    ROW(EP_BACKWARD_EX, PRE_NO_BASE_Q, M_NONE, STATE, "never a forward"),
    ROW(EP_BACKWARD_EX, PRE_CROSS, M_TAPE(0), STATE, "tape of another adapter"),
    ROW(EP_BACKWARD_EX, PRE_CROSS, M_TAPE(1), STATE, "empty tape"),
    ROW(EP_BACKWARD_EX, PRE_CROSS, M_TAPE(2), STATE, "tape recorded before set_param"),
    ROW(EP_TAPE_CREATE, PRE_SELF, M_OUT, INV, "out NULL"),
    ROW(EP_TAPE_CREATE, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_TAPE_DESTROY, PRE_NONE, M_HANDLE, W_VOID, "NULL is a no-op"),
    ROW(EP_MSE_LOSS, PRE_NONE, M_NULL(0), INV, "out NULL"),
    ROW(EP_MSE_LOSS, PRE_NONE, M_NULL(1), INV, "target NULL"),
    ROW(EP_MSE_LOSS, PRE_NONE, M_VNULL(0), INV, "loss NULL"),
    ROW(EP_MSE_LOSS, PRE_NONE, M_INT(0, 0), INV, "n 0"),
    ROW(EP_MSE_LOSS, PRE_NONE, M_NAN(0), NONF, "NaN in out"),
    ROW(EP_MSE_LOSS, PRE_NONE, M_INF(1), NONF, "-Inf in target"),
    ROW(EP_MSE_LOSS_MEAN, PRE_NONE, M_NULL(0), INV, "out NULL"),
    ROW(EP_MSE_LOSS_MEAN, PRE_NONE, M_NULL(1), INV, "target NULL"),
    ROW(EP_MSE_LOSS_MEAN, PRE_NONE, M_VNULL(0), INV, "loss NULL"),
    ROW(EP_MSE_LOSS_MEAN, PRE_NONE, M_INT(0, 0), INV, "n 0"),
    ROW(EP_MSE_LOSS_MEAN, PRE_NONE, M_NAN(0), NONF, "NaN in out"),
    ROW(EP_MSE_LOSS_MEAN, PRE_NONE, M_INF(1), NONF, "-Inf in target"),

    /* ---- threshold estimator ---- */
    ROW(EP_THRESHOLD_ESTIMATE, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_THRESHOLD_ESTIMATE, PRE_SELF, M_NULL(0), INV, "x NULL"),
    ROW(EP_THRESHOLD_ESTIMATE, PRE_SELF, M_VNULL(0), INV, "report NULL"),
    ROW(EP_THRESHOLD_ESTIMATE, PRE_SELF, M_SIZE(4), INV, "struct_size 4"),
    ROW(EP_THRESHOLD_ESTIMATE, PRE_SELF, M_SIZE(0), INV, "struct_size 0"),
    ROW(EP_THRESHOLD_ESTIMATE, PRE_SELF, M_INT(0, 0), SHP, "batch 0"),
    ROW(EP_THRESHOLD_ESTIMATE, PRE_SELF, M_INT(1, -1), SHP, "seq_len -1"),
    ROW(EP_THRESHOLD_ESTIMATE, PRE_SELF, M_INT(0, INT64_MAX / 2), SHP, "batch overflows"),
    ROW(EP_THRESHOLD_ESTIMATE, PRE_SELF, M_NAN(0), NONF, "NaN in x"),
    ROW(EP_THRESHOLD_ESTIMATE, PRE_SELF, M_INF(0), NONF, "-Inf in the last x"),
    ROW(EP_THRESHOLD_ESTIMATE, PRE_NO_BASE_K, M_NONE, STATE, "W_K unset"),
    /* the same checks through the args route (args NULL); args' own: attention_suite */
    ROW(EP_THRESHOLD_ESTIMATE_EX, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_THRESHOLD_ESTIMATE_EX, PRE_SELF, M_NULL(0), INV, "x NULL"),
    ROW(EP_THRESHOLD_ESTIMATE_EX, PRE_SELF, M_VNULL(0), INV, "report NULL"),
    ROW(EP_THRESHOLD_ESTIMATE_EX, PRE_SELF, M_INT(0, 0), SHP, "batch 0"),
    ROW(EP_THRESHOLD_ESTIMATE_EX, PRE_SELF, M_NAN(0), NONF, "NaN in x"),

    /* ---- optimizer ---- */
    ROW(EP_OPT_CREATE, PRE_SELF, M_OUT, INV, "out NULL"),
    ROW(EP_OPT_CREATE, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_OPT_CREATE, PRE_SELF, M_INT(0, 2), INV, "unknown kind 2"),
    ROW(EP_OPT_CREATE, PRE_SELF, M_INT(0, -1), INV, "unknown kind -1"),
    ROW(EP_OPT_DESTROY, PRE_NONE, M_HANDLE, W_VOID, "NULL is a no-op"),
    ROW(EP_OPT_LAST_ERROR, PRE_NONE, M_HANDLE, W_STRING, "NULL optimizer"),
    ROW(EP_OPT_SET_INT, PRE_OPT_SGD, M_HANDLE, INV, "opt NULL"),
    ROW(EP_OPT_SET_INT, PRE_OPT_SGD, M_INT(0, 0), INV, "param 0"),
    ROW(EP_OPT_SET_INT, PRE_OPT_SGD, M_INT(0, 12), INV, "unknown param 12"),
    ROW(EP_OPT_SET_INT, PRE_OPT_SGD, M_INT(0, LORA_OPT_STEP), INV, "read-only STEP"),
    ROW(EP_OPT_SET_INT, PRE_OPT_SGD, M_INT(0, LORA_OPT_LR), INV, "double param LR"),
    ROW(EP_OPT_SET_INT, PRE_OPT_SGD, M_INT(1, 2), INV, "NESTEROV 2"),
    ROW(EP_OPT_SET_INT, PRE_OPT_SGD, M_INT(1, -1), INV, "NESTEROV -1"),
    ROW(EP_OPT_SET_INT, PRE_OPT, M_NONE, INV, "NESTEROV (SGD only) on AdamW"),
    ROW(EP_OPT_SET_DOUBLE, PRE_OPT, M_HANDLE, INV, "opt NULL"),
    ROW(EP_OPT_SET_DOUBLE, PRE_OPT, M_DBL(NAN), NONF, "LR NaN"),
    ROW(EP_OPT_SET_DOUBLE, PRE_OPT, M_DBL(INFINITY), NONF, "LR +Inf"),
    ROW(EP_OPT_SET_DOUBLE, PRE_OPT, M_DBL(-1e-3), INV, "LR < 0"),
    ROW2(EP_OPT_SET_DOUBLE, PRE_OPT, M_INT(0, LORA_OPT_BETA1), M_DBL(1.0), INV, "BETA1 1"),
    ROW2(EP_OPT_SET_DOUBLE, PRE_OPT, M_INT(0, LORA_OPT_BETA2), M_DBL(-0.5), INV, "BETA2 < 0"),
    ROW2(EP_OPT_SET_DOUBLE, PRE_OPT, M_INT(0, LORA_OPT_EPS), M_DBL(-1.0), INV, "EPS < 0"),
    ROW2(EP_OPT_SET_DOUBLE, PRE_OPT, M_INT(0, LORA_OPT_MAX_GRAD_NORM), M_DBL(-INFINITY), NONF,
         "MAX_GRAD_NORM -Inf"),
    ROW(EP_OPT_SET_DOUBLE, PRE_OPT, M_INT(0, LORA_OPT_GRAD_NORM), INV, "read-only GRAD_NORM"),
    ROW(EP_OPT_SET_DOUBLE, PRE_OPT, M_INT(0, LORA_OPT_MOMENTUM), INV, "SGD param on AdamW"),
    ROW(EP_OPT_SET_DOUBLE, PRE_OPT, M_INT(0, LORA_OPT_NESTEROV), INV, "integer param"),
    ROW(EP_OPT_SET_DOUBLE, PRE_OPT, M_INT(0, 99), INV, "unknown param 99"),
    ROW2(EP_OPT_SET_DOUBLE, PRE_OPT_SGD, M_INT(0, LORA_OPT_DAMPENING), M_DBL(1.5), INV,
         "DAMPENING 1.5"),
    ROW2(EP_OPT_SET_DOUBLE, PRE_OPT_SGD, M_INT(0, LORA_OPT_BETA1), M_DBL(0.5), INV,
         "AdamW param on SGD"),
    ROW(EP_OPT_GET_INT, PRE_OPT, M_HANDLE, INV, "opt NULL"),
    ROW(EP_OPT_GET_INT, PRE_OPT, M_VNULL(0), INV, "value NULL"),
    ROW(EP_OPT_GET_INT, PRE_OPT, M_INT(0, LORA_OPT_LR), INV, "double param LR"),
    ROW(EP_OPT_GET_INT, PRE_OPT, M_INT(0, -7), INV, "param -7"),
    ROW(EP_OPT_GET_DOUBLE, PRE_OPT, M_HANDLE, INV, "opt NULL"),
    ROW(EP_OPT_GET_DOUBLE, PRE_OPT, M_VNULL(0), INV, "value NULL"),
    ROW(EP_OPT_GET_DOUBLE, PRE_OPT, M_INT(0, LORA_OPT_STEP), INV, "integer param STEP"),
    ROW(EP_OPT_GET_DOUBLE, PRE_OPT, M_INT(0, 0), INV, "param 0"),
    ROW(EP_OPT_STEP, PRE_OPT, M_HANDLE, INV, "opt NULL"),
    ROW(EP_OPT_STEP, PRE_OPT, M_AD2, INV, "ad NULL"),
    ROW(EP_OPT_STEP, PRE_OPT, M_OTHER_AD, INV, "ad shaped unlike the optimizer's"),
    ROW(EP_OPT_STEP, PRE_OPT_NESTEROV, M_NONE, INV, "NESTEROV without MOMENTUM"),
    ROW(EP_OPT_RESET, PRE_OPT, M_HANDLE, INV, "opt NULL"),
    ROW(EP_OPT_CREATE_SET, PRE_SELF, M_OUT, INV, "out NULL"),
    ROW(EP_OPT_CREATE_SET, PRE_SELF, M_VNULL(0), INV, "adapters NULL"),
    ROW(EP_OPT_CREATE_SET, PRE_SELF, M_INT(2, 0), INV, "n 0"),
    ROW(EP_OPT_CREATE_SET, PRE_SELF, M_AD0, INV, "adapters[0] NULL"),
    ROW(EP_OPT_CREATE_SET, PRE_SELF, M_AD2, INV, "adapters[1] NULL"),
    ROW(EP_OPT_CREATE_SET, PRE_SELF, M_DUP, INV, "one adapter twice"),
    ROW(EP_OPT_CREATE_SET, PRE_SELF, M_INT(0, 2), INV, "unknown kind 2"),
    ROW(EP_OPT_STEP_SET, PRE_OPT, M_HANDLE, INV, "opt NULL"),
    ROW(EP_OPT_STEP_SET, PRE_OPT, M_VNULL(0), INV, "adapters NULL"),
    ROW(EP_OPT_STEP_SET, PRE_OPT, M_INT(2, 0), INV, "n 0, made for 1"),
    ROW(EP_OPT_STEP_SET, PRE_OPT, M_INT(2, 2), INV, "n 2, made for 1"),
    ROW(EP_OPT_STEP_SET, PRE_OPT, M_AD0, INV, "adapters[0] NULL"),
    ROW(EP_OPT_STEP_SET, PRE_OPT, M_OTHER_AD, INV, "adapters[0] shaped unlike"),
    ROW(EP_OPT_STEP_SET, PRE_OPT_NESTEROV, M_NONE, INV, "NESTEROV without MOMENTUM"),

    /* ---- flat parameters and gradients ---- */
    ROW(EP_PARAM_COUNT, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_PARAM_COUNT, PRE_SELF, M_VNULL(0), INV, "count NULL"),
    ROW(EP_GET_PARAMS_FLAT, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_GET_PARAMS_FLAT, PRE_SELF, M_NULL(0), INV, "dst NULL"),
    ROW(EP_GET_PARAMS_FLAT, PRE_SELF, M_INT(2, 0), INV, "count 0"),
    ROW(EP_GET_PARAMS_FLAT, PRE_SELF, M_DCOUNT(-1), INV, "count one short"),
    ROW(EP_GET_PARAMS_FLAT, PRE_SELF, M_INT(2, -1), INV, "count SIZE_MAX"),
    ROW(EP_GET_GRADS_FLAT, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_GET_GRADS_FLAT, PRE_SELF, M_NULL(0), INV, "dst NULL"),
    ROW(EP_GET_GRADS_FLAT, PRE_SELF, M_DCOUNT(1), INV, "count one over"),
    ROW(EP_SET_PARAMS_FLAT, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_SET_PARAMS_FLAT, PRE_SELF, M_NULL(0), INV, "src NULL"),
    ROW(EP_SET_PARAMS_FLAT, PRE_SELF, M_INT(2, 16), INV, "count of one factor"),
    ROW(EP_SET_PARAMS_FLAT, PRE_SELF, M_NAN(0), NONF, "NaN first"),
    ROW(EP_SET_PARAMS_FLAT, PRE_SELF, M_INF(0), NONF, "-Inf last"),
    ROW(EP_SET_GRADS_FLAT, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_SET_GRADS_FLAT, PRE_SELF, M_NULL(0), INV, "src NULL"),
    ROW(EP_SET_GRADS_FLAT, PRE_SELF, M_INT(2, -1), INV, "count SIZE_MAX"),
    ROW(EP_SET_GRADS_FLAT, PRE_SELF, M_NAN(0), NONF, "NaN first"),
    ROW(EP_SET_GRADS_FLAT, PRE_SELF, M_INF(0), NONF, "-Inf last"),

    /* ---- merge and serving ---- */
    ROW(EP_MERGE, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_MERGE, PRE_SELF, M_NULL(0), INV, "weight NULL"),
    ROW(EP_MERGE, PRE_SELF, M_INT(0, 0), INV, "target 0"),
    ROW(EP_MERGE, PRE_SELF, M_INT(0, 12), INV, "target mask O|V"),
    ROW(EP_MERGE, PRE_QV, M_INT(0, TK), INV, "K not adapted"),
    ROW(EP_MERGE, PRE_SELF, M_INT(2, 63), INV, "count one short"),
    ROW(EP_MERGE, PRE_SELF, M_INT(2, -1), INV, "count SIZE_MAX"),
    ROW(EP_MERGE, PRE_SELF, M_NAN(0), NONF, "NaN in weight"),
    ROW(EP_UNMERGE, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_UNMERGE, PRE_SELF, M_NULL(0), INV, "weight NULL"),
    ROW(EP_UNMERGE, PRE_QV, M_INT(0, TO), INV, "O not adapted"),
    ROW(EP_UNMERGE, PRE_SELF, M_INT(2, 0), INV, "count 0"),
    ROW(EP_UNMERGE, PRE_SELF, M_INF(0), NONF, "-Inf in weight"),
    ROW(EP_FORWARD_MERGED, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_FORWARD_MERGED, PRE_SELF, M_NULL(0), INV, "x NULL"),
    ROW(EP_FORWARD_MERGED, PRE_SELF, M_NULL(1), INV, "out NULL"),
    ROW(EP_FORWARD_MERGED, PRE_SELF, M_INT(0, 0), SHP, "batch 0"),
    ROW(EP_FORWARD_MERGED, PRE_SELF, M_INT(1, -1), SHP, "seq_len -1"),
    ROW2(EP_FORWARD_MERGED, PRE_SELF, M_INT(0, BIG), M_INT(1, BIG), SHP, "2^32 x 2^32"),
    ROW(EP_FORWARD_MERGED, PRE_SELF, M_NAN(0), NONF, "NaN in x"),
    ROW(EP_FORWARD_MERGED, PRE_NO_BASE_O, M_NONE, STATE, "W_O unset"),
    ROW(EP_FORWARD_MERGED_CROSS, PRE_CROSS, M_HANDLE, INV, "ad NULL"),
    ROW(EP_FORWARD_MERGED_CROSS, PRE_CROSS, M_NULL(1), INV, "xkv NULL"),
    ROW(EP_FORWARD_MERGED_CROSS, PRE_CROSS, M_NULL(2), INV, "out NULL"),
    ROW(EP_FORWARD_MERGED_CROSS, PRE_CROSS, M_INT(2, 0), SHP, "len_kv 0"),
    ROW(EP_FORWARD_MERGED_CROSS, PRE_CROSS, M_INT(2, INT64_MAX), SHP, "len_kv overflows"),
    ROW2(EP_FORWARD_MERGED_CROSS, PRE_CROSS, M_INT(1, 7), M_INT(2, 5), SHP,
         "causal: len_q 7 > len_kv 5"),
    ROW(EP_FORWARD_MERGED_CROSS, PRE_CROSS, M_INF(1), NONF, "-Inf in xkv"),
    ROW(EP_FORWARD_MERGED_CROSS, PRE_NO_BASE_Q, M_NONE, STATE, "W_Q unset"),
    ROW(EP_SET_BASE_BORROWED, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_SET_BASE_BORROWED, PRE_SELF, M_NULL(0), INV, "weight NULL"),
    ROW(EP_SET_BASE_BORROWED, PRE_SELF, M_INT(0, 7), INV, "target mask Q|K|V"),
    ROW(EP_SET_BASE_BORROWED, PRE_QV, M_INT(0, TO), INV, "TARGET_O without OUT_PROJ"),
    ROW2(EP_SET_BASE_BORROWED, PRE_SELF, M_INT(0, TV), M_NAN(0), NONF, "NaN in W_V"),
    ROW2(EP_SET_BASE_BORROWED, PRE_SELF, M_INT(0, TO), M_INF(1), NONF, "-Inf in the bias of O"),
    /* NULL and the table's own checks (n, values): attention_suite */
    ROW(EP_SET_ROPE_FREQS, PRE_SELF, M_NONE, INV, "adapter without RoPE"),
    ROW(EP_COPY_PARAMS, PRE_SELF, M_HANDLE, INV, "dst NULL"),
    ROW(EP_COPY_PARAMS, PRE_SELF, M_AD2, INV, "src NULL"),
    ROW(EP_COPY_PARAMS, PRE_SELF, M_OTHER_AD, INV, "src of another rank"),
    ROW(EP_SET_BASE_TYPED, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_SET_BASE_TYPED, PRE_SELF, M_NULL(0), INV, "weight NULL"),
    ROW(EP_SET_BASE_TYPED, PRE_SELF, M_INT(0, 3), INV, "target mask Q|K"),
    ROW(EP_SET_BASE_TYPED, PRE_QV, M_INT(0, TO), INV, "TARGET_O without OUT_PROJ"),
    ROW(EP_SET_BASE_TYPED, PRE_SELF, M_INT(1, 3), LORA_ERR_UNSUPPORTED, "dtype 3"),
    ROW(EP_SET_BASE_TYPED, PRE_SELF, M_INT(1, -1), LORA_ERR_UNSUPPORTED, "dtype -1"),
    ROW(EP_SET_BASE_TYPED, PRE_SELF, M_INT(2, 2), INV, "flags 2"),
    ROW(EP_SET_BASE_TYPED, PRE_SELF, M_INT(2, 0x80000001), INV, "flags BORROW|2^31"),
    ROW2(EP_SET_BASE_TYPED, PRE_SELF, M_INT(0, TV), M_NAN(0), NONF, "NaN in W_V (f32)"),
    ROW2(EP_SET_BASE_TYPED, PRE_SELF, M_INT(0, TO), M_INF(1), NONF, "-Inf in the bias of O"),
    /* ---- KV cache and decoding (cache: batch 2, capacity 4; decode n_new i0 = 1) ---- */
    ROW(EP_KV_CACHE_CREATE, PRE_SELF, M_OUT, INV, "out NULL"),
    ROW(EP_KV_CACHE_CREATE, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_KV_CACHE_CREATE, PRE_SELF, M_INT(0, 0), SHP, "batch 0"),
    ROW(EP_KV_CACHE_CREATE, PRE_SELF, M_INT(1, -1), SHP, "capacity -1"),
    ROW(EP_KV_CACHE_CREATE, PRE_SELF, M_INT(1, INT64_MAX), SHP, "capacity overflows"),
    ROW(EP_KV_CACHE_CREATE, PRE_SELF, M_INT(0, INT64_MAX / 4), SHP, "batch overflows"),
    ROW(EP_KV_CACHE_DESTROY, PRE_NONE, M_HANDLE, W_VOID, "NULL is a no-op"),
    ROW(EP_KV_CACHE_RESET, PRE_SELF, M_HANDLE, INV, "cache NULL"),
    ROW(EP_KV_CACHE_RESET, PRE_SELF, M_INT(0, 2), INV, "b = batch"),
    ROW(EP_KV_CACHE_RESET, PRE_SELF, M_INT(0, -2), INV, "b -2"),
    ROW(EP_KV_CACHE_LENGTH, PRE_SELF, M_HANDLE, INV, "cache NULL"),
    ROW(EP_KV_CACHE_LENGTH, PRE_SELF, M_VNULL(0), INV, "len NULL"),
    ROW(EP_KV_CACHE_LENGTH, PRE_SELF, M_INT(0, -1), INV, "b -1"),
    ROW(EP_KV_CACHE_LENGTH, PRE_SELF, M_INT(0, 2), INV, "b = batch"),
    ROW(EP_DECODE, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_DECODE, PRE_SELF, M_VNULL(0), INV, "cache NULL"),
    ROW(EP_DECODE, PRE_SELF, M_NULL(0), INV, "x NULL"),
    ROW(EP_DECODE, PRE_SELF, M_NULL(1), INV, "out NULL"),
    ROW(EP_DECODE, PRE_SELF, M_INT(0, 0), SHP, "n_new 0"),
    ROW(EP_DECODE, PRE_SELF, M_INT(0, -1), SHP, "n_new -1"),
    ROW(EP_DECODE, PRE_SELF, M_INT(0, 5), SHP, "n_new over capacity"),
    ROW(EP_DECODE, PRE_SELF, M_INT(0, INT64_MAX), SHP, "n_new overflows"),
    ROW(EP_DECODE, PRE_SELF, M_NAN(0), NONF, "NaN in x"),
    ROW(EP_DECODE, PRE_SELF, M_INF(0), NONF, "-Inf in the last x"),
    ROW(EP_DECODE, PRE_NO_BASE_Q, M_NONE, STATE, "W_Q unset"),
    ROW(EP_DECODE, PRE_NO_BASE_O, M_NONE, STATE, "W_O unset"),
    ROW(EP_DECODE, PRE_SELF, M_OTHER_AD, SHP, "cache of another kv geometry"),
    ROW(EP_DECODE_EX, PRE_SELF, M_HANDLE, INV, "ad NULL"),
    ROW(EP_DECODE_EX, PRE_SELF, M_SIZE(0), INV, "args->struct_size 0"),
    ROW(EP_DECODE_EX, PRE_SELF, M_TAIL, LORA_ERR_UNSUPPORTED, "unknown nonzero tail"),
    ROW(EP_DECODE_EX, PRE_SELF, M_FLAGS(1), INV, "flags 1"),
    ROW(EP_DECODE_EX, PRE_SELF, M_AD0, INV, "tenants[0] NULL"),
    ROW(EP_DECODE_EX, PRE_SELF, M_INT(2, 0), INV, "n_tenants 0"),
    ROW(EP_DECODE_EX, PRE_SELF, M_TENANT(1), INV, "tenant id = n_tenants"),
    ROW(EP_DECODE_EX, PRE_SELF, M_TENANT(-2), INV, "tenant id -2"),
    ROW(EP_DECODE_EX, PRE_SELF, M_CFG_MISMATCH, SHP, "a tenant of another width"),
    ROW(EP_DECODE_EX, PRE_SELF, M_VNULL(1), INV, "tenant_of_seq NULL with tenants"),
    ROW(EP_DECODE_EX, PRE_SELF, M_MASK(0), INV, "n_tokens[0] -1"),
    ROW(EP_DECODE_EX, PRE_SELF, M_NAN(0), NONF, "NaN in a read row of x"),
    ROW(EP_APPLY, PRE_SELF, M_VNULL(0), INV, "tenants NULL"),
    ROW(EP_APPLY, PRE_SELF, M_AD0, INV, "tenants[0] NULL"),
    ROW(EP_APPLY, PRE_SELF, M_INT(2, 0), INV, "n_tenants 0"),
    ROW(EP_APPLY, PRE_SELF, M_INT(0, 5), INV, "target mask Q|V"),
    ROW(EP_APPLY, PRE_QV, M_INT(0, TK), INV, "K not adapted"),
    ROW(EP_APPLY, PRE_SELF, M_CFG_MISMATCH, SHP, "a tenant of another width"),
    ROW(EP_APPLY, PRE_SELF, M_INT(1, -1), SHP, "rows -1"),
    ROW(EP_APPLY, PRE_SELF, M_INT(1, INT64_MAX), SHP, "rows overflow"),
    ROW(EP_APPLY, PRE_SELF, M_VNULL(1), INV, "tenant_of_row NULL"),
    ROW(EP_APPLY, PRE_SELF, M_NULL(0), INV, "x NULL"),
    ROW(EP_APPLY, PRE_SELF, M_NULL(1), INV, "y NULL"),
    ROW(EP_APPLY, PRE_SELF, M_TENANT(1), INV, "tenant id = n_tenants"),
    ROW(EP_APPLY, PRE_SELF, M_TENANT(-2), INV, "tenant id -2"),
    ROW(EP_APPLY, PRE_SELF, M_NAN(0), NONF, "NaN in a read row of x"),
    ROW(EP_APPLY_WITH_ERROR, PRE_SELF, M_VNULL(0), INV, "tenants NULL"),
    ROW(EP_APPLY_WITH_ERROR, PRE_QV, M_INT(0, TK), INV, "K not adapted"),
    ROW(EP_APPLY_WITH_ERROR, PRE_SELF, M_CFG_MISMATCH, SHP, "a tenant of another width"),
    ROW(EP_APPLY_WITH_ERROR, PRE_SELF, M_TENANT(INT32_MAX), INV, "tenant id INT32_MAX"),
    ROW(EP_APPLY_WITH_ERROR, PRE_SELF, M_INF(0), NONF, "-Inf in a read row of x"),

    /* ---- I/O ---- */
    ROW(EP_SAVE_PEFT, PRE_SELF, M_NULL(0), INV, "dir NULL"),
    ROW(EP_SAVE_PEFT, PRE_SELF, M_VNULL(0), INV, "adapters NULL"),
    ROW(EP_SAVE_PEFT, PRE_SELF, M_VNULL(1), INV, "layers NULL"),
    ROW(EP_SAVE_PEFT, PRE_SELF, M_INT(2, 0), INV, "count 0"),
    ROW(EP_SAVE_PEFT, PRE_SELF, M_AD0, INV, "adapters[0] NULL"),
    ROW(EP_SAVE_PEFT, PRE_SELF, M_LAYER(-1), INV, "layer -1"),
    ROW(EP_SAVE_PEFT, PRE_SELF, M_LAYER(INT64_C(1) << 31), INV, "layer 2^31"),
    ROW(EP_SAVE_PEFT, PRE_SELF, M_DUP, INV, "duplicate layer"),
    ROW(EP_SAVE_PEFT, PRE_SELF, M_OTHER_AD, INV, "adapters of different ranks"),
    ROW(EP_SAVE_PEFT, PRE_SELF, M_MISSING, LORA_ERR_IO, "parent directory missing"),
    ROW(EP_SAVE_GGUF, PRE_SELF, M_NULL(0), INV, "path NULL"),
    ROW(EP_SAVE_GGUF, PRE_SELF, M_VNULL(0), INV, "adapters NULL"),
    ROW(EP_SAVE_GGUF, PRE_SELF, M_INT(2, 0), INV, "count 0"),
    ROW(EP_SAVE_GGUF, PRE_SELF, M_LAYER(-5), INV, "layer -5"),
    ROW(EP_SAVE_GGUF, PRE_SELF, M_DUP, INV, "duplicate layer"),
    ROW(EP_SAVE_GGUF, PRE_SELF, M_MISSING, LORA_ERR_IO, "directory missing"),
    ROW(EP_SAVE_PEFT_EX, PRE_SELF, M_NULL(0), INV, "dir NULL"),
    ROW(EP_SAVE_PEFT_EX, PRE_SELF, M_VNULL(0), INV, "adapters NULL"),
    ROW(EP_SAVE_PEFT_EX, PRE_SELF, M_VNULL(1), INV, "layers NULL"),
    ROW(EP_SAVE_PEFT_EX, PRE_SELF, M_INT(2, 0), INV, "count 0"),
    ROW(EP_SAVE_PEFT_EX, PRE_SELF, M_DUP, INV, "duplicate layer"),
    ROW(EP_SAVE_PEFT_EX, PRE_SELF, M_OTHER_AD, INV, "adapters of different ranks"),
    ROW(EP_SAVE_PEFT_EX, PRE_SELF, M_SIZE(0), INV, "options struct_size 0"),
    ROW(EP_SAVE_PEFT_EX, PRE_SELF, M_SIZE(8), INV, "options struct_size 8"),
    ROW(EP_SAVE_PEFT_EX, PRE_SELF, M_BASE_MODEL, INV, "base_model_name_or_path \\x01"),
    ROW(EP_SAVE_PEFT_EX, PRE_SELF, M_MISSING, LORA_ERR_IO, "parent directory missing"),
    ROW(EP_SAVE_GGUF_EX, PRE_SELF, M_NULL(0), INV, "path NULL"),
    ROW(EP_SAVE_GGUF_EX, PRE_SELF, M_VNULL(0), INV, "adapters NULL"),
    ROW(EP_SAVE_GGUF_EX, PRE_SELF, M_INT(2, 0), INV, "count 0"),
    ROW(EP_SAVE_GGUF_EX, PRE_SELF, M_LAYER(-5), INV, "layer -5"),
    ROW(EP_SAVE_GGUF_EX, PRE_SELF, M_DUP, INV, "duplicate layer"),
    ROW(EP_SAVE_GGUF_EX, PRE_SELF, M_SIZE(12), INV, "options struct_size 12"),
    ROW(EP_SAVE_GGUF_EX, PRE_SELF, M_BASE_MODEL, INV, "base_model_name_or_path \\x01"),
    ROW(EP_SAVE_GGUF_EX, PRE_SELF, M_MISSING, LORA_ERR_IO, "directory missing"),
    ROW(EP_LOAD_PEFT, PRE_SELF, M_NULL(0), INV, "dir NULL"),
    ROW(EP_LOAD_PEFT, PRE_SELF, M_HANDLE, INV, "cfg NULL"),
    ROW(EP_LOAD_PEFT, PRE_SELF, M_VNULL(1), INV, "count NULL"),
    ROW(EP_LOAD_PEFT, PRE_SELF, M_INT(2, 0), INV, "capacity 0 with an array"),
    ROW(EP_LOAD_PEFT, PRE_SELF, M_MISSING, LORA_ERR_IO, "no such directory"),
    ROW(EP_LOAD_PEFT, PRE_SELF, M_GARBAGE(0), LORA_ERR_FORMAT, "safetensors is text"),
    ROW(EP_LOAD_PEFT, PRE_SELF, M_GARBAGE(1), LORA_ERR_FORMAT, "adapter_config.json is text"),
    ROW(EP_LOAD_PEFT, PRE_SELF, M_TRUNC, LORA_ERR_FORMAT, "safetensors cut in half"),
    ROW(EP_LOAD_PEFT, PRE_SELF, M_CFG_MISMATCH, SHP, "cfg of another width"),
    ROW(EP_LOAD_GGUF, PRE_SELF, M_NULL(0), INV, "path NULL"),
    ROW(EP_LOAD_GGUF, PRE_SELF, M_HANDLE, INV, "cfg NULL"),
    ROW(EP_LOAD_GGUF, PRE_SELF, M_VNULL(1), INV, "count NULL"),
    ROW(EP_LOAD_GGUF, PRE_SELF, M_INT(2, 0), INV, "capacity 0 with an array"),
    ROW(EP_LOAD_GGUF, PRE_SELF, M_MISSING, LORA_ERR_IO, "no such file"),
    ROW(EP_LOAD_GGUF, PRE_SELF, M_GARBAGE(0), LORA_ERR_FORMAT, "file is text"),
    ROW(EP_LOAD_GGUF, PRE_SELF, M_TRUNC, LORA_ERR_FORMAT, "file cut in half"),
    ROW(EP_LOAD_GGUF, PRE_SELF, M_CFG_MISMATCH, SHP, "cfg of another width"),
};
#define N_BAD_ROWS ((int)(sizeof bad_rows / sizeof bad_rows[0]))

/* ---- running a row -------------------------------------------------------------------- */

typedef struct row_env {
    int pre;
    tfx f;         /* adapter states */
    int have_f;
    float *snap;   /* gradients before the call */
    lora_optimizer *opt;
    lora_config *cfg;
    int64_t cfg_before[CFG_PARAM_UNKNOWN]; /* config states: every param before */
    double cfg_before_d[CFG_PARAM_UNKNOWN];
} row_env;

static const int tbits[REF_NPROJ] = {TQ, TK, TV, TO};

static int proj_of(int target)
{
    switch (target) {
    case TQ: return REF_Q;
    case TK: return REF_K;
    case TV: return REF_V;
    case TO: return REF_O;
    default: return -1;
    }
}

/* Replaces the fixture's adapter by one holding the same factors and every base but
 * projection `missing`. */
static void drop_base(tfx *f, int missing)
{
    lora_adapter_destroy(f->ad);
    f->ad = NULL;
    const ref_layer *l = &f->l;
    lora_config *cfg = cfg_new(l->cfg.d_model);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, l->n_heads), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, l->n_kv_heads), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RANK, l->rank), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_TARGETS, l->targets), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_OUT_PROJ, l->cfg.out_proj), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_CAUSAL, l->cfg.causal), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_BACKEND, LORA_BACKEND_EXACT), LORA_OK);
    ck_assert_int_eq(lora_adapter_create(&f->ad, cfg), LORA_OK);
    lora_config_destroy(cfg);
    float w[64], bias[8], p[16];
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_has_proj(l, t))
            continue;
        if (ref_is_adapted(l, t)) {
            const size_t na = (size_t)(l->rank * l->in[t]), nb = (size_t)(l->out[t] * l->rank);
            ref_to_float(l->a[t], p, na);
            ck_assert_int_eq(lora_adapter_set_param(f->ad, tbits[t], LORA_A, p, na), LORA_OK);
            ref_to_float(l->b[t], p, nb);
            ck_assert_int_eq(lora_adapter_set_param(f->ad, tbits[t], LORA_B, p, nb), LORA_OK);
        }
        if (t == missing)
            continue;
        ref_to_float(l->w[t], w, (size_t)(l->out[t] * l->in[t]));
        ref_to_float(l->bias[t], bias, (size_t)l->out[t]);
        ck_assert_int_eq(lora_adapter_set_base(f->ad, tbits[t], w, bias), LORA_OK);
    }
}

static void cfg_snapshot(const lora_config *cfg, int64_t *iv, double *dv)
{
    for (int p = 1; p < CFG_PARAM_UNKNOWN; p++) {
        iv[p] = INT64_MIN;
        dv[p] = NAN;
        if (lora_config_get_int(cfg, p, &iv[p]) != LORA_OK)
            ck_assert_int_eq(lora_config_get_double(cfg, p, &dv[p]), LORA_OK);
    }
}

static void env_setup(row_env *e, int pre)
{
    memset(e, 0, sizeof *e);
    e->pre = pre;
    if (pre_is_config(pre)) {
        if (pre == PRE_CFG_EMPTY) {
            ck_assert_int_eq(lora_config_create(&e->cfg), LORA_OK);
        } else {
            e->cfg = cfg_new(pre == PRE_CFG_INDIV ? 10 : 8);
        }
        lora_config *c = e->cfg;
        switch (pre) {
        case PRE_CFG_KV:
            ck_assert_int_eq(lora_config_set_int(c, LORA_CFG_N_HEADS, 4), LORA_OK);
            ck_assert_int_eq(lora_config_set_int(c, LORA_CFG_N_KV_HEADS, 3), LORA_OK);
            break;
        case PRE_CFG_INDIV:
            ck_assert_int_eq(lora_config_set_int(c, LORA_CFG_N_HEADS, 4), LORA_OK);
            break;
        case PRE_CFG_O:
            ck_assert_int_eq(lora_config_set_int(c, LORA_CFG_TARGETS, 15), LORA_OK);
            break;
        case PRE_CFG_HUGE:
            ck_assert_int_eq(lora_config_set_int(c, LORA_CFG_D_MODEL, INT64_C(1) << 24), LORA_OK);
            ck_assert_int_eq(lora_config_set_int(c, LORA_CFG_N_HEADS, INT64_C(1) << 24), LORA_OK);
            ck_assert_int_eq(lora_config_set_int(c, LORA_CFG_HEAD_DIM, INT64_C(1) << 24), LORA_OK);
            ck_assert_int_eq(lora_config_set_int(c, LORA_CFG_RANK, INT64_C(1) << 24), LORA_OK);
            break;
        default: break;
        }
        cfg_snapshot(e->cfg, e->cfg_before, e->cfg_before_d);
        return;
    }
    if (!pre_is_adapter(pre))
        return;
    e->have_f = 1;
    if (pre == PRE_QV) {
        const ref_config c = {.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .rank = 2,
                              .bias = 1}; /* targets default Q|V, no out-proj */
        tfx_init_config(&e->f, &c, 0);
        e->snap = tfx_prime(&e->f);
        return;
    }
    tfx_init(&e->f, pre == PRE_CROSS, 1);
    if (pre_no_base(pre)) {
        drop_base(&e->f, pre - PRE_NO_BASE_Q);
        e->snap = calloc(e->f.ngrads, sizeof(float));
        ck_assert_ptr_nonnull(e->snap);
        return;
    }
    e->snap = tfx_prime(&e->f);
    if (pre_is_opt(pre)) {
        const int kind = pre == PRE_OPT ? LORA_OPTIMIZER_ADAMW : LORA_OPTIMIZER_SGD;
        ck_assert_int_eq(lora_optimizer_create(&e->opt, e->f.ad, kind), LORA_OK);
        if (pre == PRE_OPT_NESTEROV)
            ck_assert_int_eq(lora_optimizer_set_int(e->opt, LORA_OPT_NESTEROV, 1), LORA_OK);
    }
    if (pre == PRE_NOT_SAVED) {
        float a[16];
        ck_assert_int_eq(lora_adapter_get_param(e->f.ad, TQ, LORA_A, a, 16), LORA_OK);
        ck_assert_int_eq(lora_adapter_set_param(e->f.ad, TQ, LORA_A, a, 16), LORA_OK);
    }
}

/* After a row: the handle is unchanged and still works. */
static void env_check_and_free(row_env *e, const char *what)
{
    if (e->cfg) {
        int64_t iv[CFG_PARAM_UNKNOWN];
        double dv[CFG_PARAM_UNKNOWN];
        cfg_snapshot(e->cfg, iv, dv);
        for (int p = 1; p < CFG_PARAM_UNKNOWN; p++)
            ck_assert_msg(iv[p] == e->cfg_before[p] &&
                              (dv[p] == e->cfg_before_d[p] ||
                               (isnan(dv[p]) && isnan(e->cfg_before_d[p]))),
                          "%s: the failed call changed config param %d", what, p);
        lora_config_destroy(e->cfg);
    }
    if (e->opt) {
        int64_t step = -1;
        ck_assert_int_eq(lora_optimizer_get_int(e->opt, LORA_OPT_STEP, &step), LORA_OK);
        ck_assert_msg(step == 0, "%s: the failed call took an optimizer step", what);
        lora_optimizer_destroy(e->opt);
    }
    if (e->have_f) {
        if (pre_no_base(e->pre)) { /* set the missing base: everything works */
            const int t = e->pre - PRE_NO_BASE_Q;
            float w[64], bias[8];
            ref_to_float(e->f.l.w[t], w, (size_t)(e->f.l.out[t] * e->f.l.in[t]));
            ref_to_float(e->f.l.bias[t], bias, (size_t)e->f.l.out[t]);
            ck_assert_int_eq(lora_adapter_set_base(e->f.ad, tbits[t], w, bias), LORA_OK);
        }
        tfx_assert_unchanged_and_works(&e->f, e->snap, what);
        tfx_free(&e->f);
    }
}

/* The arguments of one call. Float buffers end at a guard page. */
typedef struct call_args {
    int null_handle, null_out;
    float *buf[4];
    size_t n[4];
    int null_buf[4], null_vptr[2];
    int64_t i[3];
    double d;
    lora_threshold_report report;
    lora_run_info info;
    lora_save_options save_opts;
    int64_t value_i, rows, cols;
    double value_d, loss;
    lora_allocator alloc;
    int alias;
    lora_config *cfg_out;
    lora_adapter *ad_out;
    lora_optimizer *opt_out;
    /* second adapters, files */
    lora_adapter *ad2;       /* same shape as the fixture's, or rank 3 (MK_OTHER_AD) */
    int null_ad2;
    lora_adapter *adv[2];    /* save: adapters */
    int64_t lay[4];          /* save: layers; load: layers out */
    int null_adv, null_lay;
    char tmp[64], path[128]; /* a private directory; the file or directory of the call */
    int null_path;
    lora_config *load_cfg;
    lora_adapter *loaded[4];
    size_t count_out;
    /* forward_ex / backward_ex: the per-call arguments (room for a longer struct), the
     * tape (and the adapter of a foreign one), dxkv of a self-attention backward */
    struct {
        lora_attn_args a;
        unsigned char tail[32];
    } ex;
    lora_tape *tape, *tape_out;
    lora_adapter *tape_owner;
    int self_dxkv;
    int32_t tid[4];    /* apply: tenant_of_row; decode_ex: tenant_of_seq */
    lora_kv_cache *cache, *cache_out; /* decode: batch 2, capacity 4 */
    struct {
        lora_decode_args a;
        unsigned char tail[32];
    } dex;
    int64_t n_tokens[2]; /* decode_ex */
    char errbuf[256];  /* apply_with_error: the caller's message buffer */
} call_args;

static void *plain_alloc(void *u, size_t n) { (void)u; return malloc(n); }
static void plain_free(void *u, void *p) { (void)u; free(p); }

static float *guarded_copy(const float *src, size_t n)
{
    float *p = guarded_alloc(n);
    if (src)
        memcpy(p, src, n * sizeof(float));
    return p;
}

/* The row's integer arguments, good defaults first, then the mutations. */
static void apply_int(const mutation *m, call_args *a)
{
    if (m->kind == MK_INT)
        a->i[m->k] = m->v;
    else if (m->kind == MK_DCOUNT)
        a->i[m->k] += m->v;
    else if (m->kind == MK_DOUBLE)
        a->d = m->d;
}

/* Element count of factor (target, which) in the fixture, 0 if there is none. */
static size_t factor_count(const tfx *f, int target, int which)
{
    const int t = proj_of(target);
    if (t < 0 || !ref_is_adapted(&f->l, t) || (which != LORA_A && which != LORA_B))
        return 0;
    return (size_t)(which == LORA_A ? f->l.rank * f->l.in[t] : f->l.out[t] * f->l.rank);
}

/* A config for the fixture's layer (d_model_override > 0 replaces D_MODEL). */
static lora_config *fixture_cfg(const tfx *f, int d_model_override, int rank_override)
{
    const ref_layer *l = &f->l;
    lora_config *cfg = cfg_new(d_model_override > 0 ? d_model_override : l->cfg.d_model);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, l->n_heads), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, l->n_kv_heads), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RANK,
                                         rank_override > 0 ? rank_override : l->rank),
                     LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_TARGETS, l->targets), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_OUT_PROJ, l->cfg.out_proj), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_CAUSAL, l->cfg.causal), LORA_OK);
    return cfg;
}

static void remove_tree(const char *path)
{
    DIR *d = opendir(path);
    if (d) {
        struct dirent *de;
        while ((de = readdir(d)) != NULL) {
            if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
                continue;
            char sub[512];
            snprintf(sub, sizeof sub, "%s/%s", path, de->d_name);
            remove_tree(sub);
        }
        closedir(d);
        rmdir(path);
    } else {
        unlink(path);
    }
}

static void write_file(const char *path, const char *text)
{
    FILE *fp = fopen(path, "wb");
    ck_assert_ptr_nonnull(fp);
    fputs(text, fp);
    fclose(fp);
}

static void truncate_half(const char *path)
{
    struct stat st;
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_int_eq(truncate(path, st.st_size / 2), 0);
}

/* Second adapters, temporary files and the I/O calls' arguments. */
static void files_and_adapters(const bad_row *r, row_env *e, call_args *a)
{
    const tfx *f = &e->f;
    const int other = r->m.kind == MK_OTHER_AD || r->m2.kind == MK_OTHER_AD;
    const int ep = r->ep;
    if (ep == EP_COPY_PARAMS || ep == EP_OPT_STEP || ep_is_save(ep)) {
        if (other) {
            lora_config *cfg = fixture_cfg(f, 0, 3);
            ck_assert_int_eq(lora_adapter_create(&a->ad2, cfg), LORA_OK);
            lora_config_destroy(cfg);
        } else {
            ck_assert_int_eq(ref_make_adapter(&f->l, LORA_BACKEND_EXACT, 1, &a->ad2), LORA_OK);
        }
    }
    if (ep == EP_KV_CACHE_RESET || ep == EP_KV_CACHE_LENGTH || ep == EP_DECODE ||
        ep == EP_DECODE_EX) {
        if (other) { /* a cache made for 2 kv heads */
            lora_config *cfg = fixture_cfg(f, 0, 0);
            ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, 2), LORA_OK);
            ck_assert_int_eq(lora_adapter_create(&a->ad2, cfg), LORA_OK);
            lora_config_destroy(cfg);
        }
        ck_assert_int_eq(lora_kv_cache_create(&a->cache, other ? a->ad2 : f->ad, 2, 4), LORA_OK);
    }
    if (ep == EP_DECODE_EX) {
        a->adv[0] = f->ad;
        if (r->m.kind == MK_CFG_MISMATCH) { /* a second tenant of width 16 */
            lora_config *cfg = fixture_cfg(f, 16, 0);
            ck_assert_int_eq(lora_adapter_create(&a->ad2, cfg), LORA_OK);
            lora_config_destroy(cfg);
            a->adv[1] = a->ad2;
            a->i[2] = 2;
            a->tid[1] = 1;
        }
        return;
    }
    if (ep == EP_APPLY || ep == EP_APPLY_WITH_ERROR) {
        a->adv[0] = f->ad;
        if (r->m.kind == MK_CFG_MISMATCH) { /* a second tenant of width 16 */
            lora_config *cfg = fixture_cfg(f, 16, 0);
            ck_assert_int_eq(lora_adapter_create(&a->ad2, cfg), LORA_OK);
            lora_config_destroy(cfg);
            a->adv[1] = a->ad2;
            a->i[2] = 2;
        }
        return;
    }
    if (ep == EP_OPT_STEP && !other)
        a->ad2 = (lora_adapter_destroy(a->ad2), NULL); /* steps the fixture's own adapter */
    if (ep == EP_OPT_CREATE_SET || ep == EP_OPT_STEP_SET) {
        /* create_set: the fixture's adapter and a twin; step_set: the fixture's alone
         * (the optimizer's set), or one of rank 3. */
        if (ep == EP_OPT_CREATE_SET || other) {
            lora_config *cfg = fixture_cfg(f, 0, other ? 3 : 0);
            ck_assert_int_eq(lora_adapter_create(&a->ad2, cfg), LORA_OK);
            lora_config_destroy(cfg);
        }
        a->adv[0] = ep == EP_OPT_STEP_SET && other ? a->ad2 : f->ad;
        a->adv[1] = ep == EP_OPT_CREATE_SET ? a->ad2 : NULL;
        if (r->m.kind == MK_DUP_LAYER)
            a->adv[1] = a->adv[0];
        if (r->m.kind == MK_AD2_NULL)
            a->adv[1] = NULL;
        return;
    }
    if (!ep_is_save(ep) && ep != EP_LOAD_PEFT && ep != EP_LOAD_GGUF)
        return;
    snprintf(a->tmp, sizeof a->tmp, "/tmp/lora_errors_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(a->tmp));
    const int gguf = ep == EP_SAVE_GGUF || ep == EP_SAVE_GGUF_EX || ep == EP_LOAD_GGUF;
    snprintf(a->path, sizeof a->path, "%s/%s", a->tmp, gguf ? "adapter.gguf" : "peft");
    a->adv[0] = f->ad;
    a->adv[1] = a->ad2;
    a->lay[0] = 0;
    a->lay[1] = 1;
    const mutation *ms[2] = {&r->m2, &r->m};
    if (ep_is_save(ep)) {
        for (int j = 0; j < 2; j++) {
            if (ms[j]->kind == MK_DUP_LAYER) {
                a->i[2] = 2;
                a->lay[1] = 0;
            } else if (ms[j]->kind == MK_OTHER_AD) {
                a->i[2] = 2;
            } else if (ms[j]->kind == MK_FILE_MISSING) {
                snprintf(a->path, sizeof a->path, "%s/no/such/%s", a->tmp,
                         gguf ? "adapter.gguf" : "peft");
            }
        }
        return;
    }
    /* Loading: a good file from the fixture's adapter, then what the row breaks. */
    lora_adapter *one[1] = {f->ad};
    const int64_t layer0[1] = {0};
    ck_assert_int_eq(gguf ? lora_save_gguf(a->path, one, layer0, 1, NULL)
                          : lora_save_peft(a->path, one, layer0, 1),
                     LORA_OK);
    a->load_cfg = fixture_cfg(f, 0, 0);
    char file[192];
    for (int j = 0; j < 2; j++) {
        const mutation *m = ms[j];
        switch (m->kind) {
        case MK_FILE_MISSING:
            snprintf(a->path, sizeof a->path, "%s/missing", a->tmp);
            break;
        case MK_FILE_GARBAGE:
            if (gguf)
                snprintf(file, sizeof file, "%s", a->path);
            else
                snprintf(file, sizeof file, "%s/%s", a->path,
                         m->k == 1 ? "adapter_config.json" : "adapter_model.safetensors");
            write_file(file, "this is not an adapter file\n");
            break;
        case MK_FILE_TRUNC:
            if (gguf)
                snprintf(file, sizeof file, "%s", a->path);
            else
                snprintf(file, sizeof file, "%s/adapter_model.safetensors", a->path);
            truncate_half(file);
            break;
        case MK_CFG_MISMATCH:
            lora_config_destroy(a->load_cfg);
            a->load_cfg = fixture_cfg(f, 16, 0);
            break;
        default: break;
        }
    }
}

/* Sets mask field k of args to bad values (lengths -1, positions beyond +-2^52;
 * segment ids have no bad value). */
static void set_mask(lora_attn_args *args, int k)
{
    static int64_t lens[64], pos[64], neg[64];
    for (int i = 0; i < 64; i++) {
        lens[i] = -1;
        pos[i] = INT64_C(1) << 62;
        neg[i] = -(INT64_C(1) << 62);
    }
    switch (k) {
    case 0: args->q_lens = lens; break;
    case 1: args->kv_lens = lens; break;
    case 2: args->q_pos = pos; break;
    default: args->kv_pos = neg; break;
    }
}

/* The tape of a row: kind 0 recorded by an identical second adapter, 1 the fixture's
 * adapter's and empty, 2 the fixture's, recorded, then made stale by a set_param that
 * writes the values the factor holds. */
static void make_tape(row_env *e, call_args *a, int kind)
{
    tfx *f = &e->f;
    lora_adapter *owner = f->ad;
    if (kind == 0) {
        ck_assert_int_eq(ref_make_adapter(&f->l, LORA_BACKEND_EXACT, 1, &a->tape_owner),
                         LORA_OK);
        owner = a->tape_owner;
    }
    ck_assert_int_eq(lora_tape_create(&a->tape, owner), LORA_OK);
    if (kind == 1)
        return;
    lora_attn_args rec = {.struct_size = sizeof rec, .tape = a->tape};
    float *out = malloc(f->nout * sizeof(float));
    ck_assert_ptr_nonnull(out);
    ck_assert_int_eq(lora_forward_ex(owner, &rec, f->xq, f->p.cross ? f->xkv : NULL,
                                     f->p.batch, f->p.len_q, f->p.len_kv, out),
                     LORA_OK);
    free(out);
    if (kind == 2) {
        float p[16];
        ck_assert_int_eq(lora_adapter_get_param(owner, TQ, LORA_A, p, 16), LORA_OK);
        ck_assert_int_eq(lora_adapter_set_param(owner, TQ, LORA_A, p, 16), LORA_OK);
    }
    a->ex.a.tape = a->tape;
}

static void build_args(const bad_row *r, row_env *e, call_args *a)
{
    memset(a, 0, sizeof *a);
    const tfx *f = &e->f;
    /* Good integer arguments. */
    switch (r->ep) {
    case EP_STATUS_STRING: a->i[0] = LORA_OK; break;
    case EP_CONFIG_SET_INT: a->i[0] = LORA_CFG_RANK; a->i[1] = 4; break;
    case EP_CONFIG_SET_DOUBLE: a->i[0] = LORA_CFG_ALPHA; a->d = 1.0; break;
    case EP_CONFIG_GET_INT: a->i[0] = LORA_CFG_D_MODEL; break;
    case EP_CONFIG_GET_DOUBLE: a->i[0] = LORA_CFG_ALPHA; break;
    case EP_SET_BASE:
    case EP_SET_BASE_BORROWED: a->i[0] = TQ; break;
    case EP_SET_BASE_TYPED: a->i[0] = TQ; a->i[1] = LORA_DTYPE_F32; a->i[2] = 0; break;
    case EP_APPLY:
    case EP_APPLY_WITH_ERROR: a->i[0] = TQ; a->i[1] = 3; a->i[2] = 1; break;
    case EP_KV_CACHE_CREATE: a->i[0] = 2; a->i[1] = 4; break;
    case EP_DECODE: a->i[0] = 1; break;
    case EP_DECODE_EX: a->i[0] = 1; a->i[2] = 1; break;
    case EP_OPT_CREATE: a->i[0] = LORA_OPTIMIZER_ADAMW; break;
    case EP_OPT_SET_INT: a->i[0] = LORA_OPT_NESTEROV; a->i[1] = 0; break;
    case EP_OPT_SET_DOUBLE: a->i[0] = LORA_OPT_LR; a->d = 1e-3; break;
    case EP_OPT_GET_INT: a->i[0] = LORA_OPT_STEP; break;
    case EP_OPT_GET_DOUBLE: a->i[0] = LORA_OPT_LR; break;
    case EP_OPT_CREATE_SET: a->i[0] = LORA_OPTIMIZER_ADAMW; a->i[2] = 2; break;
    case EP_OPT_STEP_SET: a->i[2] = 1; break;
    case EP_GET_PARAMS_FLAT:
    case EP_SET_PARAMS_FLAT:
    case EP_GET_GRADS_FLAT:
    case EP_SET_GRADS_FLAT: {
        size_t n = 0;
        ck_assert_int_eq(lora_adapter_param_count(f->ad, &n), LORA_OK);
        a->i[2] = (int64_t)n;
        break;
    }
    case EP_MERGE:
    case EP_UNMERGE:
        a->i[0] = TQ;
        a->i[2] = (int64_t)(f->l.out[REF_Q] * f->l.in[REF_Q]);
        break;
    case EP_SAVE_PEFT:
    case EP_SAVE_GGUF:
    case EP_SAVE_PEFT_EX:
    case EP_SAVE_GGUF_EX: a->i[2] = 1; break;
    case EP_LOAD_PEFT:
    case EP_LOAD_GGUF: a->i[2] = 4; break;
    case EP_SET_PARAM:
    case EP_GET_PARAM:
    case EP_GET_GRAD:
    case EP_PARAM_SHAPE:
    case EP_BORROW_FACTOR:
        a->i[0] = TQ;
        a->i[1] = LORA_A;
        a->i[2] = (int64_t)factor_count(f, TQ, LORA_A);
        break;
    case EP_GET_CONFIG_INT: a->i[0] = LORA_CFG_RANK; break;
    case EP_GET_CONFIG_DOUBLE: a->i[0] = LORA_CFG_ALPHA; break;
    case EP_FORWARD:
    case EP_FORWARD_MERGED:
    case EP_THRESHOLD_ESTIMATE:
    case EP_THRESHOLD_ESTIMATE_EX:
        a->i[0] = f->p.batch;
        a->i[1] = f->p.len_q;
        break;
    case EP_FORWARD_CROSS:
    case EP_FORWARD_MERGED_CROSS:
    case EP_FORWARD_EX:
        a->i[0] = f->p.batch;
        a->i[1] = f->p.len_q;
        a->i[2] = f->p.len_kv;
        break;
    case EP_MSE_LOSS:
    case EP_MSE_LOSS_MEAN: a->i[0] = 16; break;
    default: break;
    }
    apply_int(&r->m2, a);
    apply_int(&r->m, a);
    /* Good buffers, sized for the defaults (or, for weights and factors, the target the
     * row names). */
    const int t = proj_of((int)a->i[0]);
    switch (r->ep) {
    case EP_SET_BASE:
    case EP_SET_BASE_BORROWED:
    case EP_SET_BASE_TYPED:
        if (t >= 0 && e->have_f && ref_has_proj(&f->l, t)) {
            a->n[0] = (size_t)(f->l.out[t] * f->l.in[t]);
            a->n[1] = (size_t)f->l.out[t];
            a->buf[0] = guarded_alloc(a->n[0]);
            a->buf[1] = guarded_alloc(a->n[1]);
            ref_to_float(f->l.w[t], a->buf[0], a->n[0]);
            ref_to_float(f->l.bias[t], a->buf[1], a->n[1]);
        } else {
            a->n[0] = a->n[1] = 64;
            a->buf[0] = guarded_copy(NULL, 64);
            a->buf[1] = guarded_copy(NULL, 64);
            for (int i = 0; i < 64; i++)
                a->buf[0][i] = a->buf[1][i] = 0.0f;
        }
        break;
    case EP_SET_PARAM:
    case EP_GET_PARAM:
    case EP_GET_GRAD: {
        size_t n = factor_count(f, (int)a->i[0], (int)a->i[1]);
        const ref_layer *l = &f->l;
        a->n[0] = n ? n : 64;
        a->buf[0] = guarded_alloc(a->n[0]);
        if (n && r->ep == EP_SET_PARAM)
            ref_to_float(a->i[1] == LORA_A ? l->a[t] : l->b[t], a->buf[0], n);
        else
            for (size_t i = 0; i < a->n[0]; i++)
                a->buf[0][i] = 0.0f;
        break;
    }
    case EP_BORROW_FACTOR: { /* the factor's values and a zero gradient */
        const size_t n = factor_count(f, (int)a->i[0], (int)a->i[1]);
        a->n[0] = a->n[1] = n ? n : 64;
        a->buf[0] = guarded_alloc(a->n[0]);
        a->buf[1] = guarded_alloc(a->n[1]);
        for (size_t i = 0; i < a->n[0]; i++)
            a->buf[0][i] = a->buf[1][i] = 0.0f;
        if (n)
            ref_to_float(a->i[1] == LORA_A ? f->l.a[t] : f->l.b[t], a->buf[0], n);
        break;
    }
    case EP_FORWARD:
    case EP_FORWARD_MERGED:
    case EP_THRESHOLD_ESTIMATE:
    case EP_THRESHOLD_ESTIMATE_EX:
        a->n[0] = f->nxq;
        a->n[1] = f->nout;
        a->buf[0] = guarded_copy(f->xq, f->nxq);
        a->buf[1] = guarded_copy(NULL, f->nout);
        break;
    case EP_BACKWARD:
        a->n[0] = f->nout;
        a->n[1] = f->nxq;
        a->buf[0] = guarded_copy(f->dout, f->nout);
        a->buf[1] = guarded_copy(NULL, f->nxq);
        break;
    case EP_FORWARD_CROSS:
    case EP_FORWARD_MERGED_CROSS:
    case EP_FORWARD_EX: {
        /* The causal length rows read len_q 7 of xq: size xq and out for both lengths. */
        const size_t d = (size_t)f->l.cfg.d_model, oc = (size_t)ref_out_cols(&f->l);
        const size_t lq = (size_t)(a->i[1] > 0 && a->i[1] <= 64 ? a->i[1] : f->p.len_q);
        a->n[0] = (size_t)f->p.batch * lq * d;
        a->n[1] = f->nxkv;
        a->n[2] = (size_t)f->p.batch * lq * oc;
        a->buf[0] = guarded_alloc(a->n[0]);
        for (size_t i = 0; i < a->n[0]; i++)
            a->buf[0][i] = f->xkv[i % f->nxkv];
        a->buf[1] = guarded_copy(f->xkv, f->nxkv);
        a->buf[2] = guarded_copy(NULL, a->n[2]);
        break;
    }
    case EP_BACKWARD_CROSS:
    case EP_BACKWARD_EX:
        a->n[0] = f->nout;
        a->n[1] = f->nxq;
        a->n[2] = f->nxkv;
        a->buf[0] = guarded_copy(f->dout, f->nout);
        a->buf[1] = guarded_copy(NULL, f->nxq);
        a->buf[2] = guarded_copy(NULL, f->nxkv);
        break;
    case EP_MSE_LOSS:
    case EP_MSE_LOSS_MEAN:
        for (int k = 0; k < 3; k++) {
            a->n[k] = 16;
            a->buf[k] = guarded_alloc(16);
            fill_uniform(a->buf[k], 16, 90 + (uint64_t)k, 1.0f);
        }
        break;
    case EP_GET_PARAMS_FLAT:
    case EP_SET_PARAMS_FLAT:
    case EP_GET_GRADS_FLAT:
    case EP_SET_GRADS_FLAT: {
        size_t n = 0;
        ck_assert_int_eq(lora_adapter_param_count(f->ad, &n), LORA_OK);
        a->n[0] = n;
        a->buf[0] = guarded_alloc(n);
        if (r->ep == EP_SET_GRADS_FLAT || r->ep == EP_GET_GRADS_FLAT)
            ck_assert_int_eq(lora_adapter_get_grads_flat(f->ad, a->buf[0], n), LORA_OK);
        else
            ck_assert_int_eq(lora_adapter_get_params_flat(f->ad, a->buf[0], n), LORA_OK);
        break;
    }
    case EP_DECODE:
    case EP_DECODE_EX: {
        /* x (2, n_new, d), out (2, n_new, out cols); n_new 0, negative or huge: 1 */
        const size_t nn = (size_t)(a->i[0] > 0 && a->i[0] <= 64 ? a->i[0] : 1);
        a->n[0] = 2 * nn * (size_t)f->l.cfg.d_model;
        a->n[1] = 2 * nn * (size_t)ref_out_cols(&f->l);
        a->buf[0] = guarded_alloc(a->n[0]);
        a->buf[1] = guarded_alloc(a->n[1]);
        fill_uniform(a->buf[0], a->n[0], 93, 1.0f);
        a->n_tokens[0] = a->n_tokens[1] = (int64_t)nn;
        const int32_t tid[4] = {0, -1, 0, 0};
        memcpy(a->tid, tid, sizeof tid);
        break;
    }
    case EP_APPLY:
    case EP_APPLY_WITH_ERROR: {
        /* x (rows, in), y (rows, out) of the target (Q's when it is no projection); the
         * overflowing and negative row counts keep 3 rows of buffers. */
        const int ta = t >= 0 && ref_has_proj(&f->l, t) ? t : REF_Q;
        const size_t rows = (size_t)(a->i[1] > 0 && a->i[1] <= 64 ? a->i[1] : 3);
        a->n[0] = rows * (size_t)f->l.in[ta];
        a->n[1] = rows * (size_t)f->l.out[ta];
        a->buf[0] = guarded_alloc(a->n[0]);
        a->buf[1] = guarded_alloc(a->n[1]);
        fill_uniform(a->buf[0], a->n[0], 91, 1.0f);
        fill_uniform(a->buf[1], a->n[1], 92, 1.0f);
        const int32_t tid[4] = {0, -1, 0, 0};
        memcpy(a->tid, tid, sizeof tid);
        break;
    }
    case EP_MERGE:
    case EP_UNMERGE: {
        const int tm = t >= 0 && ref_has_proj(&f->l, t) ? t : REF_Q;
        a->n[0] = (size_t)(f->l.out[tm] * f->l.in[tm]);
        a->buf[0] = guarded_alloc(a->n[0]);
        ref_to_float(f->l.w[tm], a->buf[0], a->n[0]);
        break;
    }
    default: break;
    }
    files_and_adapters(r, e, a);
    a->ex.a.struct_size = sizeof a->ex.a;
    a->dex.a = (lora_decode_args){.struct_size = sizeof a->dex.a, .n_tokens = a->n_tokens,
                                  .tenants = (const lora_adapter *const *)a->adv,
                                  .n_tenants = (size_t)a->i[2], .tenant_of_seq = a->tid};
    a->report.struct_size = sizeof a->report;
    a->info.struct_size = sizeof a->info;
    a->save_opts = (lora_save_options){sizeof a->save_opts, "org/model", NULL};
    a->alloc = (lora_allocator){plain_alloc, plain_free, NULL};
    /* The remaining mutations. */
    const mutation *ms[2] = {&r->m2, &r->m};
    for (int j = 0; j < 2; j++) {
        const mutation *m = ms[j];
        switch (m->kind) {
        case MK_HANDLE: a->null_handle = 1; break;
        case MK_OUT: a->null_out = 1; break;
        case MK_PTR_NULL:
            a->null_buf[m->k] = 1;
            a->null_path = 1;
            break;
        case MK_NAN_FIRST: a->buf[m->k][0] = NAN; break;
        case MK_INF_LAST: a->buf[m->k][a->n[m->k] - 1] = -INFINITY; break;
        case MK_VPTR_NULL:
            a->null_vptr[m->k] = 1;
            if (m->k == 0)
                a->null_adv = 1; /* save: adapters */
            else
                a->null_lay = 1; /* save: layers */
            break;
        case MK_STRUCT_SIZE:
            a->report.struct_size = (uint32_t)m->v;
            a->info.struct_size = (uint32_t)m->v;
            a->ex.a.struct_size = (uint32_t)m->v;
            a->dex.a.struct_size = (uint32_t)m->v;
            a->save_opts.struct_size = (uint32_t)m->v;
            break;
        case MK_ARGS_FLAGS:
            a->ex.a.flags = (uint32_t)m->v;
            a->dex.a.flags = (uint32_t)m->v;
            break;
        case MK_ARGS_MASK:
            set_mask(&a->ex.a, m->k);
            a->n_tokens[0] = -1; /* decode_ex */
            break;
        case MK_ARGS_TAIL:
            a->ex.a.struct_size = sizeof a->ex;
            a->ex.tail[3] = 1;
            a->dex.a.struct_size = sizeof a->dex;
            a->dex.tail[3] = 1;
            break;
        case MK_TAPE: make_tape(e, a, m->k); break;
        case MK_SELF_DXKV: a->self_dxkv = 1; break;
        case MK_BAD_BASE_MODEL: a->save_opts.base_model_name_or_path = "bad\x01name"; break;
        case MK_HOOK_NULL:
            if (m->k == 0)
                a->alloc.alloc = NULL;
            else
                a->alloc.free = NULL;
            break;
        case MK_ALIAS: a->alias = 1; break;
        case MK_AD2_NULL: a->null_ad2 = 1; break;
        case MK_FIRST_AD_NULL: a->adv[0] = NULL; break;
        case MK_LAYER: a->lay[0] = m->v; break;
        case MK_TENANT: a->tid[0] = (int32_t)m->v; break;
        default: break;
        }
    }
}

static void free_args(call_args *a)
{
    for (int k = 0; k < 4; k++)
        guarded_free(a->buf[k], a->n[k]);
    lora_config_destroy(a->cfg_out);
    lora_adapter_destroy(a->ad_out);
    lora_optimizer_destroy(a->opt_out);
    lora_kv_cache_destroy(a->cache);
    lora_kv_cache_destroy(a->cache_out);
    lora_adapter_destroy(a->ad2);
    lora_tape_destroy(a->tape);
    lora_tape_destroy(a->tape_out);
    lora_adapter_destroy(a->tape_owner);
    lora_config_destroy(a->load_cfg);
    for (int k = 0; k < 4; k++)
        lora_adapter_destroy(a->loaded[k]);
    if (a->tmp[0])
        remove_tree(a->tmp);
}

/* Calls the entry point. Returns its status, or for the W_ kinds: W_STRING when it
 * returned a non-empty string, W_VOID, W_VERSION when the version matches, else -100. */
static int invoke(int ep, row_env *e, call_args *a)
{
    lora_adapter *ad = a->null_handle || !e->have_f ? NULL : e->f.ad;
    lora_config *cfg = a->null_handle ? NULL : e->cfg;
    lora_optimizer *opt = a->null_handle ? NULL : e->opt;
    float *b[4];
    for (int k = 0; k < 4; k++)
        b[k] = a->null_buf[k] ? NULL : a->buf[k];
    const size_t count = (size_t)a->i[2];
    const char *s = NULL;
    switch (ep) {
    case EP_VERSION_NUMBER:
        return lora_version_number() == LORA_VERSION_NUMBER ? W_VERSION : -100;
    case EP_VERSION_STRING: s = lora_version_string(); break;
    case EP_STATUS_STRING: s = lora_status_string((int)a->i[0]); break;
    case EP_CONFIG_CREATE: return lora_config_create(a->null_out ? NULL : &a->cfg_out);
    case EP_CONFIG_CREATE_WITH_ALLOCATOR:
        return lora_config_create_with_allocator(a->null_out ? NULL : &a->cfg_out, &a->alloc);
    case EP_CONFIG_DESTROY: lora_config_destroy(cfg); return W_VOID;
    case EP_CONFIG_SET_INT: return lora_config_set_int(cfg, (int)a->i[0], a->i[1]);
    case EP_CONFIG_SET_DOUBLE: return lora_config_set_double(cfg, (int)a->i[0], a->d);
    case EP_CONFIG_GET_INT:
        return lora_config_get_int(cfg, (int)a->i[0], a->null_vptr[0] ? NULL : &a->value_i);
    case EP_CONFIG_GET_DOUBLE:
        return lora_config_get_double(cfg, (int)a->i[0], a->null_vptr[0] ? NULL : &a->value_d);
    case EP_CONFIG_VALIDATE: return lora_config_validate(cfg);
    case EP_CONFIG_LAST_ERROR: s = lora_config_last_error(cfg); break;
    case EP_ADAPTER_CREATE: return lora_adapter_create(a->null_out ? NULL : &a->ad_out, cfg);
    case EP_ADAPTER_DESTROY: lora_adapter_destroy(ad); return W_VOID;
    case EP_SET_BASE: return lora_adapter_set_base(ad, (int)a->i[0], b[0], b[1]);
    case EP_SET_PARAM: return lora_adapter_set_param(ad, (int)a->i[0], (int)a->i[1], b[0], count);
    case EP_GET_PARAM: return lora_adapter_get_param(ad, (int)a->i[0], (int)a->i[1], b[0], count);
    case EP_GET_GRAD: return lora_adapter_get_grad(ad, (int)a->i[0], (int)a->i[1], b[0], count);
    case EP_PARAM_SHAPE:
        return lora_adapter_param_shape(ad, (int)a->i[0], (int)a->i[1],
                                        a->null_vptr[0] ? NULL : &a->rows,
                                        a->null_vptr[1] ? NULL : &a->cols);
    case EP_ZERO_GRAD: return lora_adapter_zero_grad(ad);
    case EP_GET_CONFIG_INT:
        return lora_adapter_get_config_int(ad, (int)a->i[0],
                                           a->null_vptr[0] ? NULL : &a->value_i);
    case EP_GET_CONFIG_DOUBLE:
        return lora_adapter_get_config_double(ad, (int)a->i[0],
                                              a->null_vptr[0] ? NULL : &a->value_d);
    case EP_ADAPTER_LAST_ERROR: s = lora_adapter_last_error(ad); break;
    case EP_GET_RUN_INFO:
        return lora_adapter_get_run_info(ad, a->null_vptr[0] ? NULL : &a->info);
    case EP_FORWARD: return lora_forward(ad, b[0], a->i[0], a->i[1], b[1]);
    case EP_BACKWARD: return lora_backward(ad, b[0], b[1]);
    case EP_FORWARD_CROSS:
        return lora_forward_cross(ad, b[0], b[1], a->i[0], a->i[1], a->i[2], b[2]);
    case EP_BACKWARD_CROSS: return lora_backward_cross(ad, b[0], b[1], a->alias ? b[1] : b[2]);
    case EP_MSE_LOSS:
        return lora_mse_loss(b[0], b[1], (size_t)a->i[0], a->null_vptr[0] ? NULL : &a->loss,
                             b[2]);
    case EP_MSE_LOSS_MEAN:
        return lora_mse_loss_mean(b[0], b[1], (size_t)a->i[0],
                                  a->null_vptr[0] ? NULL : &a->loss, b[2]);
    case EP_OPT_CREATE_SET:
        return lora_optimizer_create_set(a->null_out ? NULL : &a->opt_out,
                                         a->null_adv ? NULL
                                                     : (const lora_adapter *const *)a->adv,
                                         count, (int)a->i[0]);
    case EP_OPT_STEP_SET: return lora_optimizer_step_set(opt, a->null_adv ? NULL : a->adv, count);
    case EP_FORWARD_EX:
        return lora_forward_ex(ad, &a->ex.a, b[0], b[1], a->i[0], a->i[1], a->i[2], b[2]);
    case EP_BACKWARD_EX: {
        const int self = e->have_f && !e->f.p.cross;
        float *dxkv = a->alias ? b[1] : self && !a->self_dxkv ? NULL : b[2];
        return lora_backward_ex(ad, a->tape, b[0], b[1], dxkv);
    }
    case EP_TAPE_CREATE: return lora_tape_create(a->null_out ? NULL : &a->tape_out, ad);
    case EP_BORROW_FACTOR:
        return lora_adapter_borrow_factor(ad, (int)a->i[0], (int)a->i[1], b[0],
                                          a->alias ? b[0] : b[1], count);
    case EP_TAPE_DESTROY: lora_tape_destroy(NULL); return W_VOID;
    case EP_THRESHOLD_ESTIMATE:
        return lora_threshold_estimate(ad, b[0], a->i[0], a->i[1],
                                       a->null_vptr[0] ? NULL : &a->report);
    case EP_THRESHOLD_ESTIMATE_EX:
        return lora_threshold_estimate_ex(ad, NULL, b[0], a->i[0], a->i[1],
                                          a->null_vptr[0] ? NULL : &a->report);
    case EP_OPT_CREATE:
        return lora_optimizer_create(a->null_out ? NULL : &a->opt_out, ad, (int)a->i[0]);
    case EP_OPT_DESTROY: lora_optimizer_destroy(a->null_handle ? NULL : e->opt); return W_VOID;
    case EP_OPT_SET_INT: return lora_optimizer_set_int(opt, (int)a->i[0], a->i[1]);
    case EP_OPT_SET_DOUBLE: return lora_optimizer_set_double(opt, (int)a->i[0], a->d);
    case EP_OPT_GET_INT:
        return lora_optimizer_get_int(opt, (int)a->i[0], a->null_vptr[0] ? NULL : &a->value_i);
    case EP_OPT_GET_DOUBLE:
        return lora_optimizer_get_double(opt, (int)a->i[0],
                                         a->null_vptr[0] ? NULL : &a->value_d);
    case EP_OPT_STEP:
        return lora_optimizer_step(opt, a->null_ad2 ? NULL : (a->ad2 ? a->ad2 : e->f.ad));
    case EP_OPT_RESET: return lora_optimizer_reset(opt);
    case EP_OPT_LAST_ERROR: s = lora_optimizer_last_error(a->null_handle ? NULL : e->opt); break;
    case EP_PARAM_COUNT:
        return lora_adapter_param_count(ad, a->null_vptr[0] ? NULL : &a->count_out);
    case EP_GET_PARAMS_FLAT: return lora_adapter_get_params_flat(ad, b[0], count);
    case EP_SET_PARAMS_FLAT: return lora_adapter_set_params_flat(ad, b[0], count);
    case EP_GET_GRADS_FLAT: return lora_adapter_get_grads_flat(ad, b[0], count);
    case EP_SET_GRADS_FLAT: return lora_adapter_set_grads_flat(ad, b[0], count);
    case EP_MERGE: return lora_adapter_merge(ad, (int)a->i[0], b[0], count);
    case EP_UNMERGE: return lora_adapter_unmerge(ad, (int)a->i[0], b[0], count);
    case EP_FORWARD_MERGED: return lora_forward_merged(ad, b[0], a->i[0], a->i[1], b[1]);
    case EP_FORWARD_MERGED_CROSS:
        return lora_forward_merged_cross(ad, b[0], b[1], a->i[0], a->i[1], a->i[2], b[2]);
    case EP_SET_BASE_BORROWED:
        return lora_adapter_set_base_borrowed(ad, (int)a->i[0], b[0], b[1]);
    case EP_COPY_PARAMS: return lora_adapter_copy_params(ad, a->null_ad2 ? NULL : a->ad2);
    case EP_SET_BASE_TYPED:
        return lora_adapter_set_base_typed(ad, (int)a->i[0], b[0], (int)a->i[1], b[1],
                                           (uint32_t)a->i[2]);
    case EP_APPLY:
    case EP_APPLY_WITH_ERROR: {
        const lora_adapter *const *tenants =
            a->null_adv ? NULL : (const lora_adapter *const *)a->adv;
        const int32_t *tid = a->null_lay ? NULL : a->tid;
        if (ep == EP_APPLY)
            return lora_apply(tenants, count, (int)a->i[0], tid, b[0], a->i[1], b[1]);
        return lora_apply_with_error(tenants, count, (int)a->i[0], tid, b[0], a->i[1], b[1],
                                     a->errbuf, sizeof a->errbuf);
    }
    case EP_KV_CACHE_CREATE:
        return lora_kv_cache_create(a->null_out ? NULL : &a->cache_out, ad, a->i[0], a->i[1]);
    case EP_KV_CACHE_DESTROY: lora_kv_cache_destroy(NULL); return W_VOID;
    case EP_KV_CACHE_RESET: return lora_kv_cache_reset(a->null_handle ? NULL : a->cache, a->i[0]);
    case EP_KV_CACHE_LENGTH:
        return lora_kv_cache_length(a->null_handle ? NULL : a->cache, a->i[0],
                                    a->null_vptr[0] ? NULL : &a->value_i);
    case EP_DECODE:
        return lora_decode(ad, a->null_vptr[0] ? NULL : a->cache, b[0], a->i[0], b[1]);
    case EP_DECODE_EX:
        a->dex.a.tenant_of_seq = a->null_lay ? NULL : a->tid;
        return lora_decode_ex(ad, &a->dex.a, a->cache, b[0], a->i[0], b[1]);
    case EP_SET_ROPE_FREQS: {
        static const double freqs[2] = {1.0, 0.5};
        return lora_adapter_set_rope_freqs(ad, freqs, 2);
    }
    case EP_SAVE_PEFT:
    case EP_SAVE_GGUF:
    case EP_SAVE_PEFT_EX:
    case EP_SAVE_GGUF_EX: {
        const char *path = a->null_path ? NULL : a->path;
        lora_adapter *const *adv = a->null_adv ? NULL : a->adv;
        const int64_t *lay = a->null_lay ? NULL : a->lay;
        switch (ep) {
        case EP_SAVE_PEFT: return lora_save_peft(path, adv, lay, count);
        case EP_SAVE_GGUF: return lora_save_gguf(path, adv, lay, count, NULL);
        case EP_SAVE_PEFT_EX: return lora_save_peft_ex(path, adv, lay, count, &a->save_opts);
        default: return lora_save_gguf_ex(path, adv, lay, count, &a->save_opts);
        }
    }
    case EP_LOAD_PEFT:
    case EP_LOAD_GGUF: {
        const char *path = a->null_path ? NULL : a->path;
        lora_config *lc = a->null_handle ? NULL : a->load_cfg;
        size_t *cnt = a->null_vptr[1] ? NULL : &a->count_out;
        return ep == EP_LOAD_PEFT ? lora_load_peft(a->loaded, a->lay, count, cnt, path, lc)
                                  : lora_load_gguf(a->loaded, a->lay, count, cnt, path, lc);
    }
    default: ck_abort_msg("entry point %d has no case in invoke()", ep);
    }
    return s && s[0] ? W_STRING : -100;
}

/* Entry points taking their handle as const: they write no message (lora.h, Threads). */
static int const_call(entry_point ep)
{
    switch (ep) {
    case EP_CONFIG_GET_INT: case EP_CONFIG_GET_DOUBLE: case EP_ADAPTER_CREATE:
    case EP_GET_PARAM: case EP_GET_GRAD: case EP_PARAM_SHAPE: case EP_GET_CONFIG_INT:
    case EP_GET_CONFIG_DOUBLE: case EP_GET_RUN_INFO: case EP_PARAM_COUNT:
    case EP_GET_PARAMS_FLAT: case EP_GET_GRADS_FLAT: case EP_MERGE: case EP_UNMERGE:
    case EP_TAPE_CREATE: case EP_OPT_CREATE: case EP_OPT_CREATE_SET: case EP_OPT_GET_INT:
    case EP_OPT_GET_DOUBLE: case EP_APPLY: case EP_APPLY_WITH_ERROR:
        return 1;
    default:
        return 0;
    }
}

/* The last-error text of the handle the row's call receives (NULL: none). */
static const char *handle_message(const bad_row *r, const row_env *e, const call_args *a)
{
    switch (r->ep) {
    case EP_MSE_LOSS:
    case EP_MSE_LOSS_MEAN:
    case EP_CONFIG_CREATE:
    case EP_CONFIG_CREATE_WITH_ALLOCATOR:
    case EP_KV_CACHE_CREATE: /* const ad: no message */
    case EP_KV_CACHE_RESET:
    case EP_KV_CACHE_LENGTH:
    case EP_APPLY:
    case EP_APPLY_WITH_ERROR:
        return NULL;
    case EP_ADAPTER_CREATE:
        return a->null_handle || !e->cfg ? NULL : lora_config_last_error(e->cfg);
    case EP_OPT_SET_INT:
    case EP_OPT_SET_DOUBLE:
    case EP_OPT_GET_INT:
    case EP_OPT_GET_DOUBLE:
    case EP_OPT_STEP:
    case EP_OPT_STEP_SET:
    case EP_OPT_RESET:
        return a->null_handle || !e->opt ? NULL : lora_optimizer_last_error(e->opt);
    case EP_OPT_CREATE_SET:
    case EP_SAVE_PEFT:
    case EP_SAVE_GGUF:
    case EP_SAVE_PEFT_EX:
    case EP_SAVE_GGUF_EX:
        return a->null_adv || !a->adv[0] ? NULL : lora_adapter_last_error(a->adv[0]);
    case EP_LOAD_PEFT:
    case EP_LOAD_GGUF:
        return a->null_handle ? NULL : lora_config_last_error(a->load_cfg);
    default:
        if (e->cfg && !e->have_f)
            return a->null_handle ? NULL : lora_config_last_error(e->cfg);
        return a->null_handle || !e->have_f ? NULL : lora_adapter_last_error(e->f.ad);
    }
}

/* Where a failed non-const row's message must be (NULL: there is no handle to hold
 * one, or the caller's buffer for lora_apply_with_error). */
static const char *row_message(const bad_row *r, const row_env *e, const call_args *a)
{
    if (r->m.kind == MK_OUT)
        return NULL; /* no handle was made */
    if (r->ep == EP_APPLY_WITH_ERROR)
        return a->errbuf;
    return const_call(r->ep) ? NULL : handle_message(r, e, a);
}

/* Puts a known message into the handle a const row's call receives (a failed setter,
 * which changes nothing else), so that the row can check the call left it alone. */
static void seed_message(const bad_row *r, row_env *e, const call_args *a)
{
    const char *m = handle_message(r, e, a);
    if (!m)
        return;
    if (m == lora_config_last_error(e->cfg))
        ck_assert_int_eq(lora_config_set_int(e->cfg, 1000, 0), LORA_ERR_INVALID_ARG);
    else if (e->opt && m == lora_optimizer_last_error(e->opt))
        ck_assert_int_eq(lora_optimizer_set_int(e->opt, 1000, 0), LORA_ERR_INVALID_ARG);
    else /* an adapter's (f.ad or adapters[0]) */
        ck_assert_int_eq(lora_adapter_set_param(r->ep == EP_OPT_CREATE_SET ? a->adv[0] : e->f.ad,
                                                0, LORA_A, NULL, 0),
                         LORA_ERR_INVALID_ARG);
    ck_assert_msg(m[0], "no message to seed");
}

static const char *row_name(const bad_row *r, char *buf, size_t n)
{
    snprintf(buf, n, "row %d: %s, %s", (int)(r - bad_rows), ep_names[r->ep], r->what);
    return buf;
}

START_TEST(test_bad_input_row)
{
    const bad_row *r = &bad_rows[_i];
    char what[160];
    row_name(r, what, sizeof what);
    row_env e;
    env_setup(&e, r->pre);
    call_args a;
    build_args(r, &e, &a);
    /* A const call leaves its handle's message as it was (here a seeded one). */
    char seeded[512] = "";
    const char *kept = const_call(r->ep) ? handle_message(r, &e, &a) : NULL;
    if (kept) {
        seed_message(r, &e, &a);
        snprintf(seeded, sizeof seeded, "%s", kept);
    }
    const int st = invoke(r->ep, &e, &a);
    ck_assert_msg(st == r->want, "%s: got %d (%s), want %d (%s)", what, st,
                  st >= 0 ? lora_status_string(st) : "-", r->want,
                  r->want >= 0 ? lora_status_string(r->want) : "-");
    if (kept)
        ck_assert_msg(strcmp(kept, seeded) == 0,
                      "%s: a const call changed the handle's message \"%s\" to \"%s\"", what,
                      seeded, kept);
    if (r->want > 0) {
        /* A message where a non-const call's handle exists. */
        const char *m = row_message(r, &e, &a);
        ck_assert_msg(m == NULL || m[0], "%s: the handle's last-error message is empty", what);
        if (r->ep == EP_ADAPTER_CREATE && e.cfg && !a.null_handle && !a.null_out) {
            /* lora_config_validate tells why, with the same status. */
            ck_assert_int_eq(lora_config_validate(e.cfg), r->want);
            ck_assert_msg(lora_config_last_error(e.cfg)[0], "%s: validate gave no reason", what);
        }
        if (r->ep == EP_LOAD_PEFT || r->ep == EP_LOAD_GGUF)
            for (int k = 0; k < 4; k++)
                ck_assert_msg(a.loaded[k] == NULL, "%s: a failed load left adapter %d", what, k);
        if (r->ep == EP_CONFIG_CREATE || r->ep == EP_CONFIG_CREATE_WITH_ALLOCATOR ||
            r->ep == EP_ADAPTER_CREATE || r->ep == EP_OPT_CREATE ||
            r->ep == EP_OPT_CREATE_SET || r->ep == EP_TAPE_CREATE)
            ck_assert_msg(a.cfg_out == NULL && a.ad_out == NULL && a.opt_out == NULL &&
                              a.tape_out == NULL,
                          "%s: a handle was returned with an error", what);
    }
    free_args(&a);
    env_check_and_free(&e, what);
}
END_TEST

/* The row's call without its bad argument succeeds in the same state (rows whose state
 * is the error, and rows that cannot fail, are skipped). */
START_TEST(test_bad_input_row_control)
{
    const bad_row *r = &bad_rows[_i];
    if (r->m.kind == MK_NONE || r->want < 0)
        return;
    char what[160];
    row_name(r, what, sizeof what);
    bad_row good = *r;
    good.m = (mutation)M_NONE;
    /* Keep a second change that only picks the target; drop one that is an error. */
    if (!(good.m2.kind == MK_INT && good.m2.k == 0 &&
          (r->ep == EP_SET_BASE || r->ep == EP_SET_PARAM)))
        good.m2 = (mutation)M_NONE;
    row_env e;
    env_setup(&e, r->pre);
    call_args a;
    build_args(&good, &e, &a);
    const int st = invoke(r->ep, &e, &a);
    ck_assert_msg(st == LORA_OK, "%s: the same call without the bad argument gives %d (%s): %s",
                  what, st, lora_status_string(st),
                  e.have_f ? lora_adapter_last_error(e.f.ad)
                           : (e.cfg ? lora_config_last_error(e.cfg) : ""));
    free_args(&a);
    if (e.cfg)
        lora_config_destroy(e.cfg);
    lora_optimizer_destroy(e.opt);
    if (e.have_f) {
        free(e.snap);
        tfx_free(&e.f);
    }
}
END_TEST

/* Every function lora.h declares has at least one row. */
START_TEST(test_every_entry_point_has_rows)
{
    int rows_of[EP_COUNT] = {0};
    for (int i = 0; i < N_BAD_ROWS; i++)
        rows_of[bad_rows[i].ep]++;
    for (int ep = 0; ep < EP_COUNT; ep++)
        ck_assert_msg(rows_of[ep] > 0, "%s has no row in bad_rows", ep_names[ep]);
    /* Functions in the header: "LORA_API <type> <name>(". */
    FILE *h = fopen(LORA_TEST_HEADER, "r");
    ck_assert_msg(h != NULL, "cannot open %s (run the tests from the repository root)",
                  LORA_TEST_HEADER);
    char line[512], missing[2048] = "";
    int declared = 0;
    while (fgets(line, sizeof line, h)) {
        if (strncmp(line, "LORA_API ", 9) != 0)
            continue;
        const char *open = strchr(line, '(');
        if (!open)
            continue;
        const char *name = open;
        while (name > line && (name[-1] == '_' || (name[-1] >= 'a' && name[-1] <= 'z') ||
                               (name[-1] >= '0' && name[-1] <= '9')))
            name--;
        char fn[128];
        snprintf(fn, sizeof fn, "%.*s", (int)(open - name), name);
        declared++;
        int found = 0;
        for (int ep = 0; ep < EP_COUNT; ep++)
            found |= strcmp(fn, ep_names[ep]) == 0;
        if (!found && strlen(missing) + strlen(fn) + 2 < sizeof missing) {
            strcat(missing, " ");
            strcat(missing, fn);
        }
    }
    fclose(h);
    ck_assert_msg(declared >= EP_COUNT, "only %d functions found in %s", declared,
                  LORA_TEST_HEADER);
    ck_assert_msg(missing[0] == '\0',
                  "lora.h declares functions without a row in test_errors.c bad_rows:%s",
                  missing);
}
END_TEST

/* ---- behaviour beyond one call ------------------------------------------------------- */

/* A good lora_threshold_estimate touches neither the gradients nor the saved forward
 * (its bad inputs are rows of the table). */
START_TEST(test_threshold_estimate_keeps_saved_forward)
{
    tfx f;
    tfx_init(&f, 0, 1);
    float *snap = tfx_prime(&f); /* leaves a saved forward */
    lora_threshold_report r = {.struct_size = sizeof r};
    ck_assert_int_eq(lora_threshold_estimate(f.ad, f.xq, 2, 5, &r), LORA_OK);
    ck_assert(r.recommended_backend == LORA_BACKEND_EXACT ||
              r.recommended_backend == LORA_BACKEND_POLY);
    float *now = malloc(f.ngrads * sizeof(float));
    ck_assert_ptr_nonnull(now);
    tfx_grads(&f, now);
    ck_assert(memcmp(now, snap, f.ngrads * sizeof(float)) == 0);
    ck_assert_int_eq(lora_backward(f.ad, f.dout, NULL), LORA_OK);
    tfx_grads(&f, now);
    double md = 0.0, m = 0.0;
    for (size_t i = 0; i < f.ngrads; i++) {
        md = fmax(md, fabs((double)now[i] - 2.0 * snap[i]));
        m = fmax(m, fabs(2.0 * snap[i]));
    }
    ck_assert_msg(md <= 1e-6 * m, "backward after threshold_estimate: off by %g", md);
    free(now);
    free(snap);
    tfx_assert_works(&f);
    tfx_free(&f);
}
END_TEST

/* lora.h, lora_forward: "On failure ... the adapter keeps its parameters and gradients
 * (the saved forward is dropped)": a following backward is LORA_ERR_STATE. */
START_TEST(test_failed_forward_drops_saved_forward)
{
    tfx f;
    tfx_init(&f, _i, 1);
    float *snap = tfx_prime(&f); /* leaves a saved forward */
    const int64_t lkv = f.p.len_kv;
    for (int k = 0; k < 3; k++) {
        int st;
        if (k == 0) { /* NONFINITE */
            f.xq[0] = NAN;
            st = f.p.cross ? lora_forward_cross(f.ad, f.xq, f.xkv, 2, 5, lkv, f.out)
                           : lora_forward(f.ad, f.xq, 2, 5, f.out);
            ref_to_float(f.p.xq, f.xq, f.nxq);
            ck_assert_int_eq(st, LORA_ERR_NONFINITE);
        } else if (k == 1) { /* SHAPE */
            st = f.p.cross ? lora_forward_cross(f.ad, f.xq, f.xkv, 0, 5, lkv, f.out)
                           : lora_forward(f.ad, f.xq, 0, 5, f.out);
            ck_assert_int_eq(st, LORA_ERR_SHAPE);
        } else { /* INVALID_ARG */
            st = f.p.cross ? lora_forward_cross(f.ad, f.xq, f.xkv, 2, 5, lkv, NULL)
                           : lora_forward(f.ad, f.xq, 2, 5, NULL);
            ck_assert_int_eq(st, LORA_ERR_INVALID_ARG);
        }
        st = f.p.cross ? lora_backward_cross(f.ad, f.dout, NULL, NULL)
                       : lora_backward(f.ad, f.dout, NULL);
        ck_assert_msg(st == LORA_ERR_STATE,
                      "backward after a failed forward (%d): status %d, want LORA_ERR_STATE", k,
                      st);
        ck_assert_int_eq(tfx_step(&f), LORA_OK); /* a saved forward again */
        ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    }
    free(snap);
    tfx_assert_works(&f);
    tfx_free(&f);
}
END_TEST

/* lora.h, Threads: a call taking its handle as const writes nothing to it, not even
 * a message, failing or not. A failed setter leaves a message; every const call after
 * it, failing or succeeding, leaves that text as it was. */
static void assert_kept(const char *now, const char *before, const char *what)
{
    ck_assert_msg(strcmp(now, before) == 0, "%s changed the message \"%s\" to \"%s\"", what,
                  before, now);
}

START_TEST(test_const_calls_keep_message)
{
    tfx f;
    tfx_init(&f, 0, 0);
    int64_t iv, rows, cols;
    double dv;
    size_t n;
    float buf[16];
    lora_run_info info = {0};
    ck_assert_int_eq(lora_adapter_set_param(f.ad, 1000, LORA_A, buf, 16), LORA_ERR_INVALID_ARG);
    char before[512];
    snprintf(before, sizeof before, "%s", lora_adapter_last_error(f.ad));
    ck_assert(before[0]);
    const lora_adapter *cad = f.ad;
    struct { int st; const char *what; } calls[] = {
        {lora_adapter_get_config_int(cad, 1000, &iv), "get_config_int(1000)"},
        {lora_adapter_get_config_int(cad, LORA_CFG_ALPHA, &iv), "get_config_int(ALPHA)"},
        {lora_adapter_get_config_double(cad, LORA_CFG_RANK, &dv), "get_config_double(RANK)"},
        {lora_adapter_get_config_int(cad, LORA_CFG_RANK, NULL), "get_config_int(NULL)"},
        {lora_adapter_get_run_info(cad, NULL), "get_run_info(NULL)"},
        {lora_adapter_get_run_info(cad, &info), "get_run_info(struct_size 0)"},
        {lora_adapter_param_shape(cad, 1000, LORA_A, &rows, &cols), "param_shape(1000)"},
        {lora_adapter_param_shape(cad, TQ, 7, &rows, &cols), "param_shape(which 7)"},
        {lora_adapter_get_param(cad, TQ, LORA_A, buf, 1), "get_param(count 1)"},
        {lora_adapter_get_grad(cad, TQ, LORA_A, NULL, 16), "get_grad(NULL)"},
        {lora_adapter_param_count(cad, NULL), "param_count(NULL)"},
        {lora_adapter_get_params_flat(cad, buf, 1), "get_params_flat(count 1)"},
        {lora_adapter_merge(cad, 1000, buf, 16), "merge(1000)"},
        {lora_adapter_unmerge(cad, TQ, NULL, 16), "unmerge(NULL)"},
        {lora_tape_create(NULL, cad), "tape_create(out NULL)"},
        {lora_optimizer_create(NULL, cad, LORA_OPTIMIZER_SGD), "optimizer_create(out NULL)"},
    };
    for (size_t i = 0; i < sizeof calls / sizeof calls[0]; i++) {
        ck_assert_msg(calls[i].st == LORA_ERR_INVALID_ARG, "%s: status %d", calls[i].what,
                      calls[i].st);
        assert_kept(lora_adapter_last_error(f.ad), before, calls[i].what);
    }
    lora_optimizer *opt = NULL;
    ck_assert_int_eq(lora_optimizer_create(&opt, cad, 42), LORA_ERR_INVALID_ARG);
    assert_kept(lora_adapter_last_error(f.ad), before, "optimizer_create(kind 42)");
    const lora_adapter *twice[2] = {cad, cad};
    ck_assert_int_eq(lora_optimizer_create_set(&opt, twice, 2, LORA_OPTIMIZER_SGD),
                     LORA_ERR_INVALID_ARG);
    assert_kept(lora_adapter_last_error(f.ad), before, "optimizer_create_set(repeated)");
    /* Succeeding const calls do not clear it either. */
    ck_assert_int_eq(lora_adapter_get_config_int(cad, LORA_CFG_RANK, &iv), LORA_OK);
    ck_assert_int_eq(lora_adapter_param_count(cad, &n), LORA_OK);
    ck_assert_int_eq(lora_adapter_param_shape(cad, TQ, LORA_A, &rows, &cols), LORA_OK);
    assert_kept(lora_adapter_last_error(f.ad), before, "a successful getter");

    /* The optimizer's getters. */
    ck_assert_int_eq(lora_optimizer_create(&opt, cad, LORA_OPTIMIZER_SGD), LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_int(opt, 1000, 0), LORA_ERR_INVALID_ARG);
    snprintf(before, sizeof before, "%s", lora_optimizer_last_error(opt));
    ck_assert(before[0]);
    ck_assert_int_eq(lora_optimizer_get_int(opt, 1000, &iv), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_get_double(opt, LORA_OPT_BETA1, &dv), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_get_double(opt, LORA_OPT_LR, NULL), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_get_double(opt, LORA_OPT_LR, &dv), LORA_OK);
    assert_kept(lora_optimizer_last_error(opt), before, "optimizer getters");
    lora_optimizer_destroy(opt);
    tfx_free(&f);
}
END_TEST

START_TEST(test_const_config_calls_keep_message)
{
    lora_config *cfg = cfg_new(8);
    ck_assert_int_eq(lora_config_set_int(cfg, 1000, 0), LORA_ERR_INVALID_ARG);
    char before[512];
    snprintf(before, sizeof before, "%s", lora_config_last_error(cfg));
    ck_assert(before[0]);
    int64_t iv;
    double dv;
    ck_assert_int_eq(lora_config_get_int(cfg, 1000, &iv), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_config_get_int(cfg, LORA_CFG_ALPHA, &iv), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_config_get_double(cfg, LORA_CFG_RANK, &dv), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_config_get_int(cfg, LORA_CFG_RANK, NULL), LORA_ERR_INVALID_ARG);
    assert_kept(lora_config_last_error(cfg), before, "failing config getters");
    ck_assert_int_eq(lora_config_get_int(cfg, LORA_CFG_RANK, &iv), LORA_OK);
    ck_assert_int_eq(iv, 8);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    lora_adapter_destroy(ad);
    assert_kept(lora_config_last_error(cfg), before, "a getter and lora_adapter_create");
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, 3), LORA_OK);
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_null(ad);
    ck_assert_str_eq(lora_config_last_error(cfg), ""); /* the set_int cleared it */
    lora_config_destroy(cfg);
}
END_TEST

Suite *errors_suite(void)
{
    Suite *s = suite_create("errors");
    TCase *tc = tcase_create("table");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_every_entry_point_has_rows);
    tcase_add_loop_test(tc, test_bad_input_row, 0, N_BAD_ROWS);
    tcase_add_loop_test(tc, test_bad_input_row_control, 0, N_BAD_ROWS);
    suite_add_tcase(s, tc);
    tc = tcase_create("behaviour");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_threshold_estimate_keeps_saved_forward);
    tcase_add_loop_test(tc, test_failed_forward_drops_saved_forward, 0, 2);
    tcase_add_test(tc, test_const_calls_keep_message);
    tcase_add_test(tc, test_const_config_calls_keep_message);
    suite_add_tcase(s, tc);
    return s;
}
