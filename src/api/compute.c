/* Forward and backward entry points: validation, backend choice, buffers; the
 * arithmetic is in src/layer and src/backend. */
#include <string.h>

#include "internal.h"

static const char *const proj_names[PROJ_COUNT] = {"W_Q", "W_K", "W_V", "W_O"};

static int checked_floats(int64_t rows, int64_t cols, size_t *n)
{
    int64_t e;
    if (__builtin_mul_overflow(rows, cols, &e) || e > (int64_t)(SIZE_MAX / 8))
        return 0;
    *n = (size_t)e;
    return 1;
}

int lora_check_inputs(lora_adapter *ad, const float *xq, const float *xkv, int64_t batch,
                      int64_t len_q, int64_t len_kv, int self, attn_problem *p)
{
    if (!xq || !xkv)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "%s is NULL",
                              self ? "x" : (!xq ? "xq" : "xkv"));
    if (batch < 1 || len_q < 1 || len_kv < 1)
        return lora_set_error(ad->err, LORA_ERR_SHAPE,
                              "batch = %lld, len_q = %lld, len_kv = %lld: each must be >= 1",
                              (long long)batch, (long long)len_q, (long long)len_kv);
    const layer *l = &ad->layer;
    if (l->causal && len_q > len_kv)
        return lora_set_error(ad->err, LORA_ERR_SHAPE,
                              "causal cross-attention needs len_q (%lld) <= len_kv (%lld): "
                              "keys are aligned to the last query",
                              (long long)len_q, (long long)len_kv);
    int64_t rows_q, rows_kv;
    size_t nxq, nxkv;
    const int64_t width = l->d_model > l->q_dim ? l->d_model : l->q_dim;
    if (__builtin_mul_overflow(batch, len_q, &rows_q) ||
        __builtin_mul_overflow(batch, len_kv, &rows_kv) ||
        !checked_floats(rows_q, width, &nxq) || !checked_floats(rows_kv, width, &nxkv))
        return lora_set_error(ad->err, LORA_ERR_SHAPE,
                              "batch %lld x len %lld/%lld x width %lld overflows",
                              (long long)batch, (long long)len_q, (long long)len_kv,
                              (long long)width);
    for (int t = 0; t < PROJ_COUNT; t++)
        if (!l->proj[t].weight.data && (t != PROJ_O || l->out_proj))
            return lora_set_error(ad->err, LORA_ERR_STATE,
                                  "base weight %s is not set (lora_adapter_set_base)",
                                  proj_names[t]);
    nxq = (size_t)rows_q * (size_t)l->d_model;
    nxkv = (size_t)rows_kv * (size_t)l->d_model;
    int64_t bad = lora_find_nonfinite(xq, nxq);
    if (bad < 0 && !self)
        bad = lora_find_nonfinite(xkv, nxkv);
    if (bad >= 0)
        return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                              "%s has a non-finite entry at index %lld",
                              self ? "x" : (lora_find_nonfinite(xq, nxq) >= 0 ? "xq" : "xkv"),
                              (long long)bad);
    *p = (attn_problem){
        .batch = batch, .len_q = len_q, .len_kv = len_kv,
        .n_heads = l->n_heads, .n_kv_heads = l->n_kv_heads, .head_dim = l->head_dim,
        .ldq = l->q_dim, .ldkv = l->kv_dim, .ldo = l->q_dim,
        .softmax_scale = l->softmax_scale, .causal = l->causal,
        .threads = ad->threads, .la = &ad->la,
    };
    return LORA_OK;
}

static int run_forward(lora_adapter *ad, const float *xq, const float *xkv, int64_t batch,
                       int64_t len_q, int64_t len_kv, float *out, lora_saved_kind kind)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    ad->saved = SAVED_NONE; /* a failed forward leaves nothing to backpropagate */
    const int self = kind == SAVED_SELF;
    attn_problem p;
    int st = lora_check_inputs(ad, xq, xkv, batch, len_q, len_kv, self, &p);
    if (st != LORA_OK)
        return st;
    if (!out)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "out is NULL");
    const layer *l = &ad->layer;
    const size_t acts = layer_acts_floats(l, &p, self);
    size_t acts_bytes;
    if (acts == 0 || __builtin_mul_overflow(acts, sizeof(float), &acts_bytes))
        return lora_set_error(ad->err, LORA_ERR_SHAPE, "activation size overflows");
    if (lora_buf_reserve(&ad->mem, &ad->acts_buf, acts_bytes) != LORA_OK)
        return lora_set_error(ad->err, LORA_ERR_NOMEM,
                              "cannot allocate %zu bytes of activations", acts_bytes);
    layer_acts_carve(l, &p, self, ad->acts_buf.ptr, &ad->acts);
    memcpy(ad->acts.xq, xq, (size_t)(batch * len_q * l->d_model) * sizeof(float));
    if (!self)
        memcpy(ad->acts.xkv, xkv, (size_t)(batch * len_kv * l->d_model) * sizeof(float));
    layer_project(l, &p, &ad->acts);

    lora_plan plan;
    st = lora_plan_call(ad, &p, ad->acts.q, ad->acts.k, &plan);
    if (st != LORA_OK) {
        if (st == LORA_ERR_NOMEM) /* under memory pressure, keep no dead activations */
            lora_buf_free(&ad->mem, &ad->acts_buf);
        return st;
    }
    if (plan.poly_groups > 0)
        p.measure_rows = ad->cfg.measure_rows;
    /* Backward's scratch is reserved here too, so a backward never allocates. */
    const size_t io = lora_io_floats(l, &p, kind);
    st = lora_reserve_scratch(ad, l, &p, &plan, io);
    if (st != LORA_OK) {
        if (st == LORA_ERR_NOMEM) { /* as above; scratch may have grown in the plan */
            lora_buf_free(&ad->mem, &ad->acts_buf);
            lora_buf_free(&ad->mem, &ad->scratch);
        }
        return st;
    }
    /* out is computed in the handle's (padded) scratch, then copied to the caller. */
    float *out_own = ad->scratch.ptr;
    double measured;
    layer_attend(l, plan.groups, &p, &ad->acts, out_own, out_own + io, &measured);
    memcpy(out, out_own, (size_t)(batch * len_q) *
                             (size_t)(l->out_proj ? l->d_model : l->q_dim) * sizeof(float));

    ad->problem = p;
    memcpy(ad->saved_groups, plan.groups, (size_t)p.n_kv_heads * sizeof *plan.groups);
    ad->saved = kind;
    ad->eta = plan.run_eta;
    lora_record_run(ad, &plan, measured);
    ad->err[0] = '\0';
    return LORA_OK;
}

size_t lora_io_floats(const layer *l, const attn_problem *p, lora_saved_kind kind)
{
    /* Each term is at most SIZE_MAX / 8 (lora_check_inputs): the sum cannot overflow. */
    const size_t nq = (size_t)(p->batch * p->len_q), nk = (size_t)(p->batch * p->len_kv);
    size_t n = nq * (size_t)(l->out_proj ? l->d_model : l->q_dim);
    if (kind != SAVED_NONE)
        n += nq * (size_t)l->d_model;
    if (kind == SAVED_CROSS)
        n += nk * (size_t)l->d_model;
    return (n + 15u) & ~(size_t)15u;
}

int lora_reserve_scratch(lora_adapter *ad, const layer *l, const attn_problem *p,
                         const lora_plan *plan, size_t io_floats)
{
    const size_t be_bytes = attn_dispatch_workspace(p, plan->groups);
    size_t bytes;
    if (__builtin_add_overflow(layer_scratch_floats(l, p), io_floats, &bytes) ||
        __builtin_mul_overflow(bytes, sizeof(float), &bytes) ||
        __builtin_add_overflow(bytes, be_bytes, &bytes))
        return lora_set_error(ad->err, LORA_ERR_SHAPE, "working memory size overflows");
    if (lora_buf_reserve(&ad->mem, &ad->scratch, bytes) != LORA_OK)
        return lora_set_error(ad->err, LORA_ERR_NOMEM,
                              "cannot allocate %zu bytes of working memory", bytes);
    return LORA_OK;
}

void lora_record_run(lora_adapter *ad, const lora_plan *plan, double measured_out)
{
    memset(&ad->info, 0, sizeof ad->info);
    ad->info.struct_size = sizeof ad->info;
    ad->info.backend = plan->poly_groups > 0 ? LORA_BACKEND_POLY : LORA_BACKEND_EXACT;
    ad->info.poly_groups = plan->poly_groups;
    ad->info.poly_degree = plan->run_order;
    ad->info.poly_rank = plan->run_features;
    ad->info.error_bound = plan->run_eta;
    ad->info.score_bound = plan->score_bound;
    ad->info.measured_out_error = measured_out;
    ad->info.measured_dq_error = -1.0;
}

static int run_backward(lora_adapter *ad, const float *dout, float *dxq, float *dxkv,
                        lora_saved_kind kind)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    if (!dout)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "dout is NULL");
    if (ad->saved != kind)
        return lora_set_error(ad->err, LORA_ERR_STATE,
                              ad->saved == SAVED_NONE
                                  ? "no saved forward: call %s first"
                                  : "the saved forward is of the other kind: call %s first",
                              kind == SAVED_SELF ? "lora_forward" : "lora_forward_cross");
    const layer *l = &ad->layer;
    const attn_problem *p = &ad->problem;
    const size_t n = (size_t)(p->batch * p->len_q) *
                     (size_t)(l->out_proj ? l->d_model : l->q_dim);
    const int64_t bad = lora_find_nonfinite(dout, n);
    if (bad >= 0)
        return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                              "dout has a non-finite entry at index %lld", (long long)bad);
    /* dout and dx live in the front of the scratch the forward reserved
     * (lora_io_floats): every gemm operand is a padded library buffer. */
    float *const dout_own = ad->scratch.ptr, *const dx_own = dout_own + n;
    const size_t nxq = (size_t)(p->batch * p->len_q) * (size_t)l->d_model;
    const size_t nxkv = (size_t)(p->batch * p->len_kv) * (size_t)l->d_model;
    float *const dxq_own = dxq ? dx_own : NULL;
    float *const dxkv_own = !dxkv ? NULL : dxkv == dxq ? dxq_own : dx_own + nxq;
    memcpy(dout_own, dout, n * sizeof(float));
    double grad_bound = 0.0, measured;
    layer_backward(l, ad->saved_groups, p, &ad->acts, dout_own, dxq_own, dxkv_own,
                   dout_own + lora_io_floats(l, p, kind), ad->eta, &grad_bound, &measured);
    if (dxq)
        memcpy(dxq, dxq_own, nxq * sizeof(float));
    if (dxkv && dxkv != dxq)
        memcpy(dxkv, dxkv_own, nxkv * sizeof(float));
    ad->info.grad_bound = grad_bound;
    ad->info.measured_dq_error = measured;
    ad->err[0] = '\0';
    return LORA_OK;
}

LORA_API int lora_forward(lora_adapter *ad, const float *x, int64_t batch, int64_t seq_len,
                          float *out)
{
    return run_forward(ad, x, x, batch, seq_len, seq_len, out, SAVED_SELF);
}

LORA_API int lora_backward(lora_adapter *ad, const float *dout, float *dx)
{
    return run_backward(ad, dout, dx, dx, SAVED_SELF);
}

LORA_API int lora_forward_cross(lora_adapter *ad, const float *xq, const float *xkv,
                                int64_t batch, int64_t len_q, int64_t len_kv, float *out)
{
    return run_forward(ad, xq, xkv, batch, len_q, len_kv, out, SAVED_CROSS);
}

LORA_API int lora_backward_cross(lora_adapter *ad, const float *dout, float *dxq,
                                 float *dxkv)
{
    if (ad && dxq && dxq == dxkv)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "dxq and dxkv must be distinct buffers");
    return run_backward(ad, dout, dxq, dxkv, SAVED_CROSS);
}

LORA_API int lora_mse_loss(const float *out, const float *target, size_t n, double *loss,
                           float *dout)
{
    if (!out || !target || !loss || n == 0)
        return LORA_ERR_INVALID_ARG;
    if (lora_find_nonfinite(out, n) >= 0 || lora_find_nonfinite(target, n) >= 0)
        return LORA_ERR_NONFINITE;
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double d = (double)out[i] - (double)target[i];
        sum += d * d;
    }
    if (dout)
        for (size_t i = 0; i < n; i++)
            dout[i] = out[i] - target[i];
    *loss = 0.5 * sum;
    return LORA_OK;
}
