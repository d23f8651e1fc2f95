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
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_DIMS 4
#define GGUF_MAX_NAME 63 /* GGML_MAX_NAME 64 with the terminating NUL */
#define GGUF_MAX_KEY 65535
#define GGUF_MAX_DEPTH 8 /* nested arrays */
#define GGUF_MAX_FILE ((size_t)1 << 40)

enum gguf_type {
    GGUF_UINT8 = 0, GGUF_INT8 = 1, GGUF_UINT16 = 2, GGUF_INT16 = 3, GGUF_UINT32 = 4,
    GGUF_INT32 = 5, GGUF_FLOAT32 = 6, GGUF_BOOL = 7, GGUF_STRING = 8, GGUF_ARRAY = 9,
    GGUF_UINT64 = 10, GGUF_INT64 = 11, GGUF_FLOAT64 = 12, GGUF_TYPE_COUNT = 13
};
enum { GGML_F32 = 0, GGML_F16 = 1, GGML_BF16 = 30, GGML_TYPE_LIMIT = 64 };

static const char *const tensor_names[PROJ_COUNT] = {"attn_q", "attn_k", "attn_v",
                                                     "attn_output"};

/* ---- save ------------------------------------------------------------------------- */

static int put_string(const lora_mem *m, io_bytes *b, const char *s)
{
    const size_t n = strlen(s);
    return io_bytes_u64(m, b, n) || io_bytes_append(m, b, s, n) ? LORA_ERR_NOMEM : LORA_OK;
}

static int put_kv_string(const lora_mem *m, io_bytes *b, const char *key, const char *v)
{
    return put_string(m, b, key) || io_bytes_u32(m, b, GGUF_STRING) || put_string(m, b, v)
               ? LORA_ERR_NOMEM
               : LORA_OK;
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

LORA_API int lora_save_gguf(const char *path, lora_adapter *const *adapters,
                            const int64_t *layers, size_t count, const char *architecture)
{
    size_t *order = NULL;
    int st = io_check_set(adapters, layers, count, &order);
    if (st != LORA_OK)
        return st;
    lora_adapter *a0 = adapters[0];
    const lora_mem *m = &a0->mem;
    char *err = a0->err;
    const char *arch = architecture ? architecture : "llama";
    io_bytes b = {0};
    if (!path) {
        st = lora_set_error(err, LORA_ERR_INVALID_ARG, "path is NULL");
        goto done;
    }
    if (!valid_arch(arch)) {
        st = lora_set_error(err, LORA_ERR_INVALID_ARG,
                            "architecture '%.64s' is not a lowercase name ([a-z0-9_-]+)", arch);
        goto done;
    }
    const double rank = (double)a0->layer.rank;
    const double alpha = io_adapter_rslora(a0) ? io_adapter_alpha(a0) * sqrt(rank)
                                               : io_adapter_alpha(a0);
    const float alpha32 = (float)alpha;
    if (alpha32 == 0.0f || !isfinite(alpha32)) {
        st = lora_set_error(err, LORA_ERR_UNSUPPORTED,
                            "alpha %g cannot be stored: llama.cpp reads adapter.lora.alpha = 0 "
                            "as scale 1, and it is an F32",
                            alpha);
        goto done;
    }
    int n_targets = 0;
    for (int t = 0; t < PROJ_COUNT; t++)
        n_targets += a0->layer.proj[t].adapted;
    const uint64_t n_tensors = (uint64_t)count * (uint64_t)n_targets * 2u;
    uint32_t alpha_bits;
    memcpy(&alpha_bits, &alpha32, 4);
    int fail = io_bytes_append(m, &b, GGUF_MAGIC, 4) || io_bytes_u32(m, &b, GGUF_VERSION) ||
               io_bytes_u64(m, &b, n_tensors) || io_bytes_u64(m, &b, 4) ||
               put_kv_string(m, &b, "general.architecture", arch) ||
               put_kv_string(m, &b, "general.type", "adapter") ||
               put_kv_string(m, &b, "adapter.type", "lora") ||
               put_string(m, &b, "adapter.lora.alpha") || io_bytes_u32(m, &b, GGUF_FLOAT32) ||
               io_bytes_u32(m, &b, alpha_bits);
    /* Tensor infos; data laid out in the same order, each start aligned. */
    uint64_t offset = 0;
    for (size_t i = 0; i < count && !fail; i++) {
        const lora_adapter *ad = adapters[order[i]];
        for (int t = 0; t < PROJ_COUNT && !fail; t++) {
            const layer_proj *p = &ad->layer.proj[t];
            if (!p->adapted)
                continue;
            for (int w = 0; w < 2 && !fail; w++) {
                char name[64];
                snprintf(name, sizeof name, "blk.%lld.%s.weight.lora_%c",
                         (long long)layers[order[i]], tensor_names[t], w ? 'b' : 'a');
                const int64_t rows = w ? p->out : ad->layer.rank;
                const int64_t cols = w ? ad->layer.rank : p->in;
                offset = (offset + GGUF_DEFAULT_ALIGNMENT - 1) &
                         ~(uint64_t)(GGUF_DEFAULT_ALIGNMENT - 1);
                fail = put_string(m, &b, name) || io_bytes_u32(m, &b, 2) ||
                       io_bytes_u64(m, &b, (uint64_t)cols) ||
                       io_bytes_u64(m, &b, (uint64_t)rows) || io_bytes_u32(m, &b, GGML_F32) ||
                       io_bytes_u64(m, &b, offset);
                offset += (uint64_t)rows * (uint64_t)cols * 4u;
            }
        }
    }
    /* Data: padding before each tensor, none after the last one. */
    const size_t data_start = (b.n + GGUF_DEFAULT_ALIGNMENT - 1) &
                              ~(size_t)(GGUF_DEFAULT_ALIGNMENT - 1);
    if (!fail)
        fail = io_bytes_zeros(m, &b, data_start - b.n);
    for (size_t i = 0; i < count && !fail; i++) {
        const lora_adapter *ad = adapters[order[i]];
        for (int t = 0; t < PROJ_COUNT && !fail; t++) {
            const layer_proj *p = &ad->layer.proj[t];
            if (!p->adapted)
                continue;
            for (int w = 0; w < 2 && !fail; w++) {
                const size_t rel = b.n - data_start;
                const size_t pad = (GGUF_DEFAULT_ALIGNMENT - rel % GGUF_DEFAULT_ALIGNMENT) %
                                   GGUF_DEFAULT_ALIGNMENT;
                const size_t n = (size_t)(w ? p->out * ad->layer.rank : ad->layer.rank * p->in);
                fail = io_bytes_zeros(m, &b, pad) || io_bytes_f32(m, &b, w ? p->b : p->a, n);
            }
        }
    }
    if (fail) {
        st = lora_set_error(err, LORA_ERR_NOMEM, "cannot allocate the GGUF file");
        goto done;
    }
    st = io_write_file_atomic(path, b.p, b.n, err);
    if (st == LORA_OK)
        err[0] = '\0';
done:
    io_bytes_free(m, &b);
    lora_mem_free(m, order);
    return st;
}

/* ---- load ------------------------------------------------------------------------- */

/* A bounds-checked reader over the file buffer. Every read fails (returns 0) rather
 * than step past the end. */
typedef struct cursor {
    const unsigned char *p;
    size_t size, pos;
} cursor;

static int need(const cursor *c, uint64_t n) { return n <= (uint64_t)(c->size - c->pos); }

static int rd_u32(cursor *c, uint32_t *v)
{
    if (!need(c, 4))
        return 0;
    *v = io_le32(c->p + c->pos);
    c->pos += 4;
    return 1;
}

static int rd_u64(cursor *c, uint64_t *v)
{
    if (!need(c, 8))
        return 0;
    *v = io_le64(c->p + c->pos);
    c->pos += 8;
    return 1;
}

/* A string: *s points into the buffer (not terminated), *len its length. */
static int rd_str(cursor *c, const unsigned char **s, uint64_t *len)
{
    if (!rd_u64(c, len) || !need(c, *len))
        return 0;
    *s = c->p + c->pos;
    c->pos += (size_t)*len;
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
        if (!need(c, sz))
            return 0;
        if (type == GGUF_BOOL && c->p[c->pos] > 1)
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
        c->pos += (size_t)bytes;
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
    if (!sz || type == GGUF_BOOL || !need(c, sz))
        return 0;
    const unsigned char *p = c->p + c->pos;
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
    uint64_t begin, end;
} tensor_span;

static int cmp_tspan(const void *a, const void *b)
{
    const tensor_span *x = a, *y = b;
    return (x->begin > y->begin) - (x->begin < y->begin);
}

/* Parses buf into factors; names are copied into *names (through m). */
static int parse_gguf(const lora_mem *m, const unsigned char *buf, size_t size,
                      io_header *h, io_factors *f, char **names, char *err)
{
    cursor c = {buf, size, 0};
    uint32_t version;
    uint64_t n_tensors, n_kv;
    if (!need(&c, 4) || memcmp(buf, GGUF_MAGIC, 4) != 0)
        return lora_set_error(err, LORA_ERR_FORMAT, "not a GGUF file (magic)");
    c.pos = 4;
    if (!rd_u32(&c, &version))
        return lora_set_error(err, LORA_ERR_FORMAT, "GGUF: truncated header");
    if (version == 1)
        return lora_set_error(err, LORA_ERR_UNSUPPORTED, "GGUF v1 is not supported (v2, v3)");
    if (version != 2 && version != 3)
        return lora_set_error(err, LORA_ERR_FORMAT,
                              "GGUF: version %u (a big-endian file, or not GGUF)", version);
    if (!rd_u64(&c, &n_tensors) || !rd_u64(&c, &n_kv))
        return lora_set_error(err, LORA_ERR_FORMAT, "GGUF: truncated header");
    /* Each tensor info takes at least 8 + 4 + 4 + 8 bytes, each KV at least 8 + 4 + 1. */
    if (n_tensors > size / 24 || n_kv > size / 13)
        return lora_set_error(err, LORA_ERR_FORMAT,
                              "GGUF: %llu tensors / %llu keys cannot fit in %zu bytes",
                              (unsigned long long)n_tensors, (unsigned long long)n_kv, size);

    uint64_t alignment = GGUF_DEFAULT_ALIGNMENT;
    int seen_gtype = 0, seen_atype = 0, seen_alpha = 0, seen_align = 0;
    h->rank = 0;
    h->alpha = NAN; /* missing: alpha = rank, as llama.cpp (scale 1) */
    h->rslora = 0;
    h->allowed_targets = 0;
    for (uint64_t i = 0; i < n_kv; i++) {
        const unsigned char *key, *sv;
        uint64_t klen, slen;
        uint32_t type;
        if (!rd_str(&c, &key, &klen) || !rd_u32(&c, &type))
            return lora_set_error(err, LORA_ERR_FORMAT, "GGUF: truncated key-value %llu",
                                  (unsigned long long)i);
        if (klen == 0 || klen > GGUF_MAX_KEY || type >= GGUF_TYPE_COUNT)
            return lora_set_error(err, LORA_ERR_FORMAT,
                                  "GGUF: key-value %llu has a bad key length or type %u",
                                  (unsigned long long)i, type);
        const int is_gtype = str_eq(key, klen, "general.type");
        const int is_atype = str_eq(key, klen, "adapter.type");
        const int is_alpha = str_eq(key, klen, "adapter.lora.alpha");
        const int is_align = str_eq(key, klen, "general.alignment");
        if ((is_gtype && seen_gtype++) || (is_atype && seen_atype++) ||
            (is_alpha && seen_alpha++) || (is_align && seen_align++))
            return lora_set_error(err, LORA_ERR_FORMAT, "GGUF: duplicate key %.*s", (int)klen,
                                  (const char *)key);
        if (is_gtype || is_atype) {
            if (type != GGUF_STRING || !rd_str(&c, &sv, &slen))
                return lora_set_error(err, LORA_ERR_FORMAT, "GGUF: %s is not a string",
                                      is_gtype ? "general.type" : "adapter.type");
            if (is_gtype && !str_eq(sv, slen, "adapter"))
                return lora_set_error(err, LORA_ERR_UNSUPPORTED,
                                      "GGUF: general.type is '%.*s', not 'adapter'",
                                      (int)(slen < 32 ? slen : 32), (const char *)sv);
            if (is_atype && !str_eq(sv, slen, "lora"))
                return lora_set_error(err, LORA_ERR_UNSUPPORTED,
                                      "GGUF: adapter.type is '%.*s', not 'lora'",
                                      (int)(slen < 32 ? slen : 32), (const char *)sv);
        } else if (is_alpha) {
            double a;
            if (!rd_number(&c, type, &a) || !isfinite(a))
                return lora_set_error(err, LORA_ERR_FORMAT,
                                      "GGUF: adapter.lora.alpha is not a finite number");
            if (a != 0.0)
                h->alpha = a;
        } else if (is_align) {
            uint32_t a;
            if (type != GGUF_UINT32 || !rd_u32(&c, &a) || a == 0 || (a & (a - 1)) != 0)
                return lora_set_error(err, LORA_ERR_FORMAT,
                                      "GGUF: general.alignment is not a u32 power of two");
            alignment = a;
        } else if (!skip_value(&c, type, 0)) {
            return lora_set_error(err, LORA_ERR_FORMAT, "GGUF: malformed value of key %.*s",
                                  (int)(klen < 64 ? klen : 64), (const char *)key);
        }
    }
    if (!seen_gtype)
        return lora_set_error(err, LORA_ERR_FORMAT,
                              "GGUF: no general.type (an adapter has general.type = adapter)");
    if (!seen_atype)
        return lora_set_error(err, LORA_ERR_FORMAT, "GGUF: no adapter.type");

    *names = lora_mem_alloc(m, (size_t)(n_tensors ? n_tensors : 1) * (GGUF_MAX_NAME + 1));
    tensor_span *spans = lora_mem_calloc(m, (size_t)(n_tensors ? n_tensors : 1), sizeof *spans);
    if (!*names || !spans) {
        lora_mem_free(m, spans);
        return lora_set_error(err, LORA_ERR_NOMEM, "cannot allocate %llu tensor entries",
                              (unsigned long long)n_tensors);
    }
    int st = LORA_OK;
    for (uint64_t i = 0; i < n_tensors && st == LORA_OK; i++) {
        const unsigned char *name;
        uint64_t nlen, ne[GGUF_MAX_DIMS], offset;
        uint32_t n_dims, type;
        if (!rd_str(&c, &name, &nlen) || !rd_u32(&c, &n_dims)) {
            st = lora_set_error(err, LORA_ERR_FORMAT, "GGUF: truncated tensor info %llu",
                                (unsigned long long)i);
            break;
        }
        if (n_dims == 0 || n_dims > GGUF_MAX_DIMS || nlen == 0 || nlen > GGUF_MAX_NAME) {
            st = lora_set_error(err, LORA_ERR_FORMAT,
                                "GGUF: tensor info %llu has %u dimensions or a name of %llu "
                                "bytes",
                                (unsigned long long)i, n_dims, (unsigned long long)nlen);
            break;
        }
        uint64_t numel = 1;
        int ok = 1;
        for (uint32_t d = 0; d < n_dims && ok; d++)
            ok = rd_u64(&c, &ne[d]) && ne[d] <= (uint64_t)INT64_MAX &&
                 !__builtin_mul_overflow(numel, ne[d], &numel);
        if (!ok || !rd_u32(&c, &type) || !rd_u64(&c, &offset)) {
            st = lora_set_error(err, LORA_ERR_FORMAT,
                                "GGUF: tensor info %llu is truncated or its size overflows",
                                (unsigned long long)i);
            break;
        }
        char *nm = *names + i * (GGUF_MAX_NAME + 1);
        memcpy(nm, name, (size_t)nlen);
        nm[nlen] = '\0';
        for (uint64_t j = 0; j < nlen; j++)
            if (!nm[j] || nm[j] < 0x20 || nm[j] > 0x7e) /* printable ASCII for messages */
                nm[j] = '?';
        io_factor x;
        memset(&x, 0, sizeof x);
        x.name = nm;
        if (type >= GGML_TYPE_LIMIT) {
            st = lora_set_error(err, LORA_ERR_FORMAT, "GGUF: tensor %s has ggml type %u", nm,
                                type);
            break;
        }
        if (!parse_name(name, (size_t)nlen, &x.layer, &x.target, &x.which)) {
            st = lora_set_error(err, LORA_ERR_UNSUPPORTED,
                                "GGUF: tensor %s is not blk.N.attn_{q,k,v,output}.weight."
                                "lora_{a,b}; liblora adapts attention only",
                                nm);
            break;
        }
        if (type != GGML_F32 && type != GGML_F16 && type != GGML_BF16) {
            st = lora_set_error(err, LORA_ERR_UNSUPPORTED,
                                "GGUF: tensor %s has ggml type %u (F32, F16, BF16 are read)",
                                nm, type);
            break;
        }
        if (n_dims != 2) {
            st = lora_set_error(err, LORA_ERR_FORMAT, "GGUF: tensor %s has %u dimensions, not 2",
                                nm, n_dims);
            break;
        }
        x.dtype = type == GGML_F32 ? IO_F32 : type == GGML_F16 ? IO_F16 : IO_BF16;
        x.rows = (int64_t)ne[1];
        x.cols = (int64_t)ne[0];
        uint64_t nbytes;
        if (__builtin_mul_overflow(numel, (uint64_t)io_dtype_size(x.dtype), &nbytes) ||
            offset % alignment != 0) {
            st = lora_set_error(err, LORA_ERR_FORMAT,
                                "GGUF: tensor %s: offset %llu not aligned to %llu or size "
                                "overflows",
                                nm, (unsigned long long)offset, (unsigned long long)alignment);
            break;
        }
        spans[i] = (tensor_span){offset, offset + nbytes}; /* checked below */
        if (__builtin_add_overflow(offset, nbytes, &spans[i].end)) {
            st = lora_set_error(err, LORA_ERR_FORMAT, "GGUF: tensor %s: offset overflows", nm);
            break;
        }
        x.data = NULL; /* set once the data start is known */
        if (io_factors_push(m, f, &x) != LORA_OK)
            st = lora_set_error(err, LORA_ERR_NOMEM, "cannot allocate tensor entries");
    }
    if (st == LORA_OK) {
        /* Data start: the end of the tensor infos rounded up to the alignment. */
        uint64_t data_start = c.pos;
        if (data_start % alignment)
            data_start += alignment - data_start % alignment;
        const uint64_t data_size = data_start <= size ? size - data_start : 0;
        if (n_tensors > 0 && data_start > size)
            st = lora_set_error(err, LORA_ERR_FORMAT, "GGUF: the tensor data is missing");
        for (size_t i = 0; i < f->n && st == LORA_OK; i++) {
            if (spans[i].end > data_size) {
                st = lora_set_error(err, LORA_ERR_FORMAT,
                                    "GGUF: tensor %s ends at %llu, past the data (%llu bytes)",
                                    f->v[i].name, (unsigned long long)spans[i].end,
                                    (unsigned long long)data_size);
                break;
            }
            f->v[i].data = buf + data_start + spans[i].begin;
        }
        if (st == LORA_OK) {
            qsort(spans, f->n, sizeof *spans, cmp_tspan);
            for (size_t i = 1; i < f->n; i++)
                if (spans[i].begin < spans[i - 1].end) {
                    st = lora_set_error(err, LORA_ERR_FORMAT, "GGUF: two tensors overlap");
                    break;
                }
        }
    }
    lora_mem_free(m, spans);
    return st;
}

LORA_API int lora_load_gguf(lora_adapter **adapters, int64_t *layers, size_t capacity,
                            size_t *count, const char *path, lora_config *cfg)
{
    int st = io_check_load_args(adapters, layers, capacity, count, path, "path", cfg);
    if (st != LORA_OK)
        return st;
    char *err = cfg->err;
    const lora_mem *m = &cfg->mem;
    unsigned char *buf = NULL;
    size_t size = 0;
    st = io_read_file(m, path, GGUF_MAX_FILE, &buf, &size, err);
    if (st != LORA_OK)
        return st;
    io_header h;
    io_factors f = {0};
    char *names = NULL;
    st = parse_gguf(m, buf, size, &h, &f, &names, err);
    if (st == LORA_OK)
        st = io_build_adapters(&f, &h, cfg, adapters, layers, capacity, count);
    io_factors_free(m, &f);
    lora_mem_free(m, names);
    lora_mem_free(m, buf);
    return st;
}
