/* minimal.c: one LoRA training step through liblora.
 *
 * Builds a one-layer attention adapter (d_model 8, 2 heads, LoRA rank 2 on Q and V),
 * runs forward, the MSE loss, backward, and reads one gradient back.
 * Build: make examples && lib/examples/minimal
 */
#include <stdio.h>
#include <stdlib.h>

#include <lora.h>

#define D_MODEL 8
#define N_HEADS 2
#define RANK 2
#define BATCH 1
#define SEQ_LEN 4

/* Prints the failing call and the library's detail, and jumps to cleanup. */
#define CHECK(call)                                                                     \
    do {                                                                                \
        int st_ = (call);                                                               \
        if (st_ != LORA_OK) {                                                           \
            fprintf(stderr, "%s failed: %s (%s)\n", #call, lora_status_string(st_),      \
                    ad ? lora_adapter_last_error(ad) : lora_config_last_error(cfg));     \
            goto done;                                                                  \
        }                                                                               \
    } while (0)

int main(void)
{
    int rc = EXIT_FAILURE;
    lora_config *cfg = NULL;
    lora_adapter *ad = NULL;
    float wq[D_MODEL * D_MODEL], wk[D_MODEL * D_MODEL], wv[D_MODEL * D_MODEL];
    float x[BATCH * SEQ_LEN * D_MODEL], target[BATCH * SEQ_LEN * D_MODEL];
    float out[BATCH * SEQ_LEN * D_MODEL], dout[BATCH * SEQ_LEN * D_MODEL];
    float grad_b[D_MODEL * RANK]; /* B of Q is (out, rank) = (8, 2) */
    const size_t n = sizeof out / sizeof out[0];

    /* Deterministic small inputs; any finite values do. */
    for (int i = 0; i < D_MODEL * D_MODEL; i++) {
        wq[i] = 0.1f * (float)((i * 7) % 11 - 5);
        wk[i] = 0.1f * (float)((i * 5) % 13 - 6);
        wv[i] = 0.1f * (float)((i * 3) % 7 - 3);
    }
    for (size_t i = 0; i < n; i++) {
        x[i] = 0.05f * (float)((int)(i * 13 % 17) - 8);
        target[i] = 0.02f * (float)((int)(i % 9) - 4);
    }

    /* 1. Configuration: only D_MODEL is required; targets default to Q|V. */
    CHECK(lora_config_create(&cfg));
    CHECK(lora_config_set_int(cfg, LORA_CFG_D_MODEL, D_MODEL));
    CHECK(lora_config_set_int(cfg, LORA_CFG_N_HEADS, N_HEADS));
    CHECK(lora_config_set_int(cfg, LORA_CFG_RANK, RANK));
    CHECK(lora_config_set_int(cfg, LORA_CFG_THREADS, 1));

    /* 2. Adapter. create only reads cfg; lora_config_validate says why it refuses. */
    if (lora_adapter_create(&ad, cfg) != LORA_OK) {
        int st = lora_config_validate(cfg);
        fprintf(stderr, "lora_adapter_create failed: %s (%s)\n", lora_status_string(st),
                lora_config_last_error(cfg));
        goto done;
    }

    /* 3. Frozen base weights, (out, in) as torch.nn.Linear; no biases. */
    CHECK(lora_adapter_set_base(ad, LORA_TARGET_Q, wq, NULL));
    CHECK(lora_adapter_set_base(ad, LORA_TARGET_K, wk, NULL));
    CHECK(lora_adapter_set_base(ad, LORA_TARGET_V, wv, NULL));

    /* 4. Forward, loss, backward. out is (batch, seq_len, n_heads*head_dim). */
    double loss = 0.0;
    CHECK(lora_forward(ad, x, BATCH, SEQ_LEN, out));
    CHECK(lora_mse_loss(out, target, n, &loss, dout));
    CHECK(lora_backward(ad, dout, NULL)); /* NULL: dL/dx not wanted */

    /* 5. Gradients. B starts at zero, so dL/dA is zero on the first step and dL/dB
     * carries the signal. */
    int64_t rows = 0, cols = 0;
    CHECK(lora_adapter_param_shape(ad, LORA_TARGET_Q, LORA_B, &rows, &cols));
    CHECK(lora_adapter_get_grad(ad, LORA_TARGET_Q, LORA_B, grad_b,
                                sizeof grad_b / sizeof grad_b[0]));

    printf("liblora %s: loss %.6f\n", lora_version_string(), loss);
    printf("dL/dB for Q (%lld x %lld), first row: % .6f % .6f\n", (long long)rows,
           (long long)cols, grad_b[0], grad_b[1]);
    rc = EXIT_SUCCESS;

done:
    lora_adapter_destroy(ad);
    lora_config_destroy(cfg);
    return rc;
}
