/* Double-precision reference of the liblora layer: plain loops, no blocking, no BLIS,
 * every formula straight from spec/MATH.md sections 1-2. Slow on purpose; the point is
 * that it is obviously right (and it is itself checked against finite differences in
 * test_reference.c). */
#include "reference.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- random numbers ----------------------------------------------------------------- */

uint64_t ref_rng_next(uint64_t *state)
{
    uint64_t z = (*state += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

double ref_uniform(uint64_t *state)
{
    return (double)(ref_rng_next(state) >> 11) * 0x1p-52 - 1.0;
}

float ref_uniform_f(uint64_t *state) { return (float)ref_uniform(state); }

void ref_to_float(const double *src, float *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = (float)src[i];
}

void ref_to_double(const float *src, double *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = (double)src[i];
}

/* ---- layer ------------------------------------------------------------------------- */

int ref_is_adapted(const ref_layer *l, int proj)
{
    return ref_has_proj(l, proj) && ((l->targets >> proj) & 1);
}

int ref_has_proj(const ref_layer *l, int proj)
{
    return proj >= 0 && proj < REF_NPROJ && (proj != REF_O || l->cfg.out_proj);
}

int ref_out_cols(const ref_layer *l) { return l->cfg.out_proj ? l->cfg.d_model : l->q_dim; }

void ref_layer_free(ref_layer *l)
{
    for (int t = 0; t < REF_NPROJ; t++) {
        free(l->w[t]);
        free(l->bias[t]);
        free(l->a[t]);
        free(l->b[t]);
        l->w[t] = l->bias[t] = l->a[t] = l->b[t] = NULL;
    }
    free(l->rope_freqs);
    l->rope_freqs = NULL;
}

int ref_layer_init(ref_layer *l, const ref_config *c)
{
    memset(l, 0, sizeof *l);
    l->cfg = *c;
    if (c->d_model <= 0)
        return -1;
    l->n_heads = c->n_heads > 0 ? c->n_heads : 1;
    l->n_kv_heads = c->n_kv_heads > 0 ? c->n_kv_heads : l->n_heads;
    if (c->head_dim > 0)
        l->head_dim = c->head_dim;
    else if (c->d_model % l->n_heads == 0)
        l->head_dim = c->d_model / l->n_heads;
    else
        return -1;
    if (l->n_heads % l->n_kv_heads != 0)
        return -1;
    l->rank = c->rank > 0 ? c->rank : 8;
    l->targets = c->targets > 0 ? c->targets : (LORA_TARGET_Q | LORA_TARGET_V);
    if ((l->targets & LORA_TARGET_O) && !c->out_proj)
        return -1;
    const double alpha = c->alpha != 0.0 ? c->alpha : (double)l->rank;
    l->lora_scale = c->rslora ? alpha / sqrt((double)l->rank) : alpha / (double)l->rank;
    l->softmax_scale = c->softmax_scale > 0.0 ? c->softmax_scale
                                               : 1.0 / sqrt((double)l->head_dim);
    if (c->rope < REF_ROPE_NONE || c->rope > REF_ROPE_INTERLEAVED || c->rope_theta < 0.0 ||
        c->rope_dim < 0 || c->rope_dim % 2 != 0 || c->rope_dim > l->head_dim ||
        (c->rope && ref_rope_dim(l) < 2) || c->window < 0 || c->softcap < 0.0 ||
        c->dropout < 0.0 || c->dropout >= 1.0)
        return -1;
    l->q_dim = l->n_heads * l->head_dim;
    l->kv_dim = l->n_kv_heads * l->head_dim;
    const int64_t d = c->d_model;
    const int64_t ins[REF_NPROJ] = {d, d, d, l->q_dim};
    const int64_t outs[REF_NPROJ] = {l->q_dim, l->kv_dim, l->kv_dim, d};
    for (int t = 0; t < REF_NPROJ; t++) {
        l->in[t] = ins[t];
        l->out[t] = outs[t];
        if (!ref_has_proj(l, t))
            continue;
        l->w[t] = calloc((size_t)(outs[t] * ins[t]), sizeof(double));
        if (!l->w[t])
            goto fail;
        if (c->bias && !(l->bias[t] = calloc((size_t)outs[t], sizeof(double))))
            goto fail;
        if (ref_is_adapted(l, t)) {
            l->a[t] = calloc((size_t)(l->rank * ins[t]), sizeof(double));
            l->b[t] = calloc((size_t)(outs[t] * l->rank), sizeof(double));
            if (!l->a[t] || !l->b[t])
                goto fail;
        }
    }
    return 0;
fail:
    ref_layer_free(l);
    return -1;
}

void ref_layer_randomize(ref_layer *l, uint64_t seed, double w_gain, double b_gain)
{
    uint64_t s = seed * UINT64_C(0x2545F4914F6CDD1D) + 1;
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_has_proj(l, t))
            continue;
        const double gw = w_gain / sqrt((double)l->in[t]);
        for (int64_t i = 0; i < l->out[t] * l->in[t]; i++)
            l->w[t][i] = (double)(float)(ref_uniform(&s) * gw);
        if (l->bias[t])
            for (int64_t i = 0; i < l->out[t]; i++)
                l->bias[t][i] = (double)(float)(0.5 * ref_uniform(&s));
        if (l->a[t]) {
            const double ga = 1.0 / sqrt((double)l->in[t]);
            for (int64_t i = 0; i < l->rank * l->in[t]; i++)
                l->a[t][i] = (double)(float)(ref_uniform(&s) * ga);
            for (int64_t i = 0; i < l->out[t] * l->rank; i++)
                l->b[t][i] = (double)(float)(ref_uniform(&s) * b_gain);
        }
    }
}

/* W_eff = W + s*B*A (out, in), freshly allocated. */
static double *effective_weight(const ref_layer *l, int t)
{
    const int64_t out = l->out[t], in = l->in[t], r = l->rank;
    double *w = malloc((size_t)(out * in) * sizeof(double));
    if (!w)
        return NULL;
    for (int64_t o = 0; o < out; o++)
        for (int64_t i = 0; i < in; i++) {
            double acc = 0.0;
            if (l->a[t])
                for (int64_t k = 0; k < r; k++)
                    acc += l->b[t][o * r + k] * l->a[t][k * in + i];
            w[o * in + i] = l->w[t][o * in + i] + l->lora_scale * acc;
        }
    return w;
}

/* y (rows, out) = x (rows, in) * W^T + bias. */
static void project(const double *x, int64_t rows, int64_t in, const double *w,
                    const double *bias, int64_t out, double *y)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t o = 0; o < out; o++) {
            double acc = bias ? bias[o] : 0.0;
            for (int64_t i = 0; i < in; i++)
                acc += x[r * in + i] * w[o * in + i];
            y[r * out + o] = acc;
        }
}

/* ---- per-call arguments, resolved ------------------------------------------------------ */

/* Everything a call's masks, positions, rotations and dropout need, defaults applied. */
typedef struct attn_ctx {
    const ref_layer *l;
    int64_t batch, len_q, len_kv;
    int self;
    int64_t *q_len, *kv_len;        /* (batch) */
    int64_t *q_pos, *kv_pos;        /* (batch*len_q), (batch*len_kv) */
    const int32_t *q_seg, *kv_seg;  /* NULL: all 0 */
    double *inv_freq;               /* rope_dim/2 values; NULL without RoPE */
    const uint8_t *keep[REF_NPROJ]; /* NULL: that LoRA branch sees x */
    double keep_scale;              /* 1/(1-p) */
} attn_ctx;

static void ctx_free(attn_ctx *cx)
{
    free(cx->q_len);
    free(cx->kv_len);
    free(cx->q_pos);
    free(cx->kv_pos);
    free(cx->inv_freq);
    memset(cx, 0, sizeof *cx);
}

static int ctx_init(attn_ctx *cx, const ref_layer *l, const ref_attn_args *a, int self,
                    int64_t batch, int64_t len_q, int64_t len_kv)
{
    memset(cx, 0, sizeof *cx);
    cx->l = l;
    cx->batch = batch;
    cx->len_q = len_q;
    cx->len_kv = len_kv;
    cx->self = self;
    const size_t nb = (size_t)(batch > 0 ? batch : 1);
    cx->q_len = malloc(nb * sizeof(int64_t));
    cx->kv_len = malloc(nb * sizeof(int64_t));
    cx->q_pos = malloc((size_t)(batch * len_q + 1) * sizeof(int64_t));
    cx->kv_pos = malloc((size_t)(batch * len_kv + 1) * sizeof(int64_t));
    if (l->cfg.rope)
        cx->inv_freq = malloc((size_t)(ref_rope_dim(l) / 2 + 1) * sizeof(double));
    if (!cx->q_len || !cx->kv_len || !cx->q_pos || !cx->kv_pos ||
        (l->cfg.rope && !cx->inv_freq)) {
        ctx_free(cx);
        return -1;
    }
    const int64_t *q_lens = a ? a->q_lens : NULL, *kv_lens = a ? a->kv_lens : NULL;
    const int64_t *q_pos = a ? a->q_pos : NULL, *kv_pos = a ? a->kv_pos : NULL;
    if (self && !kv_lens)
        kv_lens = q_lens;
    if (self && !kv_pos)
        kv_pos = q_pos;
    for (int64_t b = 0; b < batch; b++) {
        cx->q_len[b] = q_lens ? q_lens[b] : len_q;
        cx->kv_len[b] = kv_lens ? kv_lens[b] : len_kv;
        for (int64_t i = 0; i < len_q; i++)
            cx->q_pos[b * len_q + i] = q_pos ? q_pos[b * len_q + i] : (len_kv - len_q) + i;
        for (int64_t j = 0; j < len_kv; j++)
            cx->kv_pos[b * len_kv + j] = kv_pos ? kv_pos[b * len_kv + j] : j;
    }
    cx->q_seg = a ? a->q_seg : NULL;
    cx->kv_seg = a ? a->kv_seg : NULL;
    if (self && !cx->kv_seg)
        cx->kv_seg = cx->q_seg;
    if (cx->inv_freq)
        ref_rope_inv_freq(l, cx->inv_freq);
    if (a && !a->infer && l->cfg.dropout > 0.0)
        for (int t = 0; t < REF_NPROJ; t++)
            cx->keep[t] = ref_is_adapted(l, t) ? a->keep[t] : NULL;
    cx->keep_scale = 1.0 / (1.0 - l->cfg.dropout);
    return 0;
}

static int ctx_visible(const attn_ctx *cx, int64_t b, int64_t i, int64_t j)
{
    if (i >= cx->q_len[b] || j >= cx->kv_len[b])
        return 0;
    const int32_t qs = cx->q_seg ? cx->q_seg[b * cx->len_q + i] : 0;
    const int32_t ks = cx->kv_seg ? cx->kv_seg[b * cx->len_kv + j] : 0;
    if (qs != ks)
        return 0;
    const int64_t d = cx->q_pos[b * cx->len_q + i] - cx->kv_pos[b * cx->len_kv + j];
    const int64_t w = cx->l->cfg.window;
    if (cx->l->cfg.causal)
        return d >= 0 && (w <= 0 || d < w);
    return w <= 0 || (d < w && -d < w);
}

int ref_attn_visible(const ref_layer *l, const ref_attn_args *args, int self, int64_t batch,
                     int64_t len_q, int64_t len_kv, int64_t b, int64_t i, int64_t j)
{
    attn_ctx cx;
    if (ctx_init(&cx, l, args, self, batch, len_q, len_kv) != 0)
        abort();
    const int v = ctx_visible(&cx, b, i, j);
    ctx_free(&cx);
    return v;
}

/* ---- RoPE ------------------------------------------------------------------------------ */

int ref_rope_dim(const ref_layer *l)
{
    return l->cfg.rope_dim > 0 ? l->cfg.rope_dim : l->head_dim;
}

void ref_rope_inv_freq(const ref_layer *l, double *inv_freq)
{
    const int half = ref_rope_dim(l) / 2;
    if (l->rope_freqs) {
        memcpy(inv_freq, l->rope_freqs, (size_t)half * sizeof(double));
        return;
    }
    const double theta = l->cfg.rope_theta > 0.0 ? l->cfg.rope_theta : 10000.0;
    ref_rope_freqs_theta(theta, ref_rope_dim(l), inv_freq);
}

int ref_layer_set_rope_freqs(ref_layer *l, const double *inv_freq, size_t n)
{
    if (n != (size_t)(ref_rope_dim(l) / 2))
        return -1;
    for (size_t i = 0; i < n; i++)
        if (!(inv_freq[i] >= 0.0) || isinf(inv_freq[i]))
            return -1;
    double *copy = malloc((n + 1) * sizeof(double));
    if (!copy)
        return -1;
    memcpy(copy, inv_freq, n * sizeof(double));
    free(l->rope_freqs);
    l->rope_freqs = copy;
    return 0;
}

void ref_rope_rotate(const ref_layer *l, const double *inv_freq, int64_t pos, double *x,
                     int inverse)
{
    const int half = ref_rope_dim(l) / 2;
    for (int i = 0; i < half; i++) {
        const int a = l->cfg.rope == REF_ROPE_INTERLEAVED ? 2 * i : i;
        const int b = l->cfg.rope == REF_ROPE_INTERLEAVED ? 2 * i + 1 : i + half;
        const double angle = (double)pos * inv_freq[i];
        const double c = cos(angle), s = inverse ? -sin(angle) : sin(angle);
        const double xa = x[a], xb = x[b];
        x[a] = xa * c - xb * s;
        x[b] = xb * c + xa * s;
    }
}

/* Rotates every head of rows (rows, width) by its position (RoPE on Q or K). */
static void rope_rows(const attn_ctx *cx, double *y, int64_t rows, int width,
                      const int64_t *pos, int inverse)
{
    if (!cx->inv_freq)
        return;
    const int hd = cx->l->head_dim;
    for (int64_t r = 0; r < rows; r++)
        for (int h = 0; h < width / hd; h++)
            ref_rope_rotate(cx->l, cx->inv_freq, pos[r], y + r * width + (int64_t)h * hd,
                            inverse);
}

void ref_rope_permute_rows(const double *src, double *dst, int n_heads, int head_dim,
                           int rope_dim, int64_t cols, int inverse)
{
    const int half = rope_dim / 2;
    for (int h = 0; h < n_heads; h++)
        for (int r = 0; r < head_dim; r++) {
            int from = r; /* HALF row that lands on INTERLEAVED row r */
            if (r < rope_dim)
                from = (r % 2) * half + r / 2;
            const int64_t hf = (int64_t)h * head_dim + from, il = (int64_t)h * head_dim + r;
            const int64_t s_row = inverse ? il : hf, d_row = inverse ? hf : il;
            memcpy(dst + d_row * cols, src + s_row * cols, (size_t)cols * sizeof(double));
        }
}

void ref_rope_freqs_theta(double theta, int dim, double *inv_freq)
{
    for (int i = 0; i < dim / 2; i++)
        inv_freq[i] = pow(theta, -2.0 * i / dim);
}

void ref_rope_freqs_linear(double theta, int dim, double factor, double *inv_freq)
{
    ref_rope_freqs_theta(theta, dim, inv_freq);
    for (int i = 0; i < dim / 2; i++)
        inv_freq[i] /= factor;
}

void ref_rope_freqs_ntk(double theta, int dim, double factor, double *inv_freq)
{
    ref_rope_freqs_theta(theta * pow(factor, (double)dim / (dim - 2)), dim, inv_freq);
}

void ref_rope_freqs_llama3(double theta, int dim, double factor, double low_freq_factor,
                           double high_freq_factor, double original_context,
                           double *inv_freq)
{
    const double pi = 3.14159265358979323846;
    const double low_wavelen = original_context / low_freq_factor;
    const double high_wavelen = original_context / high_freq_factor;
    ref_rope_freqs_theta(theta, dim, inv_freq);
    for (int i = 0; i < dim / 2; i++) {
        const double f = inv_freq[i], wavelen = 2.0 * pi / f;
        if (wavelen < high_wavelen)
            continue; /* high frequencies: unchanged */
        if (wavelen > low_wavelen) {
            inv_freq[i] = f / factor; /* low frequencies: interpolated */
            continue;
        }
        const double smooth = (original_context / wavelen - low_freq_factor) /
                              (high_freq_factor - low_freq_factor);
        inv_freq[i] = (1.0 - smooth) * f / factor + smooth * f;
    }
}

double ref_rope_freqs_yarn(double theta, int dim, double factor, double original_context,
                           double beta_fast, double beta_slow, double *inv_freq)
{
    const double pi = 3.14159265358979323846;
    /* The dimension index at which a frequency turns `rotations` times over the
     * original context. */
#define CORRECTION_DIM(rotations) \
    (dim * log(original_context / ((rotations) * 2.0 * pi)) / (2.0 * log(theta)))
    double low = floor(CORRECTION_DIM(beta_fast)), high = ceil(CORRECTION_DIM(beta_slow));
#undef CORRECTION_DIM
    low = low > 0.0 ? low : 0.0;
    high = high < dim - 1 ? high : dim - 1;
    if (low == high)
        high += 0.001;
    for (int i = 0; i < dim / 2; i++) {
        const double extrapolated = pow(theta, -2.0 * i / dim);
        const double interpolated = extrapolated / factor;
        double ramp = (i - low) / (high - low);
        ramp = ramp < 0.0 ? 0.0 : (ramp > 1.0 ? 1.0 : ramp);
        const double keep_extrapolated = 1.0 - ramp;
        inv_freq[i] = interpolated * (1.0 - keep_extrapolated) + extrapolated * keep_extrapolated;
    }
    return 0.1 * log(factor) + 1.0;
}

void ref_dropout_keep_random(uint64_t seed, double p, size_t n, uint8_t *keep)
{
    uint64_t s = seed * UINT64_C(0xD1B54A32D192ED03) + 11;
    for (size_t i = 0; i < n; i++)
        keep[i] = (uint8_t)(0.5 * (ref_uniform(&s) + 1.0) >= p);
}

/* ---- forward ----------------------------------------------------------------------------- */

/* Softmax score of (query row qi, key row kj): beta*q.k, then Gemma 2's tanh cap. */
static double score(const ref_layer *l, const double *qi, const double *kj)
{
    double s = 0.0;
    for (int c = 0; c < l->head_dim; c++)
        s += qi[c] * kj[c];
    s *= l->softmax_scale;
    if (l->cfg.softcap > 0.0)
        s = l->cfg.softcap * tanh(s / l->cfg.softcap);
    return s;
}

/* P (len_q, len_kv) of batch element b, query head h; masked entries are 0, and so is a
 * row that sees no key. */
static void head_probs(const attn_ctx *cx, const double *q, const double *k, int64_t b,
                       int h, double *p)
{
    const ref_layer *l = cx->l;
    const int64_t len_q = cx->len_q, len_kv = cx->len_kv;
    const int d = l->head_dim, kvh = h / (l->n_heads / l->n_kv_heads);
    for (int64_t i = 0; i < len_q; i++) {
        const double *qi = q + (b * len_q + i) * l->q_dim + (int64_t)h * d;
        double *row = p + i * len_kv;
        double mx = -INFINITY;
        for (int64_t j = 0; j < len_kv; j++) {
            row[j] = 0.0;
            if (!ctx_visible(cx, b, i, j))
                continue;
            row[j] = score(l, qi, k + (b * len_kv + j) * l->kv_dim + (int64_t)kvh * d);
            if (row[j] > mx)
                mx = row[j];
        }
        double sum = 0.0;
        for (int64_t j = 0; j < len_kv; j++)
            if (ctx_visible(cx, b, i, j)) {
                row[j] = exp(row[j] - mx);
                sum += row[j];
            }
        for (int64_t j = 0; j < len_kv; j++)
            row[j] = ctx_visible(cx, b, i, j) ? row[j] / sum : 0.0;
    }
}

/* Everything a forward computes; backward recomputes it. */
typedef struct fwd {
    double *weff[REF_NPROJ];
    double *xd[REF_NPROJ];     /* dropped LoRA input x*keep/(1-p), NULL without dropout */
    double *q, *k, *v, *c, *p; /* q, k after RoPE; p: one head's (len_q, len_kv) scratch */
} fwd;

static void fwd_free(fwd *f)
{
    for (int t = 0; t < REF_NPROJ; t++) {
        free(f->weff[t]);
        free(f->xd[t]);
    }
    free(f->q);
    free(f->k);
    free(f->v);
    free(f->c);
    free(f->p);
    memset(f, 0, sizeof *f);
}

/* x*keep/(1-p) for target t's LoRA branch, or NULL (no dropout there, or no memory:
 * *failed tells). */
static double *dropped_input(const attn_ctx *cx, int t, const double *x, int64_t rows,
                             int *failed)
{
    if (!cx->keep[t])
        return NULL;
    const int64_t n = rows * cx->l->in[t];
    double *xd = malloc((size_t)(n + 1) * sizeof(double));
    if (!xd) {
        *failed = 1;
        return NULL;
    }
    for (int64_t i = 0; i < n; i++)
        xd[i] = cx->keep[t][i] ? x[i] * cx->keep_scale : 0.0;
    return xd;
}

/* y = x W_eff^T + b without dropout; with it, y = x W^T + b + s (xd A^T) B^T (PEFT's
 * lora_B(lora_A(dropout(x))) * s). */
static void project_target(const ref_layer *l, int t, const double *x, const double *xd,
                           int64_t rows, const double *weff, double *y)
{
    const int64_t in = l->in[t], out = l->out[t], r = l->rank;
    if (!xd) {
        project(x, rows, in, weff, l->bias[t], out, y);
        return;
    }
    project(x, rows, in, l->w[t], l->bias[t], out, y);
    for (int64_t row = 0; row < rows; row++)
        for (int64_t k = 0; k < r; k++) {
            double u = 0.0;
            for (int64_t i = 0; i < in; i++)
                u += xd[row * in + i] * l->a[t][k * in + i];
            for (int64_t o = 0; o < out; o++)
                y[row * out + o] += l->lora_scale * l->b[t][o * r + k] * u;
        }
}

/* Zeroes the rows of padded queries of y (batch*len_q rows of width cols). */
static void zero_padded_rows(const attn_ctx *cx, double *y, int64_t cols)
{
    for (int64_t b = 0; b < cx->batch; b++)
        for (int64_t i = cx->q_len[b]; i < cx->len_q; i++)
            memset(y + (b * cx->len_q + i) * cols, 0, (size_t)cols * sizeof(double));
}

static int fwd_run(const attn_ctx *cx, const double *xq, const double *xkv, fwd *f,
                   double *out)
{
    const ref_layer *l = cx->l;
    memset(f, 0, sizeof *f);
    const int64_t len_q = cx->len_q, len_kv = cx->len_kv;
    const int64_t nq = cx->batch * len_q, nk = cx->batch * len_kv;
    int failed = 0;
    for (int t = 0; t < REF_NPROJ; t++)
        if (ref_has_proj(l, t) && !(f->weff[t] = effective_weight(l, t)))
            goto fail;
    f->xd[REF_Q] = dropped_input(cx, REF_Q, xq, nq, &failed);
    f->xd[REF_K] = dropped_input(cx, REF_K, xkv, nk, &failed);
    f->xd[REF_V] = dropped_input(cx, REF_V, xkv, nk, &failed);
    f->q = malloc((size_t)(nq * l->q_dim + 1) * sizeof(double));
    f->k = malloc((size_t)(nk * l->kv_dim + 1) * sizeof(double));
    f->v = malloc((size_t)(nk * l->kv_dim + 1) * sizeof(double));
    f->c = calloc((size_t)(nq * l->q_dim + 1), sizeof(double));
    f->p = malloc((size_t)(len_q * len_kv + 1) * sizeof(double));
    if (failed || !f->q || !f->k || !f->v || !f->c || !f->p)
        goto fail;
    project_target(l, REF_Q, xq, f->xd[REF_Q], nq, f->weff[REF_Q], f->q);
    project_target(l, REF_K, xkv, f->xd[REF_K], nk, f->weff[REF_K], f->k);
    project_target(l, REF_V, xkv, f->xd[REF_V], nk, f->weff[REF_V], f->v);
    rope_rows(cx, f->q, nq, l->q_dim, cx->q_pos, 0);
    rope_rows(cx, f->k, nk, l->kv_dim, cx->kv_pos, 0);
    const int hd = l->head_dim;
    for (int64_t b = 0; b < cx->batch; b++)
        for (int h = 0; h < l->n_heads; h++) {
            const int kvh = h / (l->n_heads / l->n_kv_heads);
            head_probs(cx, f->q, f->k, b, h, f->p);
            for (int64_t i = 0; i < len_q; i++) {
                double *ci = f->c + (b * len_q + i) * l->q_dim + (int64_t)h * hd;
                for (int64_t j = 0; j < len_kv; j++) {
                    const double pij = f->p[i * len_kv + j];
                    const double *vj = f->v + (b * len_kv + j) * l->kv_dim + (int64_t)kvh * hd;
                    for (int c = 0; c < hd; c++)
                        ci[c] += pij * vj[c];
                }
            }
        }
    if (l->cfg.out_proj) {
        f->xd[REF_O] = dropped_input(cx, REF_O, f->c, nq, &failed);
        if (failed)
            goto fail;
    }
    if (out) {
        if (l->cfg.out_proj)
            project_target(l, REF_O, f->c, f->xd[REF_O], nq, f->weff[REF_O], out);
        else
            memcpy(out, f->c, (size_t)(nq * l->q_dim) * sizeof(double));
        zero_padded_rows(cx, out, ref_out_cols(l));
    }
    return 0;
fail:
    fwd_free(f);
    return -1;
}

/* Self-attention: xkv NULL or xq, with equal lengths. */
static int is_self(const double *xq, const double *xkv, int64_t len_q, int64_t len_kv)
{
    return (xkv == NULL || xkv == xq) && len_q == len_kv;
}

void ref_forward_ex(const ref_layer *l, const ref_attn_args *args, const double *xq,
                    const double *xkv, int64_t batch, int64_t len_q, int64_t len_kv,
                    double *out)
{
    const int self = is_self(xq, xkv, len_q, len_kv);
    attn_ctx cx;
    fwd f;
    if (ctx_init(&cx, l, args, self, batch, len_q, len_kv) != 0 ||
        fwd_run(&cx, xq, xkv ? xkv : xq, &f, out) != 0) {
        fprintf(stderr, "reference: out of memory\n");
        abort();
    }
    fwd_free(&f);
    ctx_free(&cx);
}

void ref_forward(const ref_layer *l, const double *xq, const double *xkv, int64_t batch,
                 int64_t len_q, int64_t len_kv, double *out)
{
    ref_forward_ex(l, NULL, xq, xkv, batch, len_q, len_kv, out);
}

int ref_activations_ex(const ref_layer *l, const ref_attn_args *args, const double *xq,
                       const double *xkv, int64_t batch, int64_t len_q, int64_t len_kv,
                       double *q, double *k, double *v, double *attn)
{
    attn_ctx cx;
    fwd f;
    if (ctx_init(&cx, l, args, is_self(xq, xkv, len_q, len_kv), batch, len_q, len_kv) != 0)
        return -1;
    if (fwd_run(&cx, xq, xkv ? xkv : xq, &f, NULL) != 0) {
        ctx_free(&cx);
        return -1;
    }
    const size_t nq = (size_t)(batch * len_q), nk = (size_t)(batch * len_kv);
    if (q)
        memcpy(q, f.q, nq * (size_t)l->q_dim * sizeof(double));
    if (k)
        memcpy(k, f.k, nk * (size_t)l->kv_dim * sizeof(double));
    if (v)
        memcpy(v, f.v, nk * (size_t)l->kv_dim * sizeof(double));
    if (attn)
        memcpy(attn, f.c, nq * (size_t)l->q_dim * sizeof(double));
    fwd_free(&f);
    ctx_free(&cx);
    return 0;
}

int ref_activations(const ref_layer *l, const double *xq, const double *xkv, int64_t batch,
                    int64_t len_q, int64_t len_kv, double *q, double *k, double *v,
                    double *attn)
{
    return ref_activations_ex(l, NULL, xq, xkv, batch, len_q, len_kv, q, k, v, attn);
}

double *ref_effective_weight(const ref_layer *l, int proj)
{
    return ref_has_proj(l, proj) ? effective_weight(l, proj) : NULL;
}

double ref_score_bound(const ref_layer *l, const double *q, const double *k, int64_t batch,
                       int64_t len_q, int64_t len_kv)
{
    const int d = l->head_dim, group = l->n_heads / l->n_kv_heads;
    double *mean = malloc((size_t)d * sizeof *mean);
    if (!mean)
        abort();
    double r = 0.0;
    for (int64_t b = 0; b < batch; b++)
        for (int h = 0; h < l->n_heads; h++) {
            const double *kh = k + b * len_kv * l->kv_dim + (int64_t)(h / group) * d;
            const double *qh = q + b * len_q * l->q_dim + (int64_t)h * d;
            double kmax = 0.0, qmax = 0.0;
            for (int c = 0; c < d; c++) {
                double s = 0.0;
                for (int64_t j = 0; j < len_kv; j++)
                    s += kh[j * l->kv_dim + c];
                mean[c] = s / (double)len_kv;
            }
            for (int64_t j = 0; j < len_kv; j++) {
                double s = 0.0;
                for (int c = 0; c < d; c++) {
                    const double x = kh[j * l->kv_dim + c] - mean[c];
                    s += x * x;
                }
                kmax = s > kmax ? s : kmax;
            }
            for (int64_t i = 0; i < len_q; i++) {
                double s = 0.0;
                for (int c = 0; c < d; c++)
                    s += qh[i * l->q_dim + c] * qh[i * l->q_dim + c];
                qmax = s > qmax ? s : qmax;
            }
            const double rh = fabs(l->softmax_scale) * sqrt(qmax) * sqrt(kmax);
            r = rh > r ? rh : r;
        }
    free(mean);
    return r;
}

/* From dY (rows, out) and X (rows, in) of projection t: dA, dB (overwritten) through
 * dW = dY^T X~ (dA = s B^T dW, dB = s dW A^T), X~ being the LoRA branch's input (xd, the
 * dropped X, or X itself), and dX (+)= dY W_eff, or with dropout
 * dX (+)= dY W + s (dY B A) .* keep/(1-p): both paths. */
static void proj_grads(const attn_ctx *cx, int t, const double *x, const double *xd,
                       const double *dy, int64_t rows, const double *weff, ref_grads *g,
                       double *dx, int accumulate)
{
    const ref_layer *l = cx->l;
    const int64_t in = l->in[t], out = l->out[t], r = l->rank;
    const double *xl = xd ? xd : x;
    if (ref_is_adapted(l, t) && (g->da[t] || g->db[t])) {
        double *dw = calloc((size_t)(out * in), sizeof(double));
        if (!dw)
            abort();
        for (int64_t row = 0; row < rows; row++)
            for (int64_t o = 0; o < out; o++) {
                const double dyo = dy[row * out + o];
                for (int64_t i = 0; i < in; i++)
                    dw[o * in + i] += dyo * xl[row * in + i];
            }
        if (g->da[t])
            for (int64_t k = 0; k < r; k++)
                for (int64_t i = 0; i < in; i++) {
                    double acc = 0.0;
                    for (int64_t o = 0; o < out; o++)
                        acc += l->b[t][o * r + k] * dw[o * in + i];
                    g->da[t][k * in + i] = l->lora_scale * acc;
                }
        if (g->db[t])
            for (int64_t o = 0; o < out; o++)
                for (int64_t k = 0; k < r; k++) {
                    double acc = 0.0;
                    for (int64_t i = 0; i < in; i++)
                        acc += dw[o * in + i] * l->a[t][k * in + i];
                    g->db[t][o * r + k] = l->lora_scale * acc;
                }
        free(dw);
    }
    if (!dx)
        return;
    for (int64_t row = 0; row < rows; row++)
        for (int64_t i = 0; i < in; i++) {
            double acc = 0.0;
            if (!xd) {
                for (int64_t o = 0; o < out; o++)
                    acc += dy[row * out + o] * weff[o * in + i];
            } else {
                double lora = 0.0;
                for (int64_t o = 0; o < out; o++) {
                    acc += dy[row * out + o] * l->w[t][o * in + i];
                    for (int64_t k = 0; k < r; k++)
                        lora += dy[row * out + o] * l->b[t][o * r + k] * l->a[t][k * in + i];
                }
                if (cx->keep[t][row * in + i])
                    acc += l->lora_scale * cx->keep_scale * lora;
            }
            dx[row * in + i] = accumulate ? dx[row * in + i] + acc : acc;
        }
}

/* dS of one head into dq, dk, dv (RoPE frame), from dC and the forward f. */
static void head_grads(const attn_ctx *cx, const fwd *f, const double *dc, int64_t b, int h,
                       double *dp, double *dq, double *dk, double *dv)
{
    const ref_layer *l = cx->l;
    const int64_t len_q = cx->len_q, len_kv = cx->len_kv;
    const int hd = l->head_dim, kvh = h / (l->n_heads / l->n_kv_heads);
    const double cap = l->cfg.softcap;
    for (int64_t i = 0; i < len_q; i++) {
        const double *doi = dc + (b * len_q + i) * l->q_dim + (int64_t)h * hd;
        const int64_t qrow = (b * len_q + i) * l->q_dim + (int64_t)h * hd;
        double rho = 0.0;
        for (int64_t j = 0; j < len_kv; j++) {
            const double *vj = f->v + (b * len_kv + j) * l->kv_dim + (int64_t)kvh * hd;
            double s = 0.0;
            for (int c = 0; c < hd; c++)
                s += doi[c] * vj[c];
            dp[i * len_kv + j] = s; /* dP = dO V^T */
            rho += f->p[i * len_kv + j] * s;
        }
        for (int64_t j = 0; j < len_kv; j++) {
            const double pij = f->p[i * len_kv + j];
            if (pij == 0.0)
                continue; /* masked (or underflowed): no gradient */
            const int64_t krow = (b * len_kv + j) * l->kv_dim + (int64_t)kvh * hd;
            double ds = pij * (dp[i * len_kv + j] - rho);
            if (cap > 0.0) {
                /* d(c tanh(s/c))/ds = 1 - tanh^2(s/c) = 1 - (capped/c)^2 */
                const double capped = score(l, f->q + qrow, f->k + krow) / cap;
                ds *= 1.0 - capped * capped;
            }
            for (int c = 0; c < hd; c++) {
                dv[krow + c] += pij * doi[c];
                dq[qrow + c] += l->softmax_scale * ds * f->k[krow + c];
                dk[krow + c] += l->softmax_scale * ds * f->q[qrow + c];
            }
        }
    }
}

void ref_backward_ex(const ref_layer *l, const ref_attn_args *args, const double *xq,
                     const double *xkv, int64_t batch, int64_t len_q, int64_t len_kv,
                     const double *dout, ref_grads *g)
{
    attn_ctx cx;
    fwd f;
    if (ctx_init(&cx, l, args, is_self(xq, xkv, len_q, len_kv), batch, len_q, len_kv) != 0)
        abort();
    if (!xkv)
        xkv = xq;
    if (fwd_run(&cx, xq, xkv, &f, NULL) != 0)
        abort();
    const int64_t nq = batch * len_q, nk = batch * len_kv;
    double *dc = malloc((size_t)(nq * l->q_dim + 1) * sizeof(double));
    double *dq = calloc((size_t)(nq * l->q_dim + 1), sizeof(double));
    double *dk = calloc((size_t)(nk * l->kv_dim + 1), sizeof(double));
    double *dv = calloc((size_t)(nk * l->kv_dim + 1), sizeof(double));
    double *dp = malloc((size_t)(len_q * len_kv + 1) * sizeof(double));
    if (!dc || !dq || !dk || !dv || !dp)
        abort();
    /* A padded query's dout needs no masking: its row of P and of C is 0, so it reaches
     * neither dS, dV nor dW_O (the frozen bias has no gradient). */
    if (l->cfg.out_proj) {
        /* out = C W_O^T + b: dC = dout W_O, and the O adapter from dW_O = dout^T C. */
        proj_grads(&cx, REF_O, f.c, f.xd[REF_O], dout, nq, f.weff[REF_O], g, dc, 0);
    } else {
        memcpy(dc, dout, (size_t)(nq * l->q_dim) * sizeof(double));
    }
    for (int64_t b = 0; b < batch; b++)
        for (int h = 0; h < l->n_heads; h++) {
            head_probs(&cx, f.q, f.k, b, h, f.p);
            head_grads(&cx, &f, dc, b, h, dp, dq, dk, dv);
        }
    /* RoPE's backward: turn dQ and dK back by their positions. */
    rope_rows(&cx, dq, nq, l->q_dim, cx.q_pos, 1);
    rope_rows(&cx, dk, nk, l->kv_dim, cx.kv_pos, 1);
    proj_grads(&cx, REF_Q, xq, f.xd[REF_Q], dq, nq, f.weff[REF_Q], g, g->dxq, 0);
    proj_grads(&cx, REF_K, xkv, f.xd[REF_K], dk, nk, f.weff[REF_K], g, g->dxkv, 0);
    proj_grads(&cx, REF_V, xkv, f.xd[REF_V], dv, nk, f.weff[REF_V], g, g->dxkv, 1);
    free(dc);
    free(dq);
    free(dk);
    free(dv);
    free(dp);
    fwd_free(&f);
    ctx_free(&cx);
}

void ref_backward(const ref_layer *l, const double *xq, const double *xkv, int64_t batch,
                  int64_t len_q, int64_t len_kv, const double *dout, ref_grads *g)
{
    ref_backward_ex(l, NULL, xq, xkv, batch, len_q, len_kv, dout, g);
}

int ref_grads_alloc(ref_grads *g, const ref_layer *l, int64_t batch, int64_t len_q,
                    int64_t len_kv)
{
    memset(g, 0, sizeof *g);
    for (int t = 0; t < REF_NPROJ; t++)
        if (ref_is_adapted(l, t)) {
            g->da[t] = calloc((size_t)(l->rank * l->in[t]), sizeof(double));
            g->db[t] = calloc((size_t)(l->out[t] * l->rank), sizeof(double));
            if (!g->da[t] || !g->db[t])
                goto fail;
        }
    g->dxq = calloc((size_t)(batch * len_q * l->cfg.d_model), sizeof(double));
    g->dxkv = calloc((size_t)(batch * len_kv * l->cfg.d_model), sizeof(double));
    if (!g->dxq || !g->dxkv)
        goto fail;
    return 0;
fail:
    ref_grads_free(g);
    return -1;
}

void ref_grads_free(ref_grads *g)
{
    for (int t = 0; t < REF_NPROJ; t++) {
        free(g->da[t]);
        free(g->db[t]);
    }
    free(g->dxq);
    free(g->dxkv);
    memset(g, 0, sizeof *g);
}

/* ---- problems ------------------------------------------------------------------------ */

int ref_problem_init(ref_problem *p, const ref_layer *l, int cross, int64_t batch,
                     int64_t len_q, int64_t len_kv, uint64_t seed)
{
    memset(p, 0, sizeof *p);
    p->cross = cross;
    p->batch = batch;
    p->len_q = len_q;
    p->len_kv = cross ? len_kv : len_q;
    const size_t nxq = (size_t)(batch * len_q * l->cfg.d_model);
    const size_t nxkv = (size_t)(batch * p->len_kv * l->cfg.d_model);
    const size_t nout = (size_t)(batch * len_q * ref_out_cols(l));
    uint64_t s = seed * UINT64_C(0x9E3779B97F4A7C15) + 7;
    p->xq = malloc(nxq * sizeof(double));
    p->dout = malloc(nout * sizeof(double));
    p->xkv = cross ? malloc(nxkv * sizeof(double)) : p->xq;
    if (!p->xq || !p->dout || !p->xkv) {
        ref_problem_free(p);
        return -1;
    }
    for (size_t i = 0; i < nxq; i++)
        p->xq[i] = (double)ref_uniform_f(&s);
    if (cross)
        for (size_t i = 0; i < nxkv; i++)
            p->xkv[i] = (double)ref_uniform_f(&s);
    for (size_t i = 0; i < nout; i++)
        p->dout[i] = (double)ref_uniform_f(&s);
    return 0;
}

void ref_problem_free(ref_problem *p)
{
    if (p->xkv != p->xq)
        free(p->xkv);
    free(p->xq);
    free(p->dout);
    memset(p, 0, sizeof *p);
}

/* ---- comparison -------------------------------------------------------------------- */

double ref_max_abs(const double *y, size_t n)
{
    double m = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double a = fabs(y[i]);
        if (!(a <= m))
            m = a; /* NaN propagates */
    }
    return m;
}

static double rel_from(double maxdiff, double refmax, double floor)
{
    double den = refmax > floor ? refmax : floor;
    if (den < 1e-300)
        den = 1e-300;
    return maxdiff / den;
}

double ref_rel_err_f(const float *x, const double *y, size_t n, double floor)
{
    double md = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)x[i] - y[i]);
        if (!(d <= md))
            md = isnan(d) ? INFINITY : d; /* NaN or Inf in x never passes */
    }
    return rel_from(md, ref_max_abs(y, n), floor);
}

double ref_rel_err_d(const double *x, const double *y, size_t n, double floor)
{
    double md = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs(x[i] - y[i]);
        if (!(d <= md))
            md = isnan(d) ? INFINITY : d;
    }
    return rel_from(md, ref_max_abs(y, n), floor);
}

static const int target_bits[REF_NPROJ] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V,
                                           LORA_TARGET_O};

int ref_make_adapter(const ref_layer *l, int backend, int threads, lora_adapter **out)
{
    return ref_make_adapter_ex(l, backend, threads, NULL, 0, out);
}

int ref_make_adapter_ex(const ref_layer *l, int backend, int threads,
                        const ref_param *extra, int n_extra, lora_adapter **out)
{
    *out = NULL;
    const ref_config *c = &l->cfg;
    lora_config *cfg = NULL;
    lora_adapter *ad = NULL;
    float *buf = NULL;
    int st = lora_config_create(&cfg);
#define SETI(p, v) \
    if (st == LORA_OK) st = lora_config_set_int(cfg, (p), (v))
#define SETD(p, v) \
    if (st == LORA_OK) st = lora_config_set_double(cfg, (p), (v))
    SETI(LORA_CFG_D_MODEL, c->d_model);
    if (c->n_heads > 0)
        SETI(LORA_CFG_N_HEADS, c->n_heads);
    if (c->n_kv_heads > 0)
        SETI(LORA_CFG_N_KV_HEADS, c->n_kv_heads);
    if (c->head_dim > 0)
        SETI(LORA_CFG_HEAD_DIM, c->head_dim);
    if (c->rank > 0)
        SETI(LORA_CFG_RANK, c->rank);
    if (c->targets > 0)
        SETI(LORA_CFG_TARGETS, c->targets);
    if (c->alpha != 0.0)
        SETD(LORA_CFG_ALPHA, c->alpha);
    SETI(LORA_CFG_RSLORA, c->rslora);
    if (c->softmax_scale > 0.0)
        SETD(LORA_CFG_SOFTMAX_SCALE, c->softmax_scale);
    SETI(LORA_CFG_CAUSAL, c->causal);
    SETI(LORA_CFG_OUT_PROJ, c->out_proj);
    /* 0.2 parameters by their spec numbers, only when used (a 0.1 library refuses them). */
    if (c->rope)
        SETI(REF_CFG_ROPE, c->rope);
    if (c->rope_theta > 0.0)
        SETD(REF_CFG_ROPE_THETA, c->rope_theta);
    if (c->rope_dim > 0)
        SETI(REF_CFG_ROPE_DIM, c->rope_dim);
    if (c->window > 0)
        SETI(REF_CFG_WINDOW, c->window);
    if (c->softcap > 0.0)
        SETD(REF_CFG_SOFTCAP, c->softcap);
    if (c->dropout > 0.0)
        SETD(REF_CFG_DROPOUT, c->dropout);
    SETI(LORA_CFG_BACKEND, backend);
    SETI(LORA_CFG_THREADS, threads);
    for (int i = 0; i < n_extra; i++) {
        if (extra[i].is_double) {
            SETD(extra[i].param, extra[i].d);
        } else {
            SETI(extra[i].param, extra[i].i);
        }
    }
#undef SETI
#undef SETD
    if (st == LORA_OK)
        st = lora_adapter_create(&ad, cfg);
    size_t maxn = 0;
    for (int t = 0; t < REF_NPROJ; t++) {
        const size_t nw = (size_t)(l->out[t] * l->in[t]);
        const size_t na = (size_t)(l->rank * l->in[t]), nb = (size_t)(l->out[t] * l->rank);
        maxn = nw > maxn ? nw : maxn;
        maxn = na > maxn ? na : maxn;
        maxn = nb > maxn ? nb : maxn;
    }
    buf = malloc((2 * maxn + 1) * sizeof(float)); /* a weight, then a bias */
    if (!buf && st == LORA_OK)
        st = LORA_ERR_NOMEM;
    for (int t = 0; t < REF_NPROJ && st == LORA_OK; t++) {
        if (!ref_has_proj(l, t))
            continue;
        const size_t nw = (size_t)(l->out[t] * l->in[t]);
        float *bias = l->bias[t] ? buf + maxn : NULL;
        ref_to_float(l->w[t], buf, nw);
        if (bias)
            ref_to_float(l->bias[t], bias, (size_t)l->out[t]);
        st = lora_adapter_set_base(ad, target_bits[t], buf, bias);
        if (st == LORA_OK && ref_is_adapted(l, t)) {
            const size_t na = (size_t)(l->rank * l->in[t]);
            const size_t nb = (size_t)(l->out[t] * l->rank);
            ref_to_float(l->a[t], buf, na);
            st = lora_adapter_set_param(ad, target_bits[t], LORA_A, buf, na);
            if (st == LORA_OK) {
                ref_to_float(l->b[t], buf, nb);
                st = lora_adapter_set_param(ad, target_bits[t], LORA_B, buf, nb);
            }
        }
    }
    free(buf);
    lora_config_destroy(cfg);
    if (st != LORA_OK) {
        lora_adapter_destroy(ad);
        return st;
    }
    *out = ad;
    return LORA_OK;
}

int ref_compare_adapter(lora_adapter *ad, const ref_layer *l, const ref_problem *p,
                        ref_errors *e)
{
    memset(e, 0, sizeof *e);
    for (int t = 0; t < REF_NPROJ; t++)
        e->da[t] = e->db[t] = -1.0;
    e->dxkv = -1.0;
    e->max = INFINITY;
    const int64_t d = l->cfg.d_model, oc = ref_out_cols(l);
    const size_t nxq = (size_t)(p->batch * p->len_q * d);
    const size_t nxkv = (size_t)(p->batch * p->len_kv * d);
    const size_t nout = (size_t)(p->batch * p->len_q * oc);
    float *xq = malloc(nxq * sizeof(float)), *xkv = malloc(nxkv * sizeof(float));
    float *out = malloc(nout * sizeof(float)), *dout = malloc(nout * sizeof(float));
    float *dxq = malloc(nxq * sizeof(float)), *dxkv = malloc(nxkv * sizeof(float));
    size_t maxg = 1;
    for (int t = 0; t < REF_NPROJ; t++) {
        const size_t na = (size_t)(l->rank * l->in[t]), nb = (size_t)(l->out[t] * l->rank);
        maxg = na > maxg ? na : maxg;
        maxg = nb > maxg ? nb : maxg;
    }
    float *gbuf = malloc(maxg * sizeof(float));
    double *rout = malloc(nout * sizeof(double));
    ref_grads g;
    int galloc = ref_grads_alloc(&g, l, p->batch, p->len_q, p->len_kv);
    if (!xq || !xkv || !out || !dout || !dxq || !dxkv || !gbuf || !rout || galloc != 0) {
        e->status = LORA_ERR_NOMEM;
        e->failed_call = "test allocation";
        goto done;
    }
    ref_to_float(p->xq, xq, nxq);
    ref_to_float(p->xkv, xkv, nxkv);
    ref_to_float(p->dout, dout, nout);
    /* Poison outputs so an unwritten entry cannot pass. */
    for (size_t i = 0; i < nout; i++)
        out[i] = NAN;
    for (size_t i = 0; i < nxq; i++)
        dxq[i] = NAN;
    for (size_t i = 0; i < nxkv; i++)
        dxkv[i] = NAN;

#define RUN(call)                     \
    do {                              \
        int st_ = (call);             \
        if (st_ != LORA_OK) {         \
            e->status = st_;          \
            e->failed_call = #call;   \
            goto done;                \
        }                             \
    } while (0)
    RUN(lora_adapter_zero_grad(ad));
    if (p->cross) {
        RUN(lora_forward_cross(ad, xq, xkv, p->batch, p->len_q, p->len_kv, out));
        RUN(lora_backward_cross(ad, dout, dxq, dxkv));
    } else {
        RUN(lora_forward(ad, xq, p->batch, p->len_q, out));
        RUN(lora_backward(ad, dout, dxq));
    }

    ref_forward(l, p->xq, p->xkv, p->batch, p->len_q, p->len_kv, rout);
    ref_backward(l, p->xq, p->xkv, p->batch, p->len_q, p->len_kv, p->dout, &g);
    if (!p->cross)
        for (size_t i = 0; i < nxq; i++)
            g.dxq[i] += g.dxkv[i];

    e->ref_out_max = ref_max_abs(rout, nout);
    e->out = ref_rel_err_f(out, rout, nout, REF_REL_FLOOR * e->ref_out_max);
    double gmax = 0.0, xmax = ref_max_abs(g.dxq, nxq);
    if (p->cross) {
        const double m = ref_max_abs(g.dxkv, nxkv);
        xmax = m > xmax ? m : xmax;
    }
    for (int t = 0; t < REF_NPROJ; t++)
        if (ref_is_adapted(l, t)) {
            const double ma = ref_max_abs(g.da[t], (size_t)(l->rank * l->in[t]));
            const double mb = ref_max_abs(g.db[t], (size_t)(l->out[t] * l->rank));
            gmax = ma > gmax ? ma : gmax;
            gmax = mb > gmax ? mb : gmax;
        }
    e->ref_grad_max = gmax > xmax ? gmax : xmax;
    double worst = e->out;
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_is_adapted(l, t))
            continue;
        const size_t na = (size_t)(l->rank * l->in[t]), nb = (size_t)(l->out[t] * l->rank);
        RUN(lora_adapter_get_grad(ad, target_bits[t], LORA_A, gbuf, na));
        e->da[t] = ref_rel_err_f(gbuf, g.da[t], na, REF_REL_FLOOR * e->ref_grad_max);
        RUN(lora_adapter_get_grad(ad, target_bits[t], LORA_B, gbuf, nb));
        e->db[t] = ref_rel_err_f(gbuf, g.db[t], nb, REF_REL_FLOOR * e->ref_grad_max);
        worst = e->da[t] > worst ? e->da[t] : worst;
        worst = e->db[t] > worst ? e->db[t] : worst;
    }
#undef RUN
    if (xmax == 0.0)
        xmax = gmax;
    e->dxq = ref_rel_err_f(dxq, g.dxq, nxq, REF_REL_FLOOR * xmax);
    worst = e->dxq > worst ? e->dxq : worst;
    if (p->cross) {
        e->dxkv = ref_rel_err_f(dxkv, g.dxkv, nxkv, REF_REL_FLOOR * xmax);
        worst = e->dxkv > worst ? e->dxkv : worst;
    }
    e->max = worst;
done:
    free(xq);
    free(xkv);
    free(out);
    free(dout);
    free(dxq);
    free(dxkv);
    free(gbuf);
    free(rout);
    if (galloc == 0)
        ref_grads_free(&g);
    return e->status;
}

int ref_check(const ref_layer *l, int backend, int threads, const ref_problem *p,
              double tol, ref_errors *e)
{
    lora_adapter *ad = NULL;
    memset(e, 0, sizeof *e);
    e->max = INFINITY;
    int st = ref_make_adapter(l, backend, threads, &ad);
    if (st != LORA_OK) {
        e->status = st;
        e->failed_call = "ref_make_adapter";
        return 0;
    }
    ref_compare_adapter(ad, l, p, e);
    lora_adapter_destroy(ad);
    return e->status == LORA_OK && e->max <= tol;
}

const char *ref_describe(const ref_layer *l, const ref_problem *p, char *buf, size_t n)
{
    const ref_config *c = &l->cfg;
    snprintf(buf, n,
             "%s batch=%lld len_q=%lld len_kv=%lld d_model=%d heads=%d kv_heads=%d "
             "head_dim=%d%s rank=%d targets=%s%s%s%s alpha=%g rslora=%d scale=%g%s "
             "causal=%d out_proj=%d bias=%d rope=%d theta=%g rope_dim=%d window=%d "
             "softcap=%g dropout=%g%s",
             p && p->cross ? "cross" : "self", p ? (long long)p->batch : 0LL,
             p ? (long long)p->len_q : 0LL, p ? (long long)p->len_kv : 0LL, c->d_model,
             l->n_heads, l->n_kv_heads, l->head_dim, c->head_dim ? "(set)" : "", l->rank,
             (l->targets & 1) ? "Q" : "", (l->targets & 2) ? "K" : "",
             (l->targets & 4) ? "V" : "", (l->targets & 8) ? "O" : "",
             c->alpha != 0.0 ? c->alpha : (double)l->rank, c->rslora, l->softmax_scale,
             c->softmax_scale > 0 ? "(set)" : "", c->causal, c->out_proj, c->bias, c->rope,
             c->rope_theta > 0 ? c->rope_theta : 10000.0, c->rope ? ref_rope_dim(l) : 0,
             c->window, c->softcap, c->dropout, l->rope_freqs ? " freq-table" : "");
    return buf;
}

const char *ref_errors_format(const ref_errors *e, char *buf, size_t n)
{
    if (e->status != LORA_OK) {
        snprintf(buf, n, "library call %s failed: %s", e->failed_call ? e->failed_call : "?",
                 lora_status_string(e->status));
        return buf;
    }
    static const char *names[REF_NPROJ] = {"Q", "K", "V", "O"};
    size_t k = (size_t)snprintf(buf, n, "max rel err %.3g: out %.3g", e->max, e->out);
    for (int t = 0; t < REF_NPROJ && k < n; t++)
        if (e->da[t] >= 0)
            k += (size_t)snprintf(buf + k, n - k, ", dA_%s %.3g, dB_%s %.3g", names[t],
                                  e->da[t], names[t], e->db[t]);
    if (k < n)
        k += (size_t)snprintf(buf + k, n - k, ", %s %.3g", e->dxkv >= 0 ? "dxq" : "dx",
                              e->dxq);
    if (k < n && e->dxkv >= 0)
        k += (size_t)snprintf(buf + k, n - k, ", dxkv %.3g", e->dxkv);
    if (k < n)
        snprintf(buf + k, n - k, " (max|ref| out %.3g, grads %.3g)", e->ref_out_max,
                 e->ref_grad_max);
    return buf;
}
