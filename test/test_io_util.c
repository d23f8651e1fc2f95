/* Helpers of the adapter-file suites (test_io_util.h). */
#include "test_io_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <check.h>

#include "fixtures.h"

char *path_in(const char *dir, const char *file)
{
    char *p = malloc(strlen(dir) + strlen(file) + 2);
    ck_assert_ptr_nonnull(p);
    sprintf(p, "%s/%s", dir, file);
    return p;
}

uint64_t le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

float lef(const unsigned char *p)
{
    const uint32_t u = le32(p);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static const char *skip_space(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
        p++;
    return p;
}

const char *json_value(const char *from, const char *key)
{
    char pat[256];
    snprintf(pat, sizeof pat, "\"%s\"", key);
    const char *p = strstr(from, pat);
    if (!p)
        return NULL;
    p = skip_space(p + strlen(pat));
    if (*p != ':')
        return NULL;
    return skip_space(p + 1);
}

int json_ints(const char *p, long long *v, int cap)
{
    ck_assert(p && *p == '[');
    p++;
    int n = 0;
    for (;;) {
        p = skip_space(p);
        if (*p == ']')
            return n;
        char *end;
        const long long x = strtoll(p, &end, 10);
        ck_assert(end != p && n < cap);
        v[n++] = x;
        p = skip_space(end);
        if (*p == ',')
            p++;
    }
}

/* ---- GGUF ---------------------------------------------------------------------------- */

static size_t gw_scalar(uint32_t type)
{
    switch (type) {
    case 0: case 1: case 7: return 1;
    case 2: case 3: return 2;
    case 4: case 5: case 6: return 4;
    case 10: case 11: case 12: return 8;
    default: return 0;
    }
}

void gw_read(const char *path, gw_file *g)
{
    memset(g, 0, sizeof *g);
    g->b = fx_read_file(path, &g->size);
    const unsigned char *b = g->b;
    ck_assert(g->size >= 24 && memcmp(b, "GGUF", 4) == 0 && le32(b + 4) == 3);
    g->nt = (size_t)le64(b + 8);
    g->nkv = (size_t)le64(b + 16);
    ck_assert(g->nt <= GW_MAX && g->nkv <= GW_MAX);
    size_t pos = 24;
    for (size_t i = 0; i < g->nkv; i++) {
        gw_kv *kv = &g->kv[i];
        kv->start = pos;
        ck_assert(pos + 8 <= g->size);
        const uint64_t kl = le64(b + pos);
        ck_assert(kl < sizeof kv->key && pos + 8 + kl + 4 <= g->size);
        memcpy(kv->key, b + pos + 8, kl);
        pos += 8 + kl;
        kv->type = le32(b + pos);
        pos += 4;
        if (kv->type == 8) {
            ck_assert(pos + 8 <= g->size);
            kv->len = (size_t)le64(b + pos);
            pos += 8;
        } else if (kv->type == 9) { /* an array of scalars: its element type and count */
            ck_assert(pos + 12 <= g->size);
            kv->elem_type = le32(b + pos);
            const size_t esz = gw_scalar(kv->elem_type);
            ck_assert_msg(esz > 0, "key %s: array of type %u", kv->key, kv->elem_type);
            kv->len = esz * (size_t)le64(b + pos + 4);
            pos += 12;
        } else {
            kv->len = gw_scalar(kv->type);
            ck_assert_msg(kv->len > 0, "key %s: type %u", kv->key, kv->type);
        }
        kv->at = pos;
        ck_assert(pos + kv->len <= g->size);
        pos += kv->len;
    }
    g->kv_end = pos;
    for (size_t i = 0; i < g->nt; i++) {
        gw_tensor *t = &g->t[i];
        ck_assert(pos + 8 <= g->size);
        const uint64_t nl = le64(b + pos);
        ck_assert(nl < sizeof t->name && pos + 8 + nl + 4 + 16 + 4 + 8 <= g->size);
        memcpy(t->name, b + pos + 8, nl);
        pos += 8 + nl;
        ck_assert_uint_eq(le32(b + pos), 2);
        t->ne0 = le64(b + pos + 4);
        t->ne1 = le64(b + pos + 12);
        t->type = le32(b + pos + 20);
        t->off = le64(b + pos + 24);
        pos += 32;
    }
    g->infos_end = pos;
    g->data_start = (pos + 31) / 32 * 32;
    ck_assert(g->data_start <= g->size);
}

void gw_free(gw_file *g)
{
    free(g->b);
    memset(g, 0, sizeof *g);
}

const gw_kv *gw_find(const gw_file *g, const char *key)
{
    for (size_t i = 0; i < g->nkv; i++)
        if (strcmp(g->kv[i].key, key) == 0)
            return &g->kv[i];
    return NULL;
}

void gw_string(const gw_file *g, const char *key, char *out, size_t n)
{
    const gw_kv *kv = gw_find(g, key);
    ck_assert_msg(kv && kv->type == 8, "no string key %s", key);
    const size_t len = kv->len < n - 1 ? kv->len : n - 1;
    memcpy(out, g->b + kv->at, len);
    out[len] = '\0';
}

void gw_write_without(const gw_file *g, const char *prefix, const char *path)
{
    unsigned char *out = calloc(1, g->size + 32);
    size_t n = 24, kept = 0;
    memcpy(out, g->b, 24);
    for (size_t i = 0; i < g->nkv; i++) {
        const gw_kv *kv = &g->kv[i];
        if (strncmp(kv->key, prefix, strlen(prefix)) == 0)
            continue;
        memcpy(out + n, g->b + kv->start, kv->at + kv->len - kv->start);
        n += kv->at + kv->len - kv->start;
        kept++;
    }
    for (int k = 0; k < 8; k++)
        out[16 + k] = (unsigned char)((uint64_t)kept >> (8 * k));
    memcpy(out + n, g->b + g->kv_end, g->infos_end - g->kv_end);
    n += g->infos_end - g->kv_end;
    n = (n + 31) / 32 * 32; /* calloc'd: zero padding */
    memcpy(out + n, g->b + g->data_start, g->size - g->data_start);
    n += g->size - g->data_start;
    fx_write_file(path, out, n);
    free(out);
}

float *gw_tensor_f32(const gw_file *g, const char *name, int64_t *rows, int64_t *cols)
{
    for (size_t i = 0; i < g->nt; i++) {
        const gw_tensor *t = &g->t[i];
        if (strcmp(t->name, name) != 0)
            continue;
        ck_assert_uint_eq(t->type, 0);
        *rows = (int64_t)t->ne1;
        *cols = (int64_t)t->ne0;
        const size_t n = (size_t)(t->ne0 * t->ne1);
        ck_assert(g->data_start + t->off + 4 * n <= g->size);
        float *v = malloc(n * sizeof(float) + 1);
        for (size_t k = 0; k < n; k++)
            v[k] = lef(g->b + g->data_start + t->off + 4 * k);
        return v;
    }
    ck_abort_msg("no tensor %s", name);
    return NULL;
}

/* ---- safetensors ----------------------------------------------------------------------- */

/* The file and its NUL-terminated JSON header. */
static unsigned char *st_open(const char *path, size_t *size, char **hdr)
{
    unsigned char *buf = fx_read_file(path, size);
    ck_assert(*size >= 8);
    const uint64_t hlen = le64(buf);
    ck_assert(hlen <= *size - 8);
    *hdr = malloc(hlen + 1);
    memcpy(*hdr, buf + 8, hlen);
    (*hdr)[hlen] = '\0';
    return buf;
}

float *st_tensor_f32(const char *path, const char *name, int64_t rows, int64_t cols)
{
    size_t size;
    char *hdr;
    unsigned char *buf = st_open(path, &size, &hdr);
    const char *entry = json_value(hdr, name);
    ck_assert_msg(entry && *entry == '{', "tensor %s not in %s", name, path);
    const char *dt = json_value(entry, "dtype");
    ck_assert(dt && strncmp(dt, "\"F32\"", 5) == 0);
    long long shape[4], off[4];
    ck_assert_int_eq(json_ints(json_value(entry, "shape"), shape, 4), 2);
    ck_assert(shape[0] == rows && shape[1] == cols);
    ck_assert_int_eq(json_ints(json_value(entry, "data_offsets"), off, 4), 2);
    const size_t data = 8 + le64(buf);
    ck_assert(off[1] - off[0] == rows * cols * 4 && data + (size_t)off[1] <= size);
    float *v = malloc((size_t)(rows * cols) * sizeof(float) + 1);
    for (int64_t k = 0; k < rows * cols; k++)
        v[k] = lef(buf + data + (size_t)off[0] + 4 * (size_t)k);
    free(hdr);
    free(buf);
    return v;
}

void st_metadata(const char *path, const char *key, char *out, size_t n)
{
    size_t size;
    char *hdr;
    unsigned char *buf = st_open(path, &size, &hdr);
    const char *md = json_value(hdr, "__metadata__");
    ck_assert(md && *md == '{');
    const char *v = json_value(md, key);
    out[0] = '\0';
    if (v) {
        ck_assert(*v == '"');
        const char *end = strchr(v + 1, '"');
        ck_assert(end);
        const size_t len = (size_t)(end - v - 1) < n - 1 ? (size_t)(end - v - 1) : n - 1;
        memcpy(out, v + 1, len);
        out[len] = '\0';
    }
    free(hdr);
    free(buf);
}

/* ---- writers ---------------------------------------------------------------------- */

void tw_put(tw_buf *t, const void *src, size_t n)
{
    if (t->n + n > t->cap) {
        t->cap = (t->n + n) * 2 + 256;
        t->b = realloc(t->b, t->cap);
        ck_assert_ptr_nonnull(t->b);
    }
    if (n)
        memcpy(t->b + t->n, src, n);
    t->n += n;
}

void tw_le(tw_buf *t, uint64_t v, int bytes)
{
    unsigned char c[8];
    for (int i = 0; i < bytes; i++)
        c[i] = (unsigned char)(v >> (8 * i));
    tw_put(t, c, (size_t)bytes);
}

void tw_u8(tw_buf *t, unsigned v) { tw_le(t, v, 1); }
void tw_u32(tw_buf *t, uint32_t v) { tw_le(t, v, 4); }
void tw_u64(tw_buf *t, uint64_t v) { tw_le(t, v, 8); }

void tw_zeros(tw_buf *t, size_t n)
{
    for (size_t i = 0; i < n; i++)
        tw_u8(t, 0);
}

void tw_align(tw_buf *t, size_t a)
{
    while (t->n % a)
        tw_u8(t, 0);
}

void tw_free(tw_buf *t)
{
    free(t->b);
    memset(t, 0, sizeof *t);
}

void tw_write(const tw_buf *t, const char *path)
{
    unlink(path); /* a save may have left it read-only or a link */
    fx_write_file(path, t->b, t->n);
}

void tw_gguf_header(tw_buf *t, uint32_t version, uint64_t n_tensors, uint64_t n_kv)
{
    t->n = 0;
    tw_put(t, "GGUF", 4);
    tw_u32(t, version);
    tw_u64(t, n_tensors);
    tw_u64(t, n_kv);
}

void tw_gguf_str(tw_buf *t, const char *s, size_t n)
{
    tw_u64(t, n);
    tw_put(t, s, n);
}

void tw_gguf_kv_str(tw_buf *t, const char *key, const char *value)
{
    tw_gguf_str(t, key, strlen(key));
    tw_u32(t, 8); /* string */
    tw_gguf_str(t, value, strlen(value));
}

void tw_gguf_kv_f32(tw_buf *t, const char *key, float value)
{
    uint32_t u;
    memcpy(&u, &value, 4);
    tw_gguf_str(t, key, strlen(key));
    tw_u32(t, 6); /* f32 */
    tw_u32(t, u);
}

void tw_gguf_info(tw_buf *t, const char *name, size_t name_len, uint64_t ne0, uint64_t ne1,
                  uint32_t type, uint64_t offset)
{
    tw_gguf_str(t, name, name_len);
    tw_u32(t, 2);
    tw_u64(t, ne0);
    tw_u64(t, ne1);
    tw_u32(t, type);
    tw_u64(t, offset);
}

void tw_st_header(tw_buf *t, const char *json, int pad8, int64_t len_override)
{
    const size_t len = strlen(json), padded = pad8 ? (len + 7) / 8 * 8 : len;
    tw_u64(t, len_override >= 0 ? (uint64_t)len_override : (uint64_t)padded);
    tw_put(t, json, len);
    for (size_t i = len; i < padded; i++)
        tw_u8(t, ' ');
}

void tw_write_peft(const char *dir, const char *config, const tw_buf *weights)
{
    if (config) {
        char *cpath = path_in(dir, "adapter_config.json");
        tw_write(&(tw_buf){(unsigned char *)(uintptr_t)config, strlen(config), 0}, cpath);
        free(cpath);
    }
    if (weights) {
        char *wpath = path_in(dir, "adapter_model.safetensors");
        tw_write(weights, wpath);
        free(wpath);
    }
}
