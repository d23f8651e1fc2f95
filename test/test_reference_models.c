/* Real models' attention, transcribed formula by formula (in double, in each model's own
 * weight layout and conventions) from the reference implementations named below, against
 * the double reference configured as docs/models.md says. One test per row of that table.
 *
 *   HF transformers modeling_llama / _mistral / _qwen2 / _gemma2 / _phi: nn.Linear
 *     projections, rotate_half RoPE (cos, sin of cat(freqs, freqs)), repeat_kv GQA,
 *     additive masks, softmax, o_proj / dense.
 *   Meta llama model.py: complex RoPE on consecutive pairs (view_as_complex, freqs_cis).
 *   mistral-src one_file_ref.py: Meta's RoPE, banded mask triu(tril(1), -sliding_window).
 *   HF modeling_gpt_neox: fused query_key_value viewed (heads, 3*head_size), rotary on the
 *     first rotary_pct of each head, causal tril buffer.
 *   HF modeling_gpt2: Conv1D c_attn (x @ W + b, W is (in, 3*d)) split into q | k | v.
 *   HF modeling_bert: BertSelfAttention + BertSelfOutput.dense, extended padding mask.
 *   HF modeling_rope_utils: linear, dynamic NTK, llama3, yarn frequencies.
 * Rows that liblora defines differently on purpose (padded query rows: liblora gives 0,
 * the models give values nobody reads) are not compared. Part of reference_suite. */
#include <complex.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>

#include "reference.h"
#include "reference_tests.h"

#define TOL 1e-12
#define B 2
#define L 7
#define MAXD 24
#define MAXQ 32 /* q_dim, kv_dim bound */

/* ---- small dense helpers (model side) ------------------------------------------------ */

/* nn.Linear: y (rows, out) = x (rows, in) W^T + b, W (out, in). */
static void linear(const double *x, int rows, int in, const double *w, const double *b,
                   int out, double *y)
{
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < out; o++) {
            double acc = b ? b[o] : 0.0;
            for (int i = 0; i < in; i++)
                acc += x[r * in + i] * w[o * in + i];
            y[r * out + o] = acc;
        }
}

/* Conv1D (GPT-2): y (rows, nf) = x (rows, nx) W + b, W (nx, nf). */
static void conv1d(const double *x, int rows, int nx, const double *w, const double *b,
                   int nf, double *y)
{
    for (int r = 0; r < rows; r++)
        for (int o = 0; o < nf; o++) {
            double acc = b ? b[o] : 0.0;
            for (int i = 0; i < nx; i++)
                acc += x[r * nx + i] * w[i * nf + o];
            y[r * nf + o] = acc;
        }
}

/* softmax over a row of scores already holding the additive mask (-inf or a huge
 * negative number where masked); torch's softmax subtracts the row max. */
static void softmax_row(double *s, int n)
{
    double mx = -INFINITY, sum = 0.0;
    for (int j = 0; j < n; j++)
        mx = s[j] > mx ? s[j] : mx;
    for (int j = 0; j < n; j++) {
        s[j] = exp(s[j] - mx);
        sum += s[j];
    }
    for (int j = 0; j < n; j++)
        s[j] /= sum;
}

static double rnd(uint64_t *s) { return (double)(float)ref_uniform(s); }

static void fill(double *v, int n, double gain, uint64_t *s)
{
    for (int i = 0; i < n; i++)
        v[i] = gain * rnd(s);
}

/* ---- the HF decoder family (Llama, Mistral, Qwen2, Gemma 2, Phi) -------------------- */

/* One HF attention module's hyper-parameters, named as its config.json names them. */
typedef struct hf_attn {
    int hidden_size, num_heads, num_kv_heads, head_dim;
    int rotary_dim;          /* Phi: int(partial_rotary_factor * head_dim); else head_dim */
    const double *inv_freq;  /* (rotary_dim/2): what the RotaryEmbedding module holds */
    double attention_factor; /* rope_utils' post-scaling of cos and sin (1 but YaRN) */
    double scaling;          /* head_dim^-0.5, or Gemma 2's query_pre_attn_scalar^-0.5 */
    double softcapping;      /* Gemma 2 attn_logit_softcapping; 0 = none */
    int sliding_window;      /* 0 = none: masking_utils' kv_idx > q_idx - sliding_window */
    const double *wq, *wk, *wv, *wo, *bq, *bk, *bv, *bo;
} hf_attn;

/* rotate_half RoPE on the first rotary_dim dims of one head vector:
 * x*cos + rotate_half(x)*sin, cos/sin of emb = cat(freqs, freqs). */
static void hf_rotate(const hf_attn *m, double *x, double pos)
{
    const int half = m->rotary_dim / 2;
    double rot[MAXQ], cosv[MAXQ], sinv[MAXQ];
    for (int i = 0; i < m->rotary_dim; i++) {
        const double emb = pos * m->inv_freq[i % half];
        cosv[i] = cos(emb) * m->attention_factor;
        sinv[i] = sin(emb) * m->attention_factor;
        rot[i] = i < half ? -x[i + half] : x[i - half]; /* cat(-x2, x1) */
    }
    for (int i = 0; i < m->rotary_dim; i++)
        x[i] = x[i] * cosv[i] + rot[i] * sinv[i];
}

/* HF forward of hidden (batch, L, hidden) with position_ids (batch, L) and the 2-D
 * attention_mask (batch, L) of 1 = token, 0 = padding; causal. out (batch, L, hidden). */
static void hf_forward(const hf_attn *m, const double *hidden, const int64_t *position_ids,
                       const int *attention_mask, double *out)
{
    const int hq = m->num_heads * m->head_dim, hkv = m->num_kv_heads * m->head_dim;
    const int groups = m->num_heads / m->num_kv_heads;
    for (int b = 0; b < B; b++) {
        double q[L * MAXQ], k[L * MAXQ], v[L * MAXQ], ctx[L * MAXQ];
        const double *x = hidden + b * L * m->hidden_size;
        linear(x, L, m->hidden_size, m->wq, m->bq, hq, q);
        linear(x, L, m->hidden_size, m->wk, m->bk, hkv, k);
        linear(x, L, m->hidden_size, m->wv, m->bv, hkv, v);
        for (int t = 0; t < L; t++) {
            const double pos = (double)position_ids[b * L + t];
            for (int h = 0; h < m->num_heads; h++)
                hf_rotate(m, q + t * hq + h * m->head_dim, pos);
            for (int h = 0; h < m->num_kv_heads; h++)
                hf_rotate(m, k + t * hkv + h * m->head_dim, pos);
        }
        for (int h = 0; h < m->num_heads; h++) {
            const int kvh = h / groups; /* repeat_kv */
            for (int i = 0; i < L; i++) {
                double w[L];
                for (int j = 0; j < L; j++) {
                    double s = 0.0;
                    for (int c = 0; c < m->head_dim; c++)
                        s += q[i * hq + h * m->head_dim + c] * k[j * hkv + kvh * m->head_dim + c];
                    s *= m->scaling;
                    if (m->softcapping > 0.0)
                        s = tanh(s / m->softcapping) * m->softcapping;
                    int allowed = j <= i && attention_mask[b * L + j];
                    if (m->sliding_window > 0)
                        allowed = allowed && j > i - m->sliding_window;
                    w[j] = s + (allowed ? 0.0 : -DBL_MAX);
                }
                softmax_row(w, L);
                for (int c = 0; c < m->head_dim; c++) {
                    double acc = 0.0;
                    for (int j = 0; j < L; j++)
                        acc += w[j] * v[j * hkv + kvh * m->head_dim + c];
                    ctx[i * hq + h * m->head_dim + c] = acc;
                }
            }
        }
        linear(ctx, L, hq, m->wo, m->bo, m->hidden_size, out + b * L * m->hidden_size);
    }
}

/* A random layer of the reference from rc, and the HF module holding its merged weights
 * (W + s*B*A: what a merged PEFT checkpoint holds), biases as the layer has them. */
typedef struct pair {
    ref_layer l;
    double *weff[REF_NPROJ];
    hf_attn m;
} pair;

static void pair_init(pair *p, const ref_config *rc, uint64_t seed, int keep_o_bias)
{
    memset(p, 0, sizeof *p);
    ck_assert_int_eq(ref_layer_init(&p->l, rc), 0);
    ref_layer_randomize(&p->l, seed, 2.0, 0.5);
    if (!keep_o_bias && p->l.bias[REF_O]) {
        free(p->l.bias[REF_O]);
        p->l.bias[REF_O] = NULL;
    }
    for (int t = 0; t < REF_NPROJ; t++) {
        p->weff[t] = ref_effective_weight(&p->l, t);
        ck_assert_ptr_nonnull(p->weff[t]);
    }
    p->m = (hf_attn){.hidden_size = rc->d_model, .num_heads = p->l.n_heads,
                     .num_kv_heads = p->l.n_kv_heads, .head_dim = p->l.head_dim,
                     .rotary_dim = ref_rope_dim(&p->l), .attention_factor = 1.0,
                     .scaling = p->l.softmax_scale, .softcapping = rc->softcap,
                     .wq = p->weff[REF_Q], .wk = p->weff[REF_K], .wv = p->weff[REF_V],
                     .wo = p->weff[REF_O], .bq = p->l.bias[REF_Q], .bk = p->l.bias[REF_K],
                     .bv = p->l.bias[REF_V], .bo = p->l.bias[REF_O]};
}

static void pair_free(pair *p)
{
    for (int t = 0; t < REF_NPROJ; t++)
        free(p->weff[t]);
    ref_layer_free(&p->l);
}

/* Compares the model's rows that are tokens (attention_mask 1) with the reference's. */
static void compare_rows(const char *what, const double *model, const double *ref,
                         const int *attention_mask, int cols)
{
    double worst = 0.0, big = 0.0;
    for (int r = 0; r < B * L; r++) {
        if (attention_mask && !attention_mask[r]) {
            for (int c = 0; c < cols; c++)
                ck_assert_msg(ref[r * cols + c] == 0.0, "%s: padded row %d not 0", what, r);
            continue;
        }
        for (int c = 0; c < cols; c++) {
            worst = fmax(worst, fabs(model[r * cols + c] - ref[r * cols + c]));
            big = fmax(big, fabs(model[r * cols + c]));
        }
    }
    ck_assert_msg(big > 0.1, "%s: outputs are trivially small (%g)", what, big);
    ck_assert_msg(worst <= TOL * big, "%s: model vs reference max diff %.3g (max|out| %.3g)",
                  what, worst, big);
}

/* Inputs: hidden states and the right-padded masks/lengths used by the tests. */
static void inputs(double *x, int d, uint64_t seed)
{
    uint64_t s = seed;
    fill(x, B * L * d, 1.0, &s);
}

static const int pad_mask[B * L] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0};
static const int64_t pad_lens[B] = {7, 4};

/* Runs the HF module and the reference (args as docs/models.md says) and compares. */
static void check_hf(const char *what, pair *p, const int64_t *position_ids, int padded,
                     const ref_attn_args *args)
{
    const int d = p->l.cfg.d_model;
    double x[B * L * MAXD], want[B * L * MAXD], got[B * L * MAXD];
    ck_assert(d <= MAXD && p->l.q_dim <= MAXQ);
    inputs(x, d, 99);
    int ones[B * L];
    for (int i = 0; i < B * L; i++)
        ones[i] = 1;
    const int *mask = padded ? pad_mask : ones;
    hf_forward(&p->m, x, position_ids, mask, want);
    ref_forward_ex(&p->l, args, x, x, B, L, L, got);
    compare_rows(what, want, got, padded ? pad_mask : NULL, d);
}

static void arange_positions(int64_t *pos, int64_t offset)
{
    for (int b = 0; b < B; b++)
        for (int t = 0; t < L; t++)
            pos[b * L + t] = offset + t;
}

/* Llama 2 / 3 (HF): no biases, rotate_half, GQA, theta = rope_theta; right padding. */
START_TEST(test_model_llama_hf)
{
    const ref_config rc = {.d_model = 16, .n_heads = 4, .n_kv_heads = 2, .rank = 2,
                           .targets = 15, .causal = 1, .out_proj = 1,
                           .rope = REF_ROPE_HALF, .rope_theta = 500000.0};
    pair p;
    pair_init(&p, &rc, 1, 0);
    double inv_freq[MAXQ];
    for (int i = 0; i < p.l.head_dim / 2; i++) /* 1/(base^(arange(0, dim, 2)/dim)) */
        inv_freq[i] = 1.0 / pow(500000.0, (2.0 * i) / p.l.head_dim);
    p.m.inv_freq = inv_freq;
    int64_t pos[B * L];
    arange_positions(pos, 0);
    const ref_attn_args a = {.q_lens = pad_lens};
    check_hf("Llama (HF), padded batch", &p, pos, 1, &a);
    /* Explicit position_ids (e.g. a continuation at offset 5) go to q_pos. */
    arange_positions(pos, 5);
    const ref_attn_args a2 = {.q_pos = pos};
    check_hf("Llama (HF), position_ids + 5", &p, pos, 0, &a2);
    pair_free(&p);
}
END_TEST

/* Meta's model.py: RoPE as complex multiplication on consecutive pairs. The checkpoint
 * is the Meta one (consolidated.*.pth); liblora takes its wq/wk rows as they are with
 * LORA_ROPE_INTERLEAVED. Queries at start_pos.. over a cache of start_pos + L keys is
 * liblora's cross-attention with default positions. */
static void meta_forward(const double *wq, const double *wk, const double *wv,
                         const double *wo, int dim, int n_heads, int n_kv_heads,
                         double theta, const double *x, const double *cache_x, int start_pos,
                         int seqlen, double *out)
{
    const int hd = dim / n_heads, n_rep = n_heads / n_kv_heads, tot = start_pos + seqlen;
    const int qd = n_heads * hd, kd = n_kv_heads * hd;
    double xq[L * MAXQ], keys[2 * L * MAXQ], values[2 * L * MAXQ], o[L * MAXQ];
    double complex freqs_cis[2 * L][MAXQ / 2];
    for (int t = 0; t < tot; t++)
        for (int i = 0; i < hd / 2; i++) {
            const double freq = 1.0 / pow(theta, (double)(2 * i) / hd);
            freqs_cis[t][i] = cexp(I * (double)t * freq); /* polar(1, t*freq) */
        }
    linear(x, seqlen, dim, wq, NULL, qd, xq);
    linear(cache_x, tot, dim, wk, NULL, kd, keys); /* the cache holds every token's xk */
    linear(cache_x, tot, dim, wv, NULL, kd, values);
    for (int t = 0; t < tot; t++)
        for (int h = 0; h < n_kv_heads; h++)
            for (int i = 0; i < hd / 2; i++) {
                double *pr = keys + t * kd + h * hd + 2 * i;
                const double complex z = (pr[0] + I * pr[1]) * freqs_cis[t][i];
                pr[0] = creal(z);
                pr[1] = cimag(z);
            }
    for (int t = 0; t < seqlen; t++)
        for (int h = 0; h < n_heads; h++)
            for (int i = 0; i < hd / 2; i++) {
                double *pr = xq + t * qd + h * hd + 2 * i;
                const double complex z = (pr[0] + I * pr[1]) * freqs_cis[start_pos + t][i];
                pr[0] = creal(z);
                pr[1] = cimag(z);
            }
    for (int h = 0; h < n_heads; h++)
        for (int i = 0; i < seqlen; i++) {
            double sc[2 * L];
            for (int j = 0; j < tot; j++) {
                double s = 0.0;
                for (int c = 0; c < hd; c++)
                    s += xq[i * qd + h * hd + c] * keys[j * kd + (h / n_rep) * hd + c];
                /* mask: hstack(zeros(seqlen, start_pos), triu(-inf, diagonal=1)) */
                sc[j] = s / sqrt((double)hd) + (j > start_pos + i ? -INFINITY : 0.0);
            }
            softmax_row(sc, tot);
            for (int c = 0; c < hd; c++) {
                double acc = 0.0;
                for (int j = 0; j < tot; j++)
                    acc += sc[j] * values[j * kd + (h / n_rep) * hd + c];
                o[i * qd + h * hd + c] = acc;
            }
        }
    linear(o, seqlen, qd, wo, NULL, dim, out);
}

START_TEST(test_model_llama_meta)
{
    const ref_config rc = {.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .rank = 2,
                           .targets = 15, .causal = 1, .out_proj = 1,
                           .rope = REF_ROPE_INTERLEAVED};
    pair p;
    pair_init(&p, &rc, 2, 0);
    const int d = 8, start = 3, seqlen = 4;
    double cache_x[L * MAXD], want[L * MAXD], got[L * MAXD];
    uint64_t s = 5;
    fill(cache_x, (start + seqlen) * d, 1.0, &s);
    const double *x = cache_x + start * d; /* the new tokens */
    meta_forward(p.weff[REF_Q], p.weff[REF_K], p.weff[REF_V], p.weff[REF_O], d, 2, 1,
                 10000.0, x, cache_x, start, seqlen, want);
    ref_forward(&p.l, x, cache_x, 1, seqlen, start + seqlen, got);
    double worst = 0.0, big = 0.0;
    for (int i = 0; i < seqlen * d; i++) {
        worst = fmax(worst, fabs(want[i] - got[i]));
        big = fmax(big, fabs(want[i]));
    }
    ck_assert_msg(big > 0.1 && worst <= TOL * big, "Meta llama: diff %.3g", worst);
    /* start_pos = 0: the prompt, self-attention */
    meta_forward(p.weff[REF_Q], p.weff[REF_K], p.weff[REF_V], p.weff[REF_O], d, 2, 1,
                 10000.0, cache_x, cache_x, 0, L, want);
    ref_forward(&p.l, cache_x, cache_x, 1, L, L, got);
    worst = 0.0;
    for (int i = 0; i < L * d; i++)
        worst = fmax(worst, fabs(want[i] - got[i]));
    ck_assert_msg(worst <= TOL * big, "Meta llama prompt: diff %.3g", worst);
    /* The HF module holding the Meta rows un-permuted (HF order) computes the same:
     * permute() is the only difference between the two checkpoints. */
    double hq[MAXQ * MAXD], hk[MAXQ * MAXD];
    ref_rope_permute_rows(p.weff[REF_Q], hq, 2, 4, 4, d, 1);
    ref_rope_permute_rows(p.weff[REF_K], hk, 1, 4, 4, d, 1);
    double inv_freq[2] = {1.0, pow(10000.0, -0.5)};
    p.m.wq = hq;
    p.m.wk = hk;
    p.m.inv_freq = inv_freq;
    double xb[B * L * MAXD], hf[B * L * MAXD], meta[L * MAXD];
    inputs(xb, d, 99);
    int64_t pos[B * L];
    arange_positions(pos, 0);
    int ones[B * L];
    for (int i = 0; i < B * L; i++)
        ones[i] = 1;
    hf_forward(&p.m, xb, pos, ones, hf);
    meta_forward(p.weff[REF_Q], p.weff[REF_K], p.weff[REF_V], p.weff[REF_O], d, 2, 1,
                 10000.0, xb, xb, 0, L, meta);
    worst = 0.0;
    for (int i = 0; i < L * d; i++)
        worst = fmax(worst, fabs(hf[i] - meta[i]));
    ck_assert_msg(worst <= TOL * big, "HF (un-permuted rows) vs Meta: diff %.3g", worst);
    pair_free(&p);
}
END_TEST

/* Mistral (HF): Llama + sliding_window (kv_idx > q_idx - W): WINDOW = sliding_window. */
START_TEST(test_model_mistral_hf)
{
    const ref_config rc = {.d_model = 16, .n_heads = 4, .n_kv_heads = 1, .rank = 2,
                           .targets = 15, .causal = 1, .out_proj = 1,
                           .rope = REF_ROPE_HALF, .rope_theta = 1000000.0, .window = 3};
    pair p;
    pair_init(&p, &rc, 3, 0);
    double inv_freq[MAXQ];
    for (int i = 0; i < p.l.head_dim / 2; i++)
        inv_freq[i] = 1.0 / pow(1000000.0, (2.0 * i) / p.l.head_dim);
    p.m.inv_freq = inv_freq;
    p.m.sliding_window = 3;
    int64_t pos[B * L];
    arange_positions(pos, 0);
    const ref_attn_args a = {.q_lens = pad_lens};
    check_hf("Mistral (HF), sliding_window 3", &p, pos, 1, &a);
    /* the window matters here: without it the results differ */
    p.m.sliding_window = 0;
    double x[B * L * MAXD], want[B * L * MAXD], got[B * L * MAXD];
    inputs(x, 16, 99);
    int ones[B * L];
    for (int i = 0; i < B * L; i++)
        ones[i] = 1;
    hf_forward(&p.m, x, pos, ones, want);
    ref_forward(&p.l, x, x, B, L, L, got);
    ck_assert_double_gt(ref_rel_err_d(got, want, B * L * 16, 1e-300), 1e-3);
    pair_free(&p);
}
END_TEST

/* mistral-src one_file_ref.py: Meta RoPE (complex pairs) and the banded mask
 * triu(tril(ones), diagonal=-sliding_window): keys i - W .. i, W + 1 of them, so
 * WINDOW = sliding_window + 1 with LORA_ROPE_INTERLEAVED. */
START_TEST(test_model_mistral_reference)
{
    const int W = 2, d = 8, nh = 2, nkv = 1, hd = 4;
    const ref_config rc = {.d_model = d, .n_heads = nh, .n_kv_heads = nkv, .rank = 2,
                           .targets = 15, .causal = 1, .out_proj = 1,
                           .rope = REF_ROPE_INTERLEAVED, .window = W + 1};
    pair p;
    pair_init(&p, &rc, 4, 0);
    double x[L * MAXD], want[L * MAXD], got[L * MAXD];
    uint64_t s = 8;
    fill(x, L * d, 1.0, &s);
    /* model side */
    double q[L * MAXQ], k[L * MAXQ], v[L * MAXQ], o[L * MAXQ];
    linear(x, L, d, p.weff[REF_Q], NULL, nh * hd, q);
    linear(x, L, d, p.weff[REF_K], NULL, nkv * hd, k);
    linear(x, L, d, p.weff[REF_V], NULL, nkv * hd, v);
    for (int t = 0; t < L; t++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < hd / 2; i++) {
                const double complex f = cexp(I * t * (1.0 / pow(10000.0, (2.0 * i) / hd)));
                double *pq = q + t * nh * hd + h * hd + 2 * i;
                const double complex zq = (pq[0] + I * pq[1]) * f;
                pq[0] = creal(zq);
                pq[1] = cimag(zq);
                if (h < nkv) {
                    double *pk = k + t * nkv * hd + h * hd + 2 * i;
                    const double complex zk = (pk[0] + I * pk[1]) * f;
                    pk[0] = creal(zk);
                    pk[1] = cimag(zk);
                }
            }
    for (int h = 0; h < nh; h++)
        for (int i = 0; i < L; i++) {
            double sc[L];
            for (int j = 0; j < L; j++) {
                double dot = 0.0;
                for (int c = 0; c < hd; c++)
                    dot += q[i * nh * hd + h * hd + c] * k[j * nkv * hd + (h / 2) * hd + c];
                const double band = (j <= i && j - i >= -W) ? 1.0 : 0.0;
                sc[j] = dot * pow((double)hd, -0.5) + log(band); /* mask = log(band) */
            }
            softmax_row(sc, L);
            for (int c = 0; c < hd; c++) {
                double acc = 0.0;
                for (int j = 0; j < L; j++)
                    acc += sc[j] * v[j * nkv * hd + (h / 2) * hd + c];
                o[i * nh * hd + h * hd + c] = acc;
            }
        }
    linear(o, L, nh * hd, p.weff[REF_O], NULL, d, want);
    ref_forward(&p.l, x, x, 1, L, L, got);
    double worst = 0.0, big = 0.0;
    for (int i = 0; i < L * d; i++) {
        worst = fmax(worst, fabs(want[i] - got[i]));
        big = fmax(big, fabs(want[i]));
    }
    ck_assert_msg(big > 0.1 && worst <= TOL * big, "mistral one_file_ref: diff %.3g", worst);
    pair_free(&p);
}
END_TEST

/* Qwen2 (HF): biases on q, k, v but not o_proj; theta 1e6; GQA. */
START_TEST(test_model_qwen2)
{
    const ref_config rc = {.d_model = 16, .n_heads = 4, .n_kv_heads = 2, .rank = 2,
                           .targets = 15, .causal = 1, .out_proj = 1, .bias = 1,
                           .rope = REF_ROPE_HALF, .rope_theta = 1000000.0};
    pair p;
    pair_init(&p, &rc, 5, 0); /* O's bias removed */
    ck_assert_ptr_null(p.l.bias[REF_O]);
    double inv_freq[MAXQ];
    for (int i = 0; i < p.l.head_dim / 2; i++)
        inv_freq[i] = 1.0 / pow(1000000.0, (2.0 * i) / p.l.head_dim);
    p.m.inv_freq = inv_freq;
    int64_t pos[B * L];
    arange_positions(pos, 0);
    const ref_attn_args a = {.q_lens = pad_lens};
    check_hf("Qwen2, padded batch", &p, pos, 1, &a);
    pair_free(&p);
}
END_TEST

/* Gemma 2 (HF): head_dim set on its own (q_dim != hidden), scaling =
 * query_pre_attn_scalar^-0.5, tanh softcap after the scaling and before the mask,
 * sliding window on even layer_idx (tril(ones, -W) masked: i - j < W), global otherwise. */
START_TEST(test_model_gemma2)
{
    const double query_pre_attn_scalar = 6.0, softcap = 1.5;
    for (int layer_idx = 0; layer_idx < 2; layer_idx++) {
        const int sliding = layer_idx % 2 == 0 ? 3 : 0;
        const ref_config rc = {.d_model = 6, .n_heads = 4, .n_kv_heads = 2, .head_dim = 4,
                               .rank = 2, .targets = 15, .causal = 1, .out_proj = 1,
                               .rope = REF_ROPE_HALF,
                               .softmax_scale = 1.0 / sqrt(query_pre_attn_scalar),
                               .softcap = softcap, .window = sliding};
        pair p;
        pair_init(&p, &rc, 6 + (uint64_t)layer_idx, 0);
        double inv_freq[MAXQ];
        for (int i = 0; i < 2; i++)
            inv_freq[i] = 1.0 / pow(10000.0, (2.0 * i) / 4);
        p.m.inv_freq = inv_freq;
        p.m.scaling = pow(query_pre_attn_scalar, -0.5);
        p.m.softcapping = softcap;
        p.m.sliding_window = sliding;
        int64_t pos[B * L];
        arange_positions(pos, 0);
        const ref_attn_args a = {.q_lens = pad_lens};
        check_hf(sliding ? "Gemma 2 local layer" : "Gemma 2 global layer", &p, pos, 1, &a);
        pair_free(&p);
    }
}
END_TEST

/* Phi-2 (HF modeling_phi): q, k, v and dense with biases, partial_rotary_factor 0.4
 * (rotary_dim = int(0.4 * head_dim)), rotate_half within the rotary part. */
START_TEST(test_model_phi2)
{
    const int head_dim = 10, rotary_dim = (int)(0.4 * head_dim);
    const ref_config rc = {.d_model = 20, .n_heads = 2, .rank = 2, .targets = 15,
                           .causal = 1, .out_proj = 1, .bias = 1, .rope = REF_ROPE_HALF,
                           .rope_dim = rotary_dim};
    pair p;
    pair_init(&p, &rc, 8, 1);
    ck_assert_int_eq(p.l.head_dim, head_dim);
    double inv_freq[MAXQ];
    for (int i = 0; i < rotary_dim / 2; i++)
        inv_freq[i] = 1.0 / pow(10000.0, (2.0 * i) / rotary_dim);
    p.m.inv_freq = inv_freq;
    p.m.rotary_dim = rotary_dim;
    int64_t pos[B * L];
    arange_positions(pos, 0);
    const ref_attn_args a = {.q_lens = pad_lens};
    check_hf("Phi-2, padded batch", &p, pos, 1, &a);
    pair_free(&p);
}
END_TEST

/* GPT-NeoX: query_key_value (3*hidden, hidden) viewed as (heads, 3*head_size): per head
 * rows [q | k | v]. rotary_ndims = int(head_size * rotary_pct), rotate_half over them,
 * base rotary_emb_base. liblora: W_Q row h*hd + c = qkv row h*3hd + c, W_K + hd, W_V + 2hd
 * (biases alike); ROPE_DIM = rotary_ndims, THETA = rotary_emb_base. */
START_TEST(test_model_gpt_neox)
{
    enum { H = 16, NH = 2, HS = 8 };
    const double rotary_pct = 0.25, base = 10000.0;
    const int rot = (int)(HS * rotary_pct);
    uint64_t s = 12;
    double qkv_w[3 * H * H], qkv_b[3 * H], dense_w[H * H], dense_b[H];
    fill(qkv_w, 3 * H * H, 2.0 / sqrt(H), &s);
    fill(qkv_b, 3 * H, 0.5, &s);
    fill(dense_w, H * H, 1.0 / sqrt(H), &s);
    fill(dense_b, H, 0.5, &s);
    double x[B * L * H], want[B * L * H], got[B * L * H];
    inputs(x, H, 31);
    for (int b = 0; b < B; b++) {
        double qkv[L * 3 * H], ctx[L * H];
        linear(x + b * L * H, L, H, qkv_w, qkv_b, 3 * H, qkv);
        /* view (L, NH, 3*HS): query = [..., :HS], key = [..., HS:2HS], value = rest */
        double q[L][NH][HS], k[L][NH][HS], v[L][NH][HS];
        for (int t = 0; t < L; t++)
            for (int h = 0; h < NH; h++)
                for (int c = 0; c < HS; c++) {
                    q[t][h][c] = qkv[t * 3 * H + h * 3 * HS + c];
                    k[t][h][c] = qkv[t * 3 * H + h * 3 * HS + HS + c];
                    v[t][h][c] = qkv[t * 3 * H + h * 3 * HS + 2 * HS + c];
                }
        for (int t = 0; t < L; t++)
            for (int h = 0; h < NH; h++) {
                double *vecs[2] = {q[t][h], k[t][h]};
                for (int w = 0; w < 2; w++) {
                    double r[HS], rh[HS];
                    for (int c = 0; c < rot; c++)
                        rh[c] = c < rot / 2 ? -vecs[w][c + rot / 2] : vecs[w][c - rot / 2];
                    for (int c = 0; c < rot; c++) {
                        const double emb = t / pow(base, (double)(2 * (c % (rot / 2))) / rot);
                        r[c] = vecs[w][c] * cos(emb) + rh[c] * sin(emb);
                    }
                    memcpy(vecs[w], r, (size_t)rot * sizeof(double)); /* cat(rot, pass) */
                }
            }
        const double norm_factor = pow(HS, -0.5);
        for (int h = 0; h < NH; h++)
            for (int i = 0; i < L; i++) {
                double sc[L];
                for (int j = 0; j < L; j++) {
                    double dot = 0.0;
                    for (int c = 0; c < HS; c++)
                        dot += q[i][h][c] * k[j][h][c];
                    /* bias buffer tril(ones)[key_len - query_len:, :key_len] */
                    sc[j] = j <= i ? norm_factor * dot : -DBL_MAX;
                }
                softmax_row(sc, L);
                for (int c = 0; c < HS; c++) {
                    double acc = 0.0;
                    for (int j = 0; j < L; j++)
                        acc += sc[j] * v[j][h][c];
                    ctx[i * H + h * HS + c] = acc; /* merge heads */
                }
            }
        linear(ctx, L, H, dense_w, dense_b, H, want + b * L * H);
    }
    const ref_config rc = {.d_model = H, .n_heads = NH, .rank = 2, .targets = 15,
                           .causal = 1, .out_proj = 1, .bias = 1, .rope = REF_ROPE_HALF,
                           .rope_dim = rot, .rope_theta = base};
    ref_layer l;
    ck_assert_int_eq(ref_layer_init(&l, &rc), 0); /* LoRA B = 0: the frozen mapping */
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < HS; c++)
            for (int t = REF_Q; t <= REF_V; t++) {
                const int from = h * 3 * HS + t * HS + c, to = h * HS + c;
                memcpy(l.w[t] + to * H, qkv_w + from * H, H * sizeof(double));
                l.bias[t][to] = qkv_b[from];
            }
    memcpy(l.w[REF_O], dense_w, sizeof dense_w);
    memcpy(l.bias[REF_O], dense_b, sizeof dense_b);
    ref_forward(&l, x, x, B, L, L, got);
    compare_rows("GPT-NeoX", want, got, NULL, H);
    ref_layer_free(&l);
}
END_TEST

/* GPT-2: c_attn Conv1D (weight (d, 3d)), split(d) into q | k | v, heads of d/n_head,
 * attn / sqrt(head_dim), causal bias buffer, c_proj Conv1D. No RoPE (absolute position
 * embeddings are added before the block). liblora: W_Q = c_attn.weight[:, 0:d]^T,
 * W_K = [:, d:2d]^T, W_V = [:, 2d:3d]^T, W_O = c_proj.weight^T, biases sliced alike. */
START_TEST(test_model_gpt2)
{
    enum { D = 12, NH = 3, HD = 4 };
    uint64_t s = 14;
    double c_attn_w[D * 3 * D], c_attn_b[3 * D], c_proj_w[D * D], c_proj_b[D];
    fill(c_attn_w, D * 3 * D, 2.0 / sqrt(D), &s);
    fill(c_attn_b, 3 * D, 0.5, &s);
    fill(c_proj_w, D * D, 1.0 / sqrt(D), &s);
    fill(c_proj_b, D, 0.5, &s);
    double x[B * L * D], want[B * L * D], got[B * L * D];
    inputs(x, D, 41);
    for (int b = 0; b < B; b++) {
        double qkv[L * 3 * D], a[L * D];
        conv1d(x + b * L * D, L, D, c_attn_w, c_attn_b, 3 * D, qkv);
        for (int h = 0; h < NH; h++)
            for (int i = 0; i < L; i++) {
                double w[L];
                for (int j = 0; j < L; j++) {
                    double dot = 0.0;
                    for (int c = 0; c < HD; c++)
                        dot += qkv[i * 3 * D + h * HD + c] * qkv[j * 3 * D + D + h * HD + c];
                    w[j] = dot / sqrt((double)HD);
                    if (j > i) /* torch.where(causal_mask, w, mask_value = finfo.min) */
                        w[j] = -DBL_MAX;
                }
                softmax_row(w, L);
                for (int c = 0; c < HD; c++) {
                    double acc = 0.0;
                    for (int j = 0; j < L; j++)
                        acc += w[j] * qkv[j * 3 * D + 2 * D + h * HD + c];
                    a[i * D + h * HD + c] = acc;
                }
            }
        conv1d(a, L, D, c_proj_w, c_proj_b, D, want + b * L * D);
    }
    const ref_config rc = {.d_model = D, .n_heads = NH, .rank = 2, .targets = 15,
                           .causal = 1, .out_proj = 1, .bias = 1};
    ref_layer l;
    ck_assert_int_eq(ref_layer_init(&l, &rc), 0);
    for (int t = REF_Q; t <= REF_V; t++)
        for (int o = 0; o < D; o++) {
            for (int i = 0; i < D; i++)
                l.w[t][o * D + i] = c_attn_w[i * 3 * D + t * D + o];
            l.bias[t][o] = c_attn_b[t * D + o];
        }
    for (int o = 0; o < D; o++) {
        for (int i = 0; i < D; i++)
            l.w[REF_O][o * D + i] = c_proj_w[i * D + o];
        l.bias[REF_O][o] = c_proj_b[o];
    }
    ref_forward(&l, x, x, B, L, L, got);
    compare_rows("GPT-2", want, got, NULL, D);
    ref_layer_free(&l);
}
END_TEST

/* BERT: bidirectional; the extended attention mask (1 - mask) * finfo.min is added to
 * the scores of padded keys; BertSelfOutput.dense is the output projection (its dropout,
 * residual and LayerNorm are outside the attention). liblora: causal 0, q_lens. */
START_TEST(test_model_bert)
{
    const ref_config rc = {.d_model = 8, .n_heads = 2, .rank = 2, .targets = 15,
                           .out_proj = 1, .bias = 1};
    pair p;
    pair_init(&p, &rc, 16, 1);
    const int D = 8, NH = 2, HD = 4;
    double x[B * L * MAXD], want[B * L * MAXD], got[B * L * MAXD];
    inputs(x, D, 51);
    for (int b = 0; b < B; b++) {
        double q[L * MAXD], k[L * MAXD], v[L * MAXD], ctx[L * MAXD];
        linear(x + b * L * D, L, D, p.weff[REF_Q], p.l.bias[REF_Q], D, q);
        linear(x + b * L * D, L, D, p.weff[REF_K], p.l.bias[REF_K], D, k);
        linear(x + b * L * D, L, D, p.weff[REF_V], p.l.bias[REF_V], D, v);
        for (int h = 0; h < NH; h++)
            for (int i = 0; i < L; i++) {
                double sc[L];
                for (int j = 0; j < L; j++) {
                    double dot = 0.0;
                    for (int c = 0; c < HD; c++)
                        dot += q[i * D + h * HD + c] * k[j * D + h * HD + c];
                    sc[j] = dot / sqrt((double)HD) + (1.0 - pad_mask[b * L + j]) * -DBL_MAX;
                }
                softmax_row(sc, L);
                for (int c = 0; c < HD; c++) {
                    double acc = 0.0;
                    for (int j = 0; j < L; j++)
                        acc += sc[j] * v[j * D + h * HD + c];
                    ctx[i * D + h * HD + c] = acc;
                }
            }
        linear(ctx, L, D, p.weff[REF_O], p.l.bias[REF_O], D, want + b * L * D);
    }
    const ref_attn_args a = {.q_lens = pad_lens};
    ref_forward_ex(&p.l, &a, x, x, B, L, L, got);
    compare_rows("BERT, padded batch", want, got, pad_mask, D);
    pair_free(&p);
}
END_TEST

/* RoPE scaling recipes as frequency tables (HF modeling_rope_utils): the model side
 * scales the way HF's rotary module does, the reference takes the table. */
START_TEST(test_model_rope_scaling_recipes)
{
    const ref_config rc = {.d_model = 8, .n_heads = 2, .rank = 2, .targets = 15, .causal = 1,
                           .out_proj = 1, .rope = REF_ROPE_HALF};
    int64_t pos[B * L];
    arange_positions(pos, 1000); /* far positions: low frequencies matter */
    const ref_attn_args a = {.q_pos = pos};
    const int dim = 4;
    double freqs[2], model_freqs[2];
    /* linear: the original rotary module divided t by scaling_factor */
    {
        pair p;
        pair_init(&p, &rc, 20, 0);
        int64_t scaled_pos[B * L];
        arange_positions(scaled_pos, 1000);
        ref_rope_freqs_linear(10000.0, dim, 4.0, freqs);
        ck_assert_int_eq(ref_layer_set_rope_freqs(&p.l, freqs, 2), 0);
        /* t/4 at inv_freq equals t at inv_freq/4: model side with positions t and the
         * plain table divided by the factor the way rope_utils does */
        for (int i = 0; i < 2; i++)
            model_freqs[i] = (1.0 / pow(10000.0, (2.0 * i) / dim)) / 4.0;
        p.m.inv_freq = model_freqs;
        check_hf("linear scaling", &p, scaled_pos, 0, &a);
        pair_free(&p);
    }
    /* dynamic NTK at seq_len 3000 over max_position_embeddings 2048, factor 2: the table
     * of base * (factor*len/max - (factor-1))^(dim/(dim-2)) */
    {
        pair p;
        pair_init(&p, &rc, 21, 0);
        const double f = 2.0 * 3000.0 / 2048.0 - 1.0;
        ref_rope_freqs_ntk(10000.0, dim, f, freqs);
        ck_assert_int_eq(ref_layer_set_rope_freqs(&p.l, freqs, 2), 0);
        const double base = 10000.0 * pow(f, (double)dim / (dim - 2));
        for (int i = 0; i < 2; i++)
            model_freqs[i] = 1.0 / pow(base, (2.0 * i) / dim);
        p.m.inv_freq = model_freqs;
        check_hf("dynamic NTK", &p, pos, 0, &a);
        pair_free(&p);
    }
    /* YaRN: table + attention_factor on cos and sin = SOFTMAX_SCALE * m^2 */
    {
        pair p;
        ref_config ry = rc;
        pair_init(&p, &ry, 22, 0);
        const double m = ref_rope_freqs_yarn(10000.0, dim, 4.0, 64.0, 32.0, 1.0, freqs);
        ck_assert_double_eq_tol(m, 0.1 * log(4.0) + 1.0, 1e-15);
        ck_assert_int_eq(ref_layer_set_rope_freqs(&p.l, freqs, 2), 0);
        p.l.softmax_scale = m * m / sqrt(4.0); /* LORA_CFG_SOFTMAX_SCALE */
        p.m.inv_freq = freqs;
        p.m.attention_factor = m;
        p.m.scaling = 1.0 / sqrt(4.0);
        check_hf("YaRN", &p, pos, 0, &a);
        pair_free(&p);
    }
}
END_TEST

/* The recipes' values: Llama 3.1's three bands and YaRN's ramp, from their definitions. */
START_TEST(test_model_rope_recipe_values)
{
    enum { DIM = 128 };
    const double pi = 3.14159265358979323846;
    double base[DIM / 2], l3[DIM / 2], yarn[DIM / 2], lin[DIM / 2], ntk[DIM / 2];
    ref_rope_freqs_theta(500000.0, DIM, base);
    ref_rope_freqs_llama3(500000.0, DIM, 8.0, 1.0, 4.0, 8192.0, l3);
    ref_rope_freqs_linear(500000.0, DIM, 8.0, lin);
    ref_rope_freqs_ntk(500000.0, DIM, 8.0, ntk);
    int high = 0, low = 0, mid = 0;
    for (int i = 0; i < DIM / 2; i++) {
        const double wavelen = 2 * pi / base[i];
        ck_assert_double_eq_tol(lin[i], base[i] / 8.0, 1e-18);
        if (wavelen < 8192.0 / 4.0) { /* short wavelengths kept */
            ck_assert(l3[i] == base[i]);
            high++;
        } else if (wavelen > 8192.0) { /* long ones interpolated by 8 */
            ck_assert_double_eq_tol(l3[i], base[i] / 8.0, 1e-18);
            low++;
        } else { /* between: a blend, strictly inside */
            ck_assert(l3[i] > base[i] / 8.0 && l3[i] < base[i]);
            mid++;
        }
    }
    ck_assert(high > 0 && low > 0 && mid > 0);
    ck_assert(ntk[0] == 1.0 && ntk[DIM / 2 - 1] < base[DIM / 2 - 1]);
    /* NTK's last frequency is exactly interpolated by the factor: theta'^(-(d-2)/d) */
    ck_assert_double_eq_tol(ntk[DIM / 2 - 1], base[DIM / 2 - 1] / 8.0,
                            1e-12 * base[DIM / 2 - 1]);
    const double m = ref_rope_freqs_yarn(10000.0, DIM, 16.0, 4096.0, 32.0, 1.0, yarn);
    ck_assert_double_eq_tol(m, 0.1 * log(16.0) + 1.0, 1e-15);
    ref_rope_freqs_theta(10000.0, DIM, base);
    const double lo = floor(DIM * log(4096.0 / (32 * 2 * pi)) / (2 * log(10000.0)));
    const double hi = ceil(DIM * log(4096.0 / (1 * 2 * pi)) / (2 * log(10000.0)));
    for (int i = 0; i < DIM / 2; i++) {
        if (i <= lo)
            ck_assert(yarn[i] == base[i]); /* fast dims extrapolate */
        else if (i >= hi)
            ck_assert_double_eq_tol(yarn[i], base[i] / 16.0, 1e-18);
        else
            ck_assert(yarn[i] < base[i] && yarn[i] > base[i] / 16.0);
    }
}
END_TEST

void reference_models_tests(Suite *s)
{
    TCase *tc = tcase_create("models");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_model_llama_hf);
    tcase_add_test(tc, test_model_llama_meta);
    tcase_add_test(tc, test_model_mistral_hf);
    tcase_add_test(tc, test_model_mistral_reference);
    tcase_add_test(tc, test_model_qwen2);
    tcase_add_test(tc, test_model_gemma2);
    tcase_add_test(tc, test_model_phi2);
    tcase_add_test(tc, test_model_gpt_neox);
    tcase_add_test(tc, test_model_gpt2);
    tcase_add_test(tc, test_model_bert);
    tcase_add_test(tc, test_model_rope_scaling_recipes);
    tcase_add_test(tc, test_model_rope_recipe_values);
    suite_add_tcase(s, tc);
}
