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

/* RoPE layouts and the config parameter numbers of spec API-0.2.md section 1 (fixed by
 * the spec; lora.h names them LORA_ROPE_* and LORA_CFG_ROPE ... LORA_CFG_DROPOUT). */
enum { REF_ROPE_NONE = 0, REF_ROPE_HALF = 1, REF_ROPE_INTERLEAVED = 2 };
enum {
    REF_CFG_ROPE = 19,
    REF_CFG_ROPE_THETA = 20,
    REF_CFG_ROPE_DIM = 21,
    REF_CFG_WINDOW = 22,
    REF_CFG_SOFTCAP = 23,
    REF_CFG_DROPOUT = 24
};

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
    int bias;             /* 0/1: every projection gets a bias (free one to drop it) */
    /* 0.2 attention (spec API-0.2.md section 1); all 0 = the 0.1 layer. */
    int rope;             /* REF_ROPE_NONE (0), _HALF or _INTERLEAVED */
    double rope_theta;    /* 0 = default (10000) */
    int rope_dim;         /* 0 = default (head_dim); even, in [2, head_dim] */
    int window;           /* 0 = none; see ref_attn_visible */
    double softcap;       /* 0 = none; S <- c*tanh(S/c) after the softmax scale */
    double dropout;       /* p in [0, 1): the LoRA branches see x*keep/(1-p), the keep
                             masks coming with each call (ref_attn_args) */
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
    double *rope_freqs; /* NULL: THETA's table; else rope_dim/2 values (ref_layer_set_rope_freqs) */
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

/* ---- 0.2 attention: RoPE, lengths, positions, segments, window, softcap, dropout ---- */
/* Per-call arguments, mirroring lora_attn_args (zero-initialise; NULL = default). A call
 * is self-attention when xkv is NULL or equal to xq and len_kv == len_q; then kv_lens,
 * kv_seg and kv_pos default to q_lens, q_seg and q_pos (the keys are the query tokens).
 *   q_lens, kv_lens (batch): valid rows, right padding. Padded query rows give out = 0
 *       (after W_O and its bias), their dout is ignored; padded keys are never seen.
 *   q_pos (batch, len_q): default (len_kv - len_q) + i. kv_pos (batch, len_kv): default j.
 *   q_seg, kv_seg (batch, len): query i sees key j only when the ids are equal; in
 *       cross-attention a NULL side counts as all 0.
 *   keep[t] (rows, in[t]) of 0/1 bytes: the dropout mask of target t's LoRA input (rows =
 *       batch*len_q for Q and O, batch*len_kv for K and V). Used only when cfg.dropout > 0,
 *       !infer and keep[t] != NULL; then that LoRA branch sees x*keep/(1-p).
 * A query row that sees no key has attention output 0 and passes no gradient. */
typedef struct ref_attn_args {
    int infer; /* 1: no dropout (LORA_FWD_INFER) */
    const int64_t *q_lens, *kv_lens;
    const int64_t *q_pos, *kv_pos;
    const int32_t *q_seg, *kv_seg;
    const uint8_t *keep[REF_NPROJ];
} ref_attn_args;

/* ref_forward, ref_activations and ref_backward with per-call arguments; args NULL gives
 * exactly those. ref_activations_ex's q and k are after RoPE (what the scores use). */
void ref_forward_ex(const ref_layer *l, const ref_attn_args *args, const double *xq,
                    const double *xkv, int64_t batch, int64_t len_q, int64_t len_kv,
                    double *out);
int ref_activations_ex(const ref_layer *l, const ref_attn_args *args, const double *xq,
                       const double *xkv, int64_t batch, int64_t len_q, int64_t len_kv,
                       double *q, double *k, double *v, double *attn);
void ref_backward_ex(const ref_layer *l, const ref_attn_args *args, const double *xq,
                     const double *xkv, int64_t batch, int64_t len_q, int64_t len_kv,
                     const double *dout, ref_grads *g);

/* Whether query i of batch element b sees key j (1/0), self as above:
 *   i < q_len, j < kv_len, equal segment ids, then with d = pos_i - pos_j:
 *   causal: d >= 0; WINDOW W > 0: causal 0 <= d < W, non-causal |d| < W. */
int ref_attn_visible(const ref_layer *l, const ref_attn_args *args, int self, int64_t batch,
                     int64_t len_q, int64_t len_kv, int64_t b, int64_t i, int64_t j);

/* RoPE. The resolved rotary width (cfg.rope_dim or head_dim) and the inverse frequencies
 * the layer uses (rope_dim/2 values): its own table, else THETA^(-2i/rope_dim). A pair
 * (a, b) = (i, i + rope_dim/2) for HALF, (2i, 2i + 1) for INTERLEAVED, turns by
 * pos * inv_freq[i]: (x_a, x_b) <- (x_a cos - x_b sin, x_b cos + x_a sin). */
int ref_rope_dim(const ref_layer *l);
void ref_rope_inv_freq(const ref_layer *l, double *inv_freq);
/* Replaces the THETA table (lora_adapter_set_rope_freqs): n must be rope_dim/2, values
 * finite and >= 0. Returns 0 or -1. */
int ref_layer_set_rope_freqs(ref_layer *l, const double *inv_freq, size_t n);
/* Rotates one head vector x (head_dim values) in place by pos; inverse = 1 turns back. */
void ref_rope_rotate(const ref_layer *l, const double *inv_freq, int64_t pos, double *x,
                     int inverse);

/* The Q/K row permutation between the HALF (Hugging Face) and INTERLEAVED (Meta, GGUF
 * llama) layouts. src, dst: (n_heads*head_dim, cols) row-major, distinct. Per head, the
 * first rope_dim rows go from HALF order (i, i + rope_dim/2) to INTERLEAVED order
 * (2i, 2i + 1): dst[h*hd + 2i + c] = src[h*hd + c*rope_dim/2 + i], c in {0, 1}; rows
 * past rope_dim stay. inverse = 1 maps INTERLEAVED back to HALF. With rope_dim = head_dim
 * this is convert_hf_to_gguf.py's LlamaModel.permute(w, n_head, n_head_kv) (n_heads =
 * n_head for attn_q, n_head_kv for attn_k): apply it to W_Q, W_K, their biases (cols 1)
 * and LoRA B (cols rank); A and V are untouched. A HALF layer and an INTERLEAVED layer
 * holding the permuted rows compute the same attention. */
void ref_rope_permute_rows(const double *src, double *dst, int n_heads, int head_dim,
                           int rope_dim, int64_t cols, int inverse);

/* RoPE frequency recipes (docs/models.md), each writing dim/2 inverse frequencies for a
 * rotary width dim and base theta:
 *   theta:  theta^(-2i/dim)
 *   linear: theta^(-2i/dim) / factor                    (position interpolation)
 *   ntk:    theta'^(-2i/dim), theta' = theta * factor^(dim/(dim-2))   (NTK-aware; the
 *           dynamic variant uses factor' = factor*L/L_orig - (factor - 1) when L > L_orig)
 *   llama3: Llama 3.1 (factor 8, low 1, high 4, original context 8192)
 *   yarn:   YaRN's ramp between interpolation and extrapolation (beta_fast 32, beta_slow
 *           1 by default); returns the attention factor m = 0.1 ln(factor) + 1 that YaRN
 *           multiplies cos and sin by: with rope_dim = head_dim it scales every score by
 *           m^2, so set SOFTMAX_SCALE = m^2 / sqrt(head_dim). */
void ref_rope_freqs_theta(double theta, int dim, double *inv_freq);
void ref_rope_freqs_linear(double theta, int dim, double factor, double *inv_freq);
void ref_rope_freqs_ntk(double theta, int dim, double factor, double *inv_freq);
void ref_rope_freqs_llama3(double theta, int dim, double factor, double low_freq_factor,
                           double high_freq_factor, double original_context,
                           double *inv_freq);
double ref_rope_freqs_yarn(double theta, int dim, double factor, double original_context,
                           double beta_fast, double beta_slow, double *inv_freq);

/* A random dropout keep mask: n bytes, each 0 with probability p (splitmix64 from seed). */
void ref_dropout_keep_random(uint64_t seed, double p, size_t n, uint8_t *keep);

#endif
