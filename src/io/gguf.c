/* llama.cpp GGUF LoRA adapters (docs/format-gguf.md). GGUF v3, little-endian:
 *   "GGUF" u32 version u64 n_tensors u64 n_kv
 *   n_kv x (string key, u32 type, value)        string = u64 length + bytes
 *   n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
 *   zero padding to `general.alignment` (default 32), then the tensor data; offsets are
 *   relative to the data start and multiples of the alignment.
 * ggml lists dimensions fastest-varying first: a row-major (rows, cols) matrix has
 * ne = [cols, rows]. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"

#define GGUF_MAGIC "GGUF"
#define GGUF_VERSION 3
#define GGUF_ALIGNMENT 32 /* written, and the default when general.alignment is absent */
#define GGUF_MAX_DIMS 4
#define GGUF_MAX_NAME 63 /* GGML_MAX_NAME 64 with the terminating NUL */
#define GGUF_MAX_KEY 65535
#define GGUF_MAX_DEPTH 8 /* nested arrays */
#define GGUF_WINDOW ((size_t)1 << 17) /* bytes of the header read at a time */

enum gguf_type {
    GGUF_UINT8 = 0, GGUF_INT8 = 1, GGUF_UINT16 = 2, GGUF_INT16 = 3, GGUF_UINT32 = 4,
    GGUF_INT32 = 5, GGUF_FLOAT32 = 6, GGUF_BOOL = 7, GGUF_STRING = 8, GGUF_ARRAY = 9,
    GGUF_UINT64 = 10, GGUF_INT64 = 11, GGUF_FLOAT64 = 12, GGUF_TYPE_COUNT = 13
};
enum { GGML_F32 = 0, GGML_F16 = 1, GGML_BF16 = 30, GGML_TYPE_LIMIT = 64 };

static const char *const tensor_names[IO_TARGETS] = {"attn_q", "attn_k", "attn_v",
                                                     "attn_output"};

/* ---- save ------------------------------------------------------------------------- */

static int put_string(const io_alloc *a, io_bytes *b, const char *s)
{
    const size_t n = strlen(s);
    return io_bytes_u64(a, b, n) || io_bytes_append(a, b, s, n) ? LORA_ERR_NOMEM : LORA_OK;
}

/* The key-values, counted as they are appended; fail latches an allocation failure. */
typedef struct kv_list {
    io_bytes b;
    uint64_t n;
    int fail;
} kv_list;

static void kv_key(const io_alloc *a, kv_list *k, const char *key, uint32_t type)
{
    k->fail = k->fail || put_string(a, &k->b, key) || io_bytes_u32(a, &k->b, type);
    k->n++;
}

static void kv_string(const io_alloc *a, kv_list *k, const char *key, const char *v)
{
    kv_key(a, k, key, GGUF_STRING);
    k->fail = k->fail || put_string(a, &k->b, v);
}

static void kv_u32(const io_alloc *a, kv_list *k, const char *key, uint32_t v)
{
    kv_key(a, k, key, GGUF_UINT32);
    k->fail = k->fail || io_bytes_u32(a, &k->b, v);
}

static void kv_f32(const io_alloc *a, kv_list *k, const char *key, float v)
{
    uint32_t bits;
    memcpy(&bits, &v, 4);
    kv_key(a, k, key, GGUF_FLOAT32);
    k->fail = k->fail || io_bytes_u32(a, &k->b, bits);
}

static void kv_f64(const io_alloc *a, kv_list *k, const char *key, double v)
{
    uint64_t bits;
    memcpy(&bits, &v, 8);
    kv_key(a, k, key, GGUF_FLOAT64);
    k->fail = k->fail || io_bytes_u64(a, &k->b, bits);
}

/* An array of float64 (GGUF_ARRAY of GGUF_FLOAT64). */
static void kv_f64_array(const io_alloc *a, kv_list *k, const char *key, const double *v,
                         size_t n)
{
    kv_key(a, k, key, GGUF_ARRAY);
    k->fail = k->fail || io_bytes_u32(a, &k->b, GGUF_FLOAT64) || io_bytes_u64(a, &k->b, n);
    for (size_t i = 0; i < n && !k->fail; i++) {
        uint64_t bits;
        memcpy(&bits, &v[i], 8);
        k->fail = io_bytes_u64(a, &k->b, bits);
    }
}

static void kv_bool(const io_alloc *a, kv_list *k, const char *key, int v)
{
    const unsigned char byte = v ? 1 : 0;
    kv_key(a, k, key, GGUF_BOOL);
    k->fail = k->fail || io_bytes_append(a, &k->b, &byte, 1);
}

static int valid_arch(const char *s)
{
    const size_t n = strlen(s);
    if (n == 0 || n > 64)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '_' ||
              s[i] == '-'))
            return 0;
    return 1;
}

/* llama.cpp's architectures that rotate attn_q/attn_k with its NORM RoPE (pairs of
 * adjacent dims; llama_model_rope_type), so their GGUF holds Q/K rows in the
 * interleaved order: convert_hf_to_gguf.py permutes rotate_half checkpoints into it
 * (LlamaModel.permute and its copies). Every other architecture keeps Hugging Face's
 * order (NEOX RoPE, or none). docs/format-gguf.md lists the converters. */
static const char *const norm_rope_archs[] = {
    "llama", "llama4", "llada", "deci", "baichuan", "internlm2", "minicpm", "xverse",
    "command-r", "cohere2", "cohere2moe", "olmo", "arctic", "deepseek", "deepseek2",
    "deepseek2-ocr", "deepseek32", "deepseek4", "muse-glimmer", "plm", "chatglm",
    "granite", "granitemoe", "granitehybrid", "graniteswitch", "granite_swa", "chameleon",
    "bailingmoe", "bailingmoe3", "neo-bert", "smollm3", "arcee", "ernie4_5",
    "ernie4_5-moe", "mistral3", "eagle3", "mistral4", "llama-embed", "maincoder", "glm-dsa",
    "dots3note", "nanbeige", "pockettts", "glm4"};

static int qk_rows_of(const char *arch, size_t len)
{
    for (size_t i = 0; i < sizeof norm_rope_archs / sizeof norm_rope_archs[0]; i++)
        if (strlen(norm_rope_archs[i]) == len && memcmp(arch, norm_rope_archs[i], len) == 0)
            return LORA_ROPE_INTERLEAVED;
    return LORA_ROPE_HALF;
}

int io_gguf_qk_rows(const char *arch)
{
    const char *a = arch ? arch : "llama";
    return qk_rows_of(a, strlen(a));
}

static size_t align_up(size_t n) { return (n + GGUF_ALIGNMENT - 1) & ~(size_t)(GGUF_ALIGNMENT - 1); }

/* "org/name": a Hugging Face model id (no path: one '/', no leading '.', no "..").
 * Checked on a string already known to be UTF-8 without control characters. */
static int is_hf_id(const char *s)
{
    const char *slash = strchr(s, '/');
    if (!slash || strchr(slash + 1, '/') || slash == s || !slash[1] || s[0] == '.' ||
        slash[1] == '.' || strstr(s, ".."))
        return 0;
    for (const char *p = s; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '/' || *p == '-' || *p == '_' || *p == '.'))
            return 0;
    return 1;
}

/* general.base_model.* as gguf-py's metadata writer names them (one base model). */
static void put_base_model(const io_alloc *a, kv_list *k, const char *base)
{
    kv_u32(a, k, "general.base_model.count", 1);
    kv_string(a, k, "general.base_model.0.name", base);
    if (strncmp(base, "https://", 8) == 0 || strncmp(base, "http://", 7) == 0) {
        kv_string(a, k, "general.base_model.0.repo_url", base);
    } else if (is_hf_id(base)) {
        static const char hub[] = "https://huggingface.co/";
        const size_t n = sizeof hub + strlen(base);
        char *url = io_malloc(a, n);
        if (!url) {
            k->fail = 1;
            return;
        }
        snprintf(url, n, "%s%s", hub, base);
        kv_string(a, k, "general.base_model.0.repo_url", url);
        io_free(a, url);
    }
}

/* liblora.*: the geometry and the Q/K row order. */
static void put_geometry(const io_alloc *a, kv_list *k, const io_meta *meta)
{
    for (int i = 0; i < IO_GEOM_COUNT; i++) {
        if (!((meta->geom.present >> i) & 1))
            continue;
        const double v = meta->geom.value[i];
        switch (io_geom_kind_of(i)) {
        case IO_GEOM_INT: kv_u32(a, k, io_geom_key(i), (uint32_t)v); break;
        case IO_GEOM_FLAG: kv_bool(a, k, io_geom_key(i), v != 0.0); break;
        case IO_GEOM_ROPE: kv_string(a, k, io_geom_key(i), io_rope_name((int)v)); break;
        case IO_GEOM_REAL: kv_f64(a, k, io_geom_key(i), v); break;
        }
    }
    kv_string(a, k, "liblora.qk_rows", io_rope_name(meta->qk_rows));
    if (meta->rope_freqs)
        kv_f64_array(a, k, IO_ROPE_FREQS_KEY, meta->rope_freqs, meta->n_rope_freqs);
}

/* The header: magic, version, counts, then the key-values. */
static int put_header(const io_alloc *a, io_bytes *b, size_t n_tensors, const char *arch,
                      float alpha, const io_meta *meta)
{
    kv_list k = {{0}, 0, 0};
    kv_string(a, &k, "general.architecture", arch);
    kv_string(a, &k, "general.type", "adapter");
    kv_string(a, &k, "adapter.type", "lora");
    kv_f32(a, &k, "adapter.lora.alpha", alpha);
    if (meta->base_model)
        put_base_model(a, &k, meta->base_model);
    put_geometry(a, &k, meta);
    const int fail = k.fail || io_bytes_append(a, b, GGUF_MAGIC, 4) ||
                     io_bytes_u32(a, b, GGUF_VERSION) || io_bytes_u64(a, b, n_tensors) ||
                     io_bytes_u64(a, b, k.n) || io_bytes_append(a, b, k.b.p, k.b.n);
    io_bytes_free(a, &k.b);
    return fail ? LORA_ERR_NOMEM : LORA_OK;
}

/* One tensor: its info into b, its data (aligned) into data. */
static int put_tensor(const io_alloc *a, io_bytes *b, io_bytes *data, const io_record *r)
{
    char name[GGUF_MAX_NAME + 1];
    snprintf(name, sizeof name, "blk.%lld.%s.weight.lora_%c", (long long)r->layer,
             tensor_names[r->target], r->which == LORA_B ? 'b' : 'a');
    const size_t offset = align_up(data->n);
    return put_string(a, b, name) || io_bytes_u32(a, b, 2) ||
                   io_bytes_u64(a, b, (uint64_t)r->cols) ||
                   io_bytes_u64(a, b, (uint64_t)r->rows) || io_bytes_u32(a, b, GGML_F32) ||
                   io_bytes_u64(a, b, offset) || io_bytes_zeros(a, data, offset - data->n) ||
                   io_bytes_f32(a, data, r->values, (size_t)(r->rows * r->cols))
               ? LORA_ERR_NOMEM
               : LORA_OK;
}

int io_gguf_write(const io_alloc *a, const char *path, const io_meta *meta,
                  const char *architecture, const io_record *r, size_t n, char *err)
{
    const char *arch = architecture ? architecture : "llama";
    if (!valid_arch(arch))
        return io_error(err, LORA_ERR_INVALID_ARG,
                        "architecture '%.64s' is not a lowercase name ([a-z0-9_-]+)", arch);
    /* GGUF has no rsLoRA flag: alpha·√r gives llama.cpp's alpha/r the same scale. */
    const double alpha = meta->rslora ? meta->alpha * sqrt((double)meta->rank) : meta->alpha;
    const float alpha32 = (float)alpha;
    if (alpha32 == 0.0f || !isfinite(alpha32))
        return io_error(err, LORA_ERR_UNSUPPORTED,
                        "alpha %g cannot be stored: llama.cpp reads adapter.lora.alpha = 0 "
                        "as scale 1, and it is an F32",
                        alpha);
    io_bytes b = {0}, data = {0};
    int fail = put_header(a, &b, n, arch, alpha32, meta);
    for (size_t i = 0; i < n && !fail; i++)
        fail = put_tensor(a, &b, &data, &r[i]);
    /* Data start: the infos' end, aligned; the data padded to the alignment too (ggml's
     * gguf_init_from_file with no_alloc = false reads whole aligned blocks). */
    if (!fail)
        fail = io_bytes_zeros(a, &data, align_up(data.n) - data.n) ||
               io_bytes_zeros(a, &b, align_up(b.n) - b.n) ||
               io_bytes_append(a, &b, data.p, data.n);
    io_bytes_free(a, &data);
    int st = fail ? io_error(err, LORA_ERR_NOMEM, "cannot allocate the GGUF file")
                  : io_write_file_atomic(path, b.p, b.n, err);
    io_bytes_free(a, &b);
    return st;
}

/* ---- load ------------------------------------------------------------------------- */

/* A bounds-checked reader over the file, through a window of at most GGUF_WINDOW bytes:
 * only the bytes the header consists of are read, never skipped values or tensor data.
 * Every read fails (returns 0) rather than step past the end; a failed read of the file
 * itself sets read_error. */
typedef struct cursor {
    int fd;
    uint64_t size, pos;  /* the file's size, the read position */
    unsigned char *win;  /* the file's bytes [win_at, win_at + win_len) */
    uint64_t win_at;
    size_t win_len, win_cap;
    int read_error;
} cursor;

static int need(const cursor *c, uint64_t n) { return n <= c->size - c->pos; }

/* The n (<= win_cap) bytes at pos, or NULL when the file has fewer. */
static const unsigned char *peek(cursor *c, size_t n)
{
    if (!need(c, n) || n > c->win_cap)
        return NULL;
    if (c->pos < c->win_at || c->pos + n > c->win_at + c->win_len) {
        const uint64_t left = c->size - c->pos;
        const size_t len = left < c->win_cap ? (size_t)left : c->win_cap;
        char ignored[IO_ERRMSG_SIZE];
        if (io_pread(c->fd, c->win, len, c->pos, "", ignored) != LORA_OK) {
            c->read_error = 1;
            c->win_len = 0;
            return NULL;
        }
        c->win_at = c->pos;
        c->win_len = len;
    }
    return c->win + (c->pos - c->win_at);
}

static int rd_u32(cursor *c, uint32_t *v)
{
    const unsigned char *p = peek(c, 4);
    if (!p)
        return 0;
    *v = io_le32(p);
    c->pos += 4;
    return 1;
}

static int rd_u64(cursor *c, uint64_t *v)
{
    const unsigned char *p = peek(c, 8);
    if (!p)
        return 0;
    *v = io_le64(p);
    c->pos += 8;
    return 1;
}

/* A string of *len bytes: *s points at them (valid until the next read; NULL when longer
 * than GGUF_MAX_KEY: such strings are only skipped). */
static int rd_str(cursor *c, const unsigned char **s, uint64_t *len)
{
    if (!rd_u64(c, len) || !need(c, *len))
        return 0;
    *s = NULL;
    if (*len <= GGUF_MAX_KEY && !(*s = peek(c, (size_t)*len)) && c->read_error)
        return 0;
    c->pos += *len;
    return 1;
}

static size_t scalar_size(uint32_t type)
{
    switch (type) {
    case GGUF_UINT8: case GGUF_INT8: case GGUF_BOOL: return 1;
    case GGUF_UINT16: case GGUF_INT16: return 2;
    case GGUF_UINT32: case GGUF_INT32: case GGUF_FLOAT32: return 4;
    case GGUF_UINT64: case GGUF_INT64: case GGUF_FLOAT64: return 8;
    default: return 0;
    }
}

/* Skips one value of `type` (arrays nested at most GGUF_MAX_DEPTH). */
static int skip_value(cursor *c, uint32_t type, int depth)
{
    const size_t sz = scalar_size(type);
    if (sz) {
        const unsigned char *p = peek(c, sz);
        if (!p || (type == GGUF_BOOL && p[0] > 1))
            return 0;
        c->pos += sz;
        return 1;
    }
    if (type == GGUF_STRING) {
        const unsigned char *s;
        uint64_t len;
        return rd_str(c, &s, &len);
    }
    if (type != GGUF_ARRAY || depth >= GGUF_MAX_DEPTH)
        return 0;
    uint32_t et;
    uint64_t n;
    if (!rd_u32(c, &et) || !rd_u64(c, &n) || et >= GGUF_TYPE_COUNT)
        return 0;
    const size_t esz = scalar_size(et);
    if (esz && et != GGUF_BOOL) {
        uint64_t bytes;
        if (__builtin_mul_overflow(n, (uint64_t)esz, &bytes) || !need(c, bytes))
            return 0;
        c->pos += bytes;
        return 1;
    }
    /* Strings, bools and arrays: each consumes at least one byte, so the loop ends
     * within the file's size. */
    for (uint64_t i = 0; i < n; i++)
        if (!skip_value(c, et, depth + 1))
            return 0;
    return 1;
}

/* A numeric scalar value as double. */
static int rd_number(cursor *c, uint32_t type, double *v)
{
    const size_t sz = scalar_size(type);
    const unsigned char *p = sz && type != GGUF_BOOL ? peek(c, sz) : NULL;
    if (!p)
        return 0;
    switch (type) {
    case GGUF_UINT8: *v = p[0]; break;
    case GGUF_INT8: *v = (int8_t)p[0]; break;
    case GGUF_UINT16: *v = io_le16(p); break;
    case GGUF_INT16: *v = (int16_t)io_le16(p); break;
    case GGUF_UINT32: *v = io_le32(p); break;
    case GGUF_INT32: *v = (int32_t)io_le32(p); break;
    case GGUF_UINT64: *v = (double)io_le64(p); break;
    case GGUF_INT64: *v = (double)(int64_t)io_le64(p); break;
    case GGUF_FLOAT32: {
        const uint32_t u = io_le32(p);
        float f;
        memcpy(&f, &u, 4);
        *v = f;
        break;
    }
    default: {
        const uint64_t u = io_le64(p);
        memcpy(v, &u, 8);
        break;
    }
    }
    c->pos += sz;
    return 1;
}

static int str_eq(const unsigned char *s, uint64_t len, const char *lit)
{
    return len == strlen(lit) && memcmp(s, lit, (size_t)len) == 0;
}

/* blk.{i}.attn_{q,k,v,output}.weight.lora_{a,b} -> (layer, target, which). */
static int parse_name(const unsigned char *s, size_t len, int64_t *layer_idx, int *target,
                      int *which)
{
    char name[GGUF_MAX_NAME + 1];
    if (len > GGUF_MAX_NAME)
        return 0;
    memcpy(name, s, len);
    name[len] = '\0';
    if (strlen(name) != len || strncmp(name, "blk.", 4) != 0)
        return 0;
    const char *p = name + 4, *dot = strchr(p, '.');
    if (!dot || (*layer_idx = io_parse_layer(p, (size_t)(dot - p))) < 0)
        return 0;
    p = dot + 1;
    return io_match_factor(p, tensor_names, ".weight.lora_a", ".weight.lora_b", target,
                           which);
}

typedef struct tensor_span {
    uint64_t begin, end; /* relative to the data start */
} tensor_span;

static int cmp_tspan(const void *a, const void *b)
{
    const tensor_span *x = a, *y = b;
    return (x->begin > y->begin) - (x->begin < y->begin);
}

/* Copies a name of nlen (<= GGUF_MAX_NAME) bytes into nm, printable for messages. */
static void printable_name(char *nm, const unsigned char *name, uint64_t nlen)
{
    memcpy(nm, name, (size_t)nlen);
    nm[nlen] = '\0';
    for (uint64_t j = 0; j < nlen; j++)
        if (!nm[j] || nm[j] < 0x20 || nm[j] > 0x7e)
            nm[j] = '?';
}

/* The keys liblora reads; KEY_GEOM + i is geometry field i. */
enum {
    KEY_OTHER, KEY_GTYPE, KEY_ATYPE, KEY_ALPHA, KEY_ALIGN, KEY_ALORA, KEY_ARCH, KEY_QK_ROWS,
    KEY_ROPE_FREQS, KEY_GEOM, KEY_COUNT = KEY_GEOM + IO_GEOM_COUNT
};

static int key_id(const unsigned char *key, uint64_t klen)
{
    static const char *const names[KEY_GEOM] = {
        NULL, "general.type", "adapter.type", "adapter.lora.alpha", "general.alignment",
        "adapter.alora.invocation_tokens", "general.architecture", "liblora.qk_rows",
        IO_ROPE_FREQS_KEY};
    if (!key)
        return KEY_OTHER;
    for (int k = 1; k < KEY_GEOM; k++)
        if (str_eq(key, klen, names[k]))
            return k;
    for (int g = 0; g < IO_GEOM_COUNT; g++)
        if (str_eq(key, klen, io_geom_key(g)))
            return KEY_GEOM + g;
    return KEY_OTHER;
}

/* What the key-values say that the tensors need. */
typedef struct gguf_kvs {
    const io_alloc *alloc; /* for the values kept (the RoPE table) */
    uint64_t alignment;
    int seen[KEY_COUNT];
    int arch_rows, key_rows; /* the Q/K row order by general.architecture, liblora.qk_rows */
} gguf_kvs;

/* Magic, version and counts. */
static int read_header(cursor *c, uint64_t *n_tensors, uint64_t *n_kv, char *err)
{
    uint32_t version;
    const unsigned char *magic = peek(c, 4);
    if (!magic || memcmp(magic, GGUF_MAGIC, 4) != 0)
        return io_error(err, LORA_ERR_FORMAT, "not a GGUF file (magic)");
    c->pos = 4;
    if (!rd_u32(c, &version))
        return io_error(err, LORA_ERR_FORMAT, "GGUF: truncated header");
    if (version == 1)
        return io_error(err, LORA_ERR_UNSUPPORTED, "GGUF v1 is not supported (v2, v3)");
    if (version != 2 && version != 3)
        return io_error(err, LORA_ERR_FORMAT,
                        "GGUF: version %u (a big-endian file, or not GGUF)", version);
    if (!rd_u64(c, n_tensors) || !rd_u64(c, n_kv))
        return io_error(err, LORA_ERR_FORMAT, "GGUF: truncated header");
    /* Each tensor info takes at least 8 + 4 + 4 + 8 bytes, each KV at least 8 + 4 + 1. */
    if (*n_tensors > c->size / 24 || *n_kv > c->size / 13)
        return io_error(err, LORA_ERR_FORMAT,
                        "GGUF: %llu tensors / %llu keys cannot fit in %llu bytes",
                        (unsigned long long)*n_tensors, (unsigned long long)*n_kv,
                        (unsigned long long)c->size);
    return LORA_OK;
}

/* A string value that must equal want (general.type, adapter.type). */
static int read_type_string(cursor *c, uint32_t type, const char *key, const char *want,
                            char *err)
{
    const unsigned char *sv;
    uint64_t slen;
    if (type != GGUF_STRING || !rd_str(c, &sv, &slen))
        return io_error(err, LORA_ERR_FORMAT, "GGUF: %s is not a string", key);
    if (!sv || !str_eq(sv, slen, want))
        return io_error(err, LORA_ERR_UNSUPPORTED, "GGUF: %s is '%.*s', not '%s'", key,
                        sv ? (int)(slen < 32 ? slen : 32) : 0, sv ? (const char *)sv : "",
                        want);
    return LORA_OK;
}

/* A string value naming a row order or RoPE layout (liblora.qk_rows, liblora.rope). */
static int read_rope_string(cursor *c, uint32_t type, const char *key, int *rope, char *err)
{
    const unsigned char *sv;
    uint64_t slen;
    if (type != GGUF_STRING || !rd_str(c, &sv, &slen))
        return io_error(err, LORA_ERR_FORMAT, "GGUF: %s is not a string", key);
    *rope = sv ? io_rope_of_name((const char *)sv, (size_t)slen) : -1;
    if (*rope < 0)
        return io_error(err, LORA_ERR_FORMAT,
                        "GGUF: %s is not \"none\", \"half\" or \"interleaved\"", key);
    return LORA_OK;
}

/* general.architecture: a string, whose name decides the Q/K row order. */
static int read_arch(cursor *c, uint32_t type, gguf_kvs *kv, char *err)
{
    const unsigned char *sv;
    uint64_t slen;
    if (type != GGUF_STRING || !rd_str(c, &sv, &slen))
        return io_error(err, LORA_ERR_FORMAT, "GGUF: general.architecture is not a string");
    kv->arch_rows = sv ? qk_rows_of((const char *)sv, (size_t)slen) : LORA_ROPE_HALF;
    return LORA_OK;
}

/* liblora.<field>: integers in [0, 2^31), flags as bool or 0/1, the RoPE layout as a
 * string, rope_theta a finite number > 0. */
static int read_geometry(cursor *c, uint32_t type, int g, io_meta *meta, char *err)
{
    const char *key = io_geom_key(g);
    const io_geom_kind kind = io_geom_kind_of(g);
    double v = 0.0;
    int ok;
    if (kind == IO_GEOM_ROPE) {
        int rope;
        const int st = read_rope_string(c, type, key, &rope, err);
        if (st != LORA_OK)
            return st;
        v = rope;
        ok = 1;
    } else if (kind == IO_GEOM_FLAG && type == GGUF_BOOL) {
        const unsigned char *p = peek(c, 1);
        ok = p && p[0] <= 1;
        v = ok ? p[0] : 0.0;
        c->pos += ok;
    } else {
        ok = rd_number(c, type, &v);
        ok = ok && (kind == IO_GEOM_REAL ? isfinite(v) && v > 0.0
                                          : v >= 0.0 && v < 2147483648.0 && floor(v) == v &&
                                                (kind != IO_GEOM_FLAG || v <= 1.0));
    }
    if (!ok)
        return io_error(err, LORA_ERR_FORMAT, "GGUF: %s is not %s", key,
                        kind == IO_GEOM_REAL   ? "a finite number > 0"
                        : kind == IO_GEOM_FLAG ? "a bool"
                                               : "an integer in [0, 2^31)");
    meta->geom.present |= 1u << g;
    meta->geom.value[g] = v;
    return LORA_OK;
}

/* liblora.rope_freqs: an array of 1 .. IO_MAX_ROPE_FREQS float64 values, finite, >= 0. */
static int read_rope_freqs(cursor *c, uint32_t type, const io_alloc *a, io_meta *meta,
                           char *err)
{
    uint32_t et = 0;
    uint64_t n = 0;
    if (type != GGUF_ARRAY || !rd_u32(c, &et) || !rd_u64(c, &n) || et != GGUF_FLOAT64 ||
        n == 0 || n > IO_MAX_ROPE_FREQS)
        return io_error(err, LORA_ERR_FORMAT,
                        "GGUF: " IO_ROPE_FREQS_KEY " is not an array of 1 to %d float64",
                        IO_MAX_ROPE_FREQS);
    double *f = io_calloc(a, (size_t)n, sizeof *f);
    if (!f)
        return io_error(err, LORA_ERR_NOMEM, "cannot allocate %llu frequencies",
                        (unsigned long long)n);
    meta->rope_freqs = f; /* the source frees it, also on failure */
    meta->n_rope_freqs = (size_t)n;
    for (uint64_t i = 0; i < n; i++)
        if (!rd_number(c, GGUF_FLOAT64, &f[i]) || !isfinite(f[i]) || f[i] < 0.0)
            return io_error(err, LORA_ERR_FORMAT,
                            "GGUF: " IO_ROPE_FREQS_KEY "[%llu] is missing, not finite or "
                            "negative",
                            (unsigned long long)i);
    return LORA_OK;
}

/* The value of key k (not KEY_OTHER). */
static int read_known_value(cursor *c, int k, uint32_t type, gguf_kvs *kv, io_meta *meta,
                            char *err)
{
    switch (k) {
    case KEY_GTYPE: return read_type_string(c, type, "general.type", "adapter", err);
    case KEY_ATYPE: return read_type_string(c, type, "adapter.type", "lora", err);
    case KEY_ARCH: return read_arch(c, type, kv, err);
    case KEY_ROPE_FREQS: return read_rope_freqs(c, type, kv->alloc, meta, err);
    case KEY_QK_ROWS: {
        const int st = read_rope_string(c, type, "liblora.qk_rows", &kv->key_rows, err);
        if (st == LORA_OK && kv->key_rows == LORA_ROPE_NONE)
            return io_error(err, LORA_ERR_FORMAT, "GGUF: liblora.qk_rows is \"none\"");
        return st;
    }
    case KEY_ALPHA: {
        double alpha;
        if (!rd_number(c, type, &alpha) || !isfinite(alpha))
            return io_error(err, LORA_ERR_FORMAT,
                            "GGUF: adapter.lora.alpha is not a finite number");
        if (alpha != 0.0)
            meta->alpha = alpha;
        return LORA_OK;
    }
    case KEY_ALIGN: {
        uint32_t align;
        if (type != GGUF_UINT32 || !rd_u32(c, &align) || align == 0 || (align & (align - 1)))
            return io_error(err, LORA_ERR_FORMAT,
                            "GGUF: general.alignment is not a u32 power of two");
        kv->alignment = align;
        return LORA_OK;
    }
    default: return read_geometry(c, type, k - KEY_GEOM, meta, err);
    }
}

/* One key-value: the keys liblora reads, the rest skipped. */
static int read_kv(cursor *c, uint64_t i, gguf_kvs *kv, io_meta *meta, char *err)
{
    const unsigned char *key;
    uint64_t klen;
    uint32_t type;
    if (!rd_str(c, &key, &klen))
        return io_error(err, LORA_ERR_FORMAT, "GGUF: truncated key-value %llu",
                        (unsigned long long)i);
    /* key is valid until the next read: keep what the messages need. */
    const int k = key_id(key, klen);
    char kname[GGUF_MAX_NAME + 1] = "";
    if (key)
        printable_name(kname, key, klen < GGUF_MAX_NAME ? klen : GGUF_MAX_NAME);
    if (!rd_u32(c, &type))
        return io_error(err, LORA_ERR_FORMAT, "GGUF: truncated key-value %llu",
                        (unsigned long long)i);
    if (klen == 0 || klen > GGUF_MAX_KEY || type >= GGUF_TYPE_COUNT)
        return io_error(err, LORA_ERR_FORMAT,
                        "GGUF: key-value %llu has a bad key length or type %u",
                        (unsigned long long)i, type);
    if (k != KEY_OTHER && kv->seen[k]++)
        return io_error(err, LORA_ERR_FORMAT, "GGUF: duplicate key %s", kname);
    if (k == KEY_ALORA) /* activated LoRA: adapts only tokens from the invocation on */
        return io_error(err, LORA_ERR_UNSUPPORTED,
                        "GGUF: adapter.alora.invocation_tokens is set: not supported");
    if (k != KEY_OTHER)
        return read_known_value(c, k, type, kv, meta, err);
    if (!skip_value(c, type, 0))
        return io_error(err, LORA_ERR_FORMAT, "GGUF: malformed value of key %s", kname);
    return LORA_OK;
}

static int read_kvs(cursor *c, const io_alloc *a, uint64_t n_kv, gguf_kvs *kv, io_meta *meta,
                    char *err)
{
    memset(kv, 0, sizeof *kv);
    kv->alloc = a;
    kv->alignment = GGUF_ALIGNMENT;
    kv->arch_rows = io_gguf_qk_rows(NULL); /* no general.architecture: the writer's default */
    *meta = (io_meta){.alpha = NAN}; /* alpha missing: alpha = rank, llama.cpp's scale 1 */
    for (uint64_t i = 0; i < n_kv; i++) {
        const int st = read_kv(c, i, kv, meta, err);
        if (st != LORA_OK)
            return st;
    }
    if (!kv->seen[KEY_GTYPE])
        return io_error(err, LORA_ERR_FORMAT,
                        "GGUF: no general.type (an adapter has general.type = adapter)");
    if (!kv->seen[KEY_ATYPE])
        return io_error(err, LORA_ERR_FORMAT, "GGUF: no adapter.type");
    /* liblora.qk_rows says what its writer did; else the architecture's convention. */
    meta->qk_rows = kv->seen[KEY_QK_ROWS] ? kv->key_rows : kv->arch_rows;
    return LORA_OK;
}

/* One tensor info into *x (offset relative to the data start, name in nm). */
static int read_tensor_info(cursor *c, uint64_t i, uint64_t alignment, char *nm, io_record *x,
                            char *err)
{
    const unsigned char *name;
    unsigned char raw[GGUF_MAX_NAME];
    uint64_t nlen, ne[GGUF_MAX_DIMS], offset, numel = 1;
    uint32_t n_dims, type;
    if (!rd_str(c, &name, &nlen))
        return io_error(err, LORA_ERR_FORMAT, "GGUF: truncated tensor info %llu",
                        (unsigned long long)i);
    if (nlen <= GGUF_MAX_NAME) /* name is valid until the next read */
        memcpy(raw, name, (size_t)nlen);
    if (!rd_u32(c, &n_dims))
        return io_error(err, LORA_ERR_FORMAT, "GGUF: truncated tensor info %llu",
                        (unsigned long long)i);
    if (n_dims == 0 || n_dims > GGUF_MAX_DIMS || nlen == 0 || nlen > GGUF_MAX_NAME)
        return io_error(err, LORA_ERR_FORMAT,
                        "GGUF: tensor info %llu has %u dimensions or a name of %llu bytes",
                        (unsigned long long)i, n_dims, (unsigned long long)nlen);
    int ok = 1;
    for (uint32_t d = 0; d < n_dims && ok; d++)
        ok = rd_u64(c, &ne[d]) && ne[d] <= (uint64_t)INT64_MAX &&
             !__builtin_mul_overflow(numel, ne[d], &numel);
    if (!ok || !rd_u32(c, &type) || !rd_u64(c, &offset))
        return io_error(err, LORA_ERR_FORMAT,
                        "GGUF: tensor info %llu is truncated or its size overflows",
                        (unsigned long long)i);
    printable_name(nm, raw, nlen);
    memset(x, 0, sizeof *x);
    x->name = nm;
    if (type >= GGML_TYPE_LIMIT)
        return io_error(err, LORA_ERR_FORMAT, "GGUF: tensor %s has ggml type %u", nm, type);
    if (!parse_name(raw, (size_t)nlen, &x->layer, &x->target, &x->which))
        return io_error(err, LORA_ERR_UNSUPPORTED,
                        "GGUF: tensor %s is not blk.N.attn_{q,k,v,output}.weight.lora_{a,b}; "
                        "liblora adapts attention only",
                        nm);
    if (type != GGML_F32 && type != GGML_F16 && type != GGML_BF16)
        return io_error(err, LORA_ERR_UNSUPPORTED,
                        "GGUF: tensor %s has ggml type %u (F32, F16, BF16 are read)", nm, type);
    if (n_dims != 2)
        return io_error(err, LORA_ERR_FORMAT, "GGUF: tensor %s has %u dimensions, not 2", nm,
                        n_dims);
    x->dtype = type == GGML_F32 ? IO_F32 : type == GGML_F16 ? IO_F16 : IO_BF16;
    x->rows = (int64_t)ne[1];
    x->cols = (int64_t)ne[0];
    x->offset = offset;
    uint64_t nbytes, end;
    if (__builtin_mul_overflow(numel, (uint64_t)io_dtype_size(x->dtype), &nbytes) ||
        offset % alignment != 0)
        return io_error(err, LORA_ERR_FORMAT,
                        "GGUF: tensor %s: offset %llu not aligned to %llu or size overflows", nm,
                        (unsigned long long)offset, (unsigned long long)alignment);
    if (__builtin_add_overflow(offset, nbytes, &end))
        return io_error(err, LORA_ERR_FORMAT, "GGUF: tensor %s: offset overflows", nm);
    return LORA_OK;
}

static uint64_t span_bytes(const io_record *x)
{
    return (uint64_t)x->rows * (uint64_t)x->cols * io_dtype_size(x->dtype); /* checked */
}

/* The tensors' spans lie inside the data, do not overlap, and the file ends within the
 * alignment padding after the last one; the records' offsets become file offsets. */
static int check_spans(const cursor *c, const io_alloc *a, uint64_t alignment,
                       io_records *rec, char *err)
{
    /* Data start: the end of the tensor infos rounded up to the alignment. */
    uint64_t data_start = c->pos;
    if (data_start % alignment)
        data_start += alignment - data_start % alignment;
    const uint64_t data_size = data_start <= c->size ? c->size - data_start : 0;
    if (rec->n > 0 && data_start > c->size)
        return io_error(err, LORA_ERR_FORMAT, "GGUF: the tensor data is missing");
    tensor_span *spans = io_calloc(a, rec->n ? rec->n : 1, sizeof *spans);
    if (!spans)
        return io_error(err, LORA_ERR_NOMEM, "cannot allocate %zu tensor entries", rec->n);
    int st = LORA_OK;
    uint64_t last_end = 0;
    for (size_t i = 0; i < rec->n && st == LORA_OK; i++) {
        spans[i] = (tensor_span){rec->v[i].offset, rec->v[i].offset + span_bytes(&rec->v[i])};
        if (spans[i].end > data_size)
            st = io_error(err, LORA_ERR_FORMAT,
                          "GGUF: tensor %s ends at %llu, past the data (%llu bytes)",
                          rec->v[i].name, (unsigned long long)spans[i].end,
                          (unsigned long long)data_size);
        last_end = spans[i].end > last_end ? spans[i].end : last_end;
        rec->v[i].offset += data_start;
    }
    if (st == LORA_OK)
        qsort(spans, rec->n, sizeof *spans, cmp_tspan);
    for (size_t i = 1; i < rec->n && st == LORA_OK; i++)
        if (spans[i].begin < spans[i - 1].end)
            st = io_error(err, LORA_ERR_FORMAT, "GGUF: two tensors overlap");
    io_free(a, spans);
    /* Padding to the alignment may follow the last tensor, nothing more. */
    const uint64_t padded = last_end + (alignment - last_end % alignment) % alignment;
    if (st == LORA_OK && rec->n > 0 && data_size > padded)
        st = io_error(err, LORA_ERR_FORMAT,
                      "GGUF: %llu bytes after the last tensor (padding to %llu allowed)",
                      (unsigned long long)(data_size - last_end),
                      (unsigned long long)alignment);
    return st;
}

static int read_tensor_infos(cursor *c, uint64_t n_tensors, uint64_t alignment, io_source *s,
                             char *err)
{
    const io_alloc *a = &s->alloc;
    int st = LORA_OK;
    /* Grown per tensor read, so memory follows the bytes present, not the count. */
    for (uint64_t i = 0; i < n_tensors && st == LORA_OK; i++) {
        io_record x;
        char nm[GGUF_MAX_NAME + 1];
        st = read_tensor_info(c, i, alignment, nm, &x, err);
        if (st == LORA_OK && (io_bytes_append(a, &s->names, nm, sizeof nm) != LORA_OK ||
                              io_records_push(a, &s->rec, &x) != LORA_OK))
            st = io_error(err, LORA_ERR_NOMEM, "cannot allocate tensor entries");
    }
    for (size_t i = 0; i < s->rec.n; i++)
        s->rec.v[i].name = (const char *)s->names.p + i * (GGUF_MAX_NAME + 1);
    if (st == LORA_OK)
        st = check_spans(c, a, alignment, &s->rec, err);
    return st;
}

int io_gguf_read(const io_alloc *a, const char *path, io_source *s, char *err)
{
    io_source_init(s, a);
    cursor c = {.fd = -1};
    int st = io_open_regular(path, &s->fd, &c.size, err);
    if (st != LORA_OK)
        return st;
    c.fd = s->fd;
    c.win_cap = c.size < GGUF_WINDOW ? (size_t)c.size : GGUF_WINDOW;
    c.win = io_malloc(a, c.win_cap ? c.win_cap : 1);
    if (!c.win)
        return io_error(err, LORA_ERR_NOMEM, "cannot allocate %zu bytes", c.win_cap);
    uint64_t n_tensors = 0, n_kv = 0;
    gguf_kvs kv;
    st = read_header(&c, &n_tensors, &n_kv, err);
    if (st == LORA_OK)
        st = read_kvs(&c, a, n_kv, &kv, &s->meta, err);
    if (st == LORA_OK)
        st = read_tensor_infos(&c, n_tensors, kv.alignment, s, err);
    io_free(a, c.win);
    if (c.read_error)
        return io_error(err, LORA_ERR_IO, "cannot read %s (it changed while being read?)",
                        path);
    return st;
}
