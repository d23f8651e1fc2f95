/* The 0.2 attention options that are not configuration values: RoPE's frequency
 * table (from ROPE_THETA, or the caller's through lora_adapter_set_rope_freqs). */
#include <math.h>
#include <string.h>

#include "internal.h"

int lora_rope_init(lora_adapter *ad)
{
    layer *l = &ad->layer;
    if (l->rope == LORA_ROPE_NONE)
        return LORA_OK;
    const int64_t half = l->rope_dim / 2;
    ad->rope_freqs = lora_mem_alloc(&ad->mem, (size_t)half * sizeof(double));
    if (!ad->rope_freqs)
        return LORA_ERR_NOMEM;
    /* inv_freq[i] = THETA^(-2i/ROPE_DIM), in double */
    for (int64_t i = 0; i < half; i++)
        ad->rope_freqs[i] = pow(ad->cfg.rope_theta, -2.0 * (double)i / (double)l->rope_dim);
    l->rope_freqs = ad->rope_freqs;
    return LORA_OK;
}

LORA_API int lora_adapter_set_rope_freqs(lora_adapter *ad, const double *inv_freq, size_t n)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    const layer *l = &ad->layer;
    if (l->rope == LORA_ROPE_NONE)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "the adapter has no RoPE (LORA_CFG_ROPE = LORA_ROPE_NONE)");
    if (!inv_freq)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "inv_freq is NULL");
    const size_t half = (size_t)(l->rope_dim / 2);
    if (n != half)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "n = %zu: the table needs LORA_CFG_ROPE_DIM/2 = %zu frequencies",
                              n, half);
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(inv_freq[i]))
            return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                                  "inv_freq[%zu] is not finite", i);
        if (inv_freq[i] < 0.0)
            return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                                  "inv_freq[%zu] = %g is negative", i, inv_freq[i]);
    }
    memcpy(ad->rope_freqs, inv_freq, n * sizeof(double));
    lora_adapter_params_changed(ad); /* a saved forward rotated by the old table */
    ad->err[0] = '\0';
    return LORA_OK;
}
