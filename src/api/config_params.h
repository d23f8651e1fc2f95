/* The configuration parameters: the library's one list of them. config.c derives the
 * setters, getters, range checks, defaults and messages from it, internal.h the fields
 * of lora_config_values. Numbers are lora.h's (checked at compile time in config.c).
 *
 * X(number, enum name, field, type, low, high, default, flags)
 *   type     INT (int64_t), U64 (uint64_t, set and read through the int64 calls) or
 *            DOUBLE
 *   low/high the accepted range, inclusive unless flagged open (CFG_LOW_OPEN,
 *            CFG_HIGH_OPEN); for DOUBLE non-finite values are refused besides
 *   default  the value of an unset parameter (ignored when CFG_DERIVED: resolved from
 *            other parameters in config.c)
 *   flags    CFG_EVEN: only even values. CFG_AS_FLOAT: computation keeps it as float,
 *            so it must fit one. CFG_DERIVED: see default. CFG_NOT_COMPUTED: setters
 *            and getters take it, but an adapter cannot compute it yet: a non-default
 *            value makes lora_adapter_create fail with LORA_ERR_UNSUPPORTED. */
#ifndef LORA_CONFIG_PARAMS_H
#define LORA_CONFIG_PARAMS_H

#include <float.h>
#include <stdint.h>

/* Limits used in the table (LORA_MAX_DIM is in internal.h). */
#define LORA_MAX_POLY_DEGREE 20
#define LORA_MAX_THREADS 1024

enum {
    CFG_EVEN = 1u << 0,
    CFG_AS_FLOAT = 1u << 1,
    CFG_DERIVED = 1u << 2,
    CFG_NOT_COMPUTED = 1u << 3,
    CFG_LOW_OPEN = 1u << 4,
    CFG_HIGH_OPEN = 1u << 5,
    CFG_BACKEND_ID = 1u << 6, /* LORA_BACKEND_AUTO or a backend of src/backend/table.c */
};

/* clang-format off */
#define LORA_CONFIG_PARAMS(X) \
    X( 1, LORA_CFG_D_MODEL,       d_model,       INT,    1, LORA_MAX_DIM,         0, 0) \
    X( 2, LORA_CFG_N_HEADS,       n_heads,       INT,    1, LORA_MAX_DIM,         1, 0) \
    X( 3, LORA_CFG_N_KV_HEADS,    n_kv_heads,    INT,    1, LORA_MAX_DIM,         0, CFG_DERIVED) \
    X( 4, LORA_CFG_HEAD_DIM,      head_dim,      INT,    1, LORA_MAX_DIM,         0, CFG_DERIVED) \
    X( 5, LORA_CFG_TARGETS,       targets,       INT,    1, 15,                   LORA_TARGET_Q | LORA_TARGET_V, 0) \
    X( 6, LORA_CFG_RANK,          rank,          INT,    1, LORA_MAX_DIM,         8, 0) \
    X( 7, LORA_CFG_ALPHA,         alpha,         DOUBLE, -DBL_MAX, DBL_MAX,       0, CFG_DERIVED | CFG_AS_FLOAT) \
    X( 8, LORA_CFG_RSLORA,        rslora,        INT,    0, 1,                    0, 0) \
    X( 9, LORA_CFG_SOFTMAX_SCALE, softmax_scale, DOUBLE, 0, DBL_MAX,              0, CFG_DERIVED | CFG_AS_FLOAT | CFG_LOW_OPEN) \
    X(10, LORA_CFG_CAUSAL,        causal,        INT,    0, 1,                    0, 0) \
    X(11, LORA_CFG_BACKEND,       backend,       INT,    LORA_BACKEND_AUTO, INT32_MAX, LORA_BACKEND_AUTO, CFG_BACKEND_ID) \
    X(12, LORA_CFG_TOLERANCE,     tolerance,     DOUBLE, 0, DBL_MAX,              1e-3, CFG_LOW_OPEN) \
    X(13, LORA_CFG_POLY_DEGREE,   poly_degree,   INT,    0, LORA_MAX_POLY_DEGREE, 0, CFG_EVEN) \
    X(14, LORA_CFG_THREADS,       threads,       INT,    0, LORA_MAX_THREADS,     0, 0) \
    X(15, LORA_CFG_SEED,          seed,          U64,    INT64_MIN, INT64_MAX,    0, 0) \
    X(16, LORA_CFG_INIT,          init,          INT,    LORA_INIT_KAIMING_ZERO, LORA_INIT_ZERO, LORA_INIT_KAIMING_ZERO, 0) \
    X(17, LORA_CFG_OUT_PROJ,      out_proj,      INT,    0, 1,                    0, 0) \
    X(18, LORA_CFG_MEASURE_ROWS,  measure_rows,  INT,    0, LORA_MAX_DIM,         0, 0) \
    X(19, LORA_CFG_ROPE,          rope,          INT,    LORA_ROPE_NONE, LORA_ROPE_INTERLEAVED, LORA_ROPE_NONE, 0) \
    X(20, LORA_CFG_ROPE_THETA,    rope_theta,    DOUBLE, 0, DBL_MAX,              10000.0, CFG_LOW_OPEN) \
    X(21, LORA_CFG_ROPE_DIM,      rope_dim,      INT,    2, LORA_MAX_DIM,         0, CFG_EVEN | CFG_DERIVED) \
    X(22, LORA_CFG_WINDOW,        window,        INT,    0, INT64_MAX,            0, 0) \
    X(23, LORA_CFG_SOFTCAP,       softcap,       DOUBLE, 0, DBL_MAX,              0.0, CFG_AS_FLOAT) \
    X(24, LORA_CFG_DROPOUT,       dropout,       DOUBLE, 0, 1,                    0.0, CFG_HIGH_OPEN) \
    X(25, LORA_CFG_COMPUTE,       compute,       INT,    LORA_COMPUTE_F32, LORA_COMPUTE_BF16, LORA_COMPUTE_F32, 0)
/* clang-format on */

/* The C type of a field, by table type. */
#define CFG_CTYPE_INT int64_t
#define CFG_CTYPE_U64 uint64_t
#define CFG_CTYPE_DOUBLE double

/* One past the largest parameter number (numbers run 1, 2, ... without gaps). */
#define CFG_COUNT_ONE(num, name, field, type, low, high, def, flags) +1
enum { LORA_CFG_PARAM_END = 1 LORA_CONFIG_PARAMS(CFG_COUNT_ONE) };
#undef CFG_COUNT_ONE

#endif
