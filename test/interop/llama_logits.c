/* llama_logits: the logits llama.cpp computes for a token sequence, for the interop test
 * (test/interop/run.sh). Built against the llama.h of the llama.cpp source that
 * node-llama-cpp ships and linked with its prebuilt libllama.
 *
 *   llama_logits MODEL.gguf ADAPTER.gguf|- OUT.f32 TOKEN...
 *
 * Loads MODEL (CPU only), applies ADAPTER (a LoRA, scale 1) unless "-", decodes the
 * tokens as one sequence (positions 0, 1, ...) with flash attention off, an F32 KV cache
 * and one thread, and writes n_tokens x n_vocab float32 logits to OUT.f32. Exit status 0
 * on success; llama.cpp's own log goes to stderr only on failure. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "llama.h"

static char log_buf[1 << 16];
static size_t log_len;

/* Keeps llama.cpp's log, printed only when something fails. */
static void keep_log(enum ggml_log_level level, const char *text, void *user)
{
    (void)level;
    (void)user;
    const size_t n = strlen(text);
    if (log_len + n < sizeof log_buf) {
        memcpy(log_buf + log_len, text, n);
        log_len += n;
    }
}

static int fail(const char *what)
{
    fprintf(stderr, "llama_logits: %s\n--- llama.cpp log ---\n%.*s", what, (int)log_len,
            log_buf);
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL.gguf ADAPTER.gguf|- OUT.f32 TOKEN...\n", argv[0]);
        return 2;
    }
    llama_log_set(keep_log, NULL);
    const char *backends = getenv("LLAMA_BACKEND_DIR");
    if (backends)
        ggml_backend_load_all_from_path(backends);
    else
        ggml_backend_load_all();
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model)
        return fail("cannot load the model");
    const int n_tokens = argc - 4;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(n_tokens < 64 ? 64 : n_tokens);
    cp.n_batch = cp.n_ctx;
    cp.n_ubatch = cp.n_ctx;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx)
        return fail("cannot create a context");
    if (strcmp(argv[2], "-") != 0) {
        struct llama_adapter_lora *lora = llama_adapter_lora_init(model, argv[2]);
        if (!lora)
            return fail("llama_adapter_lora_init refused the adapter");
        float scale = 1.0f;
        if (llama_set_adapters_lora(ctx, &lora, 1, &scale) != 0)
            return fail("llama_set_adapters_lora failed");
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    struct llama_batch batch = llama_batch_init(n_tokens, 0, 1);
    for (int i = 0; i < n_tokens; i++) {
        batch.token[i] = (llama_token)atoi(argv[4 + i]);
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n_tokens;
    if (llama_decode(ctx, batch) != 0)
        return fail("llama_decode failed");
    FILE *out = fopen(argv[3], "wb");
    if (!out)
        return fail("cannot open the output file");
    for (int i = 0; i < n_tokens; i++) {
        const float *logits = llama_get_logits_ith(ctx, i);
        if (!logits || fwrite(logits, sizeof(float), (size_t)n_vocab, out) != (size_t)n_vocab)
            return fail("cannot read or write the logits");
    }
    if (fclose(out) != 0)
        return fail("cannot write the output file");
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
