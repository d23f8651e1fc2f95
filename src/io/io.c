/* Shared parts of the adapter-file formats: byte buffers, little-endian access, dtype
 * conversion, whole-file reads, atomic writes, and turning the LoRA factors found in a
 * file into adapters. */
#include "io.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>


/* ---- growable arrays ------------------------------------------------------------- */

static int grow(const lora_mem *m, void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return LORA_OK;
    size_t ncap = *cap ? *cap : 16;
    while (ncap < need) {
        if (ncap > SIZE_MAX / 2)
            return LORA_ERR_NOMEM;
        ncap *= 2;
    }
    size_t bytes;
    if (__builtin_mul_overflow(ncap, elem, &bytes))
        return LORA_ERR_NOMEM;
    void *q = lora_mem_alloc(m, bytes);
    if (!q)
        return LORA_ERR_NOMEM;
    if (*p) {
        memcpy(q, *p, *cap * elem);
        lora_mem_free(m, *p);
    }
    *p = q;
    *cap = ncap;
    return LORA_OK;
}

int io_factors_push(const lora_mem *m, io_factors *f, const io_factor *x)
{
    if (grow(m, (void **)&f->v, &f->cap, f->n + 1, sizeof *f->v) != LORA_OK)
        return LORA_ERR_NOMEM;
    f->v[f->n++] = *x;
    return LORA_OK;
}

void io_factors_free(const lora_mem *m, io_factors *f)
{
    lora_mem_free(m, f->v);
    memset(f, 0, sizeof *f);
}

int io_bytes_append(const lora_mem *m, io_bytes *b, const void *src, size_t len)
{
    size_t need;
    if (__builtin_add_overflow(b->n, len, &need) ||
        grow(m, (void **)&b->p, &b->cap, need, 1) != LORA_OK)
        return LORA_ERR_NOMEM;
    if (len)
        memcpy(b->p + b->n, src, len);
    b->n = need;
    return LORA_OK;
}

int io_bytes_zeros(const lora_mem *m, io_bytes *b, size_t len)
{
    size_t need;
    if (__builtin_add_overflow(b->n, len, &need) ||
        grow(m, (void **)&b->p, &b->cap, need, 1) != LORA_OK)
        return LORA_ERR_NOMEM;
    memset(b->p + b->n, 0, len);
    b->n = need;
    return LORA_OK;
}

int io_bytes_u32(const lora_mem *m, io_bytes *b, uint32_t v)
{
    unsigned char le[4];
    for (int i = 0; i < 4; i++)
        le[i] = (unsigned char)(v >> (8 * i));
    return io_bytes_append(m, b, le, 4);
}

int io_bytes_u64(const lora_mem *m, io_bytes *b, uint64_t v)
{
    unsigned char le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (unsigned char)(v >> (8 * i));
    return io_bytes_append(m, b, le, 8);
}

int io_bytes_f32(const lora_mem *m, io_bytes *b, const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        if (io_bytes_u32(m, b, u) != LORA_OK)
            return LORA_ERR_NOMEM;
    }
    return LORA_OK;
}

void io_bytes_free(const lora_mem *m, io_bytes *b)
{
    lora_mem_free(m, b->p);
    memset(b, 0, sizeof *b);
}

/* ---- little-endian loads and dtype conversion ------------------------------------ */

uint16_t io_le16(const unsigned char *p) { return (uint16_t)(p[0] | (unsigned)p[1] << 8); }

uint32_t io_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

uint64_t io_le64(const unsigned char *p)
{
    return (uint64_t)io_le32(p) | (uint64_t)io_le32(p + 4) << 32;
}

static float half_to_float(uint16_t h)
{
    const unsigned exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    float f;
    if (exp == 0)
        f = ldexpf((float)mant, -24); /* zero and subnormals */
    else if (exp == 31)
        f = mant ? NAN : INFINITY;
    else
        f = ldexpf((float)(mant | 0x400u), (int)exp - 25);
    return (h & 0x8000u) ? -f : f;
}

size_t io_dtype_size(io_dtype dtype)
{
    switch (dtype) {
    case IO_F32: return 4;
    case IO_F64: return 8;
    default: return 2;
    }
}

const char *io_dtype_name(io_dtype dtype)
{
    switch (dtype) {
    case IO_F32: return "F32";
    case IO_F16: return "F16";
    case IO_BF16: return "BF16";
    default: return "F64";
    }
}

void io_convert(io_dtype dtype, const unsigned char *src, size_t n, float *dst)
{
    for (size_t i = 0; i < n; i++) {
        switch (dtype) {
        case IO_F32: {
            const uint32_t u = io_le32(src + 4 * i);
            memcpy(&dst[i], &u, 4);
            break;
        }
        case IO_F16: dst[i] = half_to_float(io_le16(src + 2 * i)); break;
        case IO_BF16: {
            const uint32_t u = (uint32_t)io_le16(src + 2 * i) << 16;
            memcpy(&dst[i], &u, 4);
            break;
        }
        default: {
            const uint64_t u = io_le64(src + 8 * i);
            double d;
            memcpy(&d, &u, 8);
            dst[i] = (float)d;
            break;
        }
        }
    }
}

int64_t io_parse_layer(const char *s, size_t len)
{
    if (len == 0 || len > 10 || (len > 1 && s[0] == '0'))
        return -1;
    int64_t v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v < IO_MAX_LAYER ? v : -1;
}

/* ---- files ------------------------------------------------------------------------- */

int io_read_file(const lora_mem *m, const char *path, size_t max_size, unsigned char **data,
                 size_t *size, char *err)
{
    *data = NULL;
    *size = 0;
    const int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return lora_set_error(err, LORA_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        const int e = errno;
        close(fd);
        return lora_set_error(err, LORA_ERR_IO, "cannot stat %s: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return lora_set_error(err, LORA_ERR_IO, "%s is not a regular file", path);
    }
    if (st.st_size < 0 || (uint64_t)st.st_size > (uint64_t)max_size) {
        close(fd);
        return lora_set_error(err, LORA_ERR_FORMAT, "%s is too large (%lld bytes, limit %zu)",
                              path, (long long)st.st_size, max_size);
    }
    const size_t n = (size_t)st.st_size;
    unsigned char *buf = lora_mem_alloc(m, n + 1);
    if (!buf) {
        close(fd);
        return lora_set_error(err, LORA_ERR_NOMEM, "cannot allocate %zu bytes for %s", n + 1,
                              path);
    }
    size_t got = 0;
    while (got < n) {
        const ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            const int e = r < 0 ? errno : 0;
            close(fd);
            lora_mem_free(m, buf);
            return lora_set_error(err, LORA_ERR_IO, "cannot read %s: %s", path,
                                  e ? strerror(e) : "file shrank while reading");
        }
        got += (size_t)r;
    }
    close(fd);
    buf[n] = '\0';
    *data = buf;
    *size = n;
    return LORA_OK;
}

int io_write_file_atomic(const char *path, const void *data, size_t size, char *err)
{
    char tmp[4096 + 64];
    const int len = snprintf(tmp, sizeof tmp, "%s.tmp-%ld-%lx", path, (long)getpid(),
                             (unsigned long)(uintptr_t)data);
    if (len < 0 || (size_t)len >= sizeof tmp)
        return lora_set_error(err, LORA_ERR_IO, "path too long: %s", path);
    const int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0)
        return lora_set_error(err, LORA_ERR_IO, "cannot create %s: %s", tmp, strerror(errno));
    const unsigned char *p = data;
    size_t done = 0;
    int e = 0;
    while (done < size) {
        const ssize_t w = write(fd, p + done, size - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            e = w < 0 ? errno : EIO;
            break;
        }
        done += (size_t)w;
    }
    if (!e && fsync(fd) != 0)
        e = errno;
    if (close(fd) != 0 && !e)
        e = errno;
    if (!e && rename(tmp, path) != 0)
        e = errno;
    if (e) {
        unlink(tmp);
        return lora_set_error(err, LORA_ERR_IO, "cannot write %s: %s", path, strerror(e));
    }
    return LORA_OK;
}

/* ---- adapter sets ------------------------------------------------------------------ */

double io_adapter_alpha(const lora_adapter *ad) { return ad->cfg.alpha; }
int io_adapter_rslora(const lora_adapter *ad) { return (int)ad->cfg.rslora; }

typedef struct layer_ref {
    int64_t layer;
    size_t idx;
} layer_ref;

static int cmp_layer_ref(const void *a, const void *b)
{
    const layer_ref *x = a, *y = b;
    return (x->layer > y->layer) - (x->layer < y->layer);
}

int io_check_set(lora_adapter *const *adapters, const int64_t *layers, size_t count,
                 size_t **order)
{
    *order = NULL;
    if (!adapters || !adapters[0])
        return LORA_ERR_INVALID_ARG;
    lora_adapter *a0 = adapters[0];
    if (!layers)
        return lora_set_error(a0->err, LORA_ERR_INVALID_ARG, "layers is NULL");
    if (count == 0)
        return lora_set_error(a0->err, LORA_ERR_INVALID_ARG, "count is 0");
    for (size_t i = 0; i < count; i++) {
        const lora_adapter *ad = adapters[i];
        if (!ad)
            return lora_set_error(a0->err, LORA_ERR_INVALID_ARG, "adapters[%zu] is NULL", i);
        if (layers[i] < 0 || layers[i] >= IO_MAX_LAYER)
            return lora_set_error(a0->err, LORA_ERR_INVALID_ARG,
                                  "layers[%zu] = %lld is outside [0, 2^31)", i,
                                  (long long)layers[i]);
        if (ad->layer.rank != a0->layer.rank || ad->cfg.alpha != a0->cfg.alpha ||
            ad->cfg.rslora != a0->cfg.rslora)
            return lora_set_error(a0->err, LORA_ERR_INVALID_ARG,
                                  "adapters[%zu] differs from adapters[0] in rank, alpha or "
                                  "rsLoRA (one file holds one rank and scale)",
                                  i);
        for (int t = 0; t < PROJ_COUNT; t++) {
            const layer_proj *p = &ad->layer.proj[t], *q = &a0->layer.proj[t];
            if (p->adapted != q->adapted ||
                (p->adapted && (p->in != q->in || p->out != q->out)))
                return lora_set_error(a0->err, LORA_ERR_INVALID_ARG,
                                      "adapters[%zu] differs from adapters[0] in target %s "
                                      "(adapted or shape)",
                                      i, lora_proj_names[t]);
        }
    }
    layer_ref *refs = lora_mem_calloc(&a0->mem, count, sizeof *refs);
    size_t *ord = lora_mem_calloc(&a0->mem, count, sizeof *ord);
    if (!refs || !ord) {
        lora_mem_free(&a0->mem, refs);
        lora_mem_free(&a0->mem, ord);
        return lora_set_error(a0->err, LORA_ERR_NOMEM, "cannot allocate %zu layer entries",
                              count);
    }
    for (size_t i = 0; i < count; i++)
        refs[i] = (layer_ref){layers[i], i};
    qsort(refs, count, sizeof *refs, cmp_layer_ref);
    for (size_t i = 0; i < count; i++) {
        if (i > 0 && refs[i].layer == refs[i - 1].layer) {
            const long long dup = (long long)refs[i].layer;
            lora_mem_free(&a0->mem, refs);
            lora_mem_free(&a0->mem, ord);
            return lora_set_error(a0->err, LORA_ERR_INVALID_ARG, "layer %lld appears twice",
                                  dup);
        }
        ord[i] = refs[i].idx;
    }
    lora_mem_free(&a0->mem, refs);
    *order = ord;
    return LORA_OK;
}

static int cmp_factor(const void *a, const void *b)
{
    const io_factor *x = a, *y = b;
    if (x->layer != y->layer)
        return (x->layer > y->layer) - (x->layer < y->layer);
    if (x->target != y->target)
        return x->target - y->target;
    return x->which - y->which;
}

static const int target_bits[PROJ_COUNT] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V,
                                            LORA_TARGET_O};

int io_build_adapters(io_factors *f, const io_header *h, lora_config *cfg,
                      lora_adapter **adapters, int64_t *layers, size_t capacity,
                      size_t *count)
{
    char *err = cfg->err;
    if (f->n == 0)
        return lora_set_error(err, LORA_ERR_FORMAT, "the file holds no LoRA factors");
    qsort(f->v, f->n, sizeof *f->v, cmp_factor);

    /* Layers, their targets (each with A and B, the same in every layer), one rank. */
    size_t n_layers = 0;
    int mask = -1; /* target bits of the first layer */
    int64_t rank = h->rank;
    for (size_t i = 0; i < f->n;) {
        const int64_t lay = f->v[i].layer;
        int bits = 0; /* bit 2*t + which */
        size_t j = i;
        for (; j < f->n && f->v[j].layer == lay; j++) {
            const io_factor *x = &f->v[j];
            const int bit = 1 << (2 * x->target + x->which);
            if (bits & bit)
                return lora_set_error(err, LORA_ERR_FORMAT, "tensor %s appears twice",
                                      x->name);
            bits |= bit;
            const int64_t r = x->which == LORA_A ? x->rows : x->cols;
            if (r < 1)
                return lora_set_error(err, LORA_ERR_FORMAT, "tensor %s has rank %lld",
                                      x->name, (long long)r);
            if (rank == 0)
                rank = r;
            else if (r != rank)
                return lora_set_error(err, LORA_ERR_FORMAT,
                                      "tensor %s has rank %lld, expected %lld%s", x->name,
                                      (long long)r, (long long)rank,
                                      h->rank ? " (the config's r)" : "");
        }
        int targets = 0;
        for (int t = 0; t < PROJ_COUNT; t++) {
            const int ab = (bits >> (2 * t)) & 3;
            if (ab == 1 || ab == 2)
                return lora_set_error(err, LORA_ERR_FORMAT,
                                      "layer %lld has lora_%s but not lora_%s of target %s",
                                      (long long)lay, ab == 1 ? "A" : "B",
                                      ab == 1 ? "B" : "A", lora_proj_names[t]);
            if (ab == 3)
                targets |= target_bits[t];
        }
        if (mask < 0)
            mask = targets;
        else if (targets != mask)
            return lora_set_error(err, LORA_ERR_FORMAT,
                                  "layer %lld adapts targets 0x%x, layer %lld adapts 0x%x: "
                                  "every layer must adapt the same projections",
                                  (long long)lay, (unsigned)targets,
                                  (long long)f->v[0].layer, (unsigned)mask);
        n_layers++;
        i = j;
    }
    if (h->allowed_targets && (mask & ~h->allowed_targets))
        return lora_set_error(err, LORA_ERR_FORMAT,
                              "the tensors adapt targets 0x%x, the config declares 0x%x",
                              (unsigned)mask, (unsigned)h->allowed_targets);

    /* The adapters' configuration: cfg with the file's rank, alpha, rsLoRA, targets. */
    lora_config tmp = *cfg;
    const double alpha = isnan(h->alpha) ? (double)rank : h->alpha;
    if (lora_config_set_int(&tmp, LORA_CFG_RANK, rank) != LORA_OK ||
        lora_config_set_double(&tmp, LORA_CFG_ALPHA, alpha) != LORA_OK ||
        lora_config_set_int(&tmp, LORA_CFG_RSLORA, h->rslora) != LORA_OK ||
        lora_config_set_int(&tmp, LORA_CFG_TARGETS, mask) != LORA_OK)
        return lora_set_error(err, LORA_ERR_FORMAT,
                              "the file's rank %lld, alpha %g or targets 0x%x are out of "
                              "range: %s",
                              (long long)rank, alpha, (unsigned)mask, tmp.err);
    lora_config_values v;
    int st = lora_config_resolve(&tmp.v, &v, tmp.err);
    if (st != LORA_OK)
        return lora_set_error(err, st, "the file's adapters do not fit the config: %s",
                              tmp.err);
    const int64_t q_dim = v.n_heads * v.head_dim, kv_dim = v.n_kv_heads * v.head_dim;
    const int64_t ins[PROJ_COUNT] = {v.d_model, v.d_model, v.d_model, q_dim};
    const int64_t outs[PROJ_COUNT] = {q_dim, kv_dim, kv_dim, v.d_model};
    size_t max_floats = 0;
    for (size_t i = 0; i < f->n; i++) {
        const io_factor *x = &f->v[i];
        const int64_t want_rows = x->which == LORA_A ? rank : outs[x->target];
        const int64_t want_cols = x->which == LORA_A ? ins[x->target] : rank;
        if (x->rows != want_rows || x->cols != want_cols)
            return lora_set_error(err, LORA_ERR_SHAPE,
                                  "tensor %s is (%lld, %lld); the config's layer needs "
                                  "(%lld, %lld)",
                                  x->name, (long long)x->rows, (long long)x->cols,
                                  (long long)want_rows, (long long)want_cols);
        const size_t n = (size_t)(x->rows * x->cols);
        max_floats = n > max_floats ? n : max_floats;
        /* Values too, so that the count query checks the whole file. */
        const size_t esize = io_dtype_size(x->dtype);
        for (size_t k = 0; k < n; k++) {
            float value;
            io_convert(x->dtype, x->data + k * esize, 1, &value);
            if (!isfinite(value))
                return lora_set_error(err, LORA_ERR_NONFINITE,
                                      "tensor %s has a NaN/Inf (as float) at element %zu",
                                      x->name, k);
        }
    }

    *count = n_layers;
    if (!adapters && capacity == 0) {
        err[0] = '\0';
        return LORA_OK; /* the query */
    }
    if (!adapters || !layers)
        return lora_set_error(err, LORA_ERR_INVALID_ARG, "%s is NULL",
                              adapters ? "layers" : "adapters");
    if (capacity < n_layers)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "capacity %zu is less than the file's %zu layers", capacity,
                              n_layers);
    *count = 0;
    float *buf = lora_mem_alloc(&cfg->mem, max_floats * sizeof(float));
    if (!buf)
        return lora_set_error(err, LORA_ERR_NOMEM, "cannot allocate %zu floats", max_floats);
    size_t made = 0;
    st = LORA_OK;
    for (size_t i = 0; i < f->n && st == LORA_OK;) {
        const int64_t lay = f->v[i].layer;
        lora_adapter *ad = NULL;
        st = lora_adapter_create(&ad, &tmp);
        if (st != LORA_OK) {
            lora_set_error(err, st, "cannot create the adapter of layer %lld",
                           (long long)lay);
            break;
        }
        adapters[made] = ad;
        layers[made] = lay;
        made++;
        for (; i < f->n && f->v[i].layer == lay; i++) {
            const io_factor *x = &f->v[i];
            const size_t n = (size_t)(x->rows * x->cols);
            io_convert(x->dtype, x->data, n, buf);
            st = lora_adapter_set_param(ad, target_bits[x->target], x->which, buf, n);
            if (st != LORA_OK) {
                lora_set_error(err, st, "tensor %s: %s", x->name, lora_adapter_last_error(ad));
                break;
            }
        }
    }
    lora_mem_free(&cfg->mem, buf);
    if (st != LORA_OK) {
        for (size_t i = 0; i < made; i++) {
            lora_adapter_destroy(adapters[i]);
            adapters[i] = NULL;
        }
        return st;
    }
    *count = made;
    err[0] = '\0';
    return LORA_OK;
}

int io_check_load_args(lora_adapter **adapters, int64_t *layers, size_t capacity,
                       size_t *count, const char *file, const char *what, lora_config *cfg)
{
    if (!cfg)
        return LORA_ERR_INVALID_ARG;
    if (!count)
        return lora_set_error(cfg->err, LORA_ERR_INVALID_ARG, "count is NULL");
    *count = 0;
    if (!file)
        return lora_set_error(cfg->err, LORA_ERR_INVALID_ARG, "%s is NULL", what);
    if (capacity > 0 && (!adapters || !layers))
        return lora_set_error(cfg->err, LORA_ERR_INVALID_ARG, "%s is NULL with capacity %zu",
                              !adapters ? "adapters" : "layers", capacity);
    return LORA_OK;
}

int io_match_factor(const char *s, const char *const names[PROJ_COUNT], const char *suffix_a,
                    const char *suffix_b, int *target, int *which)
{
    for (int t = 0; t < PROJ_COUNT; t++) {
        const size_t n = strlen(names[t]);
        if (strncmp(s, names[t], n) != 0)
            continue;
        const int a = strcmp(s + n, suffix_a) == 0, b = strcmp(s + n, suffix_b) == 0;
        if (a || b) {
            *target = t;
            *which = a ? LORA_A : LORA_B;
            return 1;
        }
    }
    return 0;
}
