/* Adapter file formats (PEFT safetensors + JSON, llama.cpp GGUF): format code only.
 * A reader turns a file into a list of records (layer, target, factor, shape, where the
 * data is) and a small metadata struct; a writer turns records and metadata into a
 * file. Building adapters from records and checking an adapter set is the API layer's
 * job (src/api/adapter_files.c): nothing here knows a handle.
 * Every length and offset a reader meets is checked against the bytes actually present
 * (overflow-safe), so a malformed, truncated or hostile file yields LORA_ERR_FORMAT and
 * never an out-of-bounds read. */
#ifndef LORA_IO_H
#define LORA_IO_H

#include <stddef.h>
#include <stdint.h>

#include "../../include/lora.h" /* status codes, LORA_A / LORA_B, LORA_TARGET_* */

/* Messages are written into buffers of this size (the handles' error buffers). */
#define IO_ERRMSG_SIZE 256
/* Writes a printf-style message into err and returns status. */
int io_error(char *err, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Where io's memory comes from (the caller's allocator). alloc returns NULL on failure. */
typedef struct io_alloc {
    void *(*alloc)(void *ctx, size_t size);
    void (*free)(void *ctx, void *ptr);
    void *ctx;
} io_alloc;
void *io_malloc(const io_alloc *a, size_t size);
void *io_calloc(const io_alloc *a, size_t count, size_t size); /* NULL on overflow too */
void io_free(const io_alloc *a, void *ptr);                     /* ptr may be NULL */

/* A growable byte buffer. Appends return LORA_OK or LORA_ERR_NOMEM. */
typedef struct io_bytes {
    unsigned char *p;
    size_t n, cap;
} io_bytes;
int io_bytes_append(const io_alloc *a, io_bytes *b, const void *src, size_t len);
int io_bytes_zeros(const io_alloc *a, io_bytes *b, size_t len);
int io_bytes_u32(const io_alloc *a, io_bytes *b, uint32_t v);
int io_bytes_u64(const io_alloc *a, io_bytes *b, uint64_t v);
int io_bytes_f32(const io_alloc *a, io_bytes *b, const float *x, size_t n); /* LE F32 */
void io_bytes_free(const io_alloc *a, io_bytes *b);

/* Targets, in file order; bit t of a target mask is target t (= LORA_TARGET_* bits). */
enum { IO_Q = 0, IO_K = 1, IO_V = 2, IO_O = 3, IO_TARGETS = 4 };

/* Largest accepted layer index + 1 (layer indices are int64 in the API). */
#define IO_MAX_LAYER (INT64_C(1) << 31)

typedef enum io_dtype { IO_F32 = 0, IO_F16 = 1, IO_BF16 = 2, IO_F64 = 3 } io_dtype;
size_t io_dtype_size(io_dtype dtype);

/* One LoRA factor of a file. */
typedef struct io_record {
    int64_t layer;
    int target;          /* IO_Q .. IO_O */
    int which;           /* LORA_A (rank, in) or LORA_B (out, rank) */
    int64_t rows, cols;  /* row-major shape */
    io_dtype dtype;      /* read: the file's element type (a writer writes F32) */
    uint64_t offset;     /* read: where the rows*cols elements start in the file */
    const float *values; /* write: rows*cols floats */
    const char *name;    /* read: the tensor's name, printable, for messages */
} io_record;

/* A growable array of records (through an io_alloc). push: LORA_OK or LORA_ERR_NOMEM. */
typedef struct io_records {
    io_record *v;
    size_t n, cap;
} io_records;
int io_records_push(const io_alloc *a, io_records *r, const io_record *x);
void io_records_free(const io_alloc *a, io_records *r);

/* The adapter geometry a file records (keys "liblora.<name>": GGUF key-values, the
 * safetensors __metadata__), field i standing for the config parameter
 * io_geom_params[i]. Integers, 0/1 flags and lora_rope values are held as doubles. */
enum { IO_GEOM_COUNT = 9 };
typedef enum io_geom_kind { IO_GEOM_INT, IO_GEOM_FLAG, IO_GEOM_ROPE, IO_GEOM_REAL } io_geom_kind;
extern const int io_geom_params[IO_GEOM_COUNT]; /* LORA_CFG_D_MODEL, ... */
const char *io_geom_key(int i);                 /* "liblora.d_model", ... */
io_geom_kind io_geom_kind_of(int i);
const char *io_rope_name(int rope);             /* "none", "half", "interleaved"; NULL else */
int io_rope_of_name(const char *s, size_t len); /* the lora_rope value, -1 for none */
typedef struct io_geometry {
    unsigned present; /* bit i: field i is recorded */
    double value[IO_GEOM_COUNT];
} io_geometry;

/* What a file says beyond the tensors. */
typedef struct io_meta {
    int64_t rank;        /* 0: take it from the tensors */
    double alpha;        /* NAN: alpha = rank (GGUF's "alpha 0 or missing") */
    int rslora;
    int targets; /* write: the mask of adapted targets (a reader leaves it 0) */
    const char *base_model; /* write: base_model_name_or_path, or NULL */
    io_geometry geom;       /* write: what to record; read: what the file records */
    int qk_rows; /* the order of the Q/K factor rows in the file: LORA_ROPE_HALF (Hugging
                    Face) or LORA_ROPE_INTERLEAVED (GGUF of a NORM-RoPE architecture) */
    /* RoPE's inverse frequencies when they are not THETA's (lora_adapter_set_rope_freqs),
     * recorded as "liblora.rope_freqs"; NULL none. write: the caller's table; read: owned
     * by the source (io_source_free), each value finite and >= 0. */
    double *rope_freqs;
    size_t n_rope_freqs;
} io_meta;

/* Most RoPE frequencies a file may record (ROPE_DIM/2; a longer table is FORMAT). */
#define IO_MAX_ROPE_FREQS 8192
#define IO_ROPE_FREQS_KEY "liblora.rope_freqs"

/* The factors of n_layers layers adapting the targets in mask, in file order: layer by
 * layer (position 0, 1, ...), targets Q, K, V, O, A before B. Start from a zeroed
 * io_walk; each call moves to the next factor and returns 1, or returns 0 at the end. */
typedef struct io_walk {
    size_t layer;
    int target, which, started;
} io_walk;
int io_walk_next(io_walk *w, size_t n_layers, int mask);

/* An opened, parsed adapter file: its metadata, its records and what they point into.
 * Only the header is read when a file is opened; io_source_values then reads one
 * record's elements (and nothing else) as floats (dst: rows*cols floats); it fails (IO)
 * only if the file changed underneath. io_source_init starts a source, io_source_free
 * releases everything (and re-initialises it). */
typedef struct io_source {
    io_alloc alloc;
    io_meta meta;
    io_records rec;
    int fd;         /* the open file, -1 none */
    io_bytes names; /* storage behind the records' names (GGUF) */
    void *json;     /* a parse tree the names point into (safetensors) */
} io_source;
void io_source_init(io_source *s, const io_alloc *a);
int io_source_values(const io_source *s, const io_record *r, float *dst, char *err);
void io_source_free(io_source *s);

/* ---- the formats (gguf.c, peft.c) ---- */

/* Readers: io_source_init(s) and fill it; free it with io_source_free, also on failure.
 * Errors: IO (open/read/not a regular file), FORMAT, UNSUPPORTED, NOMEM. */
int io_gguf_read(const io_alloc *a, const char *path, io_source *s, char *err);
int io_peft_read(const io_alloc *a, const char *dir, io_source *s, char *err);

/* The Q/K row order of a GGUF of architecture arch (NULL = "llama"): LORA_ROPE_INTERLEAVED
 * for the architectures llama.cpp runs with its NORM RoPE, else LORA_ROPE_HALF. A PEFT
 * file is always LORA_ROPE_HALF. */
int io_gguf_qk_rows(const char *arch);

/* Writers: records r[0..n) in file order (io_walk), F32, their Q/K rows in the order
 * meta->qk_rows says (recorded in GGUF). architecture: the GGUF general.architecture
 * ([a-z0-9_-]+; INVALID_ARG else). The rsLoRA flag of meta is written to PEFT as is and
 * folded into GGUF's alpha (alpha·√r, same scale). meta->geom and meta->base_model are
 * recorded. Errors: INVALID_ARG, UNSUPPORTED (GGUF alpha 0 or not a float), IO, NOMEM. */
int io_gguf_write(const io_alloc *a, const char *path, const io_meta *meta,
                  const char *architecture, const io_record *r, size_t n, char *err);
int io_peft_write(const io_alloc *a, const char *dir, const io_meta *meta,
                  const io_record *r, size_t n, char *err);

/* ---- shared by the formats (io.c) ---- */


/* Little-endian loads (unaligned-safe). */
uint16_t io_le16(const unsigned char *p);
uint32_t io_le32(const unsigned char *p);
uint64_t io_le64(const unsigned char *p);

/* Opens a regular file for reading (a FIFO, device, directory or socket is refused
 * without blocking): *fd and its *size. Errors: IO. */
int io_open_regular(const char *path, int *fd, uint64_t *size, char *err);
/* Reads exactly n bytes at offset (what: the file or tensor, for messages). Errors: IO. */
int io_pread(int fd, void *buf, size_t n, uint64_t offset, const char *what, char *err);
/* Reads a whole regular file into *data (size + 1 bytes, NUL-terminated).
 * max_size: larger files are LORA_ERR_FORMAT.
 * Errors: IO (open/read/not a regular file), FORMAT (too large), NOMEM. */
int io_read_file(const io_alloc *a, const char *path, size_t max_size, unsigned char **data,
                 size_t *size, char *err);
/* Saving a file: io_stage writes data to a new temporary file beside the file path
 * names (through symlinks: a save writes to the file a link leads to, the link stays)
 * with the replaced file's permission bits (new files: 0666 less the umask), and
 * fsyncs it; io_commit renames it into place and fsyncs the directory; io_discard
 * removes a staged temporary. Several files can be staged before any is committed.
 * Errors: IO (the message names the file and the reason, e.g. no space). */
#define IO_PATH_MAX 4096
typedef struct io_staged {
    char target[IO_PATH_MAX], tmp[IO_PATH_MAX];
    int staged;
} io_staged;
int io_stage(const char *path, const void *data, size_t size, io_staged *f, char *err);
int io_commit(io_staged *f, char *err);
void io_discard(io_staged *f);
/* io_stage + io_commit. */
int io_write_file_atomic(const char *path, const void *data, size_t size, char *err);
/* fsync of a directory (0, or -1 with errno). */
int io_fsync_dir(const char *dir);

/* JSON text[0..len) parsed to root (a cJSON tree) holds no "\u0000" escape and no
 * object with a key twice (json.c). what: the file, for messages. Errors: FORMAT, NOMEM. */
int io_json_strict(const io_alloc *a, const char *text, size_t len, const void *root,
                   const char *what, char *err);

/* Parses a decimal layer index of [s, s+len): digits only, no leading zeros, < 2^31.
 * Returns -1 if malformed. */
int64_t io_parse_layer(const char *s, size_t len);
/* s is names[t] followed exactly by suffix_a or suffix_b: sets *target = t and
 * *which = LORA_A / LORA_B and returns 1; else 0. */
int io_match_factor(const char *s, const char *const names[IO_TARGETS], const char *suffix_a,
                    const char *suffix_b, int *target, int *which);

#endif
