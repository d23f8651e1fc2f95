/* Caller-owned storage for LoRA factors and their gradients (a numpy array, a
 * torch.nn.Parameter and its .grad), used in place. The library sees the caller's
 * writes into a borrowed factor through a fingerprint of its values, taken whenever a
 * call depends on derived state: a tape recorded before such a write, or merged weights
 * built before it, are then stale exactly as after lora_adapter_set_param. */
#include <string.h>

#include "internal.h"

/* Own storage of factor `which` (grad: of its gradient) of projection t. */
static float *own_storage(const lora_adapter *ad, int t, int which, int grad)
{
    const layer_proj *p = &ad->layer.proj[t];
    const size_t na = (size_t)(ad->layer.rank * p->in), nb = (size_t)(p->out * ad->layer.rank);
    float *a = ad->own_factors[t];
    return a + (grad ? na + nb : 0) + (which == LORA_B ? na : 0);
}

static float **slot(layer_proj *p, int which, int grad)
{
    return grad ? (which == LORA_B ? &p->db : &p->da) : (which == LORA_B ? &p->b : &p->a);
}

#define PRINT_MUL UINT64_C(0x9E3779B97F4A7C15)

static uint64_t print_mix(uint64_t z)
{
    z = (z ^ (z >> 31)) * UINT64_C(0xBF58476D1CE4E5B9);
    return z ^ (z >> 29);
}

/* A 64-bit fingerprint of n floats' bits: four independent lanes, so it runs at memory
 * speed. Not cryptographic: it tells a changed factor from an unchanged one. */
static uint64_t print_block(uint64_t seed, const float *x, size_t n)
{
    uint64_t lane[4] = {seed ^ 1u, seed ^ 2u, seed ^ 3u, seed ^ 4u};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 4; k++) {
            uint64_t w;
            memcpy(&w, x + i + 2 * k, sizeof w);
            lane[k] = (lane[k] ^ w) * PRINT_MUL;
            lane[k] ^= lane[k] >> 32;
        }
    for (; i < n; i++) {
        uint32_t w;
        memcpy(&w, x + i, sizeof w);
        lane[0] = (lane[0] ^ w) * PRINT_MUL;
        lane[0] ^= lane[0] >> 32;
    }
    return print_mix(lane[0] ^ print_mix(lane[1] + n) ^ print_mix(lane[2] ^ (lane[3] << 1)));
}

/* Fingerprint of every borrowed factor (their addresses too: a new buffer is a change). */
static uint64_t borrowed_print(const lora_adapter *ad)
{
    uint64_t h = 0;
    for (int t = 0; t < PROJ_COUNT; t++) {
        const layer_proj *p = &ad->layer.proj[t];
        if (!p->adapted)
            continue;
        for (int w = 0; w < 2; w++) {
            const float *f = w == LORA_B ? p->b : p->a;
            if (f == own_storage(ad, t, w, 0))
                continue;
            const size_t n = (size_t)(w == LORA_B ? p->out * ad->layer.rank : ad->layer.rank * p->in);
            h = print_block(print_mix(h + (uint64_t)(uintptr_t)f), f, n);
        }
    }
    return h;
}

void lora_adapter_sync_borrowed(lora_adapter *ad)
{
    if (!ad->factors_borrowed)
        return;
    const uint64_t now = borrowed_print(ad);
    if (now != ad->borrowed_print) {
        lora_adapter_params_changed(ad);
        ad->borrowed_print = now;
    }
}

/* Checks one buffer given to lora_adapter_borrow_factor. */
static int check_buffer(lora_adapter *ad, const float *buf, size_t n, const char *name)
{
    if (!buf)
        return LORA_OK;
    const int64_t bad = lora_find_nonfinite(buf, n);
    if (bad >= 0)
        return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                              "%s has a non-finite entry at index %lld", name, (long long)bad);
    return LORA_OK;
}

/* Points factor (or gradient) storage at buf, or back at the own storage (buf NULL),
 * carrying a borrowed buffer's current values over. */
static void rebind(lora_adapter *ad, int t, int which, int grad, float *buf, size_t n)
{
    float **s = slot(&ad->layer.proj[t], which, grad);
    float *own = own_storage(ad, t, which, grad);
    if (!buf && *s != own)
        memcpy(own, *s, n * sizeof(float));
    *s = buf ? buf : own;
}

LORA_API int lora_adapter_borrow_factor(lora_adapter *ad, int target, int which,
                                        float *param, float *grad, size_t count)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    const int t = lora_target_index(target);
    if (t < 0)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "target %d is not one of LORA_TARGET_Q/K/V/O", target);
    if (which != LORA_A && which != LORA_B)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "which = %d is not LORA_A or LORA_B", which);
    const layer_proj *p = &ad->layer.proj[t];
    if (!p->adapted)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "target %s is not adapted (not in LORA_CFG_TARGETS)",
                              lora_proj_names[t]);
    const size_t n = (size_t)(which == LORA_A ? ad->layer.rank * p->in : p->out * ad->layer.rank);
    if (count != n)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "count %zu does not match the factor's %zu elements", count, n);
    if (param && param == grad)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "param and grad must be distinct buffers");
    int st = check_buffer(ad, param, n, "param");
    if (st == LORA_OK)
        st = check_buffer(ad, grad, n, "grad");
    if (st != LORA_OK)
        return st;
    lora_adapter_sync_borrowed(ad); /* what tapes recorded so far saw */
    const float *before = which == LORA_B ? p->b : p->a;
    rebind(ad, t, which, 1, grad, n);
    rebind(ad, t, which, 0, param, n);
    if ((which == LORA_B ? p->b : p->a) != before || param)
        lora_adapter_params_changed(ad); /* new values (a borrow takes the caller's) */
    ad->factors_borrowed = 0;
    for (int u = 0; u < PROJ_COUNT; u++)
        for (int w = 0; w < 2; w++)
            ad->factors_borrowed |= ad->layer.proj[u].adapted &&
                                    *slot(&ad->layer.proj[u], w, 0) != own_storage(ad, u, w, 0);
    ad->borrowed_print = borrowed_print(ad);
    ad->err[0] = '\0';
    return LORA_OK;
}
