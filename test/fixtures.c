/* Fixtures for the optimizer, merge, serving and I/O suites (see fixtures.h). */
#include "fixtures.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <check.h>

#include "helpers.h"

const int fx_tbits[4] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V, LORA_TARGET_O};

fx_spec fx_default(void)
{
    return (fx_spec){.d_model = 16, .n_heads = 4, .n_kv_heads = 2, .rank = 4,
                     .targets = 15, .out_proj = 1, .bias = 1, .alpha = 8.0};
}

lora_config *fx_config(const fx_spec *s)
{
    lora_config *cfg = cfg_new(s->d_model);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, s->n_heads), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, s->n_kv_heads), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RANK, s->rank), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_TARGETS, s->targets), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_OUT_PROJ, s->out_proj), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RSLORA, s->rslora), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_INIT, s->init), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_BACKEND, LORA_BACKEND_EXACT), LORA_OK);
    if (s->alpha != 0.0)
        ck_assert_int_eq(lora_config_set_double(cfg, LORA_CFG_ALPHA, s->alpha), LORA_OK);
    return cfg;
}

void fx_randomize_factors(lora_adapter *ad, uint64_t seed, float b_gain)
{
    for (int t = 0; t < 4; t++) {
        int64_t r, c;
        for (int w = 0; w < 2; w++) {
            if (lora_adapter_param_shape(ad, fx_tbits[t], w, &r, &c) != LORA_OK)
                continue;
            const size_t n = (size_t)(r * c);
            float *x = malloc(n * sizeof(float));
            ck_assert_ptr_nonnull(x);
            fill_uniform(x, n, seed * 131u + (uint64_t)(2 * t + w),
                         w == LORA_A ? 1.0f / sqrtf((float)c) : b_gain);
            ck_assert_int_eq(lora_adapter_set_param(ad, fx_tbits[t], w, x, n), LORA_OK);
            free(x);
        }
    }
}

lora_adapter *fx_adapter_nobase(const fx_spec *s, uint64_t seed)
{
    lora_config *cfg = fx_config(s);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    lora_config_destroy(cfg);
    if (!s->keep_init)
        fx_randomize_factors(ad, seed, 0.5f);
    return ad;
}

void fx_base_make(fx_base *b, const fx_spec *s, uint64_t seed)
{
    memset(b, 0, sizeof *b);
    const int head_dim = s->d_model / s->n_heads;
    const int q = s->n_heads * head_dim, kv = s->n_kv_heads * head_dim;
    const int outs[4] = {q, kv, kv, s->d_model}, ins[4] = {s->d_model, s->d_model, s->d_model, q};
    for (int t = 0; t < (s->out_proj ? 4 : 3); t++) {
        b->nw[t] = (size_t)outs[t] * (size_t)ins[t];
        b->w[t] = malloc(b->nw[t] * sizeof(float));
        ck_assert_ptr_nonnull(b->w[t]);
        fill_uniform(b->w[t], b->nw[t], seed * 7u + (uint64_t)t, 1.0f / sqrtf((float)ins[t]));
        if (s->bias) {
            b->nb[t] = (size_t)outs[t];
            b->bias[t] = malloc(b->nb[t] * sizeof(float));
            ck_assert_ptr_nonnull(b->bias[t]);
            fill_uniform(b->bias[t], b->nb[t], seed * 7u + 100u + (uint64_t)t, 0.5f);
        }
    }
}

void fx_base_free(fx_base *b)
{
    for (int t = 0; t < 4; t++) {
        free(b->w[t]);
        free(b->bias[t]);
    }
    memset(b, 0, sizeof *b);
}

void fx_base_apply(const fx_base *b, lora_adapter *ad, int copy)
{
    for (int t = 0; t < 4; t++) {
        if (!b->w[t])
            continue;
        const int st = copy ? lora_adapter_set_base(ad, fx_tbits[t], b->w[t], b->bias[t])
                            : lora_adapter_set_base_borrowed(ad, fx_tbits[t], b->w[t],
                                                             b->bias[t]);
        ck_assert_msg(st == LORA_OK, "set_base%s: %s", copy ? "" : "_borrowed",
                      lora_adapter_last_error(ad));
    }
}

lora_adapter *fx_adapter(const fx_spec *s, uint64_t seed)
{
    lora_adapter *ad = fx_adapter_nobase(s, seed);
    fx_base b;
    fx_base_make(&b, s, seed);
    fx_base_apply(&b, ad, 1);
    fx_base_free(&b);
    return ad;
}

int fx_out_cols(const fx_spec *s)
{
    return s->out_proj ? s->d_model : s->n_heads * (s->d_model / s->n_heads);
}

float *fx_params(const lora_adapter *ad, size_t *n)
{
    ck_assert_int_eq(lora_adapter_param_count(ad, n), LORA_OK);
    float *p = malloc((*n ? *n : 1) * sizeof(float));
    ck_assert_ptr_nonnull(p);
    ck_assert_int_eq(lora_adapter_get_params_flat(ad, p, *n), LORA_OK);
    return p;
}

void fx_write_file(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "cannot write %s", path);
    ck_assert_uint_eq(fwrite(data, 1, n, f), n);
    ck_assert_int_eq(fclose(f), 0);
}

unsigned char *fx_read_file(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot read %s", path);
    ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
    const long len = ftell(f);
    ck_assert(len >= 0);
    rewind(f);
    unsigned char *buf = malloc((size_t)len + 1);
    ck_assert_ptr_nonnull(buf);
    ck_assert_uint_eq(fread(buf, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    buf[len] = 0;
    *n = (size_t)len;
    return buf;
}

char *fx_tmpdir(void)
{
    /* TMPDIR, else /dev/shm (saves fsync their files: on tmpfs that costs nothing), else
     * /tmp. */
    const char *base = getenv("TMPDIR");
    if (!base || !base[0])
        base = access("/dev/shm", W_OK | X_OK) == 0 ? "/dev/shm" : "/tmp";
    char tmpl[512];
    snprintf(tmpl, sizeof tmpl, "%s/lora_test_XXXXXX", base);
    char *d = mkdtemp(tmpl);
    ck_assert_msg(d != NULL, "mkdtemp failed");
    char *out = malloc(strlen(d) + 1);
    ck_assert_ptr_nonnull(out);
    strcpy(out, d);
    return out;
}

void fx_rmtree(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    char path[1024];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (unlink(path) != 0)
            fx_rmtree(path); /* a subdirectory */
    }
    closedir(d);
    rmdir(dir);
}
