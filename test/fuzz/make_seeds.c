/* Writes the seed corpora of the fuzz targets (make fuzz-seeds; the seeds are
 * committed): files lora_save_gguf and lora_save_peft write for a few adapter sets on
 * the fuzz targets' layer (d_model 8, 2 heads over 1 kv head, output projection), and
 * config byte strings in fuzz_config.c's format. Usage: make_seeds OUT_DIR */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <lora.h>

static void die(const char *what, int st)
{
    fprintf(stderr, "make_seeds: %s: %d\n", what, st);
    exit(1);
}

static lora_adapter *make(int rank, int targets, int rslora, int rope, uint64_t seed)
{
    lora_config *cfg = NULL;
    lora_adapter *ad = NULL;
    int st = lora_config_create(&cfg);
    const int64_t kv[][2] = {{LORA_CFG_D_MODEL, 8}, {LORA_CFG_N_HEADS, 2},
                             {LORA_CFG_N_KV_HEADS, 1}, {LORA_CFG_OUT_PROJ, 1},
                             {LORA_CFG_RANK, rank}, {LORA_CFG_TARGETS, targets},
                             {LORA_CFG_RSLORA, rslora}, {LORA_CFG_SEED, (int64_t)seed},
                             {LORA_CFG_INIT, LORA_INIT_GAUSSIAN}, {LORA_CFG_ROPE, rope}};
    for (size_t i = 0; st == LORA_OK && i < sizeof kv / sizeof kv[0]; i++)
        st = lora_config_set_int(cfg, (int)kv[i][0], kv[i][1]);
    if (st == LORA_OK)
        st = lora_adapter_create(&ad, cfg);
    if (st != LORA_OK)
        die("create", st);
    lora_config_destroy(cfg);
    /* A custom RoPE table, so the files record liblora.rope_freqs (head_dim 4: 2). */
    static const double freqs[2] = {0.5, 0.0078125};
    if (rope && (st = lora_adapter_set_rope_freqs(ad, freqs, 2)) != LORA_OK)
        die("set_rope_freqs", st);
    /* B = 0 after init: nonzero values make the seeds exercise conversions. */
    size_t n = 0;
    lora_adapter_param_count(ad, &n);
    float *p = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        p[i] = (float)((int)((i * 2654435761u + seed) % 200) - 100) / 128.0f;
    if ((st = lora_adapter_set_params_flat(ad, p, n)) != LORA_OK)
        die("set_params_flat", st);
    free(p);
    return ad;
}

static void copy_file(const char *from, const char *to)
{
    FILE *a = fopen(from, "rb"), *b = fopen(to, "wb");
    if (!a || !b)
        die(from, -1);
    char buf[4096];
    size_t k;
    while ((k = fread(buf, 1, sizeof buf, a)) > 0)
        fwrite(buf, 1, k, b);
    fclose(a);
    fclose(b);
}

static void write_bytes(const char *path, const unsigned char *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        die(path, -1);
    fwrite(p, 1, n, f);
    fclose(f);
}

int main(int argc, char **argv)
{
    if (argc != 2)
        die("usage: make_seeds OUT_DIR", 2);
    const char *out = argv[1];
    char path[512], from[512];
    static const char *sub[] = {"corpus_gguf", "corpus_safetensors", "corpus_peft_json",
                                "corpus_config", "tmp"};
    for (int i = 0; i < 5; i++) {
        snprintf(path, sizeof path, "%s/%s", out, sub[i]);
        mkdir(path, 0755);
    }
    /* Adapter sets: (rank, targets, rslora, layers, RoPE with a custom table). */
    static const int sets[][5] = {{2, 15, 0, 1, 0}, {1, 5, 0, 1, 0}, {4, 15, 1, 2, 0},
                                  {2, 3, 0, 2, 0},  {3, 8, 0, 1, 0}, {2, 3, 0, 2, 1}};
    for (size_t s = 0; s < sizeof sets / sizeof sets[0]; s++) {
        lora_adapter *ads[2] = {NULL, NULL};
        const int64_t layers[2] = {0, 3};
        for (int l = 0; l < sets[s][3]; l++)
            ads[l] = make(sets[s][0], sets[s][1], sets[s][2], sets[s][4], 17 * s + (uint64_t)l);
        int st;
        snprintf(path, sizeof path, "%s/corpus_gguf/seed%zu.gguf", out, s);
        if ((st = lora_save_gguf(path, ads, layers, (size_t)sets[s][3], NULL)) != LORA_OK)
            die("save_gguf", st);
        snprintf(path, sizeof path, "%s/tmp/peft%zu", out, s);
        if ((st = lora_save_peft(path, ads, layers, (size_t)sets[s][3])) != LORA_OK)
            die("save_peft", st);
        snprintf(from, sizeof from, "%s/tmp/peft%zu/adapter_model.safetensors", out, s);
        snprintf(path, sizeof path, "%s/corpus_safetensors/seed%zu.safetensors", out, s);
        copy_file(from, path);
        snprintf(from, sizeof from, "%s/tmp/peft%zu/adapter_config.json", out, s);
        snprintf(path, sizeof path, "%s/corpus_peft_json/seed%zu.json", out, s);
        copy_file(from, path);
        for (int l = 0; l < 2; l++)
            lora_adapter_destroy(ads[l]);
    }
    /* Config byte strings: ops count, then (op, param, value...) as fuzz_config.c reads
     * them; value bytes < 128 are small integers, then batch, len_q, len_kv. */
    static const unsigned char cfg0[] = {6, 0, 2, 8, 0, 3, 2, 0, 4, 1, 0, 6, 15, 0, 18, 1,
                                         0, 7, 2, 1, 2, 3, 4};
    static const unsigned char cfg1[] = {4, 0, 2, 16, 0, 3, 4, 0, 4, 2, 0, 12, 2, 2, 4, 5};
    static const unsigned char cfg2[] = {5, 0, 2, 8, 1, 8, 0, 0, 11, 1, 0, 14, 2, 2, 3, 1, 6, 3};
    static const unsigned char cfg3[] = {3, 0, 2, 12, 0, 4, 5, 0, 3, 3, 1, 5, 6};
    const unsigned char *cfgs[] = {cfg0, cfg1, cfg2, cfg3};
    const size_t lens[] = {sizeof cfg0, sizeof cfg1, sizeof cfg2, sizeof cfg3};
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/corpus_config/seed%d", out, i);
        write_bytes(path, cfgs[i], lens[i]);
    }
    return 0;
}
