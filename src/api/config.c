/* The config handle: the parameters of config_params.h, each checked on its own when
 * set and together when an adapter is created. */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "../linalg/bf16.h"

/* Largest element count of one tensor the library accepts (2^40 floats = 4 TiB). */
#define LORA_MAX_ELEMS (INT64_C(1) << 40)

/* The table's numbers are lora.h's (one declaration, so that the amalgamation's
 * declaration scanner sees a plain statement). */
#define CFG_NUMBER_MATCHES(num, name, field, type, low, high, def, flags) &&(name == num)
_Static_assert(1 LORA_CONFIG_PARAMS(CFG_NUMBER_MATCHES),
               "a parameter number of config_params.h differs from lora.h");
#undef CFG_NUMBER_MATCHES

typedef enum { CFG_INT, CFG_U64, CFG_DOUBLE } param_type;

typedef struct param_desc {
    const char *name; /* "LORA_CFG_..." */
    param_type type;
    unsigned flags;
    size_t offset;           /* of the field in lora_config_values */
    int64_t imin, imax, idef; /* CFG_INT, CFG_U64 */
    double dmin, dmax, ddef;  /* CFG_DOUBLE */
} param_desc;

#define CFG_RANGE_INT(low, high, def) .imin = (low), .imax = (high), .idef = (def)
#define CFG_RANGE_U64(low, high, def) .imin = (low), .imax = (high), .idef = (def)
#define CFG_RANGE_DOUBLE(low, high, def) .dmin = (low), .dmax = (high), .ddef = (def)
#define CFG_DESC(num, pname, field, ptype, low, high, def, pflags)                     \
    [num] = {.name = #pname, .type = CFG_##ptype, .flags = (pflags),                   \
             .offset = offsetof(lora_config_values, field),                            \
             CFG_RANGE_##ptype(low, high, def)},
static const param_desc params[LORA_CFG_PARAM_END] = {LORA_CONFIG_PARAMS(CFG_DESC)};
#undef CFG_DESC

static const param_desc *find_param(int param)
{
    return (param >= 1 && param < LORA_CFG_PARAM_END) ? &params[param] : NULL;
}

/* The field of d in v, by type. */
static int64_t *int_field(lora_config_values *v, const param_desc *d)
{
    return (int64_t *)(void *)((char *)v + d->offset);
}
static uint64_t *u64_field(lora_config_values *v, const param_desc *d)
{
    return (uint64_t *)(void *)((char *)v + d->offset);
}
static double *double_field(lora_config_values *v, const param_desc *d)
{
    return (double *)(void *)((char *)v + d->offset);
}
static double double_value(const lora_config_values *v, const param_desc *d)
{
    return *(const double *)(const void *)((const char *)v + d->offset);
}

/* Puts param p back to its table default (a derived one is resolved later). */
static void reset_param(lora_config_values *v, int p)
{
    const param_desc *d = &params[p];
    if (d->type == CFG_INT)
        *int_field(v, d) = d->idef;
    else if (d->type == CFG_U64)
        *u64_field(v, d) = (uint64_t)d->idef;
    else
        *double_field(v, d) = d->ddef;
    v->set[p] = 0;
}

static void config_defaults(lora_config_values *v)
{
    memset(v, 0, sizeof *v);
    for (int p = 1; p < LORA_CFG_PARAM_END; p++)
        reset_param(v, p);
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

/* Kept as float without overflowing to Inf or underflowing to 0 (or a subnormal). */
static int fits_float(double x)
{
    const double a = fabs(x);
    return a <= FLT_MAX && (a == 0.0 || a >= FLT_MIN);
}

static int check_int(const param_desc *d, int64_t value, char *err)
{
    if (value < d->imin || value > d->imax)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "%s = %lld is out of range [%lld, %lld]", d->name,
                              (long long)value, (long long)d->imin, (long long)d->imax);
    if ((d->flags & CFG_EVEN) && value % 2 != 0)
        return lora_set_error(err, LORA_ERR_INVALID_ARG, "%s = %lld must be even", d->name,
                              (long long)value);
    if ((d->flags & CFG_BACKEND_ID) && value != LORA_BACKEND_AUTO &&
        !attn_backend_of((int)value))
        return lora_set_error(err, LORA_ERR_INVALID_ARG, "%s = %lld is not a backend",
                              d->name, (long long)value);
    return LORA_OK;
}

static int check_double(const param_desc *d, double value, char *err)
{
    if (!isfinite(value))
        return lora_set_error(err, LORA_ERR_NONFINITE, "%s must be finite", d->name);
    const int low_open = (d->flags & CFG_LOW_OPEN) != 0;
    const int high_open = (d->flags & CFG_HIGH_OPEN) != 0;
    if (value < d->dmin || value > d->dmax || (low_open && value == d->dmin) ||
        (high_open && value == d->dmax))
        return lora_set_error(err, LORA_ERR_INVALID_ARG, "%s = %g is out of range %c%g, %g%c",
                              d->name, value, low_open ? '(' : '[', d->dmin, d->dmax,
                              high_open ? ')' : ']');
    if ((d->flags & CFG_AS_FLOAT) && !fits_float(value))
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "%s = %g does not fit a float (0 or |value| in [%g, %g])",
                              d->name, value, (double)FLT_MIN, (double)FLT_MAX);
    return LORA_OK;
}

LORA_API int lora_config_set_int(lora_config *cfg, int param, int64_t value)
{
    if (!cfg)
        return LORA_ERR_INVALID_ARG;
    const param_desc *d = find_param(param);
    if (!d)
        return lora_set_error(cfg->err, LORA_ERR_INVALID_ARG, "unknown parameter %d", param);
    if (d->type == CFG_DOUBLE)
        return lora_set_error(cfg->err, LORA_ERR_INVALID_ARG,
                              "%s takes a double: use lora_config_set_double", d->name);
    const int st = check_int(d, value, cfg->err);
    if (st != LORA_OK)
        return st;
    if (d->type == CFG_U64)
        *u64_field(&cfg->v, d) = (uint64_t)value;
    else
        *int_field(&cfg->v, d) = value;
    cfg->v.set[param] = 1;
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
    if (d->type != CFG_DOUBLE)
        return lora_set_error(cfg->err, LORA_ERR_INVALID_ARG,
                              "%s takes an integer: use lora_config_set_int", d->name);
    const int st = check_double(d, value, cfg->err);
    if (st != LORA_OK)
        return st;
    *double_field(&cfg->v, d) = value;
    cfg->v.set[param] = 1;
    cfg->err[0] = '\0';
    return LORA_OK;
}

/* Derived defaults (the table's CFG_DERIVED rows) without consistency checks: what a
 * getter reports. */
static void resolve_defaults(lora_config_values *v)
{
    if (!v->set[LORA_CFG_N_KV_HEADS])
        v->n_kv_heads = v->n_heads;
    if (!v->set[LORA_CFG_HEAD_DIM])
        v->head_dim = (v->d_model > 0 && v->d_model % v->n_heads == 0)
                          ? v->d_model / v->n_heads
                          : 0;
    if (!v->set[LORA_CFG_ALPHA])
        v->alpha = (double)v->rank;
    if (!v->set[LORA_CFG_SOFTMAX_SCALE])
        v->softmax_scale = v->head_dim > 0 ? 1.0 / sqrt((double)v->head_dim) : 0.0;
    if (!v->set[LORA_CFG_ROPE_DIM])
        v->rope_dim = v->head_dim;
}

/* Whether param p of the resolved values v equals what it resolves to when unset. */
static int is_default(const lora_config_values *v, int p)
{
    const param_desc *d = &params[p];
    lora_config_values def = *v;
    reset_param(&def, p);
    resolve_defaults(&def);
    if (d->type == CFG_DOUBLE)
        return double_value(&def, d) == double_value(v, d);
    return memcmp((const char *)&def + d->offset, (const char *)v + d->offset,
                  sizeof(int64_t)) == 0;
}

/* Each value on its own again (a config copied inside the library bypasses the
 * setters), then the parameters this build cannot compute yet. */
static int check_values(const lora_config_values *v, char *err)
{
    for (int p = 1; p < LORA_CFG_PARAM_END; p++) {
        const param_desc *d = &params[p];
        if (d->type == CFG_DOUBLE && v->set[p]) {
            const int st = check_double(d, double_value(v, d), err);
            if (st != LORA_OK)
                return st;
        }
    }
    for (int p = 1; p < LORA_CFG_PARAM_END; p++)
        if ((params[p].flags & CFG_NOT_COMPUTED) && !is_default(v, p))
            return lora_set_error(err, LORA_ERR_UNSUPPORTED,
                                  "%s: this build computes only its default value (the "
                                  "parameter is reserved for liblora 0.2)",
                                  params[p].name);
    return LORA_OK;
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
    if (v.rope_dim > v.head_dim)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "LORA_CFG_ROPE_DIM = %lld exceeds LORA_CFG_HEAD_DIM = %lld",
                              (long long)v.rope_dim, (long long)v.head_dim);
    if (v.rope != LORA_ROPE_NONE && v.rope_dim % 2 != 0)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "LORA_CFG_ROPE needs an even LORA_CFG_ROPE_DIM: HEAD_DIM = %lld "
                              "is odd, set LORA_CFG_ROPE_DIM",
                              (long long)v.head_dim);
    int64_t q_dim, w_elems, a_elems;
    if (__builtin_mul_overflow(v.n_heads, v.head_dim, &q_dim) ||
        __builtin_mul_overflow(q_dim > v.d_model ? q_dim : v.d_model, v.d_model, &w_elems) ||
        __builtin_mul_overflow(q_dim > v.d_model ? q_dim : v.d_model, v.rank, &a_elems) ||
        w_elems > LORA_MAX_ELEMS || a_elems > LORA_MAX_ELEMS)
        return lora_set_error(err, LORA_ERR_SHAPE,
                              "layer too large: d_model %lld, %lld heads of %lld, rank %lld",
                              (long long)v.d_model, (long long)v.n_heads,
                              (long long)v.head_dim, (long long)v.rank);
    const int st = check_values(&v, err);
    if (st != LORA_OK)
        return st;
    if (v.compute == LORA_COMPUTE_BF16 && !la_cpu_bf16())
        return lora_set_error(err, LORA_ERR_UNSUPPORTED,
                              "LORA_CFG_COMPUTE = LORA_COMPUTE_BF16 needs a CPU with AVX512_BF16 "
                              "(Zen 4, Cooper Lake, Sapphire Rapids or later); this one has "
                              "none (or LORA_DISABLE_BF16 is set): use LORA_COMPUTE_F32");
    *out = v;
    return LORA_OK;
}

int lora_config_values_get_int(const lora_config_values *in, int param, int64_t *value)
{
    const param_desc *d = find_param(param);
    if (!value || !d || d->type == CFG_DOUBLE)
        return LORA_ERR_INVALID_ARG;
    lora_config_values v = *in;
    resolve_defaults(&v);
    *value = d->type == CFG_U64 ? (int64_t)*u64_field(&v, d) : *int_field(&v, d);
    return LORA_OK;
}

int lora_config_values_get_double(const lora_config_values *in, int param, double *value)
{
    const param_desc *d = find_param(param);
    if (!value || !d || d->type != CFG_DOUBLE)
        return LORA_ERR_INVALID_ARG;
    lora_config_values v = *in;
    resolve_defaults(&v);
    *value = *double_field(&v, d);
    return LORA_OK;
}
/* The getters read the config only (lora.h, Threads): a failure is its status alone. */
LORA_API int lora_config_get_int(const lora_config *cfg, int param, int64_t *value)
{
    if (!cfg)
        return LORA_ERR_INVALID_ARG;
    return lora_config_values_get_int(&cfg->v, param, value);
}

LORA_API int lora_config_get_double(const lora_config *cfg, int param, double *value)
{
    if (!cfg)
        return LORA_ERR_INVALID_ARG;
    return lora_config_values_get_double(&cfg->v, param, value);
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
