/* Flat views of an adapter: every LoRA factor (or its gradient) as one vector, in the
 * order Q, K, V, O (adapted ones), A then B, row-major. */
#include <string.h>

#include "internal.h"

size_t lora_factor_floats(const layer *l)
{
    size_t n = 0;
    for (int t = 0; t < PROJ_COUNT; t++) {
        const layer_proj *p = &l->proj[t];
        if (p->adapted)
            n += (size_t)(l->rank * (p->in + p->out));
    }
    return n;
}

void lora_for_each_factor(const lora_adapter *ad, int grad, lora_block_fn fn, void *ctx)
{
    size_t off = 0;
    for (int t = 0; t < PROJ_COUNT; t++) {
        const layer_proj *p = &ad->layer.proj[t];
        if (!p->adapted)
            continue;
        const size_t na = (size_t)(ad->layer.rank * p->in), nb = (size_t)(p->out * ad->layer.rank);
        fn(ctx, grad ? p->da : p->a, na, off);
        off += na;
        fn(ctx, grad ? p->db : p->b, nb, off);
        off += nb;
    }
}

void lora_flat_copy_out(void *ctx, float *data, size_t len, size_t off)
{
    memcpy((float *)ctx + off, data, len * sizeof(float));
}

void lora_flat_copy_in(void *ctx, float *data, size_t len, size_t off)
{
    memcpy(data, (const float *)ctx + off, len * sizeof(float));
}

LORA_API int lora_adapter_param_count(const lora_adapter *ad, size_t *count)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    if (!count)
        return LORA_ERR_INVALID_ARG; /* const: no message */
    *count = lora_factor_floats(&ad->layer);
    return LORA_OK;
}

/* err: the message's place, NULL for a const adapter. */
static int flat_check(const lora_adapter *ad, const void *buf, size_t count,
                      const char *name, char *err)
{
    if (!buf)
        return lora_set_error(err, LORA_ERR_INVALID_ARG, "%s is NULL", name);
    const size_t n = lora_factor_floats(&ad->layer);
    if (count != n)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "count %zu does not match the adapter's %zu parameters",
                              count, n);
    return LORA_OK;
}

static int flat_get(const lora_adapter *ad, float *dst, size_t count, int grad)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    int st = flat_check(ad, dst, count, "dst", NULL);
    if (st != LORA_OK)
        return st;
    lora_for_each_factor(ad, grad, lora_flat_copy_out, dst);
    return LORA_OK;
}

static int flat_set(lora_adapter *ad, const float *src, size_t count, int grad)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    int st = flat_check(ad, src, count, "src", ad->err);
    if (st != LORA_OK)
        return st;
    const int64_t bad = lora_find_nonfinite(src, count);
    if (bad >= 0)
        return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                              "src has a non-finite entry at index %lld", (long long)bad);
    lora_for_each_factor(ad, grad, lora_flat_copy_in, (void *)src);
    if (!grad)
        lora_adapter_params_changed(ad);
    ad->err[0] = '\0';
    return LORA_OK;
}

LORA_API int lora_adapter_get_params_flat(const lora_adapter *ad, float *dst, size_t count)
{
    return flat_get(ad, dst, count, 0);
}

LORA_API int lora_adapter_get_grads_flat(const lora_adapter *ad, float *dst, size_t count)
{
    return flat_get(ad, dst, count, 1);
}

LORA_API int lora_adapter_set_params_flat(lora_adapter *ad, const float *src, size_t count)
{
    return flat_set(ad, src, count, 0);
}

LORA_API int lora_adapter_set_grads_flat(lora_adapter *ad, const float *src, size_t count)
{
    return flat_set(ad, src, count, 1);
}
