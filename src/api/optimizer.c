/* The optimizer handle: AdamW and SGD over every LoRA factor of a set of adapters (one
 * adapter is the set of one), with clipping by the global norm over the whole set,
 * following PyTorch's update rules (docs/training.md). The flat views are in flat.c. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

/* The shape of one adapter of the set, as it was at creation. */
typedef struct opt_member {
    int64_t rank;
    int adapted[PROJ_COUNT];
    int64_t in[PROJ_COUNT], out[PROJ_COUNT];
} opt_member;

struct lora_optimizer {
    lora_mem mem;
    int kind;
    double lr, beta1, beta2, eps, weight_decay, momentum, dampening, max_grad_norm;
    int nesterov;
    int64_t step;
    double grad_norm;
    int momentum_started; /* SGD: the momentum buffer holds a value (torch: buf set) */
    size_t n_members;
    opt_member *members; /* the shape of each adapter of the set, in order */
    size_t n;     /* floats of all factors of the set */
    double *m, *v; /* AdamW: first and second moments; SGD: m = momentum buffer */
    char err[LORA_ERRMSG_SIZE];
};

/* ---- the optimizer handle ----------------------------------------------------------- */

static void set_defaults(lora_optimizer *o)
{
    o->lr = 1e-3;
    o->beta1 = 0.9;
    o->beta2 = 0.999;
    o->eps = 1e-8;
    o->weight_decay = o->kind == LORA_OPTIMIZER_ADAMW ? 0.01 : 0.0; /* torch defaults */
    o->momentum = 0.0;
    o->dampening = 0.0;
    o->nesterov = 0;
    o->max_grad_norm = 0.0;
}

/* Names adapter i of a call in messages: "ad" for the one-adapter entry points. */
static const char *member_name(char *buf, size_t size, int single, size_t i)
{
    if (single)
        return "ad";
    snprintf(buf, size, "adapters[%zu]", i);
    return buf;
}

/* INVALID_ARG when an entry of adapters is NULL or repeated (a repeated adapter would
 * be updated twice); the message goes to err when there is one. */
static int check_set(const lora_adapter *const *adapters, size_t n, char *err, int single)
{
    char name[40];
    for (size_t i = 0; i < n; i++) {
        if (!adapters[i])
            return err ? lora_set_error(err, LORA_ERR_INVALID_ARG, "%s is NULL",
                                        member_name(name, sizeof name, single, i))
                       : LORA_ERR_INVALID_ARG;
        for (size_t j = 0; j < i; j++)
            if (adapters[j] == adapters[i])
                return err ? lora_set_error(err, LORA_ERR_INVALID_ARG,
                                            "adapters[%zu] and adapters[%zu] are the same "
                                            "adapter", j, i)
                           : LORA_ERR_INVALID_ARG;
    }
    return LORA_OK;
}

static int create_set(lora_optimizer **out, const lora_adapter *const *adapters, size_t n,
                      int kind, int single)
{
    if (!out)
        return LORA_ERR_INVALID_ARG;
    *out = NULL;
    if (!adapters || n == 0)
        return LORA_ERR_INVALID_ARG; /* no adapter to hold a message */
    char *const err = NULL; /* the adapters are const: the messages below go nowhere */
    int st = check_set(adapters, n, err, single);
    if (st != LORA_OK)
        return st;
    if (kind != LORA_OPTIMIZER_ADAMW && kind != LORA_OPTIMIZER_SGD)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "optimizer kind %d is not LORA_OPTIMIZER_ADAMW or _SGD", kind);
    const lora_mem *mem = &adapters[0]->mem;
    lora_optimizer *o = lora_mem_calloc(mem, 1, sizeof *o);
    if (o)
        o->members = lora_mem_calloc(mem, n, sizeof *o->members);
    if (!o || !o->members) {
        lora_mem_free(mem, o);
        return lora_set_error(err, LORA_ERR_NOMEM, "cannot allocate the optimizer");
    }
    o->mem = *mem;
    o->kind = kind;
    set_defaults(o);
    o->grad_norm = -1.0;
    o->n_members = n;
    for (size_t i = 0; i < n; i++) {
        const lora_adapter *ad = adapters[i];
        opt_member *m = &o->members[i];
        m->rank = ad->layer.rank;
        for (int t = 0; t < PROJ_COUNT; t++) {
            m->adapted[t] = ad->layer.proj[t].adapted;
            m->in[t] = ad->layer.proj[t].in;
            m->out[t] = ad->layer.proj[t].out;
        }
        o->n += lora_factor_floats(&ad->layer);
    }
    /* AdamW needs two moments, SGD one momentum buffer. */
    o->m = lora_mem_calloc(&o->mem, o->n ? o->n : 1, sizeof(double));
    if (o->m && kind == LORA_OPTIMIZER_ADAMW)
        o->v = lora_mem_calloc(&o->mem, o->n ? o->n : 1, sizeof(double));
    if (!o->m || (kind == LORA_OPTIMIZER_ADAMW && !o->v)) {
        const size_t floats = o->n;
        lora_optimizer_destroy(o);
        return lora_set_error(err, LORA_ERR_NOMEM,
                              "cannot allocate optimizer state for %zu parameters", floats);
    }
    *out = o;
    return LORA_OK;
}

LORA_API int lora_optimizer_create(lora_optimizer **out, const lora_adapter *ad, int kind)
{
    return create_set(out, &ad, 1, kind, 1);
}

LORA_API int lora_optimizer_create_set(lora_optimizer **out,
                                       const lora_adapter *const *adapters, size_t n,
                                       int kind)
{
    return create_set(out, adapters, n, kind, 0);
}

LORA_API void lora_optimizer_destroy(lora_optimizer *opt)
{
    if (!opt)
        return;
    const lora_mem mem = opt->mem;
    lora_mem_free(&mem, opt->m);
    lora_mem_free(&mem, opt->v);
    lora_mem_free(&mem, opt->members);
    lora_mem_free(&mem, opt);
}

LORA_API const char *lora_optimizer_last_error(const lora_optimizer *opt)
{
    return opt ? opt->err : "NULL optimizer";
}


/* Which kinds a parameter applies to: bit 0 AdamW, bit 1 SGD; is_int; read_only. */
typedef struct opt_param_desc {
    int param, kinds, is_int, read_only;
    const char *name;
} opt_param_desc;

static const opt_param_desc opt_params[] = {
    {LORA_OPT_LR, 3, 0, 0, "LORA_OPT_LR"},
    {LORA_OPT_BETA1, 1, 0, 0, "LORA_OPT_BETA1"},
    {LORA_OPT_BETA2, 1, 0, 0, "LORA_OPT_BETA2"},
    {LORA_OPT_EPS, 1, 0, 0, "LORA_OPT_EPS"},
    {LORA_OPT_WEIGHT_DECAY, 3, 0, 0, "LORA_OPT_WEIGHT_DECAY"},
    {LORA_OPT_MOMENTUM, 2, 0, 0, "LORA_OPT_MOMENTUM"},
    {LORA_OPT_DAMPENING, 2, 0, 0, "LORA_OPT_DAMPENING"},
    {LORA_OPT_NESTEROV, 2, 1, 0, "LORA_OPT_NESTEROV"},
    {LORA_OPT_MAX_GRAD_NORM, 3, 0, 0, "LORA_OPT_MAX_GRAD_NORM"},
    {LORA_OPT_STEP, 3, 1, 1, "LORA_OPT_STEP"},
    {LORA_OPT_GRAD_NORM, 3, 0, 1, "LORA_OPT_GRAD_NORM"},
};

/* Looks param up for an access of type is_int (writing when set); NULL with the
 * message in err (NULL for the getters: the optimizer is const) when refused. */
static const opt_param_desc *opt_find(const lora_optimizer *o, int param, int is_int,
                                      int set, char *err)
{
    const opt_param_desc *d = NULL;
    for (size_t i = 0; i < sizeof opt_params / sizeof opt_params[0]; i++)
        if (opt_params[i].param == param)
            d = &opt_params[i];
    if (!d) {
        lora_set_error(err, LORA_ERR_INVALID_ARG, "unknown optimizer parameter %d",
                       param);
        return NULL;
    }
    const char *kind = o->kind == LORA_OPTIMIZER_ADAMW ? "AdamW" : "SGD";
    if (!((d->kinds >> (o->kind == LORA_OPTIMIZER_ADAMW ? 0 : 1)) & 1)) {
        lora_set_error(err, LORA_ERR_INVALID_ARG, "%s does not apply to %s", d->name,
                       kind);
        return NULL;
    }
    if (d->is_int != is_int) {
        lora_set_error(err, LORA_ERR_INVALID_ARG, "%s is %s parameter", d->name,
                       d->is_int ? "an integer" : "a double");
        return NULL;
    }
    if (set && d->read_only) {
        lora_set_error(err, LORA_ERR_INVALID_ARG, "%s is read-only", d->name);
        return NULL;
    }
    return d;
}

LORA_API int lora_optimizer_set_int(lora_optimizer *opt, int param, int64_t value)
{
    if (!opt)
        return LORA_ERR_INVALID_ARG;
    const opt_param_desc *d = opt_find(opt, param, 1, 1, opt->err);
    if (!d)
        return LORA_ERR_INVALID_ARG;
    /* The only writable integer parameter is NESTEROV. */
    if (value != 0 && value != 1)
        return lora_set_error(opt->err, LORA_ERR_INVALID_ARG, "%s = %lld is not 0 or 1",
                              d->name, (long long)value);
    opt->nesterov = (int)value;
    opt->err[0] = '\0';
    return LORA_OK;
}

LORA_API int lora_optimizer_set_double(lora_optimizer *opt, int param, double value)
{
    if (!opt)
        return LORA_ERR_INVALID_ARG;
    const opt_param_desc *d = opt_find(opt, param, 0, 1, opt->err);
    if (!d)
        return LORA_ERR_INVALID_ARG;
    if (!isfinite(value))
        return lora_set_error(opt->err, LORA_ERR_NONFINITE, "%s = %g is not finite",
                              d->name, value);
    double *slot = NULL;
    double lo = 0.0, hi = INFINITY;
    int hi_open = 0;
    switch (param) {
    case LORA_OPT_LR: slot = &opt->lr; break;
    case LORA_OPT_BETA1: slot = &opt->beta1; hi = 1.0; hi_open = 1; break;
    case LORA_OPT_BETA2: slot = &opt->beta2; hi = 1.0; hi_open = 1; break;
    case LORA_OPT_EPS: slot = &opt->eps; break;
    case LORA_OPT_WEIGHT_DECAY: slot = &opt->weight_decay; break;
    case LORA_OPT_MOMENTUM: slot = &opt->momentum; break;
    case LORA_OPT_DAMPENING: slot = &opt->dampening; hi = 1.0; break;
    default: slot = &opt->max_grad_norm; break; /* LORA_OPT_MAX_GRAD_NORM */
    }
    if (value < lo || value > hi || (hi_open && value == hi))
        return lora_set_error(opt->err, LORA_ERR_INVALID_ARG, "%s = %g is outside %s0, %g%s",
                              d->name, value, "[", hi, hi_open ? ")" : "]");
    *slot = value;
    opt->err[0] = '\0';
    return LORA_OK;
}

LORA_API int lora_optimizer_get_int(const lora_optimizer *opt, int param, int64_t *value)
{
    if (!opt)
        return LORA_ERR_INVALID_ARG;
    const opt_param_desc *d = opt_find(opt, param, 1, 0, NULL);
    if (!d || !value)
        return LORA_ERR_INVALID_ARG;
    *value = param == LORA_OPT_STEP ? opt->step : opt->nesterov;
    return LORA_OK;
}

LORA_API int lora_optimizer_get_double(const lora_optimizer *opt, int param, double *value)
{
    if (!opt)
        return LORA_ERR_INVALID_ARG;
    const opt_param_desc *d = opt_find(opt, param, 0, 0, NULL);
    if (!d || !value)
        return LORA_ERR_INVALID_ARG;
    switch (param) {
    case LORA_OPT_LR: *value = opt->lr; break;
    case LORA_OPT_BETA1: *value = opt->beta1; break;
    case LORA_OPT_BETA2: *value = opt->beta2; break;
    case LORA_OPT_EPS: *value = opt->eps; break;
    case LORA_OPT_WEIGHT_DECAY: *value = opt->weight_decay; break;
    case LORA_OPT_MOMENTUM: *value = opt->momentum; break;
    case LORA_OPT_DAMPENING: *value = opt->dampening; break;
    case LORA_OPT_MAX_GRAD_NORM: *value = opt->max_grad_norm; break;
    default: *value = opt->grad_norm; break; /* LORA_OPT_GRAD_NORM */
    }
    return LORA_OK;
}

LORA_API int lora_optimizer_reset(lora_optimizer *opt)
{
    if (!opt)
        return LORA_ERR_INVALID_ARG;
    memset(opt->m, 0, (opt->n ? opt->n : 1) * sizeof(double));
    if (opt->v)
        memset(opt->v, 0, (opt->n ? opt->n : 1) * sizeof(double));
    opt->step = 0;
    opt->grad_norm = -1.0;
    opt->momentum_started = 0;
    opt->err[0] = '\0';
    return LORA_OK;
}

/* ---- the update ------------------------------------------------------------------- */

/* Per-step constants shared by every element. */
typedef struct step_consts {
    double clip, lr, decay_factor; /* AdamW: p *= 1 - lr*wd */
    double beta1, beta2, step_size, bc2_sqrt, eps;
    double wd, momentum, dampening;
    int nesterov, first_momentum;
} step_consts;

/* New value of one parameter; with commit, also updates the state. */
static inline double update_one(const lora_optimizer *o, const step_consts *c, double p,
                                double g, double *m, double *v, int commit)
{
    g *= c->clip;
    if (o->kind == LORA_OPTIMIZER_ADAMW) {
        p *= c->decay_factor;
        const double m1 = c->beta1 * *m + (1.0 - c->beta1) * g;
        const double v1 = c->beta2 * *v + (1.0 - c->beta2) * g * g;
        p -= c->step_size * m1 / (sqrt(v1) / c->bc2_sqrt + c->eps);
        if (commit) {
            *m = m1;
            *v = v1;
        }
        return p;
    }
    if (c->wd != 0.0)
        g += c->wd * p;
    if (c->momentum != 0.0) {
        const double buf = c->first_momentum ? g : c->momentum * *m + (1.0 - c->dampening) * g;
        if (commit)
            *m = buf;
        g = c->nesterov ? g + c->momentum * buf : buf;
    }
    return p - c->lr * g;
}

/* One pass over every factor of the set: check (commit = 0) returns the flat index
 * (over the set) of the first parameter that would become non-finite (or -1); commit
 * writes parameters and state. */
static int64_t update_pass(lora_optimizer *o, lora_adapter *const *adapters,
                           const step_consts *c, int commit)
{
    size_t off = 0;
    for (size_t k = 0; k < o->n_members; k++) {
        lora_adapter *ad = adapters[k];
        for (int t = 0; t < PROJ_COUNT; t++) {
            layer_proj *p = &ad->layer.proj[t];
            if (!p->adapted)
                continue;
            for (int f = 0; f < 2; f++) {
                float *w = f ? p->b : p->a;
                const float *g = f ? p->db : p->da;
                const size_t len = (size_t)(ad->layer.rank * (f ? p->out : p->in));
                double *v = o->v ? o->v + off : NULL;
                double dummy = 0.0;
                for (size_t i = 0; i < len; i++) {
                    const double np = update_one(o, c, (double)w[i], (double)g[i],
                                                 o->m + off + i, v ? v + i : &dummy, commit);
                    const float nf = (float)np;
                    if (!commit) {
                        if (!isfinite(nf))
                            return (int64_t)(off + i);
                    } else {
                        w[i] = nf;
                    }
                }
                off += len;
            }
        }
    }
    return -1;
}

/* INVALID_ARG unless every adapter is shaped as its member was at creation. */
static int check_shapes(lora_optimizer *opt, lora_adapter *const *adapters, int single)
{
    char name[40];
    for (size_t k = 0; k < opt->n_members; k++) {
        const lora_adapter *ad = adapters[k];
        const opt_member *m = &opt->members[k];
        if (ad->layer.rank != m->rank)
            return lora_set_error(opt->err, LORA_ERR_INVALID_ARG,
                                  "%s has rank %lld, the optimizer was made for %lld",
                                  member_name(name, sizeof name, single, k),
                                  (long long)ad->layer.rank, (long long)m->rank);
        for (int t = 0; t < PROJ_COUNT; t++) {
            const layer_proj *p = &ad->layer.proj[t];
            if (p->adapted != m->adapted[t] ||
                (p->adapted && (p->in != m->in[t] || p->out != m->out[t])))
                return lora_set_error(opt->err, LORA_ERR_INVALID_ARG,
                                      "target %s of %s is shaped unlike the one the "
                                      "optimizer was made for",
                                      lora_proj_names[t],
                                      member_name(name, sizeof name, single, k));
        }
    }
    return LORA_OK;
}

/* Global L2 norm of every gradient of the set, in double (clip_grad_norm_ with
 * norm_type 2 over all parameters); NONFINITE names the first NaN/Inf. */
static int global_grad_norm(lora_optimizer *opt, lora_adapter *const *adapters, int single,
                            double *norm)
{
    char name[40];
    double sumsq = 0.0;
    for (size_t k = 0; k < opt->n_members; k++) {
        const lora_adapter *ad = adapters[k];
        for (int t = 0; t < PROJ_COUNT; t++) {
            const layer_proj *p = &ad->layer.proj[t];
            if (!p->adapted)
                continue;
            for (size_t i = 0, na = (size_t)(ad->layer.rank * p->in),
                        len = na + (size_t)(p->out * ad->layer.rank); i < len; i++) {
                /* da and db may be separate (borrowed) buffers */
                const double g = (double)(i < na ? p->da[i] : p->db[i - na]);
                if (!isfinite(g))
                    return lora_set_error(opt->err, LORA_ERR_NONFINITE,
                                          "gradient of target %s of %s has a NaN/Inf entry; "
                                          "nothing was updated",
                                          lora_proj_names[t],
                                          member_name(name, sizeof name, single, k));
                sumsq += g * g;
            }
        }
    }
    *norm = sqrt(sumsq);
    return LORA_OK;
}

static step_consts make_step_consts(const lora_optimizer *opt, double norm, int64_t step)
{
    step_consts c;
    memset(&c, 0, sizeof c);
    c.clip = 1.0;
    if (opt->max_grad_norm > 0.0) {
        const double coef = opt->max_grad_norm / (norm + 1e-6);
        c.clip = coef < 1.0 ? coef : 1.0;
    }
    c.lr = opt->lr;
    c.decay_factor = 1.0 - opt->lr * opt->weight_decay;
    c.beta1 = opt->beta1;
    c.beta2 = opt->beta2;
    c.eps = opt->eps;
    /* beta in [0, 1) keeps both bias corrections > 0 */
    c.step_size = opt->lr / (1.0 - pow(opt->beta1, (double)step));
    c.bc2_sqrt = sqrt(1.0 - pow(opt->beta2, (double)step));
    c.wd = opt->weight_decay;
    c.momentum = opt->momentum;
    c.dampening = opt->dampening;
    c.nesterov = opt->nesterov;
    c.first_momentum = !opt->momentum_started;
    return c;
}

/* The step over the set; adapters holds n_members valid, distinct handles. */
static int step_set(lora_optimizer *opt, lora_adapter *const *adapters, int single)
{
    int st = check_shapes(opt, adapters, single);
    if (st != LORA_OK)
        return st;
    if (opt->kind == LORA_OPTIMIZER_SGD && opt->nesterov &&
        (opt->momentum <= 0.0 || opt->dampening != 0.0))
        return lora_set_error(opt->err, LORA_ERR_INVALID_ARG,
                              "Nesterov momentum needs LORA_OPT_MOMENTUM > 0 and "
                              "LORA_OPT_DAMPENING = 0");
    double norm = 0.0;
    st = global_grad_norm(opt, adapters, single, &norm);
    if (st != LORA_OK)
        return st;
    const int64_t step = opt->step + 1;
    const step_consts c = make_step_consts(opt, norm, step);
    const int64_t bad = update_pass(opt, adapters, &c, 0);
    if (bad >= 0)
        return lora_set_error(opt->err, LORA_ERR_NONFINITE,
                              "the update would make parameter %lld (flat order) NaN/Inf; "
                              "nothing was updated",
                              (long long)bad);
    update_pass(opt, adapters, &c, 1);
    if (opt->kind == LORA_OPTIMIZER_SGD && opt->momentum != 0.0)
        opt->momentum_started = 1;
    opt->step = step;
    opt->grad_norm = norm;
    for (size_t k = 0; k < opt->n_members; k++)
        lora_adapter_params_changed(adapters[k]);
    opt->err[0] = '\0';
    return LORA_OK;
}

LORA_API int lora_optimizer_step(lora_optimizer *opt, lora_adapter *ad)
{
    if (!opt)
        return LORA_ERR_INVALID_ARG;
    if (!ad)
        return lora_set_error(opt->err, LORA_ERR_INVALID_ARG, "ad is NULL");
    if (opt->n_members != 1)
        return lora_set_error(opt->err, LORA_ERR_INVALID_ARG,
                              "the optimizer serves %zu adapters: use lora_optimizer_step_set",
                              opt->n_members);
    return step_set(opt, &ad, 1);
}

LORA_API int lora_optimizer_step_set(lora_optimizer *opt, lora_adapter *const *adapters,
                                     size_t n)
{
    if (!opt)
        return LORA_ERR_INVALID_ARG;
    if (!adapters)
        return lora_set_error(opt->err, LORA_ERR_INVALID_ARG, "adapters is NULL");
    if (n != opt->n_members)
        return lora_set_error(opt->err, LORA_ERR_INVALID_ARG,
                              "n = %zu adapters, the optimizer was made for %zu", n,
                              opt->n_members);
    const int st = check_set((const lora_adapter *const *)adapters, n, opt->err, 0);
    if (st != LORA_OK)
        return st;
    return step_set(opt, adapters, 0);
}
