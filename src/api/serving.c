/* Multi-adapter serving: borrowed (shared, uncopied) base weights, hot-swapping of LoRA
 * factors between adapters, and lora_apply (many tenants' LoRA deltas in one call). */
#include <math.h>
#include <string.h>

#include "internal.h"
#include "../layer/apply.h"

/* ---- base weights: float, bf16 or half; copied or borrowed ---- */

/* Validates a base weight (and optional bias) for target; *proj: its PROJ_* index. */
static int check_base(lora_adapter *ad, int target, la_wmat w, const float *bias, int *proj)
{
    const int t = lora_target_index(target);
    if (t < 0)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "target %d is not one of LORA_TARGET_Q/K/V/O", target);
    if (t == PROJ_O && !ad->layer.out_proj)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "the layer has no output projection (LORA_CFG_OUT_PROJ = 0)");
    if (!w.data)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "weight is NULL");
    const layer_proj *p = &ad->layer.proj[t];
    int64_t bad = la_wmat_find_nonfinite(w, (size_t)(p->out * p->in));
    if (bad >= 0)
        return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                              "base weight %s has a non-finite entry at index %lld",
                              lora_proj_names[t], (long long)bad);
    if (bias && (bad = lora_find_nonfinite(bias, (size_t)p->out)) >= 0)
        return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                              "base bias %s has a non-finite entry at index %lld",
                              lora_proj_names[t], (long long)bad);
    *proj = t;
    return LORA_OK;
}

/* Copies w and bias into buffers of the adapter (reusing its own ones of the same size). */
static int copy_base(lora_adapter *ad, int t, la_wmat w, const float *bias)
{
    layer_proj *p = &ad->layer.proj[t];
    const size_t nw = (size_t)(p->out * p->in) * la_dtype_size(w.dtype);
    const size_t nbias = (size_t)p->out * sizeof(float);
    const int owned = !ad->base_borrowed[t]; /* a borrowed buffer is never written */
    void *old_w = owned ? (void *)p->weight.data : NULL;
    void *wbuf = old_w && p->weight.dtype == w.dtype ? old_w : lora_mem_alloc(&ad->mem, nw);
    if (!wbuf)
        return lora_set_error(ad->err, LORA_ERR_NOMEM, "cannot allocate base weight %s",
                              lora_proj_names[t]);
    float *b = NULL;
    if (bias) {
        b = owned && p->bias ? p->bias : lora_mem_alloc(&ad->mem, nbias);
        if (!b) {
            if (wbuf != old_w)
                lora_mem_free(&ad->mem, wbuf);
            return lora_set_error(ad->err, LORA_ERR_NOMEM, "cannot allocate base bias %s",
                                  lora_proj_names[t]);
        }
        memcpy(b, bias, nbias);
    } else if (owned) {
        lora_mem_free(&ad->mem, p->bias);
    }
    if (wbuf != old_w)
        lora_mem_free(&ad->mem, old_w);
    memcpy(wbuf, w.data, nw);
    p->weight = (la_wmat){wbuf, w.dtype};
    p->bias = b;
    ad->base_borrowed[t] = 0;
    return LORA_OK;
}

LORA_API int lora_adapter_set_base_typed(lora_adapter *ad, int target, const void *weight,
                                         int dtype, const float *bias, uint32_t flags)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    if (flags & ~(uint32_t)LORA_BASE_BORROW)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "flags = 0x%x has bits other than LORA_BASE_BORROW", flags);
    if (dtype != LORA_DTYPE_F32 && dtype != LORA_DTYPE_BF16 && dtype != LORA_DTYPE_F16)
        return lora_set_error(ad->err, LORA_ERR_UNSUPPORTED,
                              "dtype = %d is not LORA_DTYPE_F32, _BF16 or _F16", dtype);
    const la_wmat w = {weight, dtype == LORA_DTYPE_BF16  ? LA_BF16
                               : dtype == LORA_DTYPE_F16 ? LA_F16
                                                         : LA_F32};
    int t = 0;
    int st = check_base(ad, target, w, bias, &t);
    if (st != LORA_OK)
        return st;
    layer_proj *p = &ad->layer.proj[t];
    if (flags & LORA_BASE_BORROW) {
        if (!ad->base_borrowed[t]) {
            lora_mem_free(&ad->mem, (void *)p->weight.data);
            lora_mem_free(&ad->mem, p->bias);
        }
        /* The layer only ever reads weight and bias (layer.h); the cast keeps one type. */
        p->weight = w;
        p->bias = (float *)bias;
        ad->base_borrowed[t] = 1;
    } else if ((st = copy_base(ad, t, w, bias)) != LORA_OK) {
        return st;
    }
    lora_adapter_params_changed(ad); /* the saved activations no longer match the layer */
    ad->err[0] = '\0';
    return LORA_OK;
}

LORA_API int lora_adapter_set_base_borrowed(lora_adapter *ad, int target,
                                            const float *weight, const float *bias)
{
    return lora_adapter_set_base_typed(ad, target, weight, LORA_DTYPE_F32, bias,
                                       LORA_BASE_BORROW);
}

LORA_API int lora_adapter_copy_params(lora_adapter *dst, const lora_adapter *src)
{
    if (!dst)
        return LORA_ERR_INVALID_ARG;
    if (!src)
        return lora_set_error(dst->err, LORA_ERR_INVALID_ARG, "src is NULL");
    if (src == dst) {
        dst->err[0] = '\0';
        return LORA_OK;
    }
    const layer *ls = &src->layer;
    layer *ld = &dst->layer;
    if (ls->rank != ld->rank)
        return lora_set_error(dst->err, LORA_ERR_INVALID_ARG,
                              "rank differs: src %lld, dst %lld", (long long)ls->rank,
                              (long long)ld->rank);
    for (int t = 0; t < PROJ_COUNT; t++) {
        const layer_proj *ps = &ls->proj[t], *pd = &ld->proj[t];
        if (ps->adapted != pd->adapted)
            return lora_set_error(dst->err, LORA_ERR_INVALID_ARG,
                                  "target %s is adapted in %s only", lora_proj_names[t],
                                  ps->adapted ? "src" : "dst");
        if (ps->adapted && (ps->in != pd->in || ps->out != pd->out))
            return lora_set_error(dst->err, LORA_ERR_INVALID_ARG,
                                  "projection %s is %lld x %lld in src, %lld x %lld in dst",
                                  lora_proj_names[t], (long long)ps->out, (long long)ps->in,
                                  (long long)pd->out, (long long)pd->in);
    }
    for (int t = 0; t < PROJ_COUNT; t++) {
        const layer_proj *ps = &ls->proj[t];
        layer_proj *pd = &ld->proj[t];
        if (!ps->adapted)
            continue;
        memcpy(pd->a, ps->a, (size_t)(ls->rank * ps->in) * sizeof(float));
        memcpy(pd->b, ps->b, (size_t)(ps->out * ls->rank) * sizeof(float));
    }
    dst->cfg.alpha = src->cfg.alpha;
    dst->cfg.rslora = src->cfg.rslora;
    ld->lora_scale = ls->lora_scale;
    lora_adapter_params_changed(dst);
    dst->err[0] = '\0';
    return LORA_OK;
}

/* ---- lora_apply: the multi-tenant LoRA delta (src/layer/apply.c runs the tasks) ---- */

/* Checks everything lora_apply reads; fills the tenants' common (in, out). */
static int apply_check(const lora_adapter *const *tenants, size_t n_tenants, int target,
                       const int32_t *tenant_of_row, const float *x, int64_t rows,
                       const float *y, int64_t *in, int64_t *out, char *err)
{
    if (!tenants)
        return lora_set_error(err, LORA_ERR_INVALID_ARG, "tenants is NULL");
    if (n_tenants == 0 || n_tenants > (size_t)INT32_MAX)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "n_tenants = %zu is outside [1, 2^31 - 1]", n_tenants);
    const int t = lora_target_index(target);
    if (t < 0)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "target %d is not one of LORA_TARGET_Q/K/V/O", target);
    for (size_t i = 0; i < n_tenants; i++) {
        if (!tenants[i])
            return lora_set_error(err, LORA_ERR_INVALID_ARG, "tenants[%zu] is NULL", i);
        const layer_proj *p = &tenants[i]->layer.proj[t];
        if (!p->adapted)
            return lora_set_error(err, LORA_ERR_INVALID_ARG,
                                  "tenants[%zu] does not adapt target %s", i,
                                  lora_proj_names[t]);
        if (i == 0) {
            *in = p->in;
            *out = p->out;
        } else if (p->in != *in || p->out != *out) {
            return lora_set_error(err, LORA_ERR_SHAPE,
                                  "tenants[%zu]'s %s is %lld x %lld, tenants[0]'s %lld x %lld",
                                  i, lora_proj_names[t], (long long)p->out, (long long)p->in,
                                  (long long)*out, (long long)*in);
        }
    }
    if (rows < 0)
        return lora_set_error(err, LORA_ERR_SHAPE, "rows = %lld is negative", (long long)rows);
    if (rows == 0)
        return LORA_OK;
    if (!tenant_of_row || !x || !y)
        return lora_set_error(err, LORA_ERR_INVALID_ARG, "%s is NULL",
                              !tenant_of_row ? "tenant_of_row" : !x ? "x" : "y");
    int64_t nx, ny;
    if (__builtin_mul_overflow(rows, *in, &nx) || __builtin_mul_overflow(rows, *out, &ny) ||
        nx > (int64_t)(SIZE_MAX / 16) || ny > (int64_t)(SIZE_MAX / 16))
        return lora_set_error(err, LORA_ERR_SHAPE, "rows = %lld x %lld columns overflows",
                              (long long)rows, (long long)(*in > *out ? *in : *out));
    for (int64_t r = 0; r < rows; r++)
        if (tenant_of_row[r] < -1 || tenant_of_row[r] >= (int64_t)n_tenants)
            return lora_set_error(err, LORA_ERR_INVALID_ARG,
                                  "tenant_of_row[%lld] = %d is outside [-1, %zu)",
                                  (long long)r, (int)tenant_of_row[r], n_tenants);
    for (int64_t r = 0; r < rows; r++) {
        if (tenant_of_row[r] < 0)
            continue; /* untouched rows are not read */
        const int64_t bad = lora_find_nonfinite(x + r * *in, (size_t)*in);
        if (bad >= 0)
            return lora_set_error(err, LORA_ERR_NONFINITE,
                                  "x has a non-finite entry at row %lld, column %lld",
                                  (long long)r, (long long)bad);
    }
    return LORA_OK;
}

/* Carves a 64-byte aligned piece of n elements of size sz at *off; 0 on overflow. */
static size_t carve_at(size_t *off, size_t n, size_t sz, int *ok)
{
    const size_t at = *off;
    size_t bytes;
    if (__builtin_mul_overflow(n, sz, &bytes) ||
        __builtin_add_overflow(bytes, (size_t)63, &bytes) ||
        __builtin_add_overflow(*off, bytes & ~(size_t)63, off))
        *ok = 0;
    return at;
}

/* Stable counting sort of the adapted rows by tenant into job->order, cut into tasks of
 * at most block rows (counts: n_tenants + 1 scratch entries). */
static void apply_sort(apply_job *job, apply_task *tasks, int64_t *order, int64_t *counts,
                       size_t n_tenants, const int32_t *tenant_of_row, int64_t rows,
                       int64_t block)
{
    memset(counts, 0, (n_tenants + 1) * sizeof *counts);
    for (int64_t r = 0; r < rows; r++)
        if (tenant_of_row[r] >= 0)
            counts[tenant_of_row[r] + 1]++;
    for (size_t i = 0; i < n_tenants; i++)
        counts[i + 1] += counts[i];
    int64_t n_tasks = 0;
    for (size_t i = 0; i < n_tenants; i++)
        for (int64_t s = counts[i]; s < counts[i + 1]; s += block) {
            const int64_t left = counts[i + 1] - s;
            tasks[n_tasks++] = (apply_task){(int32_t)i, s, left < block ? left : block};
        }
    for (int64_t r = 0; r < rows; r++)
        if (tenant_of_row[r] >= 0)
            order[counts[tenant_of_row[r]]++] = r;
    job->order = order;
    job->tasks = tasks;
    job->n_tasks = n_tasks;
}

/* The tasks on tenants[0]'s worker threads, each part in its own scratch. The pool
 * takes one caller at a time: a concurrent caller (or one while tenants[0] runs a
 * forward) finds it busy and runs every part itself, with the same y. */
static int apply_tasks(const lora_adapter *lead, apply_job *job, char *err)
{
    const int parts = apply_parts(job, lead->threads);
    size_t floats;
    if (__builtin_mul_overflow(job->part_floats, (size_t)parts, &floats) ||
        floats > SIZE_MAX / sizeof(float))
        return lora_set_error(err, LORA_ERR_SHAPE, "lora_apply's workspace size overflows");
    job->scratch = lora_mem_alloc(&lead->mem, floats * sizeof(float));
    if (!job->scratch)
        return lora_set_error(err, LORA_ERR_NOMEM, "cannot allocate %zu floats of workspace",
                              floats);
    pool_queue_start(&job->queue);
    pool_run(lead->la.pool, parts, apply_part, job);
    lora_mem_free(&lead->mem, job->scratch);
    return LORA_OK;
}

static int apply_run(const lora_adapter *const *tenants, size_t n_tenants, int target,
                     const int32_t *tenant_of_row, const float *x, int64_t rows, float *y,
                     char *err)
{
    int64_t in = 0, out = 0;
    int st = apply_check(tenants, n_tenants, target, tenant_of_row, x, rows, y, &in, &out, err);
    if (st != LORA_OK || rows == 0)
        return st;
    const int t = lora_target_index(target);
    int64_t max_rank = 0;
    for (size_t i = 0; i < n_tenants; i++)
        max_rank = tenants[i]->layer.rank > max_rank ? tenants[i]->layer.rank : max_rank;
    const int64_t block = apply_block_rows(in, out, max_rank);
    const int64_t panel_rows = rows < block ? rows : block;
    const size_t part_floats = apply_part_floats(panel_rows, in, out, max_rank);
    size_t bytes = 0;
    int ok = part_floats > 0;
    const size_t counts_at = carve_at(&bytes, n_tenants + 1, sizeof(int64_t), &ok);
    const size_t order_at = carve_at(&bytes, (size_t)rows, sizeof(int64_t), &ok);
    const size_t tasks_at = carve_at(&bytes, (size_t)rows, sizeof(apply_task), &ok);
    const size_t views_at = carve_at(&bytes, n_tenants, sizeof(apply_tenant), &ok);
    if (!ok)
        return lora_set_error(err, LORA_ERR_SHAPE, "lora_apply's workspace size overflows");
    const lora_mem *mem = &tenants[0]->mem;
    unsigned char *ws = lora_mem_alloc(mem, bytes);
    if (!ws)
        return lora_set_error(err, LORA_ERR_NOMEM, "cannot allocate %zu bytes of workspace",
                              bytes);
    apply_tenant *views = (apply_tenant *)(void *)(ws + views_at);
    for (size_t i = 0; i < n_tenants; i++) {
        const layer *l = &tenants[i]->layer;
        views[i] = (apply_tenant){l->proj[t].a, l->proj[t].b, l->rank, l->lora_scale};
    }
    apply_job job = {.la = &tenants[0]->la, .tenants = views, .in = in, .out = out,
                     .panel_rows = panel_rows, .x = x, .y = y, .part_floats = part_floats};
    apply_sort(&job, (apply_task *)(void *)(ws + tasks_at), (int64_t *)(void *)(ws + order_at),
               (int64_t *)(void *)(ws + counts_at), n_tenants, tenant_of_row, rows, block);
    st = apply_tasks(tenants[0], &job, err);
    lora_mem_free(mem, ws);
    return st;
}

LORA_API int lora_apply_with_error(const lora_adapter *const *tenants, size_t n_tenants,
                                   int target, const int32_t *tenant_of_row, const float *x,
                                   int64_t rows, float *y, char *error, size_t error_size)
{
    char err[LORA_ERRMSG_SIZE] = "";
    const int st = apply_run(tenants, n_tenants, target, tenant_of_row, x, rows, y, err);
    if (error && error_size > 0) {
        const size_t n = strnlen(err, error_size - 1);
        memcpy(error, err, n);
        error[n] = '\0';
    }
    return st;
}

LORA_API int lora_apply(const lora_adapter *const *tenants, size_t n_tenants, int target,
                        const int32_t *tenant_of_row, const float *x, int64_t rows, float *y)
{
    return lora_apply_with_error(tenants, n_tenants, target, tenant_of_row, x, rows, y, NULL,
                                 0);
}
