/* safetensors (Hugging Face): an 8-byte little-endian header length N, N bytes of JSON
 * ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}),
 * then the raw little-endian tensor data; offsets are relative to the data start. */
#ifndef LORA_IO_SAFETENSORS_H
#define LORA_IO_SAFETENSORS_H

#include "io.h"

#define ST_MAX_DIMS 8
#define ST_MAX_HEADER (100u << 20) /* as the reference implementation */

typedef struct st_tensor {
    const char *name;  /* owned by the parsed JSON */
    const char *dtype; /* "F32", "F16", ... (every safetensors dtype is accepted here) */
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    uint64_t offset; /* of the data, relative to the data start; nbytes in bounds */
    size_t nbytes;
} st_tensor;

typedef struct st_file {
    void *json; /* cJSON root, kept while names are in use */
    st_tensor *t;
    size_t n;
    uint64_t data_start; /* file offset of the data: 8 + the header length */
    const void *metadata; /* the __metadata__ object (cJSON, inside json) or NULL */
} st_file;

/* Reads the header of the safetensors file fd (size bytes) and checks it against the
 * size: header length, JSON, dtypes, shapes, element counts against data_offsets,
 * offsets within the data, no two tensors overlapping, no bytes after the last one.
 * The tensor data is not read. Errors: FORMAT, IO, NOMEM (message in err). */
int st_parse(const io_alloc *a, int fd, uint64_t size, st_file *out, char *err);
void st_free(const io_alloc *a, st_file *f);

/* One F32 matrix to write. */
typedef struct st_entry {
    const char *name; /* ASCII without '"' or '\\' */
    int64_t rows, cols;
    const float *data;
} st_entry;

/* Serialises entries (in the given order) with __metadata__ {"format": "pt"} and the
 * n_meta pairs meta[2i] = meta[2i+1] (strings, ASCII without '"' or '\\'); the header
 * is space-padded so the data starts 8-byte aligned. Errors: NOMEM. */
int st_write(const io_alloc *a, const st_entry *e, size_t n, const char *const *meta,
             size_t n_meta, io_bytes *out);

#endif
