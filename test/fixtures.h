/* Fixtures for the optimizer, merge, serving and I/O suites: small adapters with
 * random base weights and random (nonzero) LoRA factors, built only through lora.h. */
#ifndef LORA_TEST_FIXTURES_H
#define LORA_TEST_FIXTURES_H

#include <stddef.h>
#include <stdint.h>

#include <lora.h>

typedef struct fx_spec {
    int d_model, n_heads, n_kv_heads, rank, targets, out_proj, bias, rslora;
    double alpha; /* 0 = default (rank) */
    int init;     /* lora_init; factors are then overwritten unless keep_init */
    int keep_init;
} fx_spec;

/* d_model 16, 4 heads over 2 kv heads, rank 4, Q|K|V|O, out_proj, biases, alpha 8. */
fx_spec fx_default(void);

/* A config for s (THREADS 1, BACKEND EXACT). Asserts. */
lora_config *fx_config(const fx_spec *s);
/* An adapter from s without base weights; factors random (A ~ U(-1,1)/sqrt(in),
 * B ~ U(-1,1)*0.5) unless keep_init. Asserts. */
lora_adapter *fx_adapter_nobase(const fx_spec *s, uint64_t seed);
/* fx_adapter_nobase + random base weights (and biases) copied in with set_base. */
lora_adapter *fx_adapter(const fx_spec *s, uint64_t seed);
/* Random factors for every adapted target. */
void fx_randomize_factors(lora_adapter *ad, uint64_t seed, float b_gain);

/* Base weights of a spec, owned by the caller (for borrowing): w[t], bias[t] per target
 * index 0..3 (Q, K, V, O; O only with out_proj), NULL where absent. */
typedef struct fx_base {
    float *w[4], *bias[4];
    size_t nw[4], nb[4];
} fx_base;
void fx_base_make(fx_base *b, const fx_spec *s, uint64_t seed);
void fx_base_free(fx_base *b);
/* set_base (copy = 1) or set_base_borrowed (copy = 0) of every projection. */
void fx_base_apply(const fx_base *b, lora_adapter *ad, int copy);

/* Output columns (d_model with out_proj, else q_dim) and q_dim of s. */
int fx_out_cols(const fx_spec *s);

/* Every factor of ad (flat order of lora_adapter_get_params_flat); malloc'd. */
float *fx_params(const lora_adapter *ad, size_t *n);

/* Writes / reads a whole file; assert on failure. fx_read_file returns malloc'd bytes. */
void fx_write_file(const char *path, const void *data, size_t n);
unsigned char *fx_read_file(const char *path, size_t *n);
/* A fresh temporary directory (malloc'd path); fx_rmtree removes it and its files. */
char *fx_tmpdir(void);
void fx_rmtree(const char *dir);

extern const int fx_tbits[4];

#endif
