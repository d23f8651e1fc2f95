/* libFuzzer target: config setters, validation and adapter creation from fuzz bytes
 * (any parameter number, any value, NaN/Inf doubles, overflowing sizes), then, when an
 * adapter exists and is small, bases, a tiny forward/backward, cross-attention, the
 * threshold estimate, a merged forward and an optimizer step with shapes from the
 * bytes. Every status must be a lora_status; nothing may crash, leak (the budgeted
 * allocator counts live blocks; LeakSanitizer watches the rest) or, with bounded
 * inputs, produce a non-finite output. Seeds: test/fuzz/corpus_config/. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static float unit(fz *r) { return (float)((int)fz_u8(r) - 128) / 128.0f; }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz r = {data, size};
    fz_mem m = {.budget = (size_t)64 << 20};
    const lora_allocator a = {fz_alloc, fz_free, &m};
    lora_config *cfg = NULL;
    if (lora_config_create_with_allocator(&cfg, &a) != LORA_OK)
        abort();
    /* THREADS 1 unless the bytes say otherwise: OpenMP teams are not what is fuzzed. */
    lora_config_set_int(cfg, LORA_CFG_THREADS, 1);
    const int ops = fz_u8(&r) % 24;
    for (int i = 0; i < ops; i++) {
        const uint8_t op = fz_u8(&r);
        const int param = (int)(fz_u8(&r) % 28) - 1; /* -1 .. 26: unknown ones included */
        int64_t iv;
        double dv;
        switch (op % 4) {
        case 0: fz_check_status(lora_config_set_int(cfg, param, fz_int(&r)), "set_int"); break;
        case 1:
            fz_check_status(lora_config_set_double(cfg, param, fz_double(&r)), "set_double");
            break;
        case 2: fz_check_status(lora_config_get_int(cfg, param, &iv), "get_int"); break;
        default: fz_check_status(lora_config_get_double(cfg, param, &dv), "get_double"); break;
        }
        if (lora_config_last_error(cfg) == NULL)
            abort();
    }
    const int vst = lora_config_validate(cfg);
    fz_check_status(vst, "validate");
    lora_adapter *ad = NULL;
    const int st = lora_adapter_create(&ad, cfg);
    fz_check_status(st, "adapter_create");
    /* create agrees with validate, NOMEM aside. */
    if (st != vst && st != LORA_ERR_NOMEM) {
        fprintf(stderr, "validate %d but create %d\n", vst, st);
        abort();
    }
    if ((st == LORA_OK) != (ad != NULL))
        abort();
    int64_t d = 0, qd = 0, hd = 0, nh = 0, kv = 0, op = 0, rank = 0;
    double alpha = 0.0, scale = 0.0;
    if (ad) {
        lora_adapter_get_config_int(ad, LORA_CFG_D_MODEL, &d);
        lora_adapter_get_config_int(ad, LORA_CFG_N_HEADS, &nh);
        lora_adapter_get_config_int(ad, LORA_CFG_N_KV_HEADS, &kv);
        lora_adapter_get_config_int(ad, LORA_CFG_HEAD_DIM, &hd);
        lora_adapter_get_config_int(ad, LORA_CFG_OUT_PROJ, &op);
        lora_adapter_get_config_int(ad, LORA_CFG_RANK, &rank);
        lora_adapter_get_config_double(ad, LORA_CFG_ALPHA, &alpha);
        lora_adapter_get_config_double(ad, LORA_CFG_SOFTMAX_SCALE, &scale);
        qd = nh * hd;
    }
    /* Compute only on small layers (fast executions). */
    if (ad && d <= 32 && qd <= 64 && rank <= 32) {
        const int64_t batch = 1 + fz_u8(&r) % 3, lq = 1 + fz_u8(&r) % 6, lkv = 1 + fz_u8(&r) % 6;
        const int64_t outw = op ? d : qd, kvd = kv * hd;
        const int tb[4] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V, LORA_TARGET_O};
        const int64_t outs[4] = {qd, kvd, kvd, d}, ins[4] = {d, d, d, qd};
        float *w = malloc(sizeof(float) * (size_t)(qd > d ? qd : d) * (size_t)(qd > d ? qd : d));
        float *bias = malloc(sizeof(float) * (size_t)(qd > d ? qd : d));
        float *xq = malloc(sizeof(float) * (size_t)(batch * lq * d));
        float *xkv = malloc(sizeof(float) * (size_t)(batch * lkv * d));
        float *out = malloc(sizeof(float) * (size_t)(batch * lq * outw));
        float *dx = malloc(sizeof(float) * (size_t)(batch * (lq > lkv ? lq : lkv) * d));
        float *dxkv = malloc(sizeof(float) * (size_t)(batch * lkv * d));
        if (!w || !bias || !xq || !xkv || !out || !dx || !dxkv)
            abort();
        for (int t = 0; t < (op ? 4 : 3); t++) {
            const int64_t nw = outs[t] * ins[t];
            for (int64_t i = 0; i < nw; i++)
                w[i] = unit(&r) / (float)(ins[t] > 0 ? ins[t] : 1);
            for (int64_t i = 0; i < outs[t]; i++)
                bias[i] = unit(&r);
            fz_check_status(lora_adapter_set_base(ad, tb[t], w, (fz_u8(&r) & 1) ? bias : NULL),
                            "set_base");
        }
        for (int64_t i = 0; i < batch * lq * d; i++)
            xq[i] = unit(&r);
        for (int64_t i = 0; i < batch * lkv * d; i++)
            xkv[i] = unit(&r);
        int fst = lora_forward(ad, xq, batch, lq, out);
        fz_check_status(fst, "forward");
        /* Bounded inputs and a moderate layer: outputs must be finite. */
        const int bounded = fabs(alpha) <= 64.0 * (double)rank && scale <= 64.0;
        if (fst == LORA_OK && bounded)
            for (int64_t i = 0; i < batch * lq * outw; i++)
                if (!isfinite(out[i])) {
                    fprintf(stderr, "forward out[%lld] = %g\n", (long long)i, out[i]);
                    abort();
                }
        if (fst == LORA_OK) {
            for (int64_t i = 0; i < batch * lq * outw; i++)
                out[i] = isfinite(out[i]) ? out[i] * 0.5f : 0.0f;
            fz_check_status(lora_backward(ad, out, (fz_u8(&r) & 1) ? dx : NULL), "backward");
        }
        lora_threshold_report rep = {.struct_size = sizeof rep};
        fz_check_status(lora_threshold_estimate(ad, xq, batch, lq, &rep), "estimate");
        fst = lora_forward_cross(ad, xq, xkv, batch, lq, lkv, out);
        fz_check_status(fst, "forward_cross");
        if (fst == LORA_OK) {
            for (int64_t i = 0; i < batch * lq * outw; i++)
                out[i] = isfinite(out[i]) ? out[i] : 0.0f;
            fz_check_status(lora_backward_cross(ad, out, dx, dxkv), "backward_cross");
        }
        fz_check_status(lora_forward_merged(ad, xq, batch, lq, out), "forward_merged");
        lora_optimizer *opt = NULL;
        const int ost = lora_optimizer_create(&opt, ad, fz_u8(&r) & 1);
        fz_check_status(ost, "optimizer_create");
        if (opt) {
            fz_check_status(lora_optimizer_set_double(opt, LORA_OPT_LR, fz_double(&r)), "set_lr");
            fz_check_status(lora_optimizer_step(opt, ad), "optimizer_step");
            lora_optimizer_destroy(opt);
        }
        lora_run_info info = {.struct_size = sizeof info};
        fz_check_status(lora_adapter_get_run_info(ad, &info), "run_info");
        free(w);
        free(bias);
        free(xq);
        free(xkv);
        free(out);
        free(dx);
        free(dxkv);
    }
    lora_adapter_destroy(ad);
    lora_config_destroy(cfg);
    if (m.live != 0) {
        fprintf(stderr, "%ld blocks still allocated\n", m.live);
        abort();
    }
    return 0;
}
