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

static int visible(const ref_layer *l, int64_t i, int64_t j, int64_t len_q, int64_t len_kv)
{
    return !l->cfg.causal || j <= i + (len_kv - len_q);
}

/* P (len_q, len_kv) of batch element b, query head h; masked entries are 0. */
static void head_probs(const ref_layer *l, const double *q, const double *k, int64_t b,
                       int h, int64_t len_q, int64_t len_kv, double *p)
{
    const int d = l->head_dim, kvh = h / (l->n_heads / l->n_kv_heads);
    for (int64_t i = 0; i < len_q; i++) {
        const double *qi = q + (b * len_q + i) * l->q_dim + (int64_t)h * d;
        double *row = p + i * len_kv;
        double mx = -INFINITY;
        for (int64_t j = 0; j < len_kv; j++) {
            row[j] = 0.0;
            if (!visible(l, i, j, len_q, len_kv))
                continue;
            const double *kj = k + (b * len_kv + j) * l->kv_dim + (int64_t)kvh * d;
            double s = 0.0;
            for (int c = 0; c < d; c++)
                s += qi[c] * kj[c];
            row[j] = l->softmax_scale * s;
            if (row[j] > mx)
                mx = row[j];
        }
        double sum = 0.0;
        for (int64_t j = 0; j < len_kv; j++)
            if (visible(l, i, j, len_q, len_kv)) {
                row[j] = exp(row[j] - mx);
                sum += row[j];
            }
        for (int64_t j = 0; j < len_kv; j++)
            row[j] = visible(l, i, j, len_q, len_kv) ? row[j] / sum : 0.0;
    }
}

/* Everything a forward computes; backward recomputes it. */
typedef struct fwd {
    double *weff[REF_NPROJ];
    double *q, *k, *v, *c, *p; /* p: one head's (len_q, len_kv) scratch */
} fwd;

static void fwd_free(fwd *f)
{
    for (int t = 0; t < REF_NPROJ; t++)
        free(f->weff[t]);
    free(f->q);
    free(f->k);
    free(f->v);
    free(f->c);
    free(f->p);
    memset(f, 0, sizeof *f);
}

static int fwd_run(const ref_layer *l, const double *xq, const double *xkv, int64_t batch,
                   int64_t len_q, int64_t len_kv, fwd *f, double *out)
{
    memset(f, 0, sizeof *f);
    const int64_t nq = batch * len_q, nk = batch * len_kv, d = l->cfg.d_model;
    for (int t = 0; t < REF_NPROJ; t++)
        if (ref_has_proj(l, t) && !(f->weff[t] = effective_weight(l, t)))
            goto fail;
    f->q = malloc((size_t)(nq * l->q_dim) * sizeof(double));
    f->k = malloc((size_t)(nk * l->kv_dim) * sizeof(double));
    f->v = malloc((size_t)(nk * l->kv_dim) * sizeof(double));
    f->c = calloc((size_t)(nq * l->q_dim), sizeof(double));
    f->p = malloc((size_t)(len_q * len_kv) * sizeof(double));
    if (!f->q || !f->k || !f->v || !f->c || !f->p)
        goto fail;
    project(xq, nq, d, f->weff[REF_Q], l->bias[REF_Q], l->q_dim, f->q);
    project(xkv, nk, d, f->weff[REF_K], l->bias[REF_K], l->kv_dim, f->k);
    project(xkv, nk, d, f->weff[REF_V], l->bias[REF_V], l->kv_dim, f->v);
    const int hd = l->head_dim;
    for (int64_t b = 0; b < batch; b++)
        for (int h = 0; h < l->n_heads; h++) {
            const int kvh = h / (l->n_heads / l->n_kv_heads);
            head_probs(l, f->q, f->k, b, h, len_q, len_kv, f->p);
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
    if (out) {
        if (l->cfg.out_proj)
            project(f->c, nq, l->q_dim, f->weff[REF_O], l->bias[REF_O], d, out);
        else
            memcpy(out, f->c, (size_t)(nq * l->q_dim) * sizeof(double));
    }
    return 0;
fail:
    fwd_free(f);
    return -1;
}

void ref_forward(const ref_layer *l, const double *xq, const double *xkv, int64_t batch,
                 int64_t len_q, int64_t len_kv, double *out)
{
    fwd f;
    if (fwd_run(l, xq, xkv, batch, len_q, len_kv, &f, out) != 0) {
        fprintf(stderr, "reference: out of memory\n");
        abort();
    }
    fwd_free(&f);
}

int ref_activations(const ref_layer *l, const double *xq, const double *xkv, int64_t batch,
                    int64_t len_q, int64_t len_kv, double *q, double *k, double *v,
                    double *attn)
{
    fwd f;
    if (fwd_run(l, xq, xkv, batch, len_q, len_kv, &f, NULL) != 0)
        return -1;
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
    return 0;
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
 * dW = dY^T X (dA = s B^T dW, dB = s dW A^T), and dX (+)= dY W_eff if dx. */
static void proj_grads(const ref_layer *l, int t, const double *x, const double *dy,
                       int64_t rows, const double *weff, ref_grads *g, double *dx,
                       int accumulate)
{
    const int64_t in = l->in[t], out = l->out[t], r = l->rank;
    if (ref_is_adapted(l, t) && (g->da[t] || g->db[t])) {
        double *dw = calloc((size_t)(out * in), sizeof(double));
        if (!dw)
            abort();
        for (int64_t row = 0; row < rows; row++)
            for (int64_t o = 0; o < out; o++) {
                const double dyo = dy[row * out + o];
                for (int64_t i = 0; i < in; i++)
                    dw[o * in + i] += dyo * x[row * in + i];
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
    if (dx)
        for (int64_t row = 0; row < rows; row++)
            for (int64_t i = 0; i < in; i++) {
                double acc = 0.0;
                for (int64_t o = 0; o < out; o++)
                    acc += dy[row * out + o] * weff[o * in + i];
                dx[row * in + i] = accumulate ? dx[row * in + i] + acc : acc;
            }
}

void ref_backward(const ref_layer *l, const double *xq, const double *xkv, int64_t batch,
                  int64_t len_q, int64_t len_kv, const double *dout, ref_grads *g)
{
    fwd f;
    if (fwd_run(l, xq, xkv, batch, len_q, len_kv, &f, NULL) != 0)
        abort();
    const int64_t nq = batch * len_q, nk = batch * len_kv;
    const int hd = l->head_dim;
    double *dc = malloc((size_t)(nq * l->q_dim) * sizeof(double));
    double *dq = calloc((size_t)(nq * l->q_dim), sizeof(double));
    double *dk = calloc((size_t)(nk * l->kv_dim), sizeof(double));
    double *dv = calloc((size_t)(nk * l->kv_dim), sizeof(double));
    double *dp = malloc((size_t)(len_q * len_kv) * sizeof(double));
    if (!dc || !dq || !dk || !dv || !dp)
        abort();
    if (l->cfg.out_proj) {
        /* out = C W_O^T + b: dC = dout W_O, and the O adapter from dW_O = dout^T C. */
        proj_grads(l, REF_O, f.c, dout, nq, f.weff[REF_O], g, dc, 0);
    } else {
        memcpy(dc, dout, (size_t)(nq * l->q_dim) * sizeof(double));
    }
    for (int64_t b = 0; b < batch; b++)
        for (int h = 0; h < l->n_heads; h++) {
            const int kvh = h / (l->n_heads / l->n_kv_heads);
            head_probs(l, f.q, f.k, b, h, len_q, len_kv, f.p);
            for (int64_t i = 0; i < len_q; i++) {
                const double *doi = dc + (b * len_q + i) * l->q_dim + (int64_t)h * hd;
                double rho = 0.0;
                for (int64_t j = 0; j < len_kv; j++) {
                    const double *vj = f.v + (b * len_kv + j) * l->kv_dim + (int64_t)kvh * hd;
                    double s = 0.0;
                    for (int c = 0; c < hd; c++)
                        s += doi[c] * vj[c];
                    dp[i * len_kv + j] = s; /* dP = dO V^T */
                    rho += f.p[i * len_kv + j] * s;
                }
                for (int64_t j = 0; j < len_kv; j++) {
                    const double pij = f.p[i * len_kv + j];
                    const double ds = pij * (dp[i * len_kv + j] - rho);
                    const int64_t krow = (b * len_kv + j) * l->kv_dim + (int64_t)kvh * hd;
                    const int64_t qrow = (b * len_q + i) * l->q_dim + (int64_t)h * hd;
                    for (int c = 0; c < hd; c++) {
                        dv[krow + c] += pij * doi[c];
                        dq[qrow + c] += l->softmax_scale * ds * f.k[krow + c];
                        dk[krow + c] += l->softmax_scale * ds * f.q[qrow + c];
                    }
                }
            }
        }
    proj_grads(l, REF_Q, xq, dq, nq, f.weff[REF_Q], g, g->dxq, 0);
    proj_grads(l, REF_K, xkv, dk, nk, f.weff[REF_K], g, g->dxkv, 0);
    proj_grads(l, REF_V, xkv, dv, nk, f.weff[REF_V], g, g->dxkv, 1);
    free(dc);
    free(dq);
    free(dk);
    free(dv);
    free(dp);
    fwd_free(&f);
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
             "causal=%d out_proj=%d bias=%d",
             p && p->cross ? "cross" : "self", p ? (long long)p->batch : 0LL,
             p ? (long long)p->len_q : 0LL, p ? (long long)p->len_kv : 0LL, c->d_model,
             l->n_heads, l->n_kv_heads, l->head_dim, c->head_dim ? "(set)" : "", l->rank,
             (l->targets & 1) ? "Q" : "", (l->targets & 2) ? "K" : "",
             (l->targets & 4) ? "V" : "", (l->targets & 8) ? "O" : "",
             c->alpha != 0.0 ? c->alpha : (double)l->rank, c->rslora, l->softmax_scale,
             c->softmax_scale > 0 ? "(set)" : "", c->causal, c->out_proj, c->bias);
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
