/* Projections and LoRA terms of one attention layer (MATH §2, "From a projection
 * gradient to the adapter"): dW is never formed, only dA and dB. */
#include "layer.h"

#include <math.h>
#include <string.h>

/* Rows each projection reads: queries for Q and the output projection, keys for K, V. */
static int64_t proj_rows(const attn_problem *p, int which)
{
    return (which == PROJ_K || which == PROJ_V) ? p->batch * p->len_kv
                                                : p->batch * p->len_q;
}

static int mul_add(size_t *acc, size_t a, size_t b)
{
    size_t m;
    if (__builtin_mul_overflow(a, b, &m) || __builtin_add_overflow(*acc, m, acc))
        return 0;
    return 1;
}

/* Scratch floats the products with 16-bit base weights need (forward and dx alike). */
static size_t wpanel_floats(const layer *l, const attn_problem *p)
{
    size_t most = 0;
    for (int t = 0; t < PROJ_COUNT; t++) {
        const layer_proj *pr = &l->proj[t];
        if (!pr->weight.data)
            continue;
        for (int tw = LA_N; tw <= LA_T; tw++) {
            const size_t n = la_gemm_w_scratch_floats(p->la, (la_trans)tw, proj_rows(p, t),
                                                      pr->weight.dtype, pr->out, pr->in);
            most = n > most ? n : most;
        }
    }
    return most;
}

size_t layer_acts_floats(const layer *l, const attn_problem *p, int self)
{
    const size_t nq = (size_t)(p->batch * p->len_q), nk = (size_t)(p->batch * p->len_kv);
    size_t n = 0;
    int ok = mul_add(&n, nq, (size_t)l->d_model);
    if (!self)
        ok &= mul_add(&n, nk, (size_t)l->d_model);
    ok &= mul_add(&n, nq, 2u * (size_t)l->q_dim); /* q, attn */
    ok &= mul_add(&n, nk, 2u * (size_t)l->kv_dim);
    ok &= mul_add(&n, attn_row_stat_count(p), 1);
    for (int t = 0; t < PROJ_COUNT; t++)
        if (l->proj[t].adapted)
            ok &= mul_add(&n, (size_t)proj_rows(p, t), (size_t)l->rank);
    ok &= mul_add(&n, wpanel_floats(l, p), 1); /* last: BLIS reads past it into padding */
    return ok ? n : 0;
}

void layer_acts_carve(const layer *l, const attn_problem *p, int self, float *buf,
                      layer_acts *a)
{
    const size_t nq = (size_t)(p->batch * p->len_q), nk = (size_t)(p->batch * p->len_kv);
    memset(a, 0, sizeof *a);
    a->batch = p->batch;
    a->len_q = p->len_q;
    a->len_kv = p->len_kv;
    a->xq = buf;
    buf += nq * (size_t)l->d_model;
    if (self) {
        a->xkv = a->xq;
    } else {
        a->xkv = buf;
        buf += nk * (size_t)l->d_model;
    }
    a->q = buf;
    buf += nq * (size_t)l->q_dim;
    a->attn = buf;
    buf += nq * (size_t)l->q_dim;
    a->k = buf;
    buf += nk * (size_t)l->kv_dim;
    a->v = buf;
    buf += nk * (size_t)l->kv_dim;
    a->row_stat = buf;
    buf += attn_row_stat_count(p);
    for (int t = 0; t < PROJ_COUNT; t++)
        if (l->proj[t].adapted) {
            a->xa[t] = buf;
            buf += (size_t)proj_rows(p, t) * (size_t)l->rank;
        }
    a->wpanel = wpanel_floats(l, p) > 0 ? buf : NULL;
}

size_t layer_scratch_floats(const layer *l, const attn_problem *p)
{
    const size_t nq = (size_t)(p->batch * p->len_q), nk = (size_t)(p->batch * p->len_kv);
    size_t n = attn_measure_scratch_floats(p); /* first: it holds doubles */
    int ok = mul_add(&n, nq, (l->out_proj ? 2u : 1u) * (size_t)l->q_dim); /* [dC,] dQ */
    ok &= mul_add(&n, nk, 2u * (size_t)l->kv_dim);   /* dK, dV */
    ok &= mul_add(&n, nq > nk ? nq : nk, (size_t)l->rank); /* dY·B */
    return ok ? n : 0;
}

/* y (rows, out) = x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ, keeping xa = x·Aᵀ. */
static void proj_forward(const layer *l, const layer_proj *pr, const la_ctx *la, int nt,
                         const float *x, int64_t rows, float *y, float *xa, float *wpanel)
{
    la_gemm_w(la, nt, LA_T, rows, pr->out, pr->in, 1.0f, x, pr->in, pr->weight, 0.0f, y,
              pr->out, wpanel);
    if (pr->bias)
        for (int64_t i = 0; i < rows; i++)
            for (int64_t j = 0; j < pr->out; j++)
                y[i * pr->out + j] += pr->bias[j];
    if (pr->adapted) {
        la_gemm(la, nt, LA_N, LA_T, rows, l->rank, pr->in, 1.0f, x, pr->in, pr->a, pr->in,
                0.0f, xa, l->rank);
        la_gemm(la, nt, LA_N, LA_T, rows, pr->out, l->rank, l->lora_scale, xa, l->rank,
                pr->b, l->rank, 1.0f, y, pr->out);
    }
}

/* From dY (rows, out): dA += s·(dY·B)ᵀ·X, dB += s·dYᵀ·XA, and dX = (or +=) dY·W_eff. */
static void proj_backward(const layer *l, const layer_proj *pr, const la_ctx *la, int nt,
                          const float *x, const float *xa, int64_t rows, const float *dy,
                          float *dx, int accumulate, float *dyb, float *wpanel)
{
    const float s = l->lora_scale;
    if (pr->adapted) {
        la_gemm(la, nt, LA_N, LA_N, rows, l->rank, pr->out, 1.0f, dy, pr->out, pr->b,
                l->rank, 0.0f, dyb, l->rank);
        la_gemm(la, nt, LA_T, LA_N, l->rank, pr->in, rows, s, dyb, l->rank, x, pr->in, 1.0f,
                pr->da, pr->in);
        la_gemm(la, nt, LA_T, LA_N, pr->out, l->rank, rows, s, dy, pr->out, xa, l->rank,
                1.0f, pr->db, l->rank);
    }
    if (dx) {
        la_gemm_w(la, nt, LA_N, rows, pr->out, pr->in, 1.0f, dy, pr->out, pr->weight,
                  accumulate ? 1.0f : 0.0f, dx, pr->in, wpanel);
        if (pr->adapted)
            la_gemm(la, nt, LA_N, LA_N, rows, pr->in, l->rank, s, dyb, l->rank, pr->a,
                    pr->in, 1.0f, dx, pr->in);
    }
}

void layer_project(const layer *l, const attn_problem *p, layer_acts *a)
{
    const int64_t nq = p->batch * p->len_q, nk = p->batch * p->len_kv;
    proj_forward(l, &l->proj[PROJ_Q], p->la, p->threads, a->xq, nq, a->q, a->xa[PROJ_Q],
                 a->wpanel);
    proj_forward(l, &l->proj[PROJ_K], p->la, p->threads, a->xkv, nk, a->k, a->xa[PROJ_K],
                 a->wpanel);
    proj_forward(l, &l->proj[PROJ_V], p->la, p->threads, a->xkv, nk, a->v, a->xa[PROJ_V],
                 a->wpanel);
}

void layer_attend(const layer *l, const attn_group_plan *plan, const attn_problem *p,
                  layer_acts *a, float *out, float *ws, double *measured)
{
    const int64_t nq = p->batch * p->len_q;
    attn_dispatch_forward(p, plan, a->q, a->k, a->v, a->attn, a->row_stat,
                          ws + layer_scratch_floats(l, p));
    *measured = attn_dispatch_measure(p, plan, a->q, a->k, a->v, a->attn, NULL, NULL, ws);
    if (l->out_proj)
        proj_forward(l, &l->proj[PROJ_O], p->la, p->threads, a->attn, nq, out,
                     a->xa[PROJ_O], a->wpanel);
    else
        memcpy(out, a->attn, (size_t)nq * (size_t)l->q_dim * sizeof(float));
}


static double max3(double a, double b, double c)
{
    return a > b ? (a > c ? a : c) : (b > c ? b : c);
}

/* MATH §4 made concrete. With |F̃ − F| <= η·F entrywise and D = d·max|dO|·max|V|
 * bounding |dP|: |ρ̃ − ρ| <= η·D, so each row of dS̃ − dS has ℓ1 norm <= η(3 + η)·D.
 * Then per entry: dQ <= β·η(3+η)·D·max|K|; dK <= β·η(3+η)·D·Lq·G·max|Q| and
 * dV <= η·Lq·G·max|dO| (column sums of F are at most Lq, G query heads per kv head);
 * the attention output carries η·max|V|. Each projection gradient multiplies its dY
 * error by the sizes and magnitudes of its other factors (dW = s·B·A chain). */
static double grad_error_bound(const layer *l, const attn_problem *p, const layer_acts *a,
                               const float *dattn, const float *dout, double eta)
{
    if (eta <= 0.0)
        return 0.0;
    if (!isfinite(eta)) /* no certificate (δ >= 1); also avoids ∞·0 when dout = 0 */
        return INFINITY;
    const size_t nq = (size_t)(p->batch * p->len_q), nk = (size_t)(p->batch * p->len_kv);
    const double qm = la_max_abs(a->q, nq * (size_t)l->q_dim);
    const double km = la_max_abs(a->k, nk * (size_t)l->kv_dim);
    const double vm = la_max_abs(a->v, nk * (size_t)l->kv_dim);
    const double gm = la_max_abs(dattn, nq * (size_t)l->q_dim);
    const double d = (double)l->head_dim, lq = (double)p->len_q;
    const double group = (double)(l->n_heads / l->n_kv_heads), beta = fabs(l->softmax_scale);
    const double ds_row = eta * (3.0 + eta) * d * gm * vm;
    const double ey[PROJ_COUNT] = {beta * ds_row * km, beta * ds_row * lq * group * qm,
                                   eta * lq * group * gm, 0.0};
    const double s = fabs(l->lora_scale), r = (double)l->rank;
    double bound = 0.0, dx = 0.0;
    for (int t = PROJ_Q; t <= PROJ_V; t++) {
        const layer_proj *pr = &l->proj[t];
        const size_t rows = t == PROJ_Q ? nq : nk;
        const double xm = la_max_abs(t == PROJ_Q ? a->xq : a->xkv, rows * (size_t)pr->in);
        const double wm = la_wmat_max_abs(pr->weight, (size_t)(pr->out * pr->in));
        double weff = wm;
        if (pr->adapted) {
            const double bm = la_max_abs(pr->b, (size_t)(pr->out * l->rank));
            const double am = la_max_abs(pr->a, (size_t)(l->rank * pr->in));
            const double xam = la_max_abs(a->xa[t], rows * (size_t)l->rank);
            bound = max3(bound, s * (double)rows * (double)pr->out * ey[t] * bm * xm,
                         s * (double)rows * ey[t] * xam);
            weff += s * r * bm * am;
        }
        dx += (double)pr->out * ey[t] * weff;
    }
    bound = bound > dx ? bound : dx;
    const layer_proj *po = &l->proj[PROJ_O];
    if (l->out_proj && po->adapted) {
        const double ec = eta * vm, gom = la_max_abs(dout, nq * (size_t)po->out);
        const double bm = la_max_abs(po->b, (size_t)(po->out * l->rank));
        const double am = la_max_abs(po->a, (size_t)(l->rank * po->in));
        bound = max3(bound, s * (double)nq * (double)po->out * gom * bm * ec,
                     s * (double)nq * gom * (double)po->in * am * ec);
    }
    return bound;
}

void layer_backward(const layer *l, const attn_group_plan *plan, const attn_problem *p,
                    const layer_acts *a, const float *dout, float *dxq, float *dxkv,
                    float *ws, double eta, double *grad_bound, double *measured)
{
    const la_ctx *la = p->la;
    const int nt = p->threads;
    const int64_t nq = p->batch * p->len_q, nk = p->batch * p->len_kv;
    /* dC (the attention output's gradient) only exists with an output projection */
    float *dc = ws + attn_measure_scratch_floats(p);
    float *dq = dc + (l->out_proj ? nq * l->q_dim : 0), *dk = dq + nq * l->q_dim;
    float *dv = dk + nk * l->kv_dim, *dyb = dv + nk * l->kv_dim;
    const float *dattn = dout;
    if (l->out_proj) {
        proj_backward(l, &l->proj[PROJ_O], la, nt, a->attn, a->xa[PROJ_O], nq, dout, dc, 0,
                      dyb, a->wpanel);
        dattn = dc;
    }
    attn_dispatch_backward(p, plan, a->q, a->k, a->v, a->attn, a->row_stat, dattn, dq, dk,
                           dv, ws + layer_scratch_floats(l, p));
    *measured = attn_dispatch_measure(p, plan, a->q, a->k, a->v, a->attn, dattn, dq, ws);
    const int shared_dx = dxq != NULL && dxq == dxkv;
    proj_backward(l, &l->proj[PROJ_Q], la, nt, a->xq, a->xa[PROJ_Q], nq, dq, dxq, 0, dyb,
                  a->wpanel);
    proj_backward(l, &l->proj[PROJ_K], la, nt, a->xkv, a->xa[PROJ_K], nk, dk, dxkv,
                  shared_dx, dyb, a->wpanel);
    proj_backward(l, &l->proj[PROJ_V], la, nt, a->xkv, a->xa[PROJ_V], nk, dv, dxkv, 1, dyb,
                  a->wpanel);
    *grad_bound = grad_error_bound(l, p, a, dattn, dout, eta);
}
