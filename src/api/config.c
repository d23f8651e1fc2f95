/* The config handle: a table of parameters, each checked on its own when set and
 * together when an adapter is created. */
#include <math.h>
#include <string.h>

#include "internal.h"

/* Largest element count of one tensor the library accepts (2^40 floats = 4 TiB). */
#define LORA_MAX_ELEMS (INT64_C(1) << 40)
#define LORA_MAX_POLY_DEGREE 20
#define LORA_MAX_THREADS 1024

typedef enum { PT_INT, PT_DOUBLE } param_type;

typedef struct param_desc {
    const char *name;
    param_type type;
    int64_t min, max; /* PT_INT range */
} param_desc;

static const param_desc params[] = {
    [LORA_CFG_D_MODEL] = {"LORA_CFG_D_MODEL", PT_INT, 1, LORA_MAX_DIM},
    [LORA_CFG_N_HEADS] = {"LORA_CFG_N_HEADS", PT_INT, 1, LORA_MAX_DIM},
    [LORA_CFG_N_KV_HEADS] = {"LORA_CFG_N_KV_HEADS", PT_INT, 1, LORA_MAX_DIM},
    [LORA_CFG_HEAD_DIM] = {"LORA_CFG_HEAD_DIM", PT_INT, 1, LORA_MAX_DIM},
    [LORA_CFG_TARGETS] = {"LORA_CFG_TARGETS", PT_INT, 1, 15},
    [LORA_CFG_RANK] = {"LORA_CFG_RANK", PT_INT, 1, LORA_MAX_DIM},
    [LORA_CFG_ALPHA] = {"LORA_CFG_ALPHA", PT_DOUBLE, 0, 0},
    [LORA_CFG_RSLORA] = {"LORA_CFG_RSLORA", PT_INT, 0, 1},
    [LORA_CFG_SOFTMAX_SCALE] = {"LORA_CFG_SOFTMAX_SCALE", PT_DOUBLE, 0, 0},
    [LORA_CFG_CAUSAL] = {"LORA_CFG_CAUSAL", PT_INT, 0, 1},
    [LORA_CFG_BACKEND] = {"LORA_CFG_BACKEND", PT_INT, LORA_BACKEND_AUTO, LORA_BACKEND_POLY},
    [LORA_CFG_TOLERANCE] = {"LORA_CFG_TOLERANCE", PT_DOUBLE, 0, 0},
    [LORA_CFG_POLY_DEGREE] = {"LORA_CFG_POLY_DEGREE", PT_INT, 0, LORA_MAX_POLY_DEGREE},
    [LORA_CFG_THREADS] = {"LORA_CFG_THREADS", PT_INT, 0, LORA_MAX_THREADS},
    [LORA_CFG_SEED] = {"LORA_CFG_SEED", PT_INT, INT64_MIN, INT64_MAX},
    [LORA_CFG_INIT] = {"LORA_CFG_INIT", PT_INT, LORA_INIT_KAIMING_ZERO, LORA_INIT_ZERO},
    [LORA_CFG_OUT_PROJ] = {"LORA_CFG_OUT_PROJ", PT_INT, 0, 1},
    [LORA_CFG_MEASURE_ROWS] = {"LORA_CFG_MEASURE_ROWS", PT_INT, 0, LORA_MAX_DIM},
};
#define PARAM_LAST LORA_CFG_MEASURE_ROWS

static const param_desc *find_param(int param)
{
    return (param >= 1 && param <= PARAM_LAST) ? &params[param] : NULL;
}

static void config_defaults(lora_config_values *v)
{
    memset(v, 0, sizeof *v);
    v->n_heads = 1;
    v->targets = LORA_TARGET_Q | LORA_TARGET_V;
    v->rank = 8;
    v->backend = LORA_BACKEND_AUTO;
    v->tolerance = 1e-3;
    v->init = LORA_INIT_KAIMING_ZERO;
}

LORA_API int lora_config_create_with_allocator(lora_config **out,
                                               const lora_allocator *allocator)
{
    if (!out)
        return LORA_ERR_INVALID_ARG;
    *out = NULL;
    lora_mem mem = lora_mem_default;
    if (allocator && (allocator->alloc || allocator->free)) {
        if (!allocator->alloc || !allocator->free)
            return LORA_ERR_INVALID_ARG; /* no handle yet to hold a message */
        mem = (lora_mem){allocator->alloc, allocator->free, allocator->user_data, 1};
    }
    lora_config *cfg = lora_mem_calloc(&mem, 1, sizeof *cfg);
    if (!cfg)
        return LORA_ERR_NOMEM;
    cfg->mem = mem;
    config_defaults(&cfg->v);
    *out = cfg;
    return LORA_OK;
}

LORA_API int lora_config_create(lora_config **out)
{
    return lora_config_create_with_allocator(out, NULL);
}

LORA_API void lora_config_destroy(lora_config *cfg)
{
    if (cfg)
        lora_mem_free(&cfg->mem, cfg);
}

static int64_t *int_slot(lora_config_values *v, int param)
{
    switch (param) {
    case LORA_CFG_D_MODEL: return &v->d_model;
    case LORA_CFG_N_HEADS: return &v->n_heads;
    case LORA_CFG_N_KV_HEADS: return &v->n_kv_heads;
    case LORA_CFG_HEAD_DIM: return &v->head_dim;
    case LORA_CFG_TARGETS: return &v->targets;
    case LORA_CFG_RANK: return &v->rank;
    case LORA_CFG_RSLORA: return &v->rslora;
    case LORA_CFG_CAUSAL: return &v->causal;
    case LORA_CFG_BACKEND: return &v->backend;
    case LORA_CFG_POLY_DEGREE: return &v->poly_degree;
    case LORA_CFG_THREADS: return &v->threads;
    case LORA_CFG_INIT: return &v->init;
    case LORA_CFG_OUT_PROJ: return &v->out_proj;
    case LORA_CFG_MEASURE_ROWS: return &v->measure_rows;
    default: return NULL; /* SEED is stored unsigned */
    }
}

static double *double_slot(lora_config_values *v, int param)
{
    switch (param) {
    case LORA_CFG_ALPHA: return &v->alpha;
    case LORA_CFG_SOFTMAX_SCALE: return &v->softmax_scale;
    case LORA_CFG_TOLERANCE: return &v->tolerance;
    default: return NULL;
    }
}

LORA_API int lora_config_set_int(lora_config *cfg, int param, int64_t value)
{
    if (!cfg)
        return LORA_ERR_INVALID_ARG;
    const param_desc *d = find_param(param);
    if (!d)
        return lora_set_error(cfg->err, LORA_ERR_INVALID_ARG, "unknown parameter %d", param);
    if (d->type != PT_INT)
        return lora_set_error(cfg->err, LORA_ERR_INVALID_ARG,
                              "%s takes a double: use lora_config_set_double", d->name);
    if (value < d->min || value > d->max)
        return lora_set_error(cfg->err, LORA_ERR_INVALID_ARG,
                              "%s = %lld is out of range [%lld, %lld]", d->name,
                              (long long)value, (long long)d->min, (long long)d->max);
    if (param == LORA_CFG_POLY_DEGREE && value % 2 != 0)
        return lora_set_error(cfg->err, LORA_ERR_INVALID_ARG,
                              "LORA_CFG_POLY_DEGREE = %lld must be even (odd Taylor "
                              "polynomials of exp can be negative)",
                              (long long)value);
    if (param == LORA_CFG_SEED)
        cfg->v.seed = (uint64_t)value;
    else
        *int_slot(&cfg->v, param) = value;
    cfg->v.set |= 1u << param;
    cfg->err[0] = '\0';
    return LORA_OK;
}

LORA_API int lora_config_set_double(lora_config *cfg, int param, double value)
{
    if (!cfg)
        return LORA_ERR_INVALID_ARG;
    const param_desc *d = find_param(param);
    if (!d)
        return lora_set_error(cfg->err, LORA_ERR_INVALID_ARG, "unknown parameter %d", param);
    if (d->type != PT_DOUBLE)
        return lora_set_error(cfg->err, LORA_ERR_INVALID_ARG,
                              "%s takes an integer: use lora_config_set_int", d->name);
    if (!isfinite(value))
        return lora_set_error(cfg->err, LORA_ERR_NONFINITE, "%s must be finite", d->name);
    if (param != LORA_CFG_ALPHA && !(value > 0.0))
        return lora_set_error(cfg->err, LORA_ERR_INVALID_ARG, "%s = %g must be > 0",
                              d->name, value);
    *double_slot(&cfg->v, param) = value;
    cfg->v.set |= 1u << param;
    cfg->err[0] = '\0';
    return LORA_OK;
}

/* Derived defaults without consistency checks: what a getter reports. */
static void resolve_defaults(lora_config_values *v)
{
    const uint32_t set = v->set;
    if (!(set & (1u << LORA_CFG_N_KV_HEADS)))
        v->n_kv_heads = v->n_heads;
    if (!(set & (1u << LORA_CFG_HEAD_DIM)))
        v->head_dim = (v->d_model > 0 && v->d_model % v->n_heads == 0)
                          ? v->d_model / v->n_heads
                          : 0;
    if (!(set & (1u << LORA_CFG_ALPHA)))
        v->alpha = (double)v->rank;
    if (!(set & (1u << LORA_CFG_SOFTMAX_SCALE)))
        v->softmax_scale = v->head_dim > 0 ? 1.0 / sqrt((double)v->head_dim) : 0.0;
}

int lora_config_resolve(const lora_config_values *in, lora_config_values *out, char *err)
{
    lora_config_values v = *in;
    resolve_defaults(&v);
    if (v.d_model <= 0)
        return lora_set_error(err, LORA_ERR_INVALID_ARG, "LORA_CFG_D_MODEL is required");
    if (v.head_dim <= 0)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "LORA_CFG_D_MODEL = %lld is not divisible by LORA_CFG_N_HEADS "
                              "= %lld: set LORA_CFG_HEAD_DIM",
                              (long long)v.d_model, (long long)v.n_heads);
    if (v.n_kv_heads > v.n_heads || v.n_heads % v.n_kv_heads != 0)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "LORA_CFG_N_KV_HEADS = %lld must divide LORA_CFG_N_HEADS = %lld",
                              (long long)v.n_kv_heads, (long long)v.n_heads);
    if ((v.targets & LORA_TARGET_O) && !v.out_proj)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "LORA_TARGET_O needs LORA_CFG_OUT_PROJ = 1");
    int64_t q_dim, w_elems, a_elems;
    if (__builtin_mul_overflow(v.n_heads, v.head_dim, &q_dim) ||
        __builtin_mul_overflow(q_dim > v.d_model ? q_dim : v.d_model, v.d_model, &w_elems) ||
        __builtin_mul_overflow(q_dim > v.d_model ? q_dim : v.d_model, v.rank, &a_elems) ||
        w_elems > LORA_MAX_ELEMS || a_elems > LORA_MAX_ELEMS)
        return lora_set_error(err, LORA_ERR_SHAPE,
                              "layer too large: d_model %lld, %lld heads of %lld, rank %lld",
                              (long long)v.d_model, (long long)v.n_heads,
                              (long long)v.head_dim, (long long)v.rank);
    *out = v;
    return LORA_OK;
}

int lora_config_values_get_int(const lora_config_values *in, int param, int64_t *value)
{
    const param_desc *d = find_param(param);
    if (!value || !d || d->type != PT_INT)
        return LORA_ERR_INVALID_ARG;
    lora_config_values v = *in;
    resolve_defaults(&v);
    *value = param == LORA_CFG_SEED ? (int64_t)v.seed : *int_slot(&v, param);
    return LORA_OK;
}

int lora_config_values_get_double(const lora_config_values *in, int param, double *value)
{
    const param_desc *d = find_param(param);
    if (!value || !d || d->type != PT_DOUBLE)
        return LORA_ERR_INVALID_ARG;
    lora_config_values v = *in;
    resolve_defaults(&v);
    *value = *double_slot(&v, param);
    return LORA_OK;
}

/* The message buffer is the one field a const accessor may write: it is scratch. */
static char *config_err(const lora_config *cfg) { return ((lora_config *)cfg)->err; }

LORA_API int lora_config_get_int(const lora_config *cfg, int param, int64_t *value)
{
    if (!cfg)
        return LORA_ERR_INVALID_ARG;
    if (lora_config_values_get_int(&cfg->v, param, value) != LORA_OK)
        return value ? lora_set_error(config_err(cfg), LORA_ERR_INVALID_ARG,
                                      "%d is not an integer parameter", param)
                     : lora_set_error(config_err(cfg), LORA_ERR_INVALID_ARG, "value is NULL");
    config_err(cfg)[0] = '\0';
    return LORA_OK;
}

LORA_API int lora_config_get_double(const lora_config *cfg, int param, double *value)
{
    if (!cfg)
        return LORA_ERR_INVALID_ARG;
    if (lora_config_values_get_double(&cfg->v, param, value) != LORA_OK)
        return value ? lora_set_error(config_err(cfg), LORA_ERR_INVALID_ARG,
                                      "%d is not a double parameter", param)
                     : lora_set_error(config_err(cfg), LORA_ERR_INVALID_ARG, "value is NULL");
    config_err(cfg)[0] = '\0';
    return LORA_OK;
}

LORA_API const char *lora_config_last_error(const lora_config *cfg)
{
    return cfg ? cfg->err : "NULL config";
}

LORA_API int lora_config_validate(lora_config *cfg)
{
    if (!cfg)
        return LORA_ERR_INVALID_ARG;
    lora_config_values resolved;
    int st = lora_config_resolve(&cfg->v, &resolved, cfg->err);
    if (st == LORA_OK)
        cfg->err[0] = '\0';
    return st;
}
