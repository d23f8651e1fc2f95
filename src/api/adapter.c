/* The adapter handle: frozen base projections, LoRA factors and their gradients. */
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

int lora_target_index(int target)
{
    switch (target) {
    case LORA_TARGET_Q: return PROJ_Q;
    case LORA_TARGET_K: return PROJ_K;
    case LORA_TARGET_V: return PROJ_V;
    case LORA_TARGET_O: return PROJ_O;
    default: return -1;
    }
}

const char *const lora_proj_names[PROJ_COUNT] = {"Q", "K", "V", "O"};

/* ---- seeded initialisation (splitmix64: tiny, stateless between calls) ---- */

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* Uniform in (0, 1): 53 random bits, never 0 (safe for log). */
static double uniform01(uint64_t *s) { return ((double)(splitmix64(s) >> 11) + 0.5) * 0x1p-53; }

static void init_factor_a(const lora_config_values *c, int proj, float *a, int64_t rank,
                          int64_t in)
{
    /* One stream per projection, so adding a target does not change the others. */
    uint64_t s = c->seed ^ (UINT64_C(0xA5A5A5A5) * (uint64_t)(proj + 1));
    const size_t n = (size_t)rank * (size_t)in;
    switch (c->init) {
    case LORA_INIT_KAIMING_ZERO: {
        /* kaiming_uniform_(a=√5): bound = √(6/((1+5)·fan_in)) = 1/√in. */
        const double bound = 1.0 / sqrt((double)in);
        for (size_t i = 0; i < n; i++)
            a[i] = (float)((2.0 * uniform01(&s) - 1.0) * bound);
        break;
    }
    case LORA_INIT_GAUSSIAN: {
        const double sd = 1.0 / (double)rank;
        for (size_t i = 0; i < n; i++) {
            const double u1 = uniform01(&s), u2 = uniform01(&s);
            a[i] = (float)(sd * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
        }
        break;
    }
    default: memset(a, 0, n * sizeof(float)); break;
    }
}

static int default_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > LORA_MAX_THREADS ? LORA_MAX_THREADS : (int)n);
}

static void adapter_free_members(lora_adapter *ad)
{
    for (int t = 0; t < PROJ_COUNT; t++) {
        layer_proj *p = &ad->layer.proj[t];
        if (!ad->base_borrowed[t]) {
            lora_mem_free(&ad->mem, (void *)p->weight.data);
            lora_mem_free(&ad->mem, p->bias);
        }
        lora_mem_free(&ad->mem, ad->own_factors[t]); /* own a, b, da, db: one block */
    }
    lora_adapter_free_merged(ad);
    lora_buf_free(&ad->mem, &ad->tape.acts_buf);
    lora_buf_free(&ad->mem, &ad->scratch);
    lora_buf_free(&ad->mem, &ad->estimate_buf);
    lora_mem_free(&ad->mem, ad->group_r); /* group_r, plan_groups, tape.groups: one block */
    lora_mem_free(&ad->mem, ad->rope_freqs);
    if (ad->la.pool) {
        pool_destroy(ad->la.pool); /* joins the worker threads */
        lora_mem_free(&ad->mem, ad->la.pool);
    }
}

LORA_API int lora_adapter_create(lora_adapter **out, const lora_config *cfg)
{
    if (!out)
        return LORA_ERR_INVALID_ARG;
    *out = NULL;
    if (!cfg)
        return LORA_ERR_INVALID_ARG;
    lora_config_values v;
    char err[LORA_ERRMSG_SIZE];
    int st = lora_config_resolve(&cfg->v, &v, err);
    if (st != LORA_OK)
        return st;
    lora_adapter *ad = lora_mem_calloc(&cfg->mem, 1, sizeof *ad);
    if (!ad)
        return LORA_ERR_NOMEM;
    ad->mem = cfg->mem;
    ad->cfg = v;
    ad->threads = v.threads > 0 ? (int)v.threads : default_threads();
    la_ctx_init(&ad->la, ad->threads);
    ad->la.bf16 = v.compute == LORA_COMPUTE_BF16;

    layer *l = &ad->layer;
    l->d_model = v.d_model;
    l->n_heads = v.n_heads;
    l->n_kv_heads = v.n_kv_heads;
    l->head_dim = v.head_dim;
    l->q_dim = v.n_heads * v.head_dim;
    l->kv_dim = v.n_kv_heads * v.head_dim;
    l->rank = v.rank;
    l->lora_scale =
        (float)(v.rslora ? v.alpha / sqrt((double)v.rank) : v.alpha / (double)v.rank);
    l->softmax_scale = (float)v.softmax_scale;
    l->causal = (int)v.causal;
    l->out_proj = (int)v.out_proj;
    l->rope = (int)v.rope;
    l->rope_dim = v.rope_dim;
    l->window = v.window;
    l->softcap = (float)v.softcap;
    l->dropout = v.dropout;
    l->seed = v.seed;
    const int64_t ins[PROJ_COUNT] = {l->d_model, l->d_model, l->d_model, l->q_dim};
    const int64_t outs[PROJ_COUNT] = {l->q_dim, l->kv_dim, l->kv_dim, l->d_model};
    for (int t = 0; t < PROJ_COUNT; t++) {
        layer_proj *p = &l->proj[t];
        p->in = ins[t];
        p->out = outs[t];
        p->adapted = (v.targets >> t) & 1;
        if (!p->adapted)
            continue;
        const size_t na = (size_t)(l->rank * p->in), nb = (size_t)(p->out * l->rank);
        p->a = ad->own_factors[t] = lora_mem_calloc(&ad->mem, 2 * (na + nb), sizeof(float));
        if (!p->a) {
            adapter_free_members(ad);
            lora_mem_free(&ad->mem, ad);
            return LORA_ERR_NOMEM;
        }
        p->b = p->a + na;
        p->da = p->b + nb;
        p->db = p->da + na;
        init_factor_a(&v, t, p->a, l->rank, p->in); /* B starts at zero */
    }
    const size_t groups = (size_t)v.n_kv_heads;
    ad->group_r =
        lora_mem_alloc(&ad->mem, groups * (sizeof(double) + 2 * sizeof(attn_group_plan)));
    if (!ad->group_r) {
        adapter_free_members(ad);
        lora_mem_free(&ad->mem, ad);
        return LORA_ERR_NOMEM;
    }
    /* The worker pool: memory now, threads on first use (src/linalg/pool.h). */
    void *pool_mem = lora_mem_alloc(&ad->mem, pool_bytes(ad->threads));
    ad->la.pool = pool_init(pool_mem, ad->threads);
    if (!ad->la.pool) {
        lora_mem_free(&ad->mem, pool_mem);
        adapter_free_members(ad);
        lora_mem_free(&ad->mem, ad);
        return LORA_ERR_NOMEM;
    }
    if (lora_rope_init(ad) != LORA_OK) {
        adapter_free_members(ad);
        lora_mem_free(&ad->mem, ad);
        return LORA_ERR_NOMEM;
    }
    ad->plan_groups = (attn_group_plan *)(void *)(ad->group_r + groups);
    ad->id = lora_new_handle_id(ad);
    lora_tape_init(&ad->tape, ad, ad->plan_groups + groups);
    ad->info.struct_size = sizeof ad->info;
    ad->info.measured_out_error = ad->info.measured_dq_error = -1.0;
    *out = ad;
    return LORA_OK;
}

LORA_API void lora_adapter_destroy(lora_adapter *ad)
{
    if (!ad)
        return;
    adapter_free_members(ad);
    lora_mem_free(&ad->mem, ad);
}

LORA_API int lora_adapter_set_base(lora_adapter *ad, int target, const float *weight,
                                   const float *bias)
{
    return lora_adapter_set_base_typed(ad, target, weight, LORA_DTYPE_F32, bias, 0);
}

/* Resolves (target, which) to a factor; NULL (with the message in err, if any) if bad. */
static const layer_proj *factor_proj(const lora_adapter *ad, int target, int which,
                                     size_t *count, char *err)
{
    const int t = lora_target_index(target);
    if (t < 0) {
        lora_set_error(err, LORA_ERR_INVALID_ARG,
                       "target %d is not one of LORA_TARGET_Q/K/V/O", target);
        return NULL;
    }
    if (which != LORA_A && which != LORA_B) {
        lora_set_error(err, LORA_ERR_INVALID_ARG, "which = %d is not LORA_A or LORA_B",
                       which);
        return NULL;
    }
    const layer_proj *p = &ad->layer.proj[t];
    if (!p->adapted) {
        lora_set_error(err, LORA_ERR_INVALID_ARG,
                       "target %s is not adapted (not in LORA_CFG_TARGETS)", lora_proj_names[t]);
        return NULL;
    }
    *count = (size_t)(which == LORA_A ? ad->layer.rank * p->in : p->out * ad->layer.rank);
    return p;
}


static int copy_factor(const lora_adapter *ad, int target, int which, float *dst,
                       size_t count, int grad)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    size_t n;
    const layer_proj *p = factor_proj(ad, target, which, &n, NULL); /* const: no message */
    if (!p || !dst || count != n)
        return LORA_ERR_INVALID_ARG;
    const float *src = grad ? (which == LORA_A ? p->da : p->db) : (which == LORA_A ? p->a : p->b);
    memcpy(dst, src, n * sizeof(float));
    return LORA_OK;
}

LORA_API int lora_adapter_get_param(const lora_adapter *ad, int target, int which,
                                    float *dst, size_t count)
{
    return copy_factor(ad, target, which, dst, count, 0);
}

LORA_API int lora_adapter_get_grad(const lora_adapter *ad, int target, int which,
                                   float *dst, size_t count)
{
    return copy_factor(ad, target, which, dst, count, 1);
}

LORA_API int lora_adapter_set_param(lora_adapter *ad, int target, int which,
                                    const float *src, size_t count)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    size_t n;
    const layer_proj *p = factor_proj(ad, target, which, &n, ad->err);
    if (!p)
        return LORA_ERR_INVALID_ARG;
    if (!src)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "src is NULL");
    if (count != n)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "count %zu does not match the factor's %zu elements", count, n);
    int64_t bad = lora_find_nonfinite(src, n);
    if (bad >= 0)
        return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                              "src has a non-finite entry at index %lld", (long long)bad);
    memcpy(which == LORA_A ? p->a : p->b, src, n * sizeof(float));
    lora_adapter_params_changed(ad);
    ad->err[0] = '\0';
    return LORA_OK;
}

LORA_API int lora_adapter_param_shape(const lora_adapter *ad, int target, int which,
                                      int64_t *rows, int64_t *cols)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    size_t n;
    const layer_proj *p = factor_proj(ad, target, which, &n, NULL); /* const: no message */
    if (!p || !rows || !cols)
        return LORA_ERR_INVALID_ARG;
    *rows = which == LORA_A ? ad->layer.rank : p->out;
    *cols = which == LORA_A ? p->in : ad->layer.rank;
    return LORA_OK;
}

LORA_API int lora_adapter_zero_grad(lora_adapter *ad)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    for (int t = 0; t < PROJ_COUNT; t++) {
        layer_proj *p = &ad->layer.proj[t];
        if (p->adapted) { /* da and db may each be caller-owned (borrow.c) */
            memset(p->da, 0, (size_t)(ad->layer.rank * p->in) * sizeof(float));
            memset(p->db, 0, (size_t)(p->out * ad->layer.rank) * sizeof(float));
        }
    }
    ad->err[0] = '\0';
    return LORA_OK;
}

LORA_API int lora_adapter_get_config_int(const lora_adapter *ad, int param, int64_t *value)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    if (param == LORA_CFG_THREADS && value) {
        *value = ad->threads; /* the resolved count, not 0 */
        return LORA_OK;
    }
    return lora_config_values_get_int(&ad->cfg, param, value);
}

LORA_API int lora_adapter_get_config_double(const lora_adapter *ad, int param,
                                            double *value)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    return lora_config_values_get_double(&ad->cfg, param, value);
}

LORA_API const char *lora_adapter_last_error(const lora_adapter *ad)
{
    return ad ? ad->err : "NULL adapter";
}

LORA_API int lora_adapter_get_run_info(const lora_adapter *ad, lora_run_info *info)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    if (!info)
        return LORA_ERR_INVALID_ARG;
    const size_t want = info->struct_size;
    if (want < offsetof(lora_run_info, measured_dq_error) + sizeof(double))
        return LORA_ERR_INVALID_ARG; /* smaller than the first version */
    lora_run_info full = ad->info;
    full.struct_size = (uint32_t)(want < sizeof full ? want : sizeof full);
    memcpy(info, &full, full.struct_size);
    return LORA_OK;
}
