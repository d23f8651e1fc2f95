/* Losses beyond the paper's: torch.nn.MSELoss's mean reduction, so that learning rates
 * tuned in PyTorch carry over. */
#include <stddef.h>

#include "internal.h"

LORA_API int lora_mse_loss_mean(const float *out, const float *target, size_t n,
                                double *loss, float *dout)
{
    if (!loss)
        return LORA_ERR_INVALID_ARG;
    double half_sum = 0.0; /* lora_mse_loss validates the other arguments first */
    const int st = lora_mse_loss(out, target, n, &half_sum, dout);
    if (st != LORA_OK)
        return st;
    /* torch's backward: (float)(2/n) * (out - target), the same float operations. */
    const float grad_scale = (float)(2.0 / (double)n);
    if (dout)
        for (size_t i = 0; i < n; i++)
            dout[i] *= grad_scale;
    *loss = 2.0 * half_sum / (double)n;
    return LORA_OK;
}
