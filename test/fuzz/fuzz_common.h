/* Shared by the libFuzzer targets in test/fuzz/ (make fuzz; docs/reliability.md). */
#ifndef LORA_FUZZ_COMMON_H
#define LORA_FUZZ_COMMON_H

#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lora.h>

/* A byte reader: every read succeeds (zeros once the input is used up). */
typedef struct fz {
    const uint8_t *p;
    size_t n;
} fz;

static inline uint8_t fz_u8(fz *r)
{
    if (!r->n)
        return 0;
    r->n--;
    return *r->p++;
}

static inline uint64_t fz_u64(fz *r)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)fz_u8(r) << (8 * i);
    return v;
}

/* Integers that matter: small ones, edges of every range, or raw 64 bits. */
static inline int64_t fz_int(fz *r)
{
    static const int64_t edges[] = {0, 1, -1, 2, 3, 4, 8, 16, 1000, INT64_C(1) << 24,
                                    (INT64_C(1) << 24) + 1, INT64_C(1) << 31,
                                    INT64_C(1) << 40, INT64_MAX, INT64_MIN, INT32_MAX};
    const uint8_t k = fz_u8(r);
    if (k < 128)
        return k % 33;
    if (k < 224)
        return edges[k % (sizeof edges / sizeof edges[0])];
    return (int64_t)fz_u64(r);
}

static inline double fz_double(fz *r)
{
    static const double edges[] = {0.0, -0.0, 1.0, -1.0, 0.5, 1e-3, 1e-300, 1e300, 2.0, 8.0,
                                   NAN, INFINITY, -INFINITY, 4.9e-324, 1e4, 1e-8};
    const uint8_t k = fz_u8(r);
    if (k < 160)
        return edges[k % (sizeof edges / sizeof edges[0])];
    uint64_t bits = fz_u64(r);
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

/* An allocator with a budget: a request past it fails (LORA_ERR_NOMEM paths), so a
 * fuzzed config cannot exhaust the machine. Counts live blocks (no leak allowed). */
typedef struct fz_mem {
    size_t budget, used;
    long live;
} fz_mem;

static void *fz_alloc(void *user, size_t size)
{
    fz_mem *m = user;
    if (size > m->budget - m->used)
        return NULL;
    size_t *p = malloc(size + 16);
    if (!p)
        return NULL;
    p[0] = size;
    m->used += size;
    m->live++;
    return (unsigned char *)p + 16;
}

static void fz_free(void *user, void *ptr)
{
    fz_mem *m = user;
    size_t *p = (size_t *)((unsigned char *)ptr - 16);
    m->used -= p[0];
    m->live--;
    free(p);
}

/* Statuses the library may return. */
static inline void fz_check_status(int st, const char *what)
{
    if (st < LORA_OK || st > LORA_ERR_TOLERANCE) {
        fprintf(stderr, "%s returned %d, not a lora_status\n", what, st);
        abort();
    }
}

static char fz_dir[64];

static void fz_remove_tree(const char *path)
{
    DIR *d = opendir(path);
    if (!d) {
        unlink(path);
        return;
    }
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        char sub[512];
        snprintf(sub, sizeof sub, "%s/%s", path, de->d_name);
        fz_remove_tree(sub);
    }
    closedir(d);
    rmdir(path);
}

static void fz_cleanup(void) { fz_remove_tree(fz_dir); }

/* A private directory for the loaders' files (tmpfs when there is one), removed at
 * exit. */
static inline const char *fz_tmpdir(void)
{
    if (!fz_dir[0]) {
        snprintf(fz_dir, sizeof fz_dir, "%s/lora_fuzz_XXXXXX",
                 access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
        if (!mkdtemp(fz_dir))
            abort();
        atexit(fz_cleanup);
    }
    return fz_dir;
}

static inline void fz_write(const char *path, const uint8_t *data, size_t size)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        abort();
    if (size && fwrite(data, 1, size, f) != size)
        abort();
    fclose(f);
}

/* The layer every loader target loads into: d_model 8, 2 heads over 1 kv head (head_dim
 * 4), output projection; the file supplies rank, alpha and targets. */
static inline lora_config *fz_layer_config(fz_mem *m)
{
    const lora_allocator a = {fz_alloc, fz_free, m};
    lora_config *cfg = NULL;
    if (lora_config_create_with_allocator(&cfg, &a) != LORA_OK)
        return NULL;
    lora_config_set_int(cfg, LORA_CFG_D_MODEL, 8);
    lora_config_set_int(cfg, LORA_CFG_N_HEADS, 2);
    lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, 1);
    lora_config_set_int(cfg, LORA_CFG_OUT_PROJ, 1);
    lora_config_set_int(cfg, LORA_CFG_THREADS, 1);
    return cfg;
}

/* What a loaded adapter must satisfy: finite factors, and a forward/backward that runs
 * once its bases are set. */
static inline void fz_exercise_loaded(lora_adapter *ad)
{
    size_t n = 0;
    if (lora_adapter_param_count(ad, &n) != LORA_OK)
        abort();
    float *p = malloc((n ? n : 1) * sizeof(float));
    if (!p || lora_adapter_get_params_flat(ad, p, n) != LORA_OK)
        abort();
    for (size_t i = 0; i < n; i++)
        if (!isfinite(p[i])) {
            fprintf(stderr, "loaded factor %zu is %g\n", i, p[i]);
            abort();
        }
    free(p);
    static const int tb[4] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V, LORA_TARGET_O};
    static float w[64], x[2 * 3 * 8], out[2 * 3 * 8];
    for (int i = 0; i < 64; i++)
        w[i] = (float)((i * 37 % 17) - 8) / 16.0f;
    for (int i = 0; i < 48; i++)
        x[i] = (float)((i * 13 % 11) - 5) / 8.0f;
    for (int t = 0; t < 4; t++)
        fz_check_status(lora_adapter_set_base(ad, tb[t], w, NULL), "set_base");
    const int st = lora_forward(ad, x, 2, 3, out);
    fz_check_status(st, "forward");
    if (st == LORA_OK)
        fz_check_status(lora_backward(ad, out, NULL), "backward");
}

/* Loads with capacity 4; every adapter created is exercised and destroyed. Returns the
 * status. No adapter may be left on failure, and nothing may stay allocated. */
static inline int fz_load(int gguf, const char *path)
{
    fz_mem m = {.budget = (size_t)64 << 20};
    lora_config *cfg = fz_layer_config(&m);
    if (!cfg)
        abort();
    lora_adapter *ads[4] = {NULL, NULL, NULL, NULL};
    int64_t layers[4];
    size_t count = 0;
    const int st = gguf ? lora_load_gguf(ads, layers, 4, &count, path, cfg)
                        : lora_load_peft(ads, layers, 4, &count, path, cfg);
    fz_check_status(st, "load");
    for (int i = 0; i < 4; i++) {
        if (st != LORA_OK && ads[i]) {
            fprintf(stderr, "failed load (%d) left adapter %d\n", st, i);
            abort();
        }
        if (ads[i] && (size_t)i < count) {
            fz_exercise_loaded(ads[i]);
        }
        lora_adapter_destroy(ads[i]);
    }
    if (st != LORA_OK && lora_config_last_error(cfg)[0] == '\0') {
        fprintf(stderr, "failed load (%d) without a message\n", st);
        abort();
    }
    lora_config_destroy(cfg);
    if (m.live != 0) {
        fprintf(stderr, "%ld blocks still allocated after load\n", m.live);
        abort();
    }
    return st;
}

#endif
