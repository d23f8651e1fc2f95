/* A plain-loop, double-precision reference of the liblora attention layer (lora.h,
 * spec/MATH.md sections 1-2): the oracle every backend is tested against.
 *
 * Nothing here calls liblora except ref_make_adapter and ref_compare_adapter, which
 * build an adapter holding the reference's weights and compare its results.
 *
 * Shapes follow lora.h: x is (batch, L, d_model); W is (out, in); A is (rank, in);
 * B is (out, rank); the adapted weight is W + s*B*A, s = alpha/r (alpha/sqrt(r) with
 * rsLoRA). Projection index: REF_Q, REF_K, REF_V, REF_O (= log2 of the lora_target).
 */
#ifndef LORA_TEST_REFERENCE_H
#define LORA_TEST_REFERENCE_H

#include <stddef.h>
#include <stdint.h>

#include <lora.h>

enum { REF_Q = 0, REF_K = 1, REF_V = 2, REF_O = 3, REF_NPROJ = 4 };

/* A layer configuration. Fields marked "0 = default" are left unset in the library
 * config, so the library's own defaults are exercised; the reference resolves them the
 * way lora.h documents. */
typedef struct ref_config {
    int d_model;          /* > 0 */
    int n_heads;          /* 0 = default (1) */
    int n_kv_heads;       /* 0 = default (n_heads) */
    int head_dim;         /* 0 = default (d_model / n_heads) */
    int rank;             /* 0 = default (8) */
    int targets;          /* bitmask of lora_target; 0 = default (Q|V) */
    double alpha;         /* 0 = default (rank) */
    int rslora;           /* 0/1 */
    double softmax_scale; /* 0 = default (1/sqrt(head_dim)) */
    int causal;           /* 0/1 */
    int out_proj;         /* 0/1 */
    int bias;             /* 0/1: every projection gets a bias */
} ref_config;

/* A layer: resolved configuration plus weights in double. a[t], b[t] are NULL for
 * targets that are not adapted; bias[t] NULL for no bias; index REF_O is only used
 * with out_proj. */
typedef struct ref_layer {
    ref_config cfg;   /* as given (0 = default kept, for the library config) */
    int n_heads, n_kv_heads, head_dim, rank, targets; /* resolved */
    int q_dim, kv_dim;
    double lora_scale, softmax_scale; /* resolved s and beta */
    int64_t in[REF_NPROJ], out[REF_NPROJ];
    double *w[REF_NPROJ], *bias[REF_NPROJ], *a[REF_NPROJ], *b[REF_NPROJ];
} ref_layer;

/* Allocates a layer with zero weights. Returns 0 on success, -1 on a bad config or
 * allocation failure. */
int ref_layer_init(ref_layer *l, const ref_config *c);
void ref_layer_free(ref_layer *l);
int ref_is_adapted(const ref_layer *l, int proj);
int ref_has_proj(const ref_layer *l, int proj);
/* Fills every weight with float-representable random values (so the library can hold
 * exactly the same ones): W ~ U(-1,1)*w_gain/sqrt(in), bias ~ U(-0.5, 0.5),
 * A ~ U(-1,1)/sqrt(in), B ~ U(-1,1)*b_gain (nonzero, so dA is not trivially 0). */
void ref_layer_randomize(ref_layer *l, uint64_t seed, double w_gain, double b_gain);
/* Output width: d_model with out_proj, else q_dim. */
int ref_out_cols(const ref_layer *l);

/* Forward. xq (batch, len_q, d_model), xkv (batch, len_kv, d_model); for
 * self-attention pass xkv = xq and len_kv = len_q. out (batch, len_q, out_cols). */
void ref_forward(const ref_layer *l, const double *xq, const double *xkv, int64_t batch,
                 int64_t len_q, int64_t len_kv, double *out);

/* The activations of ref_forward, any of them NULL when not wanted: q (batch*len_q,
 * q_dim), k and v (batch*len_kv, kv_dim), attn (batch*len_q, q_dim) the attention output
 * before any output projection. Returns 0 or -1 (allocation). */
int ref_activations(const ref_layer *l, const double *xq, const double *xkv, int64_t batch,
                    int64_t len_q, int64_t len_kv, double *q, double *k, double *v,
                    double *attn);
/* W + s*B*A of projection proj (out, in), malloc'd (NULL on failure). */
double *ref_effective_weight(const ref_layer *l, int proj);
/* The score bound of lora_run_info / lora_threshold_report from the reference's q, k
 * (as ref_activations): max over (batch, query head) of
 * softmax_scale * max_i |q_i|_2 * max_j |k_j - mean_j k_j|_2 (key centring). */
double ref_score_bound(const ref_layer *l, const double *q, const double *k, int64_t batch,
                       int64_t len_q, int64_t len_kv);

/* Gradients of sum(out .* dout). da/db: per projection, NULL for non-adapted (or not
 * wanted), overwritten (not accumulated). dxq: (batch, len_q, d_model), gradient
 * through the query path (Q); dxkv: (batch, len_kv, d_model), through K and V. Either
 * may be NULL. For self-attention dL/dx = dxq + dxkv. */
typedef struct ref_grads {
    double *da[REF_NPROJ], *db[REF_NPROJ];
    double *dxq, *dxkv;
} ref_grads;
void ref_backward(const ref_layer *l, const double *xq, const double *xkv, int64_t batch,
                  int64_t len_q, int64_t len_kv, const double *dout, ref_grads *g);
/* Allocates/frees zeroed gradient buffers for every adapted projection and both dx. */
int ref_grads_alloc(ref_grads *g, const ref_layer *l, int64_t batch, int64_t len_q,
                    int64_t len_kv);
void ref_grads_free(ref_grads *g);

/* ---- problems: inputs and an upstream gradient ----------------------------------- */
typedef struct ref_problem {
    int cross;       /* 0: lora_forward (len_kv == len_q, xkv == xq); 1: _cross */
    int64_t batch, len_q, len_kv;
    double *xq, *xkv; /* xkv == xq when !cross */
    double *dout;     /* (batch, len_q, out_cols) */
} ref_problem;
/* Random float-representable inputs in U(-1,1) and dout in U(-1,1). len_kv is ignored
 * (set to len_q) when !cross. Returns 0 or -1. */
int ref_problem_init(ref_problem *p, const ref_layer *l, int cross, int64_t batch,
                     int64_t len_q, int64_t len_kv, uint64_t seed);
void ref_problem_free(ref_problem *p);

/* ---- comparison with the library -------------------------------------------------- */
/* Creates a config matching l (leaving 0 = default fields unset) with the given
 * LORA_CFG_BACKEND and LORA_CFG_THREADS, an adapter from it, and copies l's base
 * weights, biases and LoRA factors in (set_base, set_param). Returns a lora_status;
 * *out is NULL on failure. */
int ref_make_adapter(const ref_layer *l, int backend, int threads, lora_adapter **out);
/* One extra config parameter for ref_make_adapter_ex: set with lora_config_set_double
 * when is_double, else lora_config_set_int. */
typedef struct ref_param {
    int param, is_double;
    int64_t i;
    double d;
} ref_param;
/* ref_make_adapter, then n_extra more parameters set (in order, after the others) before
 * the adapter is created (e.g. LORA_CFG_POLY_DEGREE, _TOLERANCE, _MEASURE_ROWS). */
int ref_make_adapter_ex(const ref_layer *l, int backend, int threads,
                        const ref_param *extra, int n_extra, lora_adapter **out);

/* Relative error of one tensor, as used everywhere here:
 *     max_i |lib_i - ref_i| / max(max_i |ref_i|, floor)
 * where floor = REF_REL_FLOOR * M (and at least 1e-300), M being the largest max|ref|
 * of the tensor's family: out for out; every dA, dB and dx of the run for dA and dB;
 * dx (dxq and dxkv) for dx. The floor only matters for tensors that are exactly or
 * nearly zero in exact arithmetic (e.g. dA_Q and dA_K when every query sees a single
 * key), where float rounding of an O(1) computation would otherwise read as a huge
 * relative error. */
#define REF_REL_FLOOR 1e-3

typedef struct ref_errors {
    int status;                /* first failing library status, LORA_OK if none */
    const char *failed_call;   /* name of the failing call, or NULL */
    double out;                /* relative error of out */
    double da[REF_NPROJ], db[REF_NPROJ]; /* -1 for projections without LoRA */
    double dxq, dxkv;          /* self-attention: dxq is dx, dxkv is -1 */
    double max;                /* max of everything above */
    double ref_out_max, ref_grad_max; /* max |ref| of out and of the gradients */
} ref_errors;

/* Runs ad on p: zero_grad, forward (or forward_cross), backward (or backward_cross)
 * with dx wanted, reads every gradient, and compares with the reference l (which must
 * hold the same weights as ad). Returns e->status. */
int ref_compare_adapter(lora_adapter *ad, const ref_layer *l, const ref_problem *p,
                        ref_errors *e);

/* ref_make_adapter + ref_compare_adapter + destroy. Returns 1 when the library ran and
 * every relative error is <= tol, else 0; e is filled either way. */
int ref_check(const ref_layer *l, int backend, int threads, const ref_problem *p,
              double tol, ref_errors *e);

/* Human-readable descriptions for failure messages (return buf). */
const char *ref_describe(const ref_layer *l, const ref_problem *p, char *buf, size_t n);
const char *ref_errors_format(const ref_errors *e, char *buf, size_t n);

/* max |x_i - y_i| / max(max |y_i|, floor): the measure above for one tensor. */
double ref_rel_err_f(const float *x, const double *y, size_t n, double floor);
double ref_rel_err_d(const double *x, const double *y, size_t n, double floor);
double ref_max_abs(const double *y, size_t n);

/* ---- small utilities shared by the tests ------------------------------------------ */
/* splitmix64 stream; ref_uniform in [-1, 1), ref_uniform_f the same rounded to float. */
uint64_t ref_rng_next(uint64_t *state);
double ref_uniform(uint64_t *state);
float ref_uniform_f(uint64_t *state);
/* Conversions between float and double arrays. */
void ref_to_float(const double *src, float *dst, size_t n);
void ref_to_double(const float *src, double *dst, size_t n);

#endif
