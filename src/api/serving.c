/* Multi-adapter serving: borrowed (shared, uncopied) base weights and hot-swapping of
 * LoRA factors between adapters. */
#include <math.h>
#include <string.h>

#include "internal.h"

LORA_API int lora_adapter_set_base_borrowed(lora_adapter *ad, int target,
                                            const float *weight, const float *bias)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    int t;
    const int st = lora_check_base(ad, target, weight, bias, &t);
    if (st != LORA_OK)
        return st;
    layer_proj *p = &ad->layer.proj[t];
    if (!ad->base_borrowed[t]) {
        lora_mem_free(&ad->mem, p->weight);
        lora_mem_free(&ad->mem, p->bias);
    }
    /* The layer only ever reads weight and bias (layer.h); the cast keeps one type. */
    p->weight = (float *)weight;
    p->bias = (float *)bias;
    ad->base_borrowed[t] = 1;
    lora_adapter_params_changed(ad);
    ad->err[0] = '\0';
    return LORA_OK;
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
