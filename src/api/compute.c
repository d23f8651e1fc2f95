/* Forward and backward entry points: validation, backend choice, buffers, and checks
 * that results fit float; the arithmetic is in src/layer and src/backend. lora_forward
 * and lora_forward_merged (merge.c) share one forward core, lora_forward_layer. */
#include <math.h>
#include <string.h>

#include "internal.h"

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
                                  "base weight W_%s is not set (lora_adapter_set_base)",
                                  lora_proj_names[t]);
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
        .softcap = l->softcap, .window = l->window,
        .threads = ad->threads, .la = &ad->la,
    };
    return LORA_OK;
}

/* Output floats of a call: rows_q x (D_MODEL with an output projection, else q_dim). */
static size_t out_floats(const layer *l, const attn_problem *p)
{
    return (size_t)(p->batch * p->len_q) * (size_t)(l->out_proj ? l->d_model : l->q_dim);
}

int lora_forward_begin(lora_adapter *ad, const lora_forward_args *a, attn_problem *p)
{
    const int st =
        lora_check_inputs(ad, a->xq, a->xkv, a->batch, a->len_q, a->len_kv, a->self, p);
    if (st != LORA_OK)
        return st;
    if (!a->out)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "out is NULL");
    p->mask = a->mask; /* checked by lora_forward_ex; project_inputs points it at copies */
    return LORA_OK;
}

/* Copies the inputs into the activations and projects them. */
static int project_inputs(lora_adapter *ad, const layer *l, const lora_forward_args *a,
                          attn_problem *p, lora_buf *acts_buf, layer_acts *acts)
{
    const size_t n_layer = layer_acts_floats(l, p, a->self);
    const size_t n_acts = n_layer + (a->mask ? lora_mask_floats(p, a->mask) : 0);
    size_t acts_bytes;
    if (n_layer == 0 || n_acts < n_layer ||
        __builtin_mul_overflow(n_acts, sizeof(float), &acts_bytes))
        return lora_set_error(ad->err, LORA_ERR_SHAPE, "activation size overflows");
    if (lora_buf_reserve(&ad->mem, acts_buf, acts_bytes) != LORA_OK)
        return lora_set_error(ad->err, LORA_ERR_NOMEM,
                              "cannot allocate %zu bytes of activations", acts_bytes);
    layer_acts_carve(l, p, a->self, acts_buf->ptr, acts);
    if (a->mask) { /* the saved forward's problem must not point at the caller's arrays */
        lora_mask_copy(p, a->mask, (float *)acts_buf->ptr + n_layer, &acts->mask);
        p->mask = &acts->mask;
    }
    acts->dropout = a->kind != SAVED_NONE && l->dropout > 0.0; /* inference never drops */
    acts->forward_count = ad->training_forwards;
    memcpy(acts->xq, a->xq, (size_t)(a->batch * a->len_q * l->d_model) * sizeof(float));
    if (!a->self)
        memcpy(acts->xkv, a->xkv, (size_t)(a->batch * a->len_kv * l->d_model) * sizeof(float));
    layer_project(l, p, acts);
    return LORA_OK;
}

int lora_forward_layer(lora_adapter *ad, const layer *l, const lora_forward_args *a,
                       attn_problem *p, lora_buf *acts_buf, layer_acts *acts, lora_plan *plan)
{
    /* A training forward has dropped its saved forward: under memory pressure it keeps
     * no dead buffers. An inference forward leaves the scratch a saved forward's
     * backward needs; the scratch only grows, so that backward still finds enough. */
    const int training = a->kind != SAVED_NONE;
    int st = project_inputs(ad, l, a, p, acts_buf, acts);
    if (st != LORA_OK)
        return st;
    st = lora_plan_call(ad, p, acts->q, acts->k, plan);
    if (st != LORA_OK) {
        if (st == LORA_ERR_NOMEM && training)
            lora_buf_free(&ad->mem, acts_buf);
        return st;
    }
    if (training && plan->poly_groups > 0)
        p->measure_rows = ad->cfg.measure_rows;
    /* A training forward reserves its backward's scratch too: a backward never
     * allocates. */
    const size_t io = lora_io_floats(l, p, a->kind);
    st = lora_reserve_scratch(ad, l, p, plan, io);
    if (st != LORA_OK) {
        if (st == LORA_ERR_NOMEM && training) { /* scratch may have grown in the plan */
            lora_buf_free(&ad->mem, acts_buf);
            lora_buf_free(&ad->mem, &ad->scratch);
        }
        return st;
    }
    /* out is computed in the handle's (padded) scratch, checked, then copied. */
    float *out_own = ad->scratch.ptr;
    double measured;
    layer_attend(l, plan->groups, p, acts, out_own, out_own + io, &measured);
    const size_t n_out = out_floats(l, p);
    const int64_t bad = lora_find_nonfinite(out_own, n_out);
    if (bad >= 0)
        return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                              "out would have a NaN/Inf at index %lld: the finite inputs "
                              "overflow float in this layer (x or the weights too large)",
                              (long long)bad);
    memcpy(a->out, out_own, n_out * sizeof(float));
    lora_record_run(ad, plan, measured);
    return LORA_OK;
}

/* A training forward: the core on the adapter's own layer, recording into tape (the
 * built-in one for lora_forward / lora_forward_cross). */
static int run_forward(lora_adapter *ad, const lora_forward_args *a, lora_tape *tape)
{
    lora_adapter_sync_borrowed(ad); /* the tape records the current generation */
    tape->kind = SAVED_NONE; /* a failed forward leaves nothing to backpropagate */
    attn_problem p;
    lora_plan plan;
    int st = lora_forward_begin(ad, a, &p);
    if (st == LORA_OK)
        st = lora_forward_layer(ad, &ad->layer, a, &p, &tape->acts_buf, &tape->acts, &plan);
    if (st != LORA_OK)
        return st;
    lora_tape_record(tape, ad, &p, &plan, a->kind);
    ad->err[0] = '\0';
    return LORA_OK;
}

/* LORA_FWD_INFER: the core on the adapter's own layer in transient activations; no tape,
 * parameter or gradient is touched. */
static int run_forward_infer(lora_adapter *ad, const lora_forward_args *a)
{
    attn_problem p;
    lora_plan plan;
    layer_acts acts;
    int st = lora_forward_begin(ad, a, &p);
    if (st == LORA_OK)
        st = lora_forward_layer(ad, &ad->layer, a, &p, &ad->infer_buf, &acts, &plan);
    if (st == LORA_OK)
        ad->err[0] = '\0';
    return st;
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
    if (kind != SAVED_NONE)
        n += lora_factor_floats(l); /* the gradients before a backward */
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
    ad->info.backend = plan->run_backend;
    ad->info.poly_groups = plan->poly_groups;
    ad->info.poly_degree = plan->run_order;
    ad->info.poly_rank = plan->run_features;
    ad->info.error_bound = plan->run_eta;
    ad->info.score_bound = plan->score_bound;
    ad->info.measured_out_error = measured_out;
    ad->info.measured_dq_error = -1.0;
    const attn_problem head = {.head_dim = ad->layer.head_dim, .la = &ad->la};
    ad->info.attention_compute = plan->poly_groups < ad->layer.n_kv_heads && attn_exact_bf16(&head)
                                     ? LORA_COMPUTE_BF16
                                     : LORA_COMPUTE_F32;
}

static void find_nonfinite_block(void *ctx, float *data, size_t len, size_t offset)
{
    int64_t *first = ctx;
    const int64_t i = *first < 0 ? lora_find_nonfinite(data, len) : -1;
    if (i >= 0)
        *first = (int64_t)offset + i;
}

/* After layer_backward: NONFINITE when a gradient or a requested dx overflowed. */
static int check_backward_results(lora_adapter *ad, const float *dxq, const float *dxkv,
                                  size_t nxq, size_t nxkv, lora_saved_kind kind)
{
    int64_t bad = -1;
    lora_for_each_factor(ad, 1, find_nonfinite_block, &bad);
    if (bad >= 0)
        return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                              "gradient entry %lld (flat order) would overflow float: dout "
                              "or the activations are too large; the gradients are unchanged",
                              (long long)bad);
    const char *name = kind == SAVED_SELF ? "dx" : "dxq";
    if (dxq && (bad = lora_find_nonfinite(dxq, nxq)) < 0 && dxkv && dxkv != dxq) {
        bad = lora_find_nonfinite(dxkv, nxkv);
        name = "dxkv";
    }
    if (bad >= 0)
        return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                              "%s would have a NaN/Inf at index %lld: dout or the weights are "
                              "too large; the gradients are unchanged",
                              name, (long long)bad);
    return LORA_OK;
}

/* The 0.1 backwards need the built-in tape to hold a forward of their own kind. */
static int check_builtin_kind(lora_adapter *ad, lora_saved_kind want)
{
    const lora_saved_kind have = ad->tape.kind;
    if (have == want)
        return LORA_OK;
    return lora_set_error(ad->err, LORA_ERR_STATE,
                          have == SAVED_NONE
                              ? "no saved forward: call %s first"
                              : "the saved forward is of the other kind: call %s first",
                          want == SAVED_SELF ? "lora_forward" : "lora_forward_cross");
}

/* The backward of tape's forward, whose checks have passed. For a self-attention tape
 * dxkv is dxq (one dL/dx) or NULL. */
static int run_backward(lora_adapter *ad, const lora_tape *tape, const float *dout,
                        float *dxq, float *dxkv)
{
    const lora_saved_kind kind = tape->kind;
    const layer *l = &ad->layer;
    attn_problem prob = tape->problem;
    prob.la = &ad->la;
    const attn_problem *p = &prob;
    const size_t n = out_floats(l, p);
    const int64_t bad = lora_find_nonfinite(dout, n);
    if (bad >= 0)
        return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                              "dout has a non-finite entry at index %lld", (long long)bad);
    /* The tape's forward reserved this scratch, but a later forward of another tape may
     * have failed for memory and released it. */
    const lora_plan plan = {.groups = tape->groups};
    const size_t io = lora_io_floats(l, p, kind);
    const int st_scratch = lora_reserve_scratch(ad, l, p, &plan, io);
    if (st_scratch != LORA_OK)
        return st_scratch;
    /* dout, dx and the gradients' prior values live in the front of the scratch
     * (lora_io_floats): every gemm operand is a padded library buffer, and a backward
     * whose results overflow puts the gradients back. */
    float *const dout_own = ad->scratch.ptr, *const dx_own = dout_own + n;
    const size_t nxq = (size_t)(p->batch * p->len_q) * (size_t)l->d_model;
    const size_t nxkv = (size_t)(p->batch * p->len_kv) * (size_t)l->d_model;
    float *const dxq_own = dxq ? dx_own : NULL;
    float *const dxkv_own = !dxkv ? NULL : dxkv == dxq ? dxq_own : dx_own + nxq;
    float *const grads_before = dx_own + nxq + (kind == SAVED_CROSS ? nxkv : 0);
    memcpy(dout_own, dout, n * sizeof(float));
    lora_for_each_factor(ad, 1, lora_flat_copy_out, grads_before);
    double grad_bound = 0.0, loss_grad_bound = 0.0, measured;
    layer_backward(l, tape->groups, p, &tape->acts, dout_own, dxq_own, dxkv_own,
                   dout_own + io, tape->eta, &grad_bound, &loss_grad_bound, &measured);
    const int st = check_backward_results(ad, dxq_own, dxkv_own, nxq, nxkv, kind);
    if (st != LORA_OK) {
        lora_for_each_factor(ad, 1, lora_flat_copy_in, grads_before);
        return st;
    }
    if (dxq)
        memcpy(dxq, dxq_own, nxq * sizeof(float));
    if (dxkv && dxkv != dxq)
        memcpy(dxkv, dxkv_own, nxkv * sizeof(float));
    ad->info.grad_bound = grad_bound;
    ad->info.loss_grad_bound = loss_grad_bound;
    ad->info.measured_dq_error = measured;
    ad->err[0] = '\0';
    return LORA_OK;
}

LORA_API int lora_forward(lora_adapter *ad, const float *x, int64_t batch, int64_t seq_len,
                          float *out)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    const lora_forward_args a = {x, x, batch, seq_len, seq_len, out, 1, SAVED_SELF, NULL};
    return run_forward(ad, &a, &ad->tape);
}

LORA_API int lora_backward(lora_adapter *ad, const float *dout, float *dx)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    if (!dout)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "dout is NULL");
    lora_adapter_sync_borrowed(ad);
    const int st = check_builtin_kind(ad, SAVED_SELF);
    return st != LORA_OK ? st : run_backward(ad, &ad->tape, dout, dx, dx);
}

LORA_API int lora_forward_cross(lora_adapter *ad, const float *xq, const float *xkv,
                                int64_t batch, int64_t len_q, int64_t len_kv, float *out)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    const lora_forward_args a = {xq, xkv, batch, len_q, len_kv, out, 0, SAVED_CROSS, NULL};
    return run_forward(ad, &a, &ad->tape);
}

LORA_API int lora_backward_cross(lora_adapter *ad, const float *dout, float *dxq,
                                 float *dxkv)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    if (dxq && dxq == dxkv)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "dxq and dxkv must be distinct buffers");
    if (!dout)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "dout is NULL");
    lora_adapter_sync_borrowed(ad);
    const int st = check_builtin_kind(ad, SAVED_CROSS);
    return st != LORA_OK ? st : run_backward(ad, &ad->tape, dout, dxq, dxkv);
}

/* ---- 0.2: per-call arguments and tapes ---- */

/* The first (0.2) layout of lora_attn_args ends at tape; later fields are appended. */
#define ATTN_ARGS_FIRST_SIZE (offsetof(lora_attn_args, tape) + sizeof(lora_tape *))

/* Reads the caller's args into *dst (lora_read_args_struct) and checks the flags. */
int lora_read_attn_args(lora_adapter *ad, const lora_attn_args *args, lora_attn_args *dst)
{
    const int st = lora_read_args_struct(ad->err, args, args ? args->struct_size : 0, dst,
                                         sizeof *dst, ATTN_ARGS_FIRST_SIZE,
                                         "lora_attn_args");
    if (st != LORA_OK)
        return st;
    if (dst->flags & ~(uint32_t)LORA_FWD_INFER)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "args->flags = 0x%x has bits other than LORA_FWD_INFER",
                              (unsigned)dst->flags);
    return LORA_OK;
}

LORA_API int lora_forward_ex(lora_adapter *ad, const lora_attn_args *args, const float *xq,
                             const float *xkv, int64_t batch, int64_t len_q, int64_t len_kv,
                             float *out)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    lora_attn_args call;
    const int self = xkv == NULL;
    int st = lora_read_attn_args(ad, args, &call);
    attn_mask mask;
    const int has_mask = st == LORA_OK && lora_mask_resolve(&call, self, &mask);
    int64_t rows;
    if (has_mask && batch >= 1 && len_q >= 1 && len_kv >= 1 &&
        !__builtin_mul_overflow(batch, len_q > len_kv ? len_q : len_kv, &rows)) {
        /* before anything is dropped: a refused args struct changes nothing (bad shapes
         * are the forward's own errors, below) */
        const attn_problem shape = {.batch = batch, .len_q = len_q, .len_kv = len_kv};
        st = lora_mask_check(ad, &shape, &mask, self);
    }
    if (st == LORA_OK && call.tape)
        st = lora_tape_check_owner(ad, call.tape, ad->err);
    if (st != LORA_OK)
        return st; /* refused arguments change nothing */
    const int infer = (call.flags & LORA_FWD_INFER) != 0;
    lora_tape *tape = call.tape ? call.tape : &ad->tape;
    if (self && len_kv != len_q) {
        if (!infer)
            tape->kind = SAVED_NONE; /* as every failed training forward */
        return lora_set_error(ad->err, LORA_ERR_SHAPE,
                              "self-attention (xkv NULL) needs len_kv (%lld) = len_q (%lld)",
                              (long long)len_kv, (long long)len_q);
    }
    const lora_forward_args a = {xq,  self ? xq : xkv, batch, len_q, len_kv, out, self,
                                 infer ? SAVED_NONE : self ? SAVED_SELF : SAVED_CROSS,
                                 has_mask ? &mask : NULL};
    return infer ? run_forward_infer(ad, &a) : run_forward(ad, &a, tape);
}

LORA_API int lora_backward_ex(lora_adapter *ad, lora_tape *tape, const float *dout,
                              float *dxq, float *dxkv)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    if (!tape)
        tape = &ad->tape;
    int st = lora_tape_check_owner(ad, tape, ad->err);
    if (st == LORA_OK && !dout)
        st = lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "dout is NULL");
    if (st == LORA_OK) {
        lora_adapter_sync_borrowed(ad);
        st = lora_tape_check_replay(ad, tape);
    }
    if (st == LORA_OK && tape->kind == SAVED_SELF && dxkv)
        st = lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                            "dxkv must be NULL: the tape's forward was self-attention (dxq "
                            "receives the whole dL/dx)");
    if (st == LORA_OK && tape->kind == SAVED_CROSS && dxq && dxq == dxkv)
        st = lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                            "dxq and dxkv must be distinct buffers");
    if (st != LORA_OK)
        return st;
    return run_backward(ad, tape, dout, dxq, tape->kind == SAVED_SELF ? dxq : dxkv);
}

LORA_API int lora_mse_loss(const float *out, const float *target, size_t n, double *loss,
                           float *dout)
{
    if (!out || !target || !loss || n == 0)
        return LORA_ERR_INVALID_ARG;
    if (lora_find_nonfinite(out, n) >= 0 || lora_find_nonfinite(target, n) >= 0)
        return LORA_ERR_NONFINITE;
    double sum = 0.0;
    int overflow = 0; /* a dout entry out - target beyond float */
    for (size_t i = 0; i < n; i++) {
        const double d = (double)out[i] - (double)target[i];
        sum += d * d;
        overflow |= dout && !isfinite(out[i] - target[i]);
    }
    if (overflow || !isfinite(sum))
        return LORA_ERR_NONFINITE;
    if (dout)
        for (size_t i = 0; i < n; i++)
            dout[i] = out[i] - target[i];
    *loss = 0.5 * sum;
    return LORA_OK;
}
