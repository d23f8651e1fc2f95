/* Helpers of the adapter-file suites (test_io*.c): paths, little-endian reads, a JSON
 * scanner, and independent readers of the written files (GGUF key-values and tensors,
 * safetensors tensors). The readers follow the formats' specifications, not src/io. */
#ifndef LORA_TEST_IO_UTIL_H
#define LORA_TEST_IO_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include <lora.h>

/* dir + "/" + file, malloc'd. */
char *path_in(const char *dir, const char *file);

uint64_t le64(const unsigned char *p);
uint32_t le32(const unsigned char *p);
float lef(const unsigned char *p);

/* In JSON text: the value after "key": (first occurrence at or after from), or NULL. */
const char *json_value(const char *from, const char *key);
/* "[a, b, ...]" into v (at most cap); returns the count. */
int json_ints(const char *p, long long *v, int cap);

/* A GGUF file walked byte by byte (scalar, string and scalar-array values). */
#define GW_MAX 64
typedef struct gw_kv {
    char key[96];
    uint32_t type, elem_type; /* elem_type: an array's */
    size_t start;   /* where the key-value begins (its key's length) */
    size_t at, len; /* the value's bytes in the file (strings: after the length; arrays:
                       the elements, after type and count) */
} gw_kv;
typedef struct gw_tensor {
    char name[64];
    uint64_t ne0, ne1, off;
    uint32_t type;
} gw_tensor;
typedef struct gw_file {
    unsigned char *b;
    size_t size, kv_end, infos_end, data_start;
    gw_kv kv[GW_MAX];
    gw_tensor t[GW_MAX];
    size_t nkv, nt;
} gw_file;
void gw_read(const char *path, gw_file *g); /* asserts the layout */
void gw_free(gw_file *g);
/* The key-value named key, or NULL. */
const gw_kv *gw_find(const gw_file *g, const char *key);
/* A string value (asserts the type) into out (NUL-terminated, truncated to n - 1). */
void gw_string(const gw_file *g, const char *key, char *out, size_t n);
/* Writes g to path without the key-values whose key starts with prefix (data moved to
 * the new aligned start). */
void gw_write_without(const gw_file *g, const char *prefix, const char *path);
/* The F32 tensor name (asserts present and F32) as malloc'd row-major floats; *rows and
 * *cols from ne = [cols, rows]. */
float *gw_tensor_f32(const gw_file *g, const char *name, int64_t *rows, int64_t *cols);

/* The F32 tensor name of a safetensors file as malloc'd floats (asserts its shape is
 * rows x cols), and the __metadata__ string of key into out ("" when absent). */
float *st_tensor_f32(const char *path, const char *name, int64_t rows, int64_t cols);
void st_metadata(const char *path, const char *key, char *out, size_t n);

#endif
