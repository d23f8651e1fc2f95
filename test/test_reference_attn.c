/* The 0.2 attention features of the double reference (RoPE, lengths, positions, segments,
 * WINDOW, SOFTCAP, LoRA dropout): central finite differences of every LoRA parameter and
 * of x, identities that must hold exactly, and small known answers. Part of
 * reference_suite. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>

#include "reference.h"
#include "reference_tests.h"

#define FD_STEP 1e-5
#define FD_TOL 1e-6
#define MAXB 2
#define MAXL 7

/* One problem: a config, its call shape and the per-call arguments (used when the
 * matching use_* flag is set). */
typedef struct attn_case {
    const char *name;
    ref_config c;
    int cross, batch, len_q, len_kv;
    int use_q_lens, use_kv_lens, use_pos, use_seg, use_keep;
    int64_t q_lens[MAXB], kv_lens[MAXB];
    int64_t q_pos[MAXB * MAXL], kv_pos[MAXB * MAXL];
    int32_t q_seg[MAXB * MAXL], kv_seg[MAXB * MAXL];
    int n_freqs;
    double freqs[4];
} attn_case;

static const attn_case fd_cases[] = {
    {"rope half, GQA, causal self, padded rows",
     {.d_model = 6, .n_heads = 4, .n_kv_heads = 2, .head_dim = 4, .rank = 2, .targets = 15,
      .causal = 1, .out_proj = 1, .bias = 1, .rope = REF_ROPE_HALF, .rope_theta = 50.0},
     0, 2, 5, 5, 1, 0, 0, 0, 0, {5, 3}, {0}, {0}, {0}, {0}, {0}, 0, {0}},
    {"rope interleaved partial, non-causal cross, explicit positions",
     {.d_model = 5, .n_heads = 2, .n_kv_heads = 1, .head_dim = 6, .rank = 2, .targets = 7,
      .rope = REF_ROPE_INTERLEAVED, .rope_dim = 4, .rope_theta = 10.0},
     1, 1, 3, 5, 0, 0, 1, 0, 0, {0}, {0}, {7, 2, 4}, {0, 3, 9, 1, 5}, {0}, {0}, 0, {0}},
    {"softcap, causal window, packed segments, frequency table",
     {.d_model = 4, .n_heads = 2, .head_dim = 4, .rank = 2, .targets = 15, .causal = 1,
      .out_proj = 1, .bias = 1, .rope = REF_ROPE_HALF, .softcap = 0.8, .window = 2},
     0, 2, 6, 6, 0, 0, 1, 1, 0, {0}, {0},
     {0, 1, 2, 0, 1, 2, 0, 1, 0, 1, 2, 3}, {0}, {0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1}, {0}, 2,
     {0.9, 0.3}},
    {"dropout on Q, K, V, O, non-causal window, cross with padding",
     {.d_model = 5, .n_heads = 2, .head_dim = 3, .rank = 2, .targets = 15, .out_proj = 1,
      .bias = 1, .dropout = 0.25, .window = 2, .rope = REF_ROPE_INTERLEAVED, .rope_dim = 2},
     1, 2, 4, 5, 1, 1, 0, 0, 1, {4, 3}, {5, 2}, {0}, {0}, {0}, {0}, 0, {0}},
    {"fully masked query, softcap, causal positions, cross segments",
     {.d_model = 4, .n_heads = 2, .n_kv_heads = 1, .head_dim = 2, .rank = 2, .targets = 15,
      .causal = 1, .out_proj = 1, .bias = 1, .rope = REF_ROPE_HALF, .softcap = 1.5},
     1, 1, 3, 4, 0, 0, 1, 1, 0, {0}, {0}, {1, 5, 3}, {0, 1, 2, 3}, {0, 2, 1}, {0, 0, 1, 1},
     0, {0}},
    {"dropout in self-attention (x feeds both paths of Q, K and V)",
     {.d_model = 4, .n_heads = 2, .head_dim = 2, .rank = 2, .targets = 15, .causal = 1,
      .out_proj = 1, .rope = REF_ROPE_HALF, .dropout = 0.4},
     0, 1, 4, 4, 0, 0, 0, 0, 1, {0}, {0}, {0}, {0}, {0}, {0}, 0, {0}},
};

/* A built case: layer, problem, args and the keep masks they point to. */
typedef struct built {
    ref_layer l;
    ref_problem p;
    ref_attn_args a;
    uint8_t *keep[REF_NPROJ];
} built;

static void build(built *bt, const attn_case *k, uint64_t seed)
{
    memset(bt, 0, sizeof *bt);
    ck_assert_int_eq(ref_layer_init(&bt->l, &k->c), 0);
    ref_layer_randomize(&bt->l, seed, 1.5, 0.7);
    if (k->n_freqs)
        ck_assert_int_eq(ref_layer_set_rope_freqs(&bt->l, k->freqs, (size_t)k->n_freqs), 0);
    ck_assert_int_eq(
        ref_problem_init(&bt->p, &bt->l, k->cross, k->batch, k->len_q, k->len_kv, seed + 1), 0);
    if (k->use_q_lens)
        bt->a.q_lens = k->q_lens;
    if (k->use_kv_lens)
        bt->a.kv_lens = k->kv_lens;
    if (k->use_pos) {
        bt->a.q_pos = k->q_pos;
        bt->a.kv_pos = k->cross ? k->kv_pos : NULL;
    }
    if (k->use_seg) {
        bt->a.q_seg = k->q_seg;
        bt->a.kv_seg = k->cross ? k->kv_seg : NULL;
    }
    if (k->use_keep)
        for (int t = 0; t < REF_NPROJ; t++) {
            if (!ref_is_adapted(&bt->l, t))
                continue;
            const int64_t rows = k->batch * (t == REF_K || t == REF_V ? bt->p.len_kv : k->len_q);
            const size_t n = (size_t)(rows * bt->l.in[t]);
            bt->keep[t] = malloc(n);
            ck_assert_ptr_nonnull(bt->keep[t]);
            ref_dropout_keep_random(seed * 31 + (uint64_t)t, k->c.dropout, n, bt->keep[t]);
            bt->a.keep[t] = bt->keep[t];
        }
}

static void unbuild(built *bt)
{
    for (int t = 0; t < REF_NPROJ; t++)
        free(bt->keep[t]);
    ref_problem_free(&bt->p);
    ref_layer_free(&bt->l);
}

static size_t n_out(const built *bt)
{
    return (size_t)(bt->p.batch * bt->p.len_q * ref_out_cols(&bt->l));
}

static double loss_of(const built *bt, const double *target, double *out)
{
    ref_forward_ex(&bt->l, &bt->a, bt->p.xq, bt->p.xkv, bt->p.batch, bt->p.len_q,
                   bt->p.len_kv, out);
    double s = 0.0;
    for (size_t i = 0; i < n_out(bt); i++)
        s += 0.5 * (out[i] - target[i]) * (out[i] - target[i]);
    return s;
}

static void central_diff(const built *bt, const double *target, double *out, double *v,
                         size_t n, double *fd)
{
    for (size_t i = 0; i < n; i++) {
        const double keep = v[i];
        v[i] = keep + FD_STEP;
        const double lp = loss_of(bt, target, out);
        v[i] = keep - FD_STEP;
        const double lm = loss_of(bt, target, out);
        v[i] = keep;
        fd[i] = (lp - lm) / (2.0 * FD_STEP);
    }
}

START_TEST(test_attn_vs_finite_differences)
{
    const attn_case *k = &fd_cases[_i];
    built bt;
    build(&bt, k, 300 + (uint64_t)_i);
    const ref_layer *l = &bt.l;
    const size_t nout = n_out(&bt);
    const size_t nxq = (size_t)(bt.p.batch * bt.p.len_q * l->cfg.d_model);
    const size_t nxkv = (size_t)(bt.p.batch * bt.p.len_kv * l->cfg.d_model);
    double *out = malloc(nout * sizeof(double)), *target = malloc(nout * sizeof(double));
    double *fd = malloc((nxq + nxkv + 256) * sizeof(double));
    ck_assert(out && target && fd);
    uint64_t s = 9;
    for (size_t i = 0; i < nout; i++)
        target[i] = ref_uniform(&s);
    ref_forward_ex(l, &bt.a, bt.p.xq, bt.p.xkv, bt.p.batch, bt.p.len_q, bt.p.len_kv, out);
    /* dout = out - target, nonzero on padded rows too: the backward must ignore it there. */
    for (size_t i = 0; i < nout; i++)
        bt.p.dout[i] = out[i] - target[i];
    ref_grads g;
    ck_assert_int_eq(ref_grads_alloc(&g, l, bt.p.batch, bt.p.len_q, bt.p.len_kv), 0);
    ref_backward_ex(l, &bt.a, bt.p.xq, bt.p.xkv, bt.p.batch, bt.p.len_q, bt.p.len_kv,
                    bt.p.dout, &g);
    static const char *names[4] = {"Q", "K", "V", "O"};
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_is_adapted(l, t))
            continue;
        const size_t na = (size_t)(l->rank * l->in[t]), nb = (size_t)(l->out[t] * l->rank);
        ck_assert(na <= 256 && nb <= 256);
        central_diff(&bt, target, out, l->a[t], na, fd);
        double e = ref_rel_err_d(fd, g.da[t], na, 1e-12);
        ck_assert_msg(e <= FD_TOL && ref_max_abs(g.da[t], na) > 1e-6,
                      "%s: dA_%s rel err %.3g vs finite differences (max|dA| %.3g)", k->name,
                      names[t], e, ref_max_abs(g.da[t], na));
        central_diff(&bt, target, out, l->b[t], nb, fd);
        e = ref_rel_err_d(fd, g.db[t], nb, 1e-12);
        ck_assert_msg(e <= FD_TOL && ref_max_abs(g.db[t], nb) > 1e-6,
                      "%s: dB_%s rel err %.3g vs finite differences", k->name, names[t], e);
    }
    if (k->cross) {
        central_diff(&bt, target, out, bt.p.xq, nxq, fd);
        double e = ref_rel_err_d(fd, g.dxq, nxq, 1e-12);
        ck_assert_msg(e <= FD_TOL, "%s: dxq rel err %.3g", k->name, e);
        central_diff(&bt, target, out, bt.p.xkv, nxkv, fd);
        e = ref_rel_err_d(fd, g.dxkv, nxkv, 1e-12);
        ck_assert_msg(e <= FD_TOL, "%s: dxkv rel err %.3g", k->name, e);
    } else {
        for (size_t i = 0; i < nxq; i++)
            g.dxq[i] += g.dxkv[i];
        central_diff(&bt, target, out, bt.p.xq, nxq, fd);
        const double e = ref_rel_err_d(fd, g.dxq, nxq, 1e-12);
        ck_assert_msg(e <= FD_TOL, "%s: dx rel err %.3g", k->name, e);
    }
    ref_grads_free(&g);
    free(out);
    free(target);
    free(fd);
    unbuild(&bt);
}
END_TEST

/* Runs forward + backward of bt (with args a) into out and g (allocated here). */
static void run_full(const built *bt, const ref_attn_args *a, double *out, ref_grads *g)
{
    ck_assert_int_eq(ref_grads_alloc(g, &bt->l, bt->p.batch, bt->p.len_q, bt->p.len_kv), 0);
    ref_forward_ex(&bt->l, a, bt->p.xq, bt->p.xkv, bt->p.batch, bt->p.len_q, bt->p.len_kv,
                   out);
    ref_backward_ex(&bt->l, a, bt->p.xq, bt->p.xkv, bt->p.batch, bt->p.len_q, bt->p.len_kv,
                    bt->p.dout, g);
}

/* Max |x - y| over out and every gradient of two runs of the same layer shape. */
static double max_diff(const built *bt, const double *o1, const ref_grads *g1,
                       const double *o2, const ref_grads *g2)
{
    const ref_layer *l = &bt->l;
    double m = 0.0;
#define ACC(x, y, n)                                     \
    for (size_t i_ = 0; i_ < (size_t)(n); i_++) {        \
        const double d_ = fabs((x)[i_] - (y)[i_]);        \
        m = (d_ > m || isnan(d_)) ? d_ : m;               \
    }
    ACC(o1, o2, n_out(bt));
    for (int t = 0; t < REF_NPROJ; t++)
        if (ref_is_adapted(l, t)) {
            ACC(g1->da[t], g2->da[t], l->rank * l->in[t]);
            ACC(g1->db[t], g2->db[t], l->out[t] * l->rank);
        }
    ACC(g1->dxq, g2->dxq, bt->p.batch * bt->p.len_q * l->cfg.d_model);
    ACC(g1->dxkv, g2->dxkv, bt->p.batch * bt->p.len_kv * l->cfg.d_model);
#undef ACC
    return m;
}

/* Spelled-out defaults (full lengths, default positions, one segment id, THETA's own
 * table) give bit for bit what args NULL gives; so does a zero-initialised args. */
START_TEST(test_attn_explicit_defaults_equal_null)
{
    for (int cross = 0; cross <= 1; cross++) {
        attn_case k = {.c = {.d_model = 5, .n_heads = 2, .head_dim = 4, .rank = 2,
                             .targets = 15, .causal = 1, .out_proj = 1, .bias = 1,
                             .rope = REF_ROPE_INTERLEAVED, .rope_theta = 30.0, .window = 3,
                             .softcap = 2.0},
                       .cross = cross, .batch = 2, .len_q = 3, .len_kv = cross ? 5 : 3};
        built bt;
        build(&bt, &k, 41 + (uint64_t)cross);
        const int64_t lq = k.len_q, lkv = bt.p.len_kv;
        int64_t q_lens[2] = {lq, lq}, kv_lens[2] = {lkv, lkv}, q_pos[2 * 5], kv_pos[2 * 5];
        int32_t seg_q[2 * 5], seg_kv[2 * 5];
        for (int b = 0; b < 2; b++) {
            for (int64_t i = 0; i < lq; i++) {
                q_pos[b * lq + i] = (lkv - lq) + i;
                seg_q[b * lq + i] = 7;
            }
            for (int64_t j = 0; j < lkv; j++) {
                kv_pos[b * lkv + j] = j;
                seg_kv[b * lkv + j] = 7;
            }
        }
        const ref_attn_args zero = {0};
        ref_attn_args full = {.q_lens = q_lens, .kv_lens = kv_lens, .q_pos = q_pos,
                              .kv_pos = kv_pos, .q_seg = seg_q, .kv_seg = seg_kv};
        const size_t no = n_out(&bt);
        double *o0 = malloc(no * sizeof(double)), *o1 = malloc(no * sizeof(double));
        double *o2 = malloc(no * sizeof(double)), *o3 = malloc(no * sizeof(double));
        ck_assert(o0 && o1 && o2 && o3);
        ref_grads g0, g1, g2, g3;
        run_full(&bt, NULL, o0, &g0);
        run_full(&bt, &zero, o1, &g1);
        run_full(&bt, &full, o2, &g2);
        double freqs[2];
        ref_rope_freqs_theta(30.0, 4, freqs);
        ck_assert_int_eq(ref_layer_set_rope_freqs(&bt.l, freqs, 2), 0);
        run_full(&bt, NULL, o3, &g3);
        ck_assert_msg(max_diff(&bt, o0, &g0, o1, &g1) == 0.0, "zero args != NULL (cross %d)",
                      cross);
        ck_assert_msg(max_diff(&bt, o0, &g0, o2, &g2) == 0.0,
                      "explicit defaults != NULL (cross %d): %.3g", cross,
                      max_diff(&bt, o0, &g0, o2, &g2));
        ck_assert_msg(max_diff(&bt, o0, &g0, o3, &g3) == 0.0,
                      "THETA's table given explicitly != THETA (cross %d)", cross);
        ck_assert(ref_max_abs(o0, no) > 0.1);
        ref_grads_free(&g0);
        ref_grads_free(&g1);
        ref_grads_free(&g2);
        ref_grads_free(&g3);
        free(o0);
        free(o1);
        free(o2);
        free(o3);
        unbuild(&bt);
    }
}
END_TEST

/* A frequency table of zeros rotates nothing: equals the same layer without RoPE. */
START_TEST(test_attn_zero_freqs_equal_no_rope)
{
    attn_case k = {.c = {.d_model = 4, .n_heads = 2, .head_dim = 4, .rank = 2, .targets = 3,
                         .causal = 1, .rope = REF_ROPE_HALF},
                   .batch = 1, .len_q = 4, .len_kv = 4};
    built bt;
    build(&bt, &k, 5);
    const size_t no = n_out(&bt);
    double *o1 = malloc(no * sizeof(double)), *o2 = malloc(no * sizeof(double));
    ck_assert(o1 && o2);
    ref_grads g1, g2;
    run_full(&bt, NULL, o1, &g1);
    const double zeros[2] = {0.0, 0.0};
    ck_assert_int_eq(ref_layer_set_rope_freqs(&bt.l, zeros, 2), 0);
    run_full(&bt, NULL, o2, &g2);
    ck_assert_msg(max_diff(&bt, o1, &g1, o2, &g2) > 1e-3, "RoPE had no effect to begin with");
    ref_grads_free(&g1);
    ref_grads_free(&g2);
    bt.l.cfg.rope = REF_ROPE_NONE;
    run_full(&bt, NULL, o1, &g1);
    bt.l.cfg.rope = REF_ROPE_HALF;
    run_full(&bt, NULL, o2, &g2);
    ck_assert_msg(max_diff(&bt, o1, &g1, o2, &g2) == 0.0, "zero table != no RoPE: %.3g",
                  max_diff(&bt, o1, &g1, o2, &g2));
    ck_assert_int_eq(ref_layer_set_rope_freqs(&bt.l, zeros, 3), -1); /* n != rope_dim/2 */
    const double bad[2] = {-1.0, 0.0};
    ck_assert_int_eq(ref_layer_set_rope_freqs(&bt.l, bad, 2), -1);
    ref_grads_free(&g1);
    ref_grads_free(&g2);
    free(o1);
    free(o2);
    unbuild(&bt);
}
END_TEST

/* A packed row (two sequences, positions restarting, segment ids) equals the sequences
 * run one by one: out rows, dx rows and the summed dA, dB. Causal, RoPE, window, softcap,
 * a padded tail. */
START_TEST(test_attn_packed_equals_separate)
{
    const ref_config c = {.d_model = 5, .n_heads = 2, .n_kv_heads = 1, .head_dim = 4,
                          .rank = 2, .targets = 15, .causal = 1, .out_proj = 1, .bias = 1,
                          .rope = REF_ROPE_HALF, .window = 3, .softcap = 1.2};
    ref_layer l;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 77, 1.5, 0.7);
    enum { L = 8, LA = 3, LB = 4 }; /* 3 + 4 tokens, 1 padded */
    const int d = c.d_model, oc = ref_out_cols(&l);
    ref_problem p;
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 1, L, L, 3), 0);
    const int64_t q_lens[1] = {LA + LB};
    const int64_t pos[L] = {0, 1, 2, 0, 1, 2, 3, 0};
    const int32_t seg[L] = {0, 0, 0, 1, 1, 1, 1, 2};
    const ref_attn_args a = {.q_lens = q_lens, .q_pos = pos, .q_seg = seg};
    double out[L * 8], sep[L * 8];
    ck_assert(oc <= 8);
    ref_grads g, ga, gb;
    ck_assert_int_eq(ref_grads_alloc(&g, &l, 1, L, L), 0);
    ck_assert_int_eq(ref_grads_alloc(&ga, &l, 1, LA, LA), 0);
    ck_assert_int_eq(ref_grads_alloc(&gb, &l, 1, LB, LB), 0);
    ref_forward_ex(&l, &a, p.xq, p.xq, 1, L, L, out);
    ref_backward_ex(&l, &a, p.xq, p.xq, 1, L, L, p.dout, &g);
    ref_forward(&l, p.xq, p.xq, 1, LA, LA, sep);
    ref_forward(&l, p.xq + LA * d, p.xq + LA * d, 1, LB, LB, sep + LA * oc);
    ref_backward(&l, p.xq, p.xq, 1, LA, LA, p.dout, &ga);
    ref_backward(&l, p.xq + LA * d, p.xq + LA * d, 1, LB, LB, p.dout + LA * oc, &gb);
    for (int i = 0; i < (LA + LB) * oc; i++)
        ck_assert_msg(fabs(out[i] - sep[i]) <= 1e-13, "out[%d]: packed %.17g, separate %.17g",
                      i, out[i], sep[i]);
    for (int i = (LA + LB) * oc; i < L * oc; i++)
        ck_assert_msg(out[i] == 0.0, "padded row out[%d] = %g", i, out[i]);
    double worst = 0.0;
    for (int t = 0; t < REF_NPROJ; t++) {
        const int64_t na = l.rank * l.in[t], nb = l.out[t] * l.rank;
        for (int64_t i = 0; i < na; i++)
            worst = fmax(worst, fabs(g.da[t][i] - ga.da[t][i] - gb.da[t][i]));
        for (int64_t i = 0; i < nb; i++)
            worst = fmax(worst, fabs(g.db[t][i] - ga.db[t][i] - gb.db[t][i]));
    }
    for (int i = 0; i < L * d; i++) {
        const double packed = g.dxq[i] + g.dxkv[i];
        double want = 0.0; /* the padded row's dx is 0 */
        if (i < LA * d)
            want = ga.dxq[i] + ga.dxkv[i];
        else if (i < (LA + LB) * d)
            want = gb.dxq[i - LA * d] + gb.dxkv[i - LA * d];
        worst = fmax(worst, fabs(packed - want));
    }
    ck_assert_msg(worst <= 1e-12, "packed vs separate gradients differ by %.3g", worst);
    ref_grads_free(&g);
    ref_grads_free(&ga);
    ref_grads_free(&gb);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* RoPE scores depend on pos_i - pos_j only: adding 1000 to every position changes
 * nothing (both layouts, partial rotary, cross-attention). */
START_TEST(test_attn_rope_is_relative)
{
    for (int layout = REF_ROPE_HALF; layout <= REF_ROPE_INTERLEAVED; layout++) {
        attn_case k = {.c = {.d_model = 4, .n_heads = 2, .head_dim = 6, .rank = 2,
                             .targets = 15, .out_proj = 1, .rope = layout, .rope_dim = 4,
                             .rope_theta = 20.0},
                       .cross = 1, .batch = 1, .len_q = 3, .len_kv = 4};
        built bt;
        build(&bt, &k, 11 + (uint64_t)layout);
        int64_t qp[3] = {2, 0, 5}, kp[4] = {1, 3, 0, 4};
        ref_attn_args a = {.q_pos = qp, .kv_pos = kp};
        const size_t no = n_out(&bt);
        double *o1 = malloc(no * sizeof(double)), *o2 = malloc(no * sizeof(double));
        ck_assert(o1 && o2);
        ref_grads g1, g2;
        run_full(&bt, &a, o1, &g1);
        for (int i = 0; i < 3; i++)
            qp[i] += 1000;
        for (int j = 0; j < 4; j++)
            kp[j] += 1000;
        run_full(&bt, &a, o2, &g2);
        const double e = max_diff(&bt, o1, &g1, o2, &g2);
        ck_assert_msg(e <= 1e-11, "layout %d: shifting positions changed results by %.3g",
                      layout, e);
        ref_grads_free(&g2);
        qp[0] += 1; /* a relative change must show */
        run_full(&bt, &a, o2, &g2);
        ck_assert_msg(max_diff(&bt, o1, &g1, o2, &g2) > 1e-4, "layout %d: RoPE inert", layout);
        ref_grads_free(&g1);
        ref_grads_free(&g2);
        free(o1);
        free(o2);
        unbuild(&bt);
    }
}
END_TEST

/* Permutes the rows of Q and K (weights, biases, LoRA B) of src into dst, HALF order to
 * INTERLEAVED order. */
static void permute_layer(const ref_layer *src, ref_layer *dst, int inverse)
{
    for (int t = REF_Q; t <= REF_K; t++) {
        const int heads = t == REF_Q ? src->n_heads : src->n_kv_heads;
        const int rd = ref_rope_dim(src);
        ref_rope_permute_rows(src->w[t], dst->w[t], heads, src->head_dim, rd, src->in[t],
                              inverse);
        if (src->bias[t])
            ref_rope_permute_rows(src->bias[t], dst->bias[t], heads, src->head_dim, rd, 1,
                                  inverse);
        if (src->b[t])
            ref_rope_permute_rows(src->b[t], dst->b[t], heads, src->head_dim, rd, src->rank,
                                  inverse);
    }
}

/* A HALF layer and the INTERLEAVED layer holding its Q/K rows permuted (as
 * convert_hf_to_gguf.py does) compute the same: out, dA, dx equal; dB permuted. */
START_TEST(test_attn_rope_layouts_equal_under_permutation)
{
    static const int rope_dims[2] = {0, 4};
    for (int v = 0; v < 2; v++) {
        const ref_config c = {.d_model = 6, .n_heads = 4, .n_kv_heads = 2, .head_dim = 6,
                              .rank = 2, .targets = 15, .causal = 1, .out_proj = 1, .bias = 1,
                              .rope = REF_ROPE_HALF, .rope_dim = rope_dims[v]};
        ref_layer half, inter;
        ck_assert_int_eq(ref_layer_init(&half, &c), 0);
        ref_layer_randomize(&half, 21, 1.5, 0.7);
        ref_config ci = c;
        ci.rope = REF_ROPE_INTERLEAVED;
        ck_assert_int_eq(ref_layer_init(&inter, &ci), 0);
        ref_layer_randomize(&inter, 21, 1.5, 0.7); /* same V, O, A; Q/K rows replaced: */
        permute_layer(&half, &inter, 0);
        ref_problem p;
        ck_assert_int_eq(ref_problem_init(&p, &half, 0, 2, 5, 5, 8), 0);
        const size_t no = (size_t)(2 * 5 * ref_out_cols(&half)), nx = (size_t)(2 * 5 * 6);
        double o1[64], o2[64];
        ck_assert(no <= 64);
        ref_grads g1, g2;
        ck_assert_int_eq(ref_grads_alloc(&g1, &half, 2, 5, 5), 0);
        ck_assert_int_eq(ref_grads_alloc(&g2, &inter, 2, 5, 5), 0);
        ref_forward(&half, p.xq, p.xq, 2, 5, 5, o1);
        ref_forward(&inter, p.xq, p.xq, 2, 5, 5, o2);
        ref_backward(&half, p.xq, p.xq, 2, 5, 5, p.dout, &g1);
        ref_backward(&inter, p.xq, p.xq, 2, 5, 5, p.dout, &g2);
        ck_assert_double_le(ref_rel_err_d(o2, o1, no, 1e-300), 1e-12);
        ck_assert_double_le(ref_rel_err_d(g2.dxq, g1.dxq, nx, 1e-300), 1e-12);
        ck_assert_double_le(ref_rel_err_d(g2.dxkv, g1.dxkv, nx, 1e-300), 1e-12);
        for (int t = 0; t < REF_NPROJ; t++) {
            const size_t na = (size_t)(half.rank * half.in[t]);
            const size_t nb = (size_t)(half.out[t] * half.rank);
            double db[256];
            ck_assert(nb <= 256);
            ck_assert_double_le(ref_rel_err_d(g2.da[t], g1.da[t], na, 1e-300), 1e-12);
            if (t == REF_Q || t == REF_K) /* dB of the interleaved layer, back in HF order */
                ref_rope_permute_rows(g2.db[t], db, t == REF_Q ? 4 : 2, 6, ref_rope_dim(&half),
                                      half.rank, 1);
            else
                memcpy(db, g2.db[t], nb * sizeof(double));
            ck_assert_msg(ref_rel_err_d(db, g1.db[t], nb, 1e-300) <= 1e-12,
                          "dB of target %d, rope_dim %d", t, rope_dims[v]);
        }
        /* Without the permutation the layouts differ. */
        ref_layer_randomize(&inter, 21, 1.5, 0.7);
        ref_forward(&inter, p.xq, p.xq, 2, 5, 5, o2);
        ck_assert_double_gt(ref_rel_err_d(o2, o1, no, 1e-300), 1e-3);
        ref_grads_free(&g1);
        ref_grads_free(&g2);
        ref_problem_free(&p);
        ref_layer_free(&half);
        ref_layer_free(&inter);
    }
}
END_TEST

/* The permutation's index map, worked out by hand from LlamaModel.permute's
 * reshape(n_head, 2, hd/2, cols).swapaxes(1, 2): per head, new row 2i + c = old row
 * c*hd/2 + i. */
START_TEST(test_attn_permutation_known_rows)
{
    /* 2 heads of head_dim 6 (rows 0..11, one column holding the row number). */
    double src[12], dst[12], back[12];
    for (int r = 0; r < 12; r++)
        src[r] = r;
    ref_rope_permute_rows(src, dst, 2, 6, 6, 1, 0);
    const double want[12] = {0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11};
    for (int r = 0; r < 12; r++)
        ck_assert_msg(dst[r] == want[r], "row %d holds %g, want %g", r, dst[r], want[r]);
    ref_rope_permute_rows(dst, back, 2, 6, 6, 1, 1);
    for (int r = 0; r < 12; r++)
        ck_assert(back[r] == src[r]);
    /* Partial rotary 4 of 6: only the first 4 rows of each head move. */
    ref_rope_permute_rows(src, dst, 2, 6, 4, 1, 0);
    const double want4[12] = {0, 2, 1, 3, 4, 5, 6, 8, 7, 9, 10, 11};
    for (int r = 0; r < 12; r++)
        ck_assert_msg(dst[r] == want4[r], "rope_dim 4: row %d holds %g, want %g", r, dst[r],
                      want4[r]);
    /* Two columns move together. */
    double m2[8], p2[8];
    for (int i = 0; i < 8; i++)
        m2[i] = 10 * (i / 2) + i % 2;
    ref_rope_permute_rows(m2, p2, 1, 4, 4, 2, 0);
    const double want2[8] = {0, 1, 20, 21, 10, 11, 30, 31};
    for (int i = 0; i < 8; i++)
        ck_assert(p2[i] == want2[i]);
}
END_TEST

/* Dropout identities: keep-all masks equal the undropped layer with B scaled by 1/(1-p);
 * the inference flag, and p = 0, ignore the masks. */
START_TEST(test_attn_dropout_identities)
{
    attn_case k = {.c = {.d_model = 4, .n_heads = 2, .head_dim = 2, .rank = 2, .targets = 15,
                         .causal = 1, .out_proj = 1, .bias = 1, .rope = REF_ROPE_HALF,
                         .dropout = 0.2},
                   .batch = 1, .len_q = 4, .len_kv = 4, .use_keep = 1};
    built bt;
    build(&bt, &k, 19);
    const size_t no = n_out(&bt);
    double *o1 = malloc(no * sizeof(double)), *o2 = malloc(no * sizeof(double));
    ck_assert(o1 && o2);
    ref_grads g1, g2;
    /* infer: masks ignored, equals args NULL */
    ref_attn_args inf = bt.a;
    inf.infer = 1;
    run_full(&bt, NULL, o1, &g1);
    run_full(&bt, &inf, o2, &g2);
    ck_assert(max_diff(&bt, o1, &g1, o2, &g2) == 0.0);
    ref_grads_free(&g2);
    run_full(&bt, &bt.a, o2, &g2); /* the masks do something */
    ck_assert(max_diff(&bt, o1, &g1, o2, &g2) > 1e-4);
    ref_grads_free(&g1);
    ref_grads_free(&g2);
    /* keep all, B * 1/(1-p) */
    ref_attn_args all = {0};
    for (int t = 0; t < REF_NPROJ; t++) {
        memset(bt.keep[t], 1, (size_t)(4 * bt.l.in[t]));
        all.keep[t] = bt.keep[t];
    }
    run_full(&bt, &all, o1, &g1);
    ref_layer scaled;
    ck_assert_int_eq(ref_layer_init(&scaled, &k.c), 0);
    ref_layer_randomize(&scaled, 19, 1.5, 0.7);
    scaled.cfg.dropout = 0.0;
    for (int t = 0; t < REF_NPROJ; t++)
        for (int64_t i = 0; i < scaled.out[t] * scaled.rank; i++)
            scaled.b[t][i] /= 1.0 - 0.2;
    ck_assert_int_eq(ref_grads_alloc(&g2, &scaled, 1, 4, 4), 0);
    ref_forward(&scaled, bt.p.xq, bt.p.xq, 1, 4, 4, o2);
    ref_backward(&scaled, bt.p.xq, bt.p.xq, 1, 4, 4, bt.p.dout, &g2);
    ck_assert_double_le(ref_rel_err_d(o1, o2, no, 1e-300), 1e-13);
    for (int t = 0; t < REF_NPROJ; t++) {
        const size_t na = (size_t)(scaled.rank * scaled.in[t]);
        const size_t nb = (size_t)(scaled.out[t] * scaled.rank);
        /* L(B') with B' = B/(1-p): dL/dB = dL/dB' / (1-p); dA is the same function's. */
        for (size_t i = 0; i < nb; i++)
            g2.db[t][i] /= 1.0 - 0.2;
        ck_assert_double_le(ref_rel_err_d(g1.da[t], g2.da[t], na, 1e-300), 1e-12);
        ck_assert_double_le(ref_rel_err_d(g1.db[t], g2.db[t], nb, 1e-300), 1e-12);
    }
    ck_assert_double_le(ref_rel_err_d(g1.dxq, g2.dxq, 16, 1e-300), 1e-12);
    ck_assert_double_le(ref_rel_err_d(g1.dxkv, g2.dxkv, 16, 1e-300), 1e-12);
    ref_grads_free(&g1);
    ref_grads_free(&g2);
    ref_layer_free(&scaled);
    /* p = 0: the masks are ignored */
    bt.l.cfg.dropout = 0.0;
    run_full(&bt, NULL, o1, &g1);
    run_full(&bt, &bt.a, o2, &g2);
    ck_assert(max_diff(&bt, o1, &g1, o2, &g2) == 0.0);
    ref_grads_free(&g1);
    ref_grads_free(&g2);
    free(o1);
    free(o2);
    unbuild(&bt);
}
END_TEST

/* With LoRA on V and O only, out is linear in every dropped input, so the mean over
 * random masks converges to the undropped out (standard error ~ 1/sqrt(N)). */
START_TEST(test_attn_dropout_mean)
{
    attn_case k = {.c = {.d_model = 4, .n_heads = 2, .head_dim = 2, .rank = 2, .targets = 12,
                         .causal = 1, .out_proj = 1, .rope = REF_ROPE_HALF, .dropout = 0.3},
                   .batch = 1, .len_q = 3, .len_kv = 3};
    built bt;
    build(&bt, &k, 23);
    enum { N = 2000 };
    const size_t no = n_out(&bt);
    double want[16], o[16], mean[16] = {0}, sq[16] = {0};
    ck_assert(no <= 16);
    ref_forward(&bt.l, bt.p.xq, bt.p.xq, 1, 3, 3, want);
    uint8_t kv[12], ko[12];
    ref_attn_args a = {.keep = {NULL, NULL, kv, ko}};
    for (int s = 0; s < N; s++) {
        ref_dropout_keep_random(1000 + (uint64_t)s, 0.3, 12, kv);
        ref_dropout_keep_random(9000 + (uint64_t)s, 0.3, 12, ko);
        ref_forward_ex(&bt.l, &a, bt.p.xq, bt.p.xq, 1, 3, 3, o);
        for (size_t i = 0; i < no; i++) {
            mean[i] += o[i] / N;
            sq[i] += o[i] * o[i] / N;
        }
    }
    double worst = 0.0, spread = 0.0;
    for (size_t i = 0; i < no; i++) {
        const double se = sqrt((sq[i] - mean[i] * mean[i]) / N);
        spread = fmax(spread, se);
        worst = fmax(worst, fabs(mean[i] - want[i]) / (se + 1e-300));
    }
    ck_assert_msg(spread > 1e-4, "dropout did not perturb out");
    ck_assert_msg(worst <= 5.0, "mean over %d masks is %.2f standard errors off", N, worst);
    unbuild(&bt);
}
END_TEST

/* Visibility rules of the spec, entry by entry. */
START_TEST(test_attn_visibility_rules)
{
    ref_config c = {.d_model = 2, .rank = 1, .targets = 1, .causal = 1, .window = 3};
    ref_layer l;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    /* causal, window 3, self L = 6: j visible iff 0 <= i - j < 3 */
    for (int i = 0; i < 6; i++)
        for (int j = 0; j < 6; j++)
            ck_assert_int_eq(ref_attn_visible(&l, NULL, 1, 1, 6, 6, 0, i, j),
                             i - j >= 0 && i - j < 3);
    /* non-causal window 3: |i - j| < 3 */
    l.cfg.causal = 0;
    for (int i = 0; i < 6; i++)
        for (int j = 0; j < 6; j++)
            ck_assert_int_eq(ref_attn_visible(&l, NULL, 1, 1, 6, 6, 0, i, j), abs(i - j) < 3);
    /* causal cross, default positions (len_kv - len_q) + i: query 0 of 2 over 4 keys
     * sits at position 2 */
    l.cfg.causal = 1;
    l.cfg.window = 0;
    for (int j = 0; j < 4; j++)
        ck_assert_int_eq(ref_attn_visible(&l, NULL, 0, 1, 2, 4, 0, 0, j), j <= 2);
    /* explicit positions, lengths and segments in self-attention: kv_pos, kv_lens and
     * kv_seg follow the query side */
    const int64_t pos[4] = {3, 0, 1, 2}, lens[1] = {3};
    const int32_t seg[4] = {1, 1, 2, 1};
    const ref_attn_args a = {.q_lens = lens, .q_pos = pos, .q_seg = seg};
    /* query 0 (pos 3, seg 1) sees key 1 (pos 0, seg 1); not key 2 (seg 2), not key 3
     * (padded) */
    ck_assert_int_eq(ref_attn_visible(&l, &a, 1, 1, 4, 4, 0, 0, 1), 1);
    ck_assert_int_eq(ref_attn_visible(&l, &a, 1, 1, 4, 4, 0, 0, 2), 0);
    ck_assert_int_eq(ref_attn_visible(&l, &a, 1, 1, 4, 4, 0, 0, 3), 0);
    /* query 1 (pos 0) does not see key 0 (pos 3): pos_j <= pos_i fails */
    ck_assert_int_eq(ref_attn_visible(&l, &a, 1, 1, 4, 4, 0, 1, 0), 0);
    ck_assert_int_eq(ref_attn_visible(&l, &a, 1, 1, 4, 4, 0, 1, 1), 1);
    /* padded query 3 sees nothing */
    for (int j = 0; j < 4; j++)
        ck_assert_int_eq(ref_attn_visible(&l, &a, 1, 1, 4, 4, 0, 3, j), 0);
    ref_layer_free(&l);
}
END_TEST

/* Hand-computed answers for RoPE (head_dim 2, one pair) and the softcap. */
START_TEST(test_attn_known_answers)
{
    /* W_Q = W_K = W_V = I (d_model = head_dim = 2), non-causal, x0 = (1, 0),
     * x1 = (0, 1). inv_freq = (1): q1 = k1 = x1 turned by 1 radian = (-sin 1, cos 1).
     * Scores (beta = 1/sqrt 2): row 0: (1, -sin 1); row 1: (-sin 1, 1). V = x. */
    ref_config c = {.d_model = 2, .rank = 1, .targets = 1, .rope = REF_ROPE_HALF};
    ref_layer l;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    for (int t = REF_Q; t <= REF_V; t++)
        l.w[t][0] = l.w[t][3] = 1.0;
    const double x[4] = {1, 0, 0, 1};
    double out[4];
    ref_forward(&l, x, x, 1, 2, 2, out);
    const double beta = 1.0 / sqrt(2.0), s1 = sin(1.0);
    const double e0 = exp(beta * 1.0), e1 = exp(-beta * s1);
    const double want[4] = {e0 / (e0 + e1), e1 / (e0 + e1), e1 / (e0 + e1), e0 / (e0 + e1)};
    for (int i = 0; i < 4; i++)
        ck_assert_msg(fabs(out[i] - want[i]) <= 1e-15, "rope out[%d] = %.17g, want %.17g", i,
                      out[i], want[i]);
    ref_layer_free(&l);
    /* Softcap c = 1, d_model 1, W = 1, beta 1 (explicit), x = (1, 2), non-causal:
     * row 0 scores tanh(1), tanh(2); row 1 tanh(2), tanh(4). */
    ref_config c2 = {.d_model = 1, .rank = 1, .targets = 1, .softmax_scale = 1.0,
                     .softcap = 1.0};
    ck_assert_int_eq(ref_layer_init(&l, &c2), 0);
    l.w[REF_Q][0] = l.w[REF_K][0] = l.w[REF_V][0] = 1.0;
    const double x2[2] = {1.0, 2.0};
    double out2[2];
    ref_forward(&l, x2, x2, 1, 2, 2, out2);
    const double a0 = exp(tanh(1.0)), a1 = exp(tanh(2.0)), b0 = exp(tanh(2.0)),
                 b1 = exp(tanh(4.0));
    ck_assert_double_eq_tol(out2[0], (a0 + 2 * a1) / (a0 + a1), 1e-15);
    ck_assert_double_eq_tol(out2[1], (b0 + 2 * b1) / (b0 + b1), 1e-15);
    ref_layer_free(&l);
}
END_TEST

/* Padded query rows: out 0 even with W_O's bias, dx 0; a query that sees no key gives
 * attention 0 (out = W_O's bias) and passes no gradient to the keys. */
START_TEST(test_attn_padding_and_empty_rows)
{
    attn_case k = {.c = {.d_model = 3, .n_heads = 1, .head_dim = 2, .rank = 1, .targets = 15,
                         .out_proj = 1, .bias = 1},
                   .cross = 1, .batch = 1, .len_q = 3, .len_kv = 2, .use_seg = 1,
                   .use_q_lens = 1, .q_lens = {2}, .q_seg = {0, 5, 0}, .kv_seg = {0, 0}};
    built bt;
    build(&bt, &k, 31);
    double out[9];
    ref_grads g;
    run_full(&bt, &bt.a, out, &g);
    for (int c = 0; c < 3; c++) {
        ck_assert_msg(out[3 + c] == bt.l.bias[REF_O][c], "empty row: out %g, bias %g",
                      out[3 + c], bt.l.bias[REF_O][c]);
        ck_assert_msg(out[6 + c] == 0.0, "padded row: out %g", out[6 + c]);
        ck_assert(g.dxq[3 + c] == 0.0 && g.dxq[6 + c] == 0.0);
        ck_assert(g.dxq[c] != 0.0);
    }
    ref_grads_free(&g);
    /* The keys' gradient is the same whatever the empty row's and padded row's dout. */
    double dxkv[6];
    ck_assert_int_eq(ref_grads_alloc(&g, &bt.l, 1, 3, 2), 0);
    ref_backward_ex(&bt.l, &bt.a, bt.p.xq, bt.p.xkv, 1, 3, 2, bt.p.dout, &g);
    memcpy(dxkv, g.dxkv, sizeof dxkv);
    for (int i = 3; i < 9; i++)
        bt.p.dout[i] *= -7.0;
    ref_backward_ex(&bt.l, &bt.a, bt.p.xq, bt.p.xkv, 1, 3, 2, bt.p.dout, &g);
    for (int i = 0; i < 6; i++)
        ck_assert_msg(g.dxkv[i] == dxkv[i], "dxkv[%d] moved with a masked row's dout", i);
    ref_grads_free(&g);
    unbuild(&bt);
}
END_TEST

void reference_attn_tests(Suite *s)
{
    TCase *tc = tcase_create("attn_finite_differences");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_attn_vs_finite_differences, 0,
                        (int)(sizeof fd_cases / sizeof fd_cases[0]));
    suite_add_tcase(s, tc);
    tc = tcase_create("attn_identities");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_attn_explicit_defaults_equal_null);
    tcase_add_test(tc, test_attn_zero_freqs_equal_no_rope);
    tcase_add_test(tc, test_attn_packed_equals_separate);
    tcase_add_test(tc, test_attn_rope_is_relative);
    tcase_add_test(tc, test_attn_rope_layouts_equal_under_permutation);
    tcase_add_test(tc, test_attn_permutation_known_rows);
    tcase_add_test(tc, test_attn_dropout_identities);
    tcase_add_test(tc, test_attn_dropout_mean);
    tcase_add_test(tc, test_attn_visibility_rules);
    tcase_add_test(tc, test_attn_known_answers);
    tcase_add_test(tc, test_attn_padding_and_empty_rows);
    suite_add_tcase(s, tc);
}
