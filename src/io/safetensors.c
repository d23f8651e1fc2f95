/* safetensors reader (bounds-checked) and writer. */
#include "safetensors.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

static const struct {
    const char *name;
    size_t size;
} st_dtypes[] = {
    {"F64", 8},  {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},     {"I32", 4},
    {"I16", 2},  {"I8", 1},  {"U8", 1},  {"U16", 2},  {"U32", 4},     {"U64", 8},
    {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
};

static size_t dtype_size(const char *s)
{
    for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
        if (strcmp(s, st_dtypes[i].name) == 0)
            return st_dtypes[i].size;
    return 0;
}

/* A JSON number that is an integer in [0, 2^53]. */
static int json_uint(const cJSON *x, uint64_t *v)
{
    if (!cJSON_IsNumber(x))
        return 0;
    const double d = x->valuedouble;
    if (!(d >= 0.0 && d <= 9007199254740992.0) || floor(d) != d)
        return 0;
    *v = (uint64_t)d;
    return 1;
}

typedef struct span {
    uint64_t begin, end;
} span;

static int cmp_span(const void *a, const void *b)
{
    const span *x = a, *y = b;
    if (x->begin != y->begin)
        return (x->begin > y->begin) - (x->begin < y->begin);
    return (x->end > y->end) - (x->end < y->end);
}

void st_free(const io_alloc *a, st_file *f)
{
    if (f->json)
        cJSON_Delete(f->json);
    io_free(a, f->t);
    memset(f, 0, sizeof *f);
}

/* The header length and JSON of the file (fd, size bytes): *root is the parsed object,
 * *data_size the bytes after the header. Only the header is read. */
static int parse_header(const io_alloc *a, int fd, uint64_t size, cJSON **root,
                        uint64_t *data_size, char *err)
{
    *root = NULL;
    unsigned char first[9];
    if (size < 8)
        return io_error(err, LORA_ERR_FORMAT,
                        "safetensors: %llu bytes, too short for the header length",
                        (unsigned long long)size);
    int st = io_pread(fd, first, size < 9 ? 8 : 9, 0, "the safetensors header", err);
    if (st != LORA_OK)
        return st;
    const uint64_t hlen = io_le64(first);
    if (hlen < 2 || hlen > ST_MAX_HEADER || hlen > size - 8)
        return io_error(err, LORA_ERR_FORMAT,
                        "safetensors: header length %" PRIu64
                        " does not fit the file (%llu bytes) or the %u-byte limit",
                        hlen, (unsigned long long)size, ST_MAX_HEADER);
    *data_size = size - 8 - hlen;
    if (first[8] != '{')
        return io_error(err, LORA_ERR_FORMAT, "safetensors: header does not start with '{'");
    /* cJSON wants a terminated string. */
    char *text = io_malloc(a, (size_t)hlen + 1);
    if (!text)
        return io_error(err, LORA_ERR_NOMEM, "cannot allocate the header copy");
    st = io_pread(fd, text, (size_t)hlen, 8, "the safetensors header", err);
    if (st == LORA_OK && memchr(text, '\0', (size_t)hlen))
        st = io_error(err, LORA_ERR_FORMAT, "safetensors: NUL byte in the header");
    if (st == LORA_OK) {
        text[hlen] = '\0';
        const char *end = NULL;
        *root = cJSON_ParseWithLengthOpts(text, (size_t)hlen + 1, &end, 1);
        if (!*root)
            st = io_error(err, LORA_ERR_FORMAT, "safetensors: the header is not valid JSON");
        else if (!cJSON_IsObject(*root))
            st = io_error(err, LORA_ERR_FORMAT, "safetensors: the header is not an object");
        else
            st = io_json_strict(a, text, (size_t)hlen, *root, "safetensors header", err);
    }
    io_free(a, text);
    return st;
}

/* One tensor entry of the header into *t and *sp (offsets relative to the data). */
static int parse_entry(const cJSON *it, uint64_t data_size, st_tensor *t, span *sp, char *err)
{
    const char *name = it->string;
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(it, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(it, "shape");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(it, "data_offsets");
    if (!cJSON_IsObject(it) || !cJSON_IsString(dt) || !cJSON_IsArray(sh) ||
        !cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2)
        return io_error(err, LORA_ERR_FORMAT,
                        "safetensors: tensor '%.64s' lacks dtype, shape or a pair of "
                        "data_offsets",
                        name);
    const size_t esize = dtype_size(dt->valuestring);
    if (esize == 0)
        return io_error(err, LORA_ERR_FORMAT,
                        "safetensors: tensor '%.64s' has unknown dtype '%.16s'", name,
                        dt->valuestring);
    t->name = name;
    t->dtype = dt->valuestring;
    uint64_t numel = 1;
    int ndim = 0, ok = 1;
    for (const cJSON *d = sh->child; d && ok; d = d->next) {
        uint64_t v;
        if (ndim >= ST_MAX_DIMS || !json_uint(d, &v) || v > (uint64_t)INT64_MAX ||
            __builtin_mul_overflow(numel, v, &numel))
            ok = 0;
        else
            t->shape[ndim++] = (int64_t)v;
    }
    t->ndim = ndim;
    uint64_t nbytes, b, e;
    if (!ok || __builtin_mul_overflow(numel, (uint64_t)esize, &nbytes))
        return io_error(err, LORA_ERR_FORMAT, "safetensors: tensor '%.64s' has a bad shape",
                        name);
    if (!json_uint(off->child, &b) || !json_uint(off->child->next, &e) || b > e ||
        e > data_size || e - b != nbytes)
        return io_error(err, LORA_ERR_FORMAT,
                        "safetensors: tensor '%.64s' has data_offsets outside the data (%" PRIu64
                        " bytes) or not matching its %" PRIu64 " bytes",
                        name, data_size, nbytes);
    t->offset = b;
    t->nbytes = (size_t)nbytes;
    *sp = (span){b, e};
    return LORA_OK;
}

/* No two of the k spans overlap (sorts them), and the data ends with the last one. */
static int check_spans(span *spans, size_t k, uint64_t data_size, char *err)
{
    qsort(spans, k, sizeof *spans, cmp_span);
    uint64_t last_end = 0;
    for (size_t i = 0; i < k; i++) {
        if (i > 0 && spans[i].begin < spans[i - 1].end)
            return io_error(err, LORA_ERR_FORMAT,
                            "safetensors: two tensors overlap at byte %" PRIu64,
                            spans[i].begin);
        last_end = spans[i].end > last_end ? spans[i].end : last_end;
    }
    if (data_size > last_end)
        return io_error(err, LORA_ERR_FORMAT,
                        "safetensors: %" PRIu64 " bytes after the last tensor",
                        data_size - last_end);
    return LORA_OK;
}

/* The entries of the header object into out->t (__metadata__ is skipped). */
static int parse_entries(const cJSON *root, uint64_t data_size, st_file *out, span *spans,
                         char *err)
{
    size_t k = 0;
    for (const cJSON *it = root->child; it; it = it->next) {
        if (!it->string)
            return io_error(err, LORA_ERR_FORMAT, "safetensors: an entry has no name");
        if (strcmp(it->string, "__metadata__") == 0) {
            if (!cJSON_IsObject(it))
                return io_error(err, LORA_ERR_FORMAT,
                                "safetensors: __metadata__ is not an object");
            out->metadata = it;
            continue;
        }
        const int st = parse_entry(it, data_size, &out->t[k], &spans[k], err);
        if (st != LORA_OK)
            return st;
        k++;
    }
    out->n = k;
    return check_spans(spans, k, data_size, err);
}

int st_parse(const io_alloc *a, int fd, uint64_t size, st_file *out, char *err)
{
    memset(out, 0, sizeof *out);
    cJSON *root;
    uint64_t data_size = 0;
    int st = parse_header(a, fd, size, &root, &data_size, err);
    out->json = root;
    out->data_start = size - data_size;
    if (st != LORA_OK) {
        st_free(a, out);
        return st;
    }
    size_t n = 0;
    for (const cJSON *it = root->child; it; it = it->next)
        n++;
    out->t = io_calloc(a, n ? n : 1, sizeof *out->t);
    span *spans = io_calloc(a, n ? n : 1, sizeof *spans);
    if (!out->t || !spans)
        st = io_error(err, LORA_ERR_NOMEM, "cannot allocate %zu tensor entries", n);
    else
        st = parse_entries(root, data_size, out, spans, err);
    io_free(a, spans);
    if (st != LORA_OK)
        st_free(a, out);
    return st;
}

int st_write(const io_alloc *a, const st_entry *e, size_t n, const char *const *meta,
             size_t n_meta, io_bytes *out)
{
    io_bytes h = {0};
    const char *open = "{\"__metadata__\":{\"format\":\"pt\"";
    int st = io_bytes_append(a, &h, open, strlen(open));
    for (size_t i = 0; i < n_meta && st == LORA_OK; i++) {
        char item[256];
        const int len = snprintf(item, sizeof item, ",\"%s\":\"%s\"", meta[2 * i],
                                 meta[2 * i + 1]);
        st = len < 0 || (size_t)len >= sizeof item ? LORA_ERR_NOMEM /* ours: short */
                                                   : io_bytes_append(a, &h, item, (size_t)len);
    }
    if (st == LORA_OK)
        st = io_bytes_append(a, &h, "}", 1);
    uint64_t offset = 0;
    for (size_t i = 0; i < n && st == LORA_OK; i++) {
        const uint64_t bytes = (uint64_t)e[i].rows * (uint64_t)e[i].cols * 4u;
        char item[512];
        const int len = snprintf(item, sizeof item,
                                 ",\"%s\":{\"dtype\":\"F32\",\"shape\":[%" PRId64 ",%" PRId64
                                 "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}",
                                 e[i].name, e[i].rows, e[i].cols, offset, offset + bytes);
        if (len < 0 || (size_t)len >= sizeof item)
            st = LORA_ERR_NOMEM; /* names are ours and short: unreachable */
        else
            st = io_bytes_append(a, &h, item, (size_t)len);
        offset += bytes;
    }
    if (st == LORA_OK)
        st = io_bytes_append(a, &h, "}", 1);
    while (st == LORA_OK && h.n % 8 != 0) /* data 8-byte aligned: 8 + N = 0 mod 8 */
        st = io_bytes_append(a, &h, " ", 1);
    if (st == LORA_OK)
        st = io_bytes_u64(a, out, (uint64_t)h.n);
    if (st == LORA_OK)
        st = io_bytes_append(a, out, h.p, h.n);
    for (size_t i = 0; i < n && st == LORA_OK; i++)
        st = io_bytes_f32(a, out, e[i].data, (size_t)(e[i].rows * e[i].cols));
    io_bytes_free(a, &h);
    return st;
}
