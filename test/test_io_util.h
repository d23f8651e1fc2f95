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

/* ---- writers of crafted files (hostile headers, names, sparse data) ---------------- */

/* A growable byte buffer (start from {0}; b and n may be read and bytes patched). */
typedef struct tw_buf {
    unsigned char *b;
    size_t n, cap;
} tw_buf;
void tw_put(tw_buf *t, const void *src, size_t n);
void tw_le(tw_buf *t, uint64_t v, int bytes); /* little-endian, `bytes` low bytes of v */
void tw_u8(tw_buf *t, unsigned v);
void tw_u32(tw_buf *t, uint32_t v);
void tw_u64(tw_buf *t, uint64_t v);
void tw_zeros(tw_buf *t, size_t n);
void tw_align(tw_buf *t, size_t a); /* zeros up to a multiple of a */
void tw_free(tw_buf *t);
void tw_write(const tw_buf *t, const char *path); /* replaces the file */

/* GGUF pieces. tw_gguf_header restarts t: magic, version, tensor and key-value counts. */
void tw_gguf_header(tw_buf *t, uint32_t version, uint64_t n_tensors, uint64_t n_kv);
void tw_gguf_str(tw_buf *t, const char *s, size_t n); /* u64 length + bytes */
void tw_gguf_kv_str(tw_buf *t, const char *key, const char *value);
void tw_gguf_kv_f32(tw_buf *t, const char *key, float value);
/* A 2-D tensor info; name of name_len bytes (may hold a NUL). */
void tw_gguf_info(tw_buf *t, const char *name, size_t name_len, uint64_t ne0, uint64_t ne1,
                  uint32_t type, uint64_t offset);

/* A safetensors header: the u64 length (len_override >= 0: that value instead), the JSON,
 * spaces up to a multiple of 8 when pad8. The data follows (tw_put / tw_zeros). */
void tw_st_header(tw_buf *t, const char *json, int pad8, int64_t len_override);
/* A PEFT directory: adapter_config.json = config (when not NULL) and
 * adapter_model.safetensors = weights (when not NULL), each replacing the old file. */
void tw_write_peft(const char *dir, const char *config, const tw_buf *weights);

#endif
