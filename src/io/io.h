/* Adapter files (PEFT safetensors + JSON, llama.cpp GGUF): the parts the formats share.
 * Files are read whole into memory and parsed with every length and offset checked
 * against the bytes actually present (overflow-safe), so a malformed, truncated or
 * hostile file yields LORA_ERR_FORMAT and never an out-of-bounds read. */
#ifndef LORA_IO_H
#define LORA_IO_H

#include <stddef.h>
#include <stdint.h>

#include "../api/internal.h"

/* Largest accepted layer index + 1 (layer indices are int64 in the API). */
#define IO_MAX_LAYER (INT64_C(1) << 31)

typedef enum io_dtype { IO_F32 = 0, IO_F16 = 1, IO_BF16 = 2, IO_F64 = 3 } io_dtype;

/* One LoRA factor found in a file: where its bytes are and its row-major shape. */
typedef struct io_factor {
    int64_t layer;
    int target;  /* PROJ_Q .. PROJ_O */
    int which;   /* LORA_A or LORA_B */
    io_dtype dtype;
    int64_t rows, cols;
    const unsigned char *data; /* rows*cols elements of dtype, little-endian, in bounds */
    const char *name;          /* for messages (points into the parser's storage) */
} io_factor;

/* A growable array of factors (through a lora_mem). */
typedef struct io_factors {
    io_factor *v;
    size_t n, cap;
} io_factors;
int io_factors_push(const lora_mem *m, io_factors *f, const io_factor *x);
void io_factors_free(const lora_mem *m, io_factors *f);

/* A growable byte buffer (through a lora_mem). Appends return 0 or LORA_ERR_NOMEM. */
typedef struct io_bytes {
    unsigned char *p;
    size_t n, cap;
} io_bytes;
int io_bytes_append(const lora_mem *m, io_bytes *b, const void *src, size_t len);
int io_bytes_zeros(const lora_mem *m, io_bytes *b, size_t len);
int io_bytes_u32(const lora_mem *m, io_bytes *b, uint32_t v);
int io_bytes_u64(const lora_mem *m, io_bytes *b, uint64_t v);
void io_bytes_free(const lora_mem *m, io_bytes *b);

/* Little-endian loads (unaligned-safe). */
uint16_t io_le16(const unsigned char *p);
uint32_t io_le32(const unsigned char *p);
uint64_t io_le64(const unsigned char *p);
/* Appends n floats as little-endian F32. */
int io_bytes_f32(const lora_mem *m, io_bytes *b, const float *x, size_t n);

/* Reads a whole regular file into *data (size + 1 bytes, NUL-terminated) through m.
 * max_size: larger files are LORA_ERR_FORMAT (what = file's role, for messages).
 * Errors: IO (open/read/not a regular file), FORMAT (too large), NOMEM. */
int io_read_file(const lora_mem *m, const char *path, size_t max_size, unsigned char **data,
                 size_t *size, char *err);
/* Writes data to path through a temporary file in the same directory and a rename, so
 * readers never see a half-written file. Errors: IO. */
int io_write_file_atomic(const char *path, const void *data, size_t size, char *err);

/* Parses a decimal layer index of [s, s+len): digits only, no leading zeros, < 2^31.
 * Returns -1 if malformed. */
int64_t io_parse_layer(const char *s, size_t len);

/* Converts n elements of dtype (little-endian) to float. */
void io_convert(io_dtype dtype, const unsigned char *src, size_t n, float *dst);
size_t io_dtype_size(io_dtype dtype);
const char *io_dtype_name(io_dtype dtype);

/* Checks an adapter set for saving: non-NULL adapters, count > 0, layers distinct in
 * [0, 2^31), same targets, rank, projection sizes, alpha and rsLoRA. The message goes
 * to adapters[0] (if any). On success *order (count indices into adapters, in
 * increasing layer order) is allocated through adapters[0]'s mem. Returns a status. */
/* Checks the arguments every lora_load_* shares (message into cfg); sets *count = 0.
 * what: "path" or "dir", the name of the file argument. */
int io_check_load_args(lora_adapter **adapters, int64_t *layers, size_t capacity,
                       size_t *count, const char *file, const char *what, lora_config *cfg);
/* s is names[t] followed exactly by suffix_a or suffix_b: sets *target = t and
 * *which = LORA_A / LORA_B and returns 1; else 0. */
int io_match_factor(const char *s, const char *const names[PROJ_COUNT], const char *suffix_a,
                    const char *suffix_b, int *target, int *which);
int io_check_set(lora_adapter *const *adapters, const int64_t *layers, size_t count,
                 size_t **order);
/* The exact LoRA scale of an adapter (alpha/r or alpha/sqrt(r)) and its parts. */
double io_adapter_alpha(const lora_adapter *ad);
int io_adapter_rslora(const lora_adapter *ad);

/* What the file says beyond the tensors. rank 0: take it from the tensors. */
typedef struct io_header {
    int64_t rank;
    double alpha;     /* NAN: alpha = rank (GGUF's "alpha 0 or missing") */
    int rslora;
    int allowed_targets; /* bitmask of lora_target the file declares; 0 = any */
} io_header;

/* Groups the factors by layer, checks them (every layer has A and B of the same
 * targets, one rank, no duplicates), checks their sizes against cfg's layer, and
 * creates the adapters (see lora_load_peft in lora.h for adapters/capacity/count).
 * Messages go to cfg. */
int io_build_adapters(io_factors *f, const io_header *h, lora_config *cfg,
                      lora_adapter **adapters, int64_t *layers, size_t capacity,
                      size_t *count);

/* Names used in messages. */

#endif
