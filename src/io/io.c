/* Shared parts of the adapter-file formats: memory and messages, byte buffers,
 * little-endian access, dtype conversion, whole-file reads, atomic writes, file order. */
#include "io.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>


/* ---- messages and memory ------------------------------------------------------------ */

int io_error(char *err, int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, IO_ERRMSG_SIZE, fmt, ap);
    va_end(ap);
    return status;
}

void *io_malloc(const io_alloc *a, size_t size) { return a->alloc(a->ctx, size); }

void *io_calloc(const io_alloc *a, size_t count, size_t size)
{
    size_t bytes;
    if (__builtin_mul_overflow(count, size, &bytes))
        return NULL;
    void *p = a->alloc(a->ctx, bytes);
    if (p)
        memset(p, 0, bytes);
    return p;
}

void io_free(const io_alloc *a, void *ptr)
{
    if (ptr)
        a->free(a->ctx, ptr);
}

/* ---- growable arrays ------------------------------------------------------------- */

static int grow(const io_alloc *a, void **p, size_t *cap, size_t need, size_t elem)
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
    void *q = io_malloc(a, bytes);
    if (!q)
        return LORA_ERR_NOMEM;
    if (*p) {
        memcpy(q, *p, *cap * elem);
        io_free(a, *p);
    }
    *p = q;
    *cap = ncap;
    return LORA_OK;
}

int io_records_push(const io_alloc *a, io_records *r, const io_record *x)
{
    if (grow(a, (void **)&r->v, &r->cap, r->n + 1, sizeof *r->v) != LORA_OK)
        return LORA_ERR_NOMEM;
    r->v[r->n++] = *x;
    return LORA_OK;
}

void io_records_free(const io_alloc *a, io_records *r)
{
    io_free(a, r->v);
    memset(r, 0, sizeof *r);
}

int io_bytes_append(const io_alloc *a, io_bytes *b, const void *src, size_t len)
{
    size_t need;
    if (__builtin_add_overflow(b->n, len, &need) ||
        grow(a, (void **)&b->p, &b->cap, need, 1) != LORA_OK)
        return LORA_ERR_NOMEM;
    if (len)
        memcpy(b->p + b->n, src, len);
    b->n = need;
    return LORA_OK;
}

int io_bytes_zeros(const io_alloc *a, io_bytes *b, size_t len)
{
    size_t need;
    if (__builtin_add_overflow(b->n, len, &need) ||
        grow(a, (void **)&b->p, &b->cap, need, 1) != LORA_OK)
        return LORA_ERR_NOMEM;
    if (len)
        memset(b->p + b->n, 0, len);
    b->n = need;
    return LORA_OK;
}

int io_bytes_u32(const io_alloc *a, io_bytes *b, uint32_t v)
{
    unsigned char le[4];
    for (int i = 0; i < 4; i++)
        le[i] = (unsigned char)(v >> (8 * i));
    return io_bytes_append(a, b, le, 4);
}

int io_bytes_u64(const io_alloc *a, io_bytes *b, uint64_t v)
{
    unsigned char le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (unsigned char)(v >> (8 * i));
    return io_bytes_append(a, b, le, 8);
}

int io_bytes_f32(const io_alloc *a, io_bytes *b, const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        if (io_bytes_u32(a, b, u) != LORA_OK)
            return LORA_ERR_NOMEM;
    }
    return LORA_OK;
}

void io_bytes_free(const io_alloc *a, io_bytes *b)
{
    io_free(a, b->p);
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

static void to_float(io_dtype dtype, const unsigned char *src, size_t n, float *dst)
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

int io_open_regular(const char *path, int *fd, uint64_t *size, char *err)
{
    *fd = -1;
    *size = 0;
    /* O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below. */
    const int f = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (f < 0)
        return io_error(err, LORA_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(f, &st) != 0) {
        const int e = errno;
        close(f);
        return io_error(err, LORA_ERR_IO, "cannot stat %s: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode) || st.st_size < 0) {
        close(f);
        return io_error(err, LORA_ERR_IO, "%s is not a regular file (%s)", path,
                        S_ISDIR(st.st_mode)    ? "a directory"
                        : S_ISFIFO(st.st_mode) ? "a FIFO"
                        : S_ISSOCK(st.st_mode) ? "a socket"
                                               : "a device");
    }
    *fd = f;
    *size = (uint64_t)st.st_size;
    return LORA_OK;
}

int io_pread(int fd, void *buf, size_t n, uint64_t offset, const char *what, char *err)
{
    unsigned char *p = buf;
    size_t got = 0;
    while (got < n) {
        const ssize_t r = pread(fd, p + got, n - got, (off_t)(offset + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return io_error(err, LORA_ERR_IO, "cannot read %zu bytes of %s at offset %llu: %s",
                            n, what, (unsigned long long)offset,
                            r < 0 ? strerror(errno) : "the file shrank while reading");
        got += (size_t)r;
    }
    return LORA_OK;
}

int io_read_file(const io_alloc *a, const char *path, size_t max_size, unsigned char **data,
                 size_t *size, char *err)
{
    *data = NULL;
    *size = 0;
    int fd;
    uint64_t fsize;
    int st = io_open_regular(path, &fd, &fsize, err);
    if (st != LORA_OK)
        return st;
    if (fsize > (uint64_t)max_size) {
        close(fd);
        return io_error(err, LORA_ERR_FORMAT, "%s is too large (%llu bytes, limit %zu)", path,
                        (unsigned long long)fsize, max_size);
    }
    const size_t n = (size_t)fsize;
    unsigned char *buf = io_malloc(a, n + 1);
    if (!buf)
        st = io_error(err, LORA_ERR_NOMEM, "cannot allocate %zu bytes for %s", n + 1, path);
    else
        st = io_pread(fd, buf, n, 0, path, err);
    close(fd);
    if (st != LORA_OK) {
        io_free(a, buf);
        return st;
    }
    buf[n] = '\0';
    *data = buf;
    *size = n;
    return LORA_OK;
}

/* The directory part of path into out (IO_PATH_MAX bytes): "." when there is none. */
static void dir_of(const char *path, char *out)
{
    const char *slash = strrchr(path, '/');
    if (!slash) {
        strcpy(out, ".");
        return;
    }
    const size_t n = slash == path ? 1 : (size_t)(slash - path);
    memcpy(out, path, n);
    out[n] = '\0';
}

int io_fsync_dir(const char *dir)
{
    const int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    const int r = fsync(fd);
    close(fd);
    return r;
}

/* The file a save to path replaces: path itself, or the file a symlink (chain) points
 * to, so a save writes through links. *mode: the existing file's permission bits, or -1
 * for a new file. */
static int resolve_target(const char *path, char *target, int *mode, char *err)
{
    *mode = -1;
    struct stat st;
    if (strlen(path) >= IO_PATH_MAX - 16)
        return io_error(err, LORA_ERR_IO, "path too long: %.200s", path);
    if (lstat(path, &st) != 0) {
        if (errno != ENOENT)
            return io_error(err, LORA_ERR_IO, "cannot stat %s: %s", path, strerror(errno));
        strcpy(target, path);
        return LORA_OK;
    }
    strcpy(target, path);
    for (int hops = 0; S_ISLNK(st.st_mode); hops++) {
        char link[IO_PATH_MAX], dir[IO_PATH_MAX];
        const ssize_t n = readlink(target, link, sizeof link - 1);
        if (hops >= 40 || n < 0 || (size_t)n >= sizeof link - 1)
            return io_error(err, LORA_ERR_IO, "cannot follow the symlink %s: %s", target,
                            hops >= 40 ? strerror(ELOOP) : n < 0 ? strerror(errno)
                                                                 : strerror(ENAMETOOLONG));
        link[n] = '\0';
        dir_of(target, dir);
        const int len = link[0] == '/' ? snprintf(target, IO_PATH_MAX, "%s", link)
                                       : snprintf(target, IO_PATH_MAX, "%s/%s", dir, link);
        if (len < 0 || len >= IO_PATH_MAX - 16)
            return io_error(err, LORA_ERR_IO, "path too long: %.200s", link);
        if (lstat(target, &st) != 0)
            return io_error(err, LORA_ERR_IO, "the symlink %s leads to %s: %s", path, target,
                            strerror(errno));
    }
    if (!S_ISREG(st.st_mode))
        return io_error(err, LORA_ERR_IO, "%s exists and is not a regular file", path);
    *mode = (int)(st.st_mode & 07777);
    return LORA_OK;
}

/* Creates a new temporary file beside target, named .<name>.<6 random characters>
 * (O_EXCL, retried on a collision), with mode (or 0666 less the umask when -1). */
static int create_temp(const char *target, int mode, char *tmp, char *err)
{
    static const char digits[] = "abcdefghijklmnopqrstuvwxyz0123456789";
    char dir[IO_PATH_MAX];
    dir_of(target, dir);
    const char *slash = strrchr(target, '/');
    const char *name = slash ? slash + 1 : target;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    uint64_t seed = (uint64_t)now.tv_nsec ^ ((uint64_t)now.tv_sec << 30) ^
                    ((uint64_t)getpid() << 17) ^ (uint64_t)(uintptr_t)tmp;
    for (int attempt = 0; attempt < 100; attempt++) {
        char suffix[7];
        for (int i = 0; i < 6; i++) {
            seed = seed * UINT64_C(6364136223846793005) + UINT64_C(1442695040888963407);
            suffix[i] = digits[(seed >> 33) % 36];
        }
        suffix[6] = '\0';
        const int len = snprintf(tmp, IO_PATH_MAX, "%s/.%s.%s", dir, name, suffix);
        if (len < 0 || len >= IO_PATH_MAX)
            return -io_error(err, LORA_ERR_IO, "path too long: %.200s", target);
        const int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW,
                            mode < 0 ? 0666 : (mode_t)mode);
        if (fd >= 0) {
            if (mode >= 0 && fchmod(fd, (mode_t)mode) != 0) { /* the umask may have cut it */
                const int e = errno;
                close(fd);
                unlink(tmp);
                return -io_error(err, LORA_ERR_IO, "cannot set the mode of %s: %s", tmp,
                                 strerror(e));
            }
            return fd;
        }
        if (errno != EEXIST)
            break;
    }
    return -io_error(err, LORA_ERR_IO, "cannot create a temporary file beside %s: %s", target,
                     strerror(errno));
}

static int write_all(int fd, const void *data, size_t size)
{
    const unsigned char *p = data;
    for (size_t done = 0; done < size;) {
        const ssize_t w = write(fd, p + done, size - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return w < 0 ? errno : EIO;
        done += (size_t)w;
    }
    return 0;
}

int io_stage(const char *path, const void *data, size_t size, io_staged *f, char *err)
{
    f->staged = 0;
    int mode;
    int st = resolve_target(path, f->target, &mode, err);
    if (st != LORA_OK)
        return st;
    const int fd = create_temp(f->target, mode, f->tmp, err);
    if (fd < 0)
        return -fd;
    int e = write_all(fd, data, size);
    if (!e && fsync(fd) != 0)
        e = errno;
    if (close(fd) != 0 && !e)
        e = errno;
    if (e) {
        unlink(f->tmp);
        return io_error(err, LORA_ERR_IO, "cannot write %s: %s", f->target, strerror(e));
    }
    f->staged = 1;
    return LORA_OK;
}

int io_commit(io_staged *f, char *err)
{
    if (rename(f->tmp, f->target) != 0) {
        const int e = errno;
        io_discard(f);
        return io_error(err, LORA_ERR_IO, "cannot replace %s: %s", f->target, strerror(e));
    }
    f->staged = 0;
    char dir[IO_PATH_MAX];
    dir_of(f->target, dir);
    io_fsync_dir(dir); /* best effort: the file is in place either way */
    return LORA_OK;
}

void io_discard(io_staged *f)
{
    if (f->staged)
        unlink(f->tmp);
    f->staged = 0;
}

int io_write_file_atomic(const char *path, const void *data, size_t size, char *err)
{
    io_staged f;
    const int st = io_stage(path, data, size, &f, err);
    return st == LORA_OK ? io_commit(&f, err) : st;
}

int io_match_factor(const char *s, const char *const names[IO_TARGETS], const char *suffix_a,
                    const char *suffix_b, int *target, int *which)
{
    for (int t = 0; t < IO_TARGETS; t++) {
        const size_t n = strlen(names[t]);
        if (strncmp(s, names[t], n) != 0)
            continue;
        const int is_a = strcmp(s + n, suffix_a) == 0, is_b = strcmp(s + n, suffix_b) == 0;
        if (is_a || is_b) {
            *target = t;
            *which = is_a ? LORA_A : LORA_B;
            return 1;
        }
    }
    return 0;
}

/* ---- file order and sources --------------------------------------------------------- */

int io_walk_next(io_walk *w, size_t n_layers, int mask)
{
    if (!w->started) {
        *w = (io_walk){0, 0, LORA_A, 1};
    } else if (w->which == LORA_A) {
        w->which = LORA_B;
        return 1;
    } else {
        w->which = LORA_A;
        w->target++;
    }
    for (; w->layer < n_layers; w->layer++, w->target = 0) {
        while (w->target < IO_TARGETS && !((mask >> w->target) & 1))
            w->target++;
        if (w->target < IO_TARGETS)
            return 1;
    }
    return 0;
}

int io_source_values(const io_source *s, const io_record *r, float *dst, char *err)
{
    unsigned char chunk[1 << 14];
    const size_t esize = io_dtype_size(r->dtype), per = sizeof chunk / esize;
    const size_t n = (size_t)(r->rows * r->cols); /* the reader checked the span */
    for (size_t done = 0; done < n;) {
        const size_t k = n - done < per ? n - done : per;
        if (io_pread(s->fd, chunk, k * esize, r->offset + done * esize, r->name, err) != LORA_OK)
            return LORA_ERR_IO;
        to_float(r->dtype, chunk, k, dst + done);
        done += k;
    }
    return LORA_OK;
}

void io_source_init(io_source *s, const io_alloc *a)
{
    memset(s, 0, sizeof *s);
    s->alloc = *a;
    s->fd = -1;
}

void io_source_free(io_source *s)
{
    const io_alloc *a = &s->alloc;
    io_records_free(a, &s->rec);
    io_bytes_free(a, &s->names);
    io_free(a, s->meta.rope_freqs);
    if (s->json)
        cJSON_Delete(s->json);
    if (s->fd >= 0)
        close(s->fd);
    io_source_init(s, a);
}

/* ---- the recorded geometry ---------------------------------------------------------- */

const int io_geom_params[IO_GEOM_COUNT] = {
    LORA_CFG_D_MODEL, LORA_CFG_N_HEADS,    LORA_CFG_N_KV_HEADS,
    LORA_CFG_HEAD_DIM, LORA_CFG_ROPE,      LORA_CFG_ROPE_THETA,
    LORA_CFG_ROPE_DIM, LORA_CFG_CAUSAL,    LORA_CFG_OUT_PROJ};

static const struct {
    const char *key;
    io_geom_kind kind;
} geom_fields[IO_GEOM_COUNT] = {
    {"liblora.d_model", IO_GEOM_INT},     {"liblora.n_heads", IO_GEOM_INT},
    {"liblora.n_kv_heads", IO_GEOM_INT},  {"liblora.head_dim", IO_GEOM_INT},
    {"liblora.rope", IO_GEOM_ROPE},       {"liblora.rope_theta", IO_GEOM_REAL},
    {"liblora.rope_dim", IO_GEOM_INT},    {"liblora.causal", IO_GEOM_FLAG},
    {"liblora.out_proj", IO_GEOM_FLAG}};

const char *io_geom_key(int i) { return geom_fields[i].key; }
io_geom_kind io_geom_kind_of(int i) { return geom_fields[i].kind; }

static const char *const rope_names[] = {"none", "half", "interleaved"};

const char *io_rope_name(int rope)
{
    return rope >= LORA_ROPE_NONE && rope <= LORA_ROPE_INTERLEAVED ? rope_names[rope] : NULL;
}

int io_rope_of_name(const char *s, size_t len)
{
    for (int i = LORA_ROPE_NONE; i <= LORA_ROPE_INTERLEAVED; i++)
        if (strlen(rope_names[i]) == len && memcmp(s, rope_names[i], len) == 0)
            return i;
    return -1;
}
