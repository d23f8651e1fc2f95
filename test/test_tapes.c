/* tapes_suite: lora_forward_ex / lora_backward_ex, several forwards in flight on tapes,
 * stale and foreign tapes, LORA_FWD_INFER, lora_attn_args' struct_size rules. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "suites.h"

static const int tbits[REF_NPROJ] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V,
                                     LORA_TARGET_O};

/* One problem on the fixture's layer, in float, with its reference gradients. */
typedef struct tape_case {
    ref_problem p;
    float *xq, *xkv, *out, *dout, *dxq, *dxkv; /* xkv NULL for self-attention */
    size_t nxq, nxkv, nout;
} tape_case;

static void case_init(tape_case *c, const ref_layer *l, int cross, int64_t len_q,
                      int64_t len_kv, uint64_t seed)
{
    memset(c, 0, sizeof *c);
    ck_assert_int_eq(ref_problem_init(&c->p, l, cross, 2, len_q, len_kv, seed), 0);
    const size_t d = (size_t)l->cfg.d_model;
    c->nxq = (size_t)(c->p.batch * c->p.len_q) * d;
    c->nxkv = (size_t)(c->p.batch * c->p.len_kv) * d;
    c->nout = (size_t)(c->p.batch * c->p.len_q) * (size_t)ref_out_cols(l);
    c->xq = malloc(c->nxq * sizeof(float));
    c->xkv = cross ? malloc(c->nxkv * sizeof(float)) : NULL;
    c->out = malloc(c->nout * sizeof(float));
    c->dout = malloc(c->nout * sizeof(float));
    c->dxq = malloc(c->nxq * sizeof(float));
    c->dxkv = malloc(c->nxkv * sizeof(float));
    ck_assert(c->xq && (c->xkv || !cross) && c->out && c->dout && c->dxq && c->dxkv);
    ref_to_float(c->p.xq, c->xq, c->nxq);
    if (cross)
        ref_to_float(c->p.xkv, c->xkv, c->nxkv);
    ref_to_float(c->p.dout, c->dout, c->nout);
}

static void case_free(tape_case *c)
{
    free(c->xq);
    free(c->xkv);
    free(c->out);
    free(c->dout);
    free(c->dxq);
    free(c->dxkv);
    ref_problem_free(&c->p);
}

static int case_forward(lora_adapter *ad, const lora_attn_args *args, tape_case *c)
{
    return lora_forward_ex(ad, args, c->xq, c->xkv, c->p.batch, c->p.len_q, c->p.len_kv,
                           c->out);
}

static int case_backward(lora_adapter *ad, lora_tape *tape, tape_case *c)
{
    return lora_backward_ex(ad, tape, c->dout, c->dxq, c->p.cross ? c->dxkv : NULL);
}

/* The adapter's gradients (accumulated from zero by `times` backwards), out and dx
 * against the reference on case c. */
static void assert_matches_reference(lora_adapter *ad, const ref_layer *l, const tape_case *c,
                                     double times, const char *what)
{
    const ref_problem *p = &c->p;
    double *out = malloc(c->nout * sizeof(double));
    ck_assert_ptr_nonnull(out);
    ref_forward(l, p->xq, p->xkv, p->batch, p->len_q, p->len_kv, out);
    const double eo = ref_rel_err_f(c->out, out, c->nout, 1e-300);
    ck_assert_msg(eo <= TOL_F32, "%s: out off by %g", what, eo);
    free(out);

    ref_grads g;
    ck_assert_int_eq(ref_grads_alloc(&g, l, p->batch, p->len_q, p->len_kv), 0);
    ref_backward(l, p->xq, p->xkv, p->batch, p->len_q, p->len_kv, p->dout, &g);
    double gmax = 0.0;
    for (int t = 0; t < REF_NPROJ; t++)
        if (ref_is_adapted(l, t))
            gmax = fmax(gmax, fmax(ref_max_abs(g.da[t], (size_t)(l->rank * l->in[t])),
                                   ref_max_abs(g.db[t], (size_t)(l->out[t] * l->rank))));
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_is_adapted(l, t))
            continue;
        for (int w = 0; w < 2; w++) {
            const size_t n = (size_t)(w == LORA_A ? l->rank * l->in[t] : l->out[t] * l->rank);
            float *got = malloc(n * sizeof(float));
            double *want = malloc(n * sizeof(double));
            ck_assert(got && want);
            ck_assert_int_eq(lora_adapter_get_grad(ad, tbits[t], w, got, n), LORA_OK);
            for (size_t i = 0; i < n; i++)
                want[i] = times * (w == LORA_A ? g.da[t] : g.db[t])[i];
            const double e = ref_rel_err_f(got, want, n, REF_REL_FLOOR * times * gmax);
            ck_assert_msg(e <= TOL_F32, "%s: d%c of target %d off by %g", what,
                          w == LORA_A ? 'A' : 'B', t, e);
            free(got);
            free(want);
        }
    }
    /* dx: the reference splits the query and key/value paths; self-attention sums them. */
    double *dx = malloc(c->nxq * sizeof(double));
    ck_assert_ptr_nonnull(dx);
    for (size_t i = 0; i < c->nxq; i++)
        dx[i] = g.dxq[i] + (p->cross ? 0.0 : g.dxkv[i]);
    const double dxmax = fmax(ref_max_abs(dx, c->nxq),
                              p->cross ? ref_max_abs(g.dxkv, c->nxkv) : 0.0);
    double e = ref_rel_err_f(c->dxq, dx, c->nxq, REF_REL_FLOOR * dxmax);
    ck_assert_msg(e <= TOL_F32, "%s: dx%s off by %g", what, p->cross ? "q" : "", e);
    if (p->cross) {
        e = ref_rel_err_f(c->dxkv, g.dxkv, c->nxkv, REF_REL_FLOOR * dxmax);
        ck_assert_msg(e <= TOL_F32, "%s: dxkv off by %g", what, e);
    }
    free(dx);
    ref_grads_free(&g);
}

static lora_tape *tape_new(lora_adapter *ad)
{
    lora_tape *t = NULL;
    ck_assert_int_eq(lora_tape_create(&t, ad), LORA_OK);
    ck_assert_ptr_nonnull(t);
    return t;
}

static lora_attn_args args_with_tape(lora_tape *t)
{
    lora_attn_args a;
    memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.tape = t;
    return a;
}

static float *grads_now(const tfx *f)
{
    float *g = malloc(f->ngrads * sizeof(float));
    ck_assert_ptr_nonnull(g);
    tfx_grads(f, g);
    return g;
}

/* Two forwards, then their backwards in reverse order: each gives its own forward's
 * gradients (with one saved forward the first backward would use the second's
 * activations). _i: 0 self, 1 cross. */
START_TEST(test_two_forwards_backward_in_reverse)
{
    tfx f;
    tfx_init(&f, _i, 1);
    tape_case c1, c2;
    case_init(&c1, &f.l, _i, 5, 7, 101);
    case_init(&c2, &f.l, _i, 4, 6, 202); /* another shape too */
    lora_tape *t1 = tape_new(f.ad), *t2 = tape_new(f.ad);
    lora_attn_args a1 = args_with_tape(t1), a2 = args_with_tape(t2);
    ck_assert_int_eq(case_forward(f.ad, &a1, &c1), LORA_OK);
    ck_assert_int_eq(case_forward(f.ad, &a2, &c2), LORA_OK);

    ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    ck_assert_int_eq(case_backward(f.ad, t2, &c2), LORA_OK);
    assert_matches_reference(f.ad, &f.l, &c2, 1.0, "second forward's tape");
    ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    ck_assert_int_eq(case_backward(f.ad, t1, &c1), LORA_OK);
    assert_matches_reference(f.ad, &f.l, &c1, 1.0, "first forward's tape");

    /* The built-in tape is a tape like the others: interleaved with t1. */
    ck_assert_int_eq(case_forward(f.ad, NULL, &c2), LORA_OK);
    ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    ck_assert_int_eq(case_backward(f.ad, t1, &c1), LORA_OK);
    assert_matches_reference(f.ad, &f.l, &c1, 1.0, "t1 after a built-in forward");
    ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    ck_assert_int_eq(case_backward(f.ad, NULL, &c2), LORA_OK);
    assert_matches_reference(f.ad, &f.l, &c2, 1.0, "built-in tape");

    lora_tape_destroy(t1);
    lora_tape_destroy(t2);
    case_free(&c1);
    case_free(&c2);
    tfx_free(&f);
}
END_TEST

/* A tape may be backwarded more than once; gradients accumulate each time. */
START_TEST(test_backward_twice_accumulates)
{
    tfx f;
    tfx_init(&f, _i, 1);
    tape_case c;
    case_init(&c, &f.l, _i, 5, 7, 303);
    lora_tape *t = tape_new(f.ad);
    lora_attn_args a = args_with_tape(t);
    ck_assert_int_eq(case_forward(f.ad, &a, &c), LORA_OK);
    ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    ck_assert_int_eq(case_backward(f.ad, t, &c), LORA_OK);
    float *once = grads_now(&f);
    float *dx_once = malloc(c.nxq * sizeof(float));
    ck_assert_ptr_nonnull(dx_once);
    memcpy(dx_once, c.dxq, c.nxq * sizeof(float));
    ck_assert_int_eq(case_backward(f.ad, t, &c), LORA_OK);
    assert_matches_reference(f.ad, &f.l, &c, 2.0, "two backwards");
    float *twice = grads_now(&f);
    double md = 0.0, m = 0.0;
    for (size_t i = 0; i < f.ngrads; i++) {
        md = fmax(md, fabs((double)twice[i] - 2.0 * once[i]));
        m = fmax(m, fabs(2.0 * once[i]));
    }
    ck_assert_msg(m > 0.0 && md <= 1e-6 * m, "second backward added %g off twice", md);
    ck_assert_msg(memcmp(dx_once, c.dxq, c.nxq * sizeof(float)) == 0,
                  "dx of the second backward differs from the first's");
    free(once);
    free(twice);
    free(dx_once);
    lora_tape_destroy(t);
    case_free(&c);
    tfx_free(&f);
}
END_TEST

/* Every change of parameters or base weights makes older tapes stale: STATE, with the
 * gradients unchanged; a new forward into the same tape works again. */
START_TEST(test_stale_tape_is_state)
{
    tfx f;
    tfx_init(&f, 0, 1);
    tape_case c;
    case_init(&c, &f.l, 0, 5, 5, 404);
    lora_tape *t = tape_new(f.ad);
    lora_attn_args a = args_with_tape(t);
    const size_t na = (size_t)(f.l.rank * f.l.in[REF_Q]);
    float *aq = malloc(na * sizeof(float));
    size_t np = 0;
    ck_assert_int_eq(lora_adapter_param_count(f.ad, &np), LORA_OK);
    float *flat = malloc(np * sizeof(float));
    float *w = malloc((size_t)(f.l.out[REF_K] * f.l.in[REF_K]) * sizeof(float));
    ck_assert(aq && flat && w);
    ck_assert_int_eq(lora_adapter_get_param(f.ad, LORA_TARGET_Q, LORA_A, aq, na), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_params_flat(f.ad, flat, np), LORA_OK);
    ref_to_float(f.l.w[REF_K], w, (size_t)(f.l.out[REF_K] * f.l.in[REF_K]));
    lora_adapter *twin = NULL;
    ck_assert_int_eq(ref_make_adapter(&f.l, LORA_BACKEND_EXACT, 1, &twin), LORA_OK);
    lora_optimizer *opt = NULL;
    ck_assert_int_eq(lora_optimizer_create(&opt, f.ad, LORA_OPTIMIZER_SGD), LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_LR, 0.0), LORA_OK);
    const char *changes[] = {"set_param", "set_params_flat", "set_base", "set_base_borrowed",
                             "copy_params", "optimizer_step"};
    for (int k = 0; k < 6; k++) {
        ck_assert_int_eq(case_forward(f.ad, &a, &c), LORA_OK);
        ck_assert_int_eq(case_forward(f.ad, NULL, &c), LORA_OK); /* the built-in one too */
        switch (k) { /* each writes the values the adapter already holds */
        case 0: ck_assert_int_eq(lora_adapter_set_param(f.ad, LORA_TARGET_Q, LORA_A, aq, na), LORA_OK); break;
        case 1: ck_assert_int_eq(lora_adapter_set_params_flat(f.ad, flat, np), LORA_OK); break;
        case 2: ck_assert_int_eq(lora_adapter_set_base(f.ad, LORA_TARGET_K, w, NULL), LORA_OK); break;
        case 3: ck_assert_int_eq(lora_adapter_set_base_borrowed(f.ad, LORA_TARGET_K, w, NULL), LORA_OK); break;
        case 4: ck_assert_int_eq(lora_adapter_copy_params(f.ad, twin), LORA_OK); break;
        default: ck_assert_int_eq(lora_optimizer_step(opt, f.ad), LORA_OK); break;
        }
        ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
        ck_assert_msg(case_backward(f.ad, t, &c) == LORA_ERR_STATE,
                      "backward of a tape recorded before %s: not LORA_ERR_STATE", changes[k]);
        ck_assert_msg(strstr(lora_adapter_last_error(f.ad), "changed") != NULL,
                      "message after %s: %s", changes[k], lora_adapter_last_error(f.ad));
        ck_assert_msg(case_backward(f.ad, NULL, &c) == LORA_ERR_STATE,
                      "built-in backward after %s: not LORA_ERR_STATE", changes[k]);
        float *g = grads_now(&f);
        for (size_t i = 0; i < f.ngrads; i++)
            ck_assert_msg(g[i] == 0.0f, "a refused backward wrote gradient %zu", i);
        free(g);
    }
    /* The base was set to the reference's W_K without bias: restore the bias. */
    float *bias = malloc((size_t)f.l.out[REF_K] * sizeof(float));
    ck_assert_ptr_nonnull(bias);
    ref_to_float(f.l.bias[REF_K], bias, (size_t)f.l.out[REF_K]);
    ck_assert_int_eq(lora_adapter_set_base(f.ad, LORA_TARGET_K, w, bias), LORA_OK);
    ck_assert_int_eq(case_forward(f.ad, &a, &c), LORA_OK);
    ck_assert_int_eq(case_backward(f.ad, t, &c), LORA_OK);
    assert_matches_reference(f.ad, &f.l, &c, 1.0, "tape recorded again");
    free(bias);
    lora_optimizer_destroy(opt);
    lora_adapter_destroy(twin);
    free(aq);
    free(flat);
    free(w);
    lora_tape_destroy(t);
    case_free(&c);
    tfx_free(&f);
}
END_TEST

/* A tape belongs to its adapter: another adapter (even an identical one, even one that
 * took a destroyed adapter's place) refuses it with STATE in forward and backward. */
START_TEST(test_tape_of_other_adapter_is_state)
{
    tfx f;
    tfx_init(&f, 0, 1);
    tape_case c;
    case_init(&c, &f.l, 0, 5, 5, 505);
    lora_adapter *other = NULL;
    ck_assert_int_eq(ref_make_adapter(&f.l, LORA_BACKEND_EXACT, 1, &other), LORA_OK);
    lora_tape *t = tape_new(f.ad);
    lora_attn_args a = args_with_tape(t);
    ck_assert_int_eq(case_forward(f.ad, &a, &c), LORA_OK);
    ck_assert_int_eq(case_forward(other, NULL, &c), LORA_OK);
    ck_assert_int_eq(case_backward(other, t, &c), LORA_ERR_STATE);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(other), "another adapter"));
    ck_assert_int_eq(case_forward(other, &a, &c), LORA_ERR_STATE);
    /* Refused: other's own saved forward is kept. */
    ck_assert_int_eq(case_backward(other, NULL, &c), LORA_OK);
    /* The owner still backwards it. */
    ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    ck_assert_int_eq(case_backward(f.ad, t, &c), LORA_OK);
    assert_matches_reference(f.ad, &f.l, &c, 1.0, "owner after refusals");

    /* Destroy the owner; adapters created afterwards (one may reuse its address) refuse
     * the tape; destroying the tape afterwards is fine (ASan/valgrind check it). */
    lora_adapter_destroy(f.ad);
    f.ad = NULL;
    for (int k = 0; k < 4; k++) {
        lora_adapter *next = NULL;
        ck_assert_int_eq(ref_make_adapter(&f.l, LORA_BACKEND_EXACT, 1, &next), LORA_OK);
        ck_assert_int_eq(case_backward(next, t, &c), LORA_ERR_STATE);
        lora_adapter_destroy(next);
    }
    lora_tape_destroy(t);
    lora_adapter_destroy(other);
    case_free(&c);
    tfx_free(&f);
}
END_TEST

/* LORA_FWD_INFER: out equals a training forward's bitwise, and the built-in saved
 * forward, every tape, the parameters and the gradients stay as they were. */
START_TEST(test_infer_touches_nothing)
{
    tfx f;
    tfx_init(&f, _i, 1);
    tape_case c, ci;
    case_init(&c, &f.l, _i, 5, 7, 606);
    case_init(&ci, &f.l, _i, 3, 7, 607); /* what inference runs on */
    lora_tape *t = tape_new(f.ad);
    lora_attn_args a = args_with_tape(t);
    ck_assert_int_eq(case_forward(f.ad, &a, &c), LORA_OK);
    ck_assert_int_eq(case_forward(f.ad, NULL, &c), LORA_OK);
    ck_assert_int_eq(case_backward(f.ad, NULL, &c), LORA_OK);
    float *g0 = grads_now(&f);
    size_t np = 0;
    ck_assert_int_eq(lora_adapter_param_count(f.ad, &np), LORA_OK);
    float *p0 = malloc(np * sizeof(float)), *p1 = malloc(np * sizeof(float));
    float *out_infer = malloc(ci.nout * sizeof(float));
    ck_assert(p0 && p1 && out_infer);
    ck_assert_int_eq(lora_adapter_get_params_flat(f.ad, p0, np), LORA_OK);

    lora_attn_args inf = args_with_tape(NULL);
    inf.flags = LORA_FWD_INFER;
    for (int k = 0; k < 2; k++) {
        inf.tape = k ? t : NULL; /* INFER records into no tape, named or not */
        ck_assert_int_eq(case_forward(f.ad, &inf, &ci), LORA_OK);
    }
    memcpy(out_infer, ci.out, ci.nout * sizeof(float));
    float *g1 = grads_now(&f);
    ck_assert_msg(memcmp(g0, g1, f.ngrads * sizeof(float)) == 0, "INFER changed gradients");
    ck_assert_int_eq(lora_adapter_get_params_flat(f.ad, p1, np), LORA_OK);
    ck_assert_msg(memcmp(p0, p1, np * sizeof(float)) == 0, "INFER changed parameters");

    /* The saved forwards are c's, untouched: each backward adds c's gradients. */
    ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    ck_assert_int_eq(case_backward(f.ad, NULL, &c), LORA_OK);
    assert_matches_reference(f.ad, &f.l, &c, 1.0, "built-in tape after INFER");
    ck_assert_int_eq(case_backward(f.ad, t, &c), LORA_OK);
    assert_matches_reference(f.ad, &f.l, &c, 2.0, "tape after INFER");

    /* A training forward of the same input gives the same out, bit for bit. */
    ck_assert_int_eq(case_forward(f.ad, NULL, &ci), LORA_OK);
    ck_assert_msg(memcmp(out_infer, ci.out, ci.nout * sizeof(float)) == 0,
                  "INFER out differs from a training forward's");
    free(g0);
    free(g1);
    free(p0);
    free(p1);
    free(out_infer);
    lora_tape_destroy(t);
    case_free(&c);
    case_free(&ci);
    tfx_free(&f);
}
END_TEST

/* args NULL (and args with every default) equal lora_forward / lora_forward_cross and
 * their backwards bitwise: out, dx and gradients. */
START_TEST(test_ex_defaults_equal_0_1_calls)
{
    tfx f;
    tfx_init(&f, _i, 1);
    const int cross = _i;
    lora_adapter *twin = NULL;
    ck_assert_int_eq(ref_make_adapter(&f.l, LORA_BACKEND_EXACT, 1, &twin), LORA_OK);
    const size_t nq = f.nxq, nk = f.nxkv, no = f.nout;
    float *out2 = malloc(no * sizeof(float)), *dxq2 = malloc(nq * sizeof(float));
    float *dxkv2 = malloc(nk * sizeof(float));
    ck_assert(out2 && dxq2 && dxkv2);
    lora_attn_args defaults = args_with_tape(NULL);
    for (int k = 0; k < 2; k++) {
        ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
        ck_assert_int_eq(lora_adapter_zero_grad(twin), LORA_OK);
        ck_assert_int_eq(tfx_step(&f), LORA_OK); /* the 0.1 calls on f.ad */
        const lora_attn_args *args = k ? &defaults : NULL;
        ck_assert_int_eq(lora_forward_ex(twin, args, f.xq, cross ? f.xkv : NULL, f.p.batch,
                                         f.p.len_q, f.p.len_kv, out2),
                         LORA_OK);
        ck_assert_int_eq(lora_backward_ex(twin, NULL, f.dout, dxq2, cross ? dxkv2 : NULL),
                         LORA_OK);
        ck_assert_msg(memcmp(out2, f.out, no * sizeof(float)) == 0, "out differs (%d)", k);
        ck_assert_msg(memcmp(dxq2, f.dxq, nq * sizeof(float)) == 0, "dx(q) differs (%d)", k);
        ck_assert(!cross || memcmp(dxkv2, f.dxkv, nk * sizeof(float)) == 0);
        float *g = grads_now(&f);
        tfx t2 = f;
        t2.ad = twin;
        float *g2 = grads_now(&t2);
        ck_assert_msg(memcmp(g, g2, f.ngrads * sizeof(float)) == 0, "gradients differ (%d)", k);
        free(g);
        free(g2);
        /* And the 0.1 backward reads what lora_forward_ex saved in the built-in tape. */
        ck_assert_int_eq(cross ? lora_backward_cross(twin, f.dout, dxq2, dxkv2)
                               : lora_backward(twin, f.dout, dxq2),
                         LORA_OK);
    }
    free(out2);
    free(dxq2);
    free(dxkv2);
    lora_adapter_destroy(twin);
    tfx_free(&f);
}
END_TEST

/* struct_size: smaller than the first version INVALID_ARG; larger accepted while the
 * unknown tail is zero, UNSUPPORTED when it is not; unknown flags INVALID_ARG; the mask
 * fields UNSUPPORTED naming the field (this build). A refused struct changes nothing. */
START_TEST(test_args_struct_size_and_fields)
{
    tfx f;
    tfx_init(&f, 0, 1);
    float *snap = tfx_prime(&f);
    struct {
        lora_attn_args a;
        unsigned char tail[32];
    } big;
    memset(&big, 0, sizeof big);
    const int64_t b = f.p.batch, lq = f.p.len_q;
#define FWD(args) lora_forward_ex(f.ad, (args), f.xq, NULL, b, lq, lq, f.out)
    const uint32_t sizes_bad[] = {0, 4, 8, (uint32_t)sizeof(lora_attn_args) - 1};
    for (size_t k = 0; k < sizeof sizes_bad / sizeof sizes_bad[0]; k++) {
        big.a.struct_size = sizes_bad[k];
        ck_assert_int_eq(FWD(&big.a), LORA_ERR_INVALID_ARG);
        ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(f.ad), "struct_size"));
    }
    big.a.struct_size = sizeof big; /* a newer caller's struct, tail zero */
    ck_assert_int_eq(FWD(&big.a), LORA_OK);
    big.tail[17] = 1;
    ck_assert_int_eq(FWD(&big.a), LORA_ERR_UNSUPPORTED);
    big.tail[17] = 0;
    big.a.struct_size = sizeof big.a;
    big.a.flags = 2;
    ck_assert_int_eq(FWD(&big.a), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(f.ad), "flags"));
    big.a.flags = 0;
    /* bad mask values are refused naming the field (lengths outside 0 .. len, self
     * kv_lens unlike q_lens, positions beyond +-2^52) */
    static const int64_t lens[2] = {6, 5}, other[2] = {5, 4}, pos[10] = {0, 1, INT64_MAX};
    const char *names[] = {"q_lens", "kv_lens", "q_pos"};
    const int want[] = {LORA_ERR_SHAPE, LORA_ERR_SHAPE, LORA_ERR_INVALID_ARG};
    for (int k = 0; k < 3; k++) {
        lora_attn_args m = args_with_tape(NULL);
        switch (k) {
        case 0: m.q_lens = lens; break;
        case 1: m.kv_lens = other; break;
        default: m.q_pos = pos; break;
        }
        ck_assert_int_eq(FWD(&m), want[k]);
        ck_assert_msg(strstr(lora_adapter_last_error(f.ad), names[k]) != NULL,
                      "message does not name %s: %s", names[k], lora_adapter_last_error(f.ad));
    }
#undef FWD
    /* The last good forward (struct with a zero tail) is what the saved forward holds:
     * none of the refused structs dropped it. */
    ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    ck_assert_int_eq(lora_backward(f.ad, f.dout, f.dxq), LORA_OK);
    /* A bad shape is a failed forward: it drops the saved forward, as lora_forward's. */
    ck_assert_int_eq(lora_forward_ex(f.ad, NULL, f.xq, NULL, b, lq, lq + 1, f.out),
                     LORA_ERR_SHAPE); /* self needs len_kv = len_q */
    ck_assert_int_eq(lora_backward(f.ad, f.dout, NULL), LORA_ERR_STATE);
    ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    tfx_assert_works(&f);
    free(snap);
    tfx_free(&f);
}
END_TEST

/* A failed forward into a tape leaves that tape empty (STATE) and the others intact;
 * backward_ex's dx rules. */
START_TEST(test_failed_forward_empties_its_tape)
{
    tfx f;
    tfx_init(&f, 1, 1);
    tape_case c;
    case_init(&c, &f.l, 1, 5, 7, 707);
    lora_tape *t1 = tape_new(f.ad), *t2 = tape_new(f.ad);
    lora_attn_args a1 = args_with_tape(t1), a2 = args_with_tape(t2);
    ck_assert_int_eq(case_backward(f.ad, t1, &c), LORA_ERR_STATE); /* empty */
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(f.ad), "holds no forward"));
    ck_assert_int_eq(case_forward(f.ad, &a1, &c), LORA_OK);
    ck_assert_int_eq(case_forward(f.ad, &a2, &c), LORA_OK);
    c.xq[3] = NAN;
    ck_assert_int_eq(case_forward(f.ad, &a2, &c), LORA_ERR_NONFINITE);
    c.xq[3] = 0.25f;
    ck_assert_int_eq(case_backward(f.ad, t2, &c), LORA_ERR_STATE);
    ck_assert_int_eq(lora_backward_ex(f.ad, t1, c.dout, c.dxq, c.dxq), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_backward_ex(f.ad, t1, NULL, c.dxq, c.dxkv), LORA_ERR_INVALID_ARG);
    ref_to_float(c.p.xq, c.xq, c.nxq);
    ck_assert_int_eq(lora_adapter_zero_grad(f.ad), LORA_OK);
    ck_assert_int_eq(case_backward(f.ad, t1, &c), LORA_OK);
    ck_assert_int_eq(case_forward(f.ad, &a1, &c), LORA_OK); /* c.out again */
    assert_matches_reference(f.ad, &f.l, &c, 1.0, "the other tape");
    /* A self-attention tape takes no dxkv. */
    tape_case s;
    case_init(&s, &f.l, 0, 5, 5, 708);
    ck_assert_int_eq(case_forward(f.ad, &a2, &s), LORA_OK);
    ck_assert_int_eq(lora_backward_ex(f.ad, t2, s.dout, s.dxq, s.dxkv), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(lora_adapter_last_error(f.ad), "dxkv"));
    ck_assert_int_eq(lora_backward_ex(f.ad, t2, s.dout, NULL, NULL), LORA_OK);
    case_free(&s);
    lora_tape_destroy(t1);
    lora_tape_destroy(t2);
    case_free(&c);
    tfx_free(&f);
}
END_TEST

/* Tapes allocate through the adapter's allocator, and destroying one returns it all. */
static size_t live_blocks;
static void *count_alloc(void *u, size_t n)
{
    (void)u;
    void *p = malloc(n);
    live_blocks += p != NULL;
    return p;
}
static void count_free(void *u, void *p)
{
    (void)u;
    live_blocks--;
    free(p);
}

START_TEST(test_tapes_use_the_adapter_allocator)
{
    const lora_allocator hooks = {count_alloc, count_free, NULL};
    lora_config *cfg = NULL;
    ck_assert_int_eq(lora_config_create_with_allocator(&cfg, &hooks), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_D_MODEL, 8), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_THREADS, 1), LORA_OK);
    lora_adapter *ad = adapter_new(cfg, 5);
    lora_config_destroy(cfg);
    const size_t base = live_blocks;
    lora_tape *t = NULL;
    ck_assert_int_eq(lora_tape_create(&t, ad), LORA_OK);
    ck_assert_uint_eq(live_blocks, base + 1);
    float x[2 * 3 * 8], out[2 * 3 * 8];
    fill_uniform(x, 48, 9, 1.0f);
    lora_attn_args a = args_with_tape(t);
    ck_assert_int_eq(lora_forward_ex(ad, &a, x, NULL, 2, 3, 3, out), LORA_OK);
    ck_assert_uint_gt(live_blocks, base + 1); /* its activations */
    lora_adapter_destroy(ad); /* before the tape: allowed */
    ck_assert_uint_gt(live_blocks, 0);
    lora_tape_destroy(t);
    ck_assert_uint_eq(live_blocks, 0);
}
END_TEST

Suite *tapes_suite(void)
{
    Suite *s = suite_create("tapes");
    TCase *tc = tcase_create("tapes");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_two_forwards_backward_in_reverse, 0, 2);
    tcase_add_loop_test(tc, test_backward_twice_accumulates, 0, 2);
    tcase_add_test(tc, test_stale_tape_is_state);
    tcase_add_test(tc, test_tape_of_other_adapter_is_state);
    tcase_add_loop_test(tc, test_infer_touches_nothing, 0, 2);
    tcase_add_loop_test(tc, test_ex_defaults_equal_0_1_calls, 0, 2);
    tcase_add_test(tc, test_args_struct_size_and_fields);
    tcase_add_test(tc, test_failed_forward_empties_its_tape);
    tcase_add_test(tc, test_tapes_use_the_adapter_allocator);
    suite_add_tcase(s, tc);
    return s;
}
