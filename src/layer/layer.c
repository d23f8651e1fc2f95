/* Projections and LoRA terms of one attention layer (MATH §2, "From a projection
 * gradient to the adapter"): dW is never formed, only dA and dB. */
#include "layer.h"

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
}

size_t layer_scratch_floats(const layer *l, const attn_problem *p)
{
    const size_t nq = (size_t)(p->batch * p->len_q), nk = (size_t)(p->batch * p->len_kv);
    size_t n = 0;
    int ok = mul_add(&n, nq, 2u * (size_t)l->q_dim); /* dC, dQ */
    ok &= mul_add(&n, nk, 2u * (size_t)l->kv_dim);   /* dK, dV */
    ok &= mul_add(&n, nq > nk ? nq : nk, (size_t)l->rank); /* dY·B */
    return ok ? n : 0;
}

/* y (rows, out) = x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ, keeping xa = x·Aᵀ. */
static void proj_forward(const layer *l, const layer_proj *pr, const la_ctx *la, int nt,
                         const float *x, int64_t rows, float *y, float *xa)
{
    la_gemm(la, nt, LA_N, LA_T, rows, pr->out, pr->in, 1.0f, x, pr->in, pr->weight, pr->in,
            0.0f, y, pr->out);
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
                          float *dx, int accumulate, float *dyb)
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
        la_gemm(la, nt, LA_N, LA_N, rows, pr->in, pr->out, 1.0f, dy, pr->out, pr->weight,
                pr->in, accumulate ? 1.0f : 0.0f, dx, pr->in);
        if (pr->adapted)
            la_gemm(la, nt, LA_N, LA_N, rows, pr->in, l->rank, s, dyb, l->rank, pr->a,
                    pr->in, 1.0f, dx, pr->in);
    }
}

void layer_forward(const layer *l, const attn_backend *be, const attn_problem *p,
                   layer_acts *a, float *out, float *ws)
{
    const la_ctx *la = p->la;
    const int nt = p->threads;
    const int64_t nq = p->batch * p->len_q, nk = p->batch * p->len_kv;
    proj_forward(l, &l->proj[PROJ_Q], la, nt, a->xq, nq, a->q, a->xa[PROJ_Q]);
    proj_forward(l, &l->proj[PROJ_K], la, nt, a->xkv, nk, a->k, a->xa[PROJ_K]);
    proj_forward(l, &l->proj[PROJ_V], la, nt, a->xkv, nk, a->v, a->xa[PROJ_V]);
    be->forward(p, a->q, a->k, a->v, a->attn, a->row_stat,
                ws + layer_scratch_floats(l, p));
    if (l->out_proj)
        proj_forward(l, &l->proj[PROJ_O], la, nt, a->attn, nq, out, a->xa[PROJ_O]);
    else
        memcpy(out, a->attn, (size_t)nq * (size_t)l->q_dim * sizeof(float));
}

void layer_backward(const layer *l, const attn_backend *be, const attn_problem *p,
                    const layer_acts *a, const float *dout, float *dxq, float *dxkv,
                    float *ws)
{
    const la_ctx *la = p->la;
    const int nt = p->threads;
    const int64_t nq = p->batch * p->len_q, nk = p->batch * p->len_kv;
    float *dc = ws, *dq = dc + nq * l->q_dim, *dk = dq + nq * l->q_dim;
    float *dv = dk + nk * l->kv_dim, *dyb = dv + nk * l->kv_dim;
    const float *dattn = dout;
    if (l->out_proj) {
        proj_backward(l, &l->proj[PROJ_O], la, nt, a->attn, a->xa[PROJ_O], nq, dout, dc, 0,
                      dyb);
        dattn = dc;
    }
    be->backward(p, a->q, a->k, a->v, a->attn, a->row_stat, dattn, dq, dk, dv,
                 ws + layer_scratch_floats(l, p));
    const int shared_dx = dxq != NULL && dxq == dxkv;
    proj_backward(l, &l->proj[PROJ_Q], la, nt, a->xq, a->xa[PROJ_Q], nq, dq, dxq, 0, dyb);
    proj_backward(l, &l->proj[PROJ_K], la, nt, a->xkv, a->xa[PROJ_K], nk, dk, dxkv,
                  shared_dx, dyb);
    proj_backward(l, &l->proj[PROJ_V], la, nt, a->xkv, a->xa[PROJ_V], nk, dv, dxkv, 1, dyb);
}
