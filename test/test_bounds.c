/* bounds_suite: known answers for the certified bounds of lora_run_info (MATH §3-4,
 * docs/math.md "Error", the bound's derivation above grad_error_bound in
 * src/layer/layer.c). On tiny layers whose weights, inputs and upstream gradients are
 * small dyadic numbers, every float product the library forms before attention (Q, K,
 * V, X·Aᵀ, and dC = dO·W_O,eff) is exact, so the reference's double activations are
 * the library's own; the test then evaluates R, η and grad_bound from the formulas
 * itself and compares them with the run info to 1e-12 relative. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "suites.h"

#define KA_REL 1e-12

/* k/4 for k uniform in [-4, 4]: at most 3 fractional bits, so sums of products of a
 * few of them are exact in float. */
static void fill_dyadic(double *x, size_t n, uint64_t *s)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (double)((int)(ref_rng_next(s) % 9) - 4) / 4.0;
}

static void dyadic_layer(ref_layer *l, uint64_t seed)
{
    uint64_t s = seed;
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_has_proj(l, t))
            continue;
        fill_dyadic(l->w[t], (size_t)(l->out[t] * l->in[t]), &s);
        if (l->bias[t])
            fill_dyadic(l->bias[t], (size_t)l->out[t], &s);
        if (ref_is_adapted(l, t)) {
            fill_dyadic(l->a[t], (size_t)(l->rank * l->in[t]), &s);
            fill_dyadic(l->b[t], (size_t)(l->out[t] * l->rank), &s);
        }
    }
}

static double max_abs(const double *x, size_t n)
{
    double m = 0.0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs(x[i]));
    return m;
}

/* δ(g, R) = e^R·R^(g+1)/(g+1)! and η = 2δ/(1 − δ) (MATH §3). */
static double eta_of(int g, double r)
{
    const double delta = exp(r) * pow(r, g + 1) / tgamma(g + 2.0);
    return delta < 1.0 ? 2.0 * delta / (1.0 - delta) : INFINITY;
}

/* Smallest even g <= 20 with δ(g, R)·(2 + tol) <= tol (docs/math.md). */
static int degree_for(double r, double tol)
{
    for (int g = 2; g <= 20; g += 2)
        if (exp(r) * pow(r, g + 1) / tgamma(g + 2.0) * (2.0 + tol) <= tol)
            return g;
    return 0;
}

/* R of one kv-head group: β·max over its query heads and rows of ‖q_i‖₂ times
 * max_j ‖k_j − k̄‖₂, per batch element, maxed. */
static double group_score_bound(const ref_layer *l, const ref_problem *p, const double *q,
                                const double *k, int g)
{
    const int d = l->head_dim, group = l->n_heads / l->n_kv_heads;
    double r = 0.0;
    for (int64_t b = 0; b < p->batch; b++) {
        double mean[64] = {0}, kmax = 0.0;
        for (int64_t j = 0; j < p->len_kv; j++)
            for (int c = 0; c < d; c++)
                mean[c] += k[(b * p->len_kv + j) * l->kv_dim + g * d + c] / (double)p->len_kv;
        for (int64_t j = 0; j < p->len_kv; j++) {
            double n2 = 0.0;
            for (int c = 0; c < d; c++) {
                const double x = k[(b * p->len_kv + j) * l->kv_dim + g * d + c] - mean[c];
                n2 += x * x;
            }
            kmax = fmax(kmax, n2);
        }
        for (int h = g * group; h < (g + 1) * group; h++)
            for (int64_t i = 0; i < p->len_q; i++) {
                double n2 = 0.0;
                for (int c = 0; c < d; c++) {
                    const double x = q[(b * p->len_q + i) * l->q_dim + h * d + c];
                    n2 += x * x;
                }
                r = fmax(r, fabs(l->softmax_scale) * sqrt(n2 * kmax));
            }
    }
    return r;
}

typedef struct bound_case {
    ref_config c;
    int cross, len_q, len_kv;
    int degree;     /* explicit POLY_DEGREE, or 0: from the tolerance */
    double tol;     /* LORA_CFG_TOLERANCE when degree is 0 */
    int edge_max;   /* unique maxima of |dO| at its last entry (the scalar tail of a
                       vectorised max) and of |X| at entry 15 (the last of 16 lanes) */
    int o_dominates; /* W_Q = W_V = 0, W_K and b_V / 4: Q and V are their biases, so the
                        output projection's terms (attention output off by η·max|V|)
                        dominate */
} bound_case;

static const bound_case bound_cases[] = {
    /* GQA (2 query heads per kv head), output projection with LoRA, biases. */
    {{.d_model = 4, .n_heads = 2, .n_kv_heads = 1, .rank = 2, .targets = 15, .alpha = 1.0,
      .softmax_scale = 0.25, .out_proj = 1, .bias = 1},
     0, 4, 4, 2, 0.0, 0, 0},
    /* Cross-attention, two kv groups with their own degree, no output projection. */
    {{.d_model = 4, .n_heads = 2, .n_kv_heads = 2, .rank = 2, .targets = 7, .alpha = 4.0,
      .softmax_scale = 0.125, .causal = 1},
     1, 2, 4, 0, 1e-4, 0, 0},
    /* dO (5 x 4 = 20 entries) peaks at its last entry, X at entry 15. */
    {{.d_model = 4, .n_heads = 1, .rank = 2, .targets = 7, .alpha = 2.0,
      .softmax_scale = 0.125},
     0, 5, 5, 4, 0.0, 1, 0},
    /* LoRA on O only, under Q and V that do not depend on X (max|V| <= 1/4). */
    {{.d_model = 4, .n_heads = 2, .rank = 2, .targets = 8, .alpha = 2.0,
      .softmax_scale = 0.125, .out_proj = 1, .bias = 1},
     0, 4, 4, 2, 0.0, 0, 1},
};

/* The expected grad_bound: dY error bounds of Q, K, V from η, then the LoRA chain rule
 * per projection, maxed over every gradient entry (dA, dB of Q, K, V, O; dX). */
static double expected_grad_bound(const ref_layer *l, const ref_problem *p, double eta,
                                  const double *q, const double *k, const double *v,
                                  const double *dattn)
{
    const size_t nq = (size_t)(p->batch * p->len_q), nk = (size_t)(p->batch * p->len_kv);
    const double qm = max_abs(q, nq * (size_t)l->q_dim), km = max_abs(k, nk * (size_t)l->kv_dim);
    const double vm = max_abs(v, nk * (size_t)l->kv_dim);
    const double gm = max_abs(dattn, nq * (size_t)l->q_dim);
    const double beta = fabs(l->softmax_scale), s = fabs(l->lora_scale);
    const double lq = (double)p->len_q, group = (double)(l->n_heads / l->n_kv_heads);
    /* Row ℓ1 error of dS: |ρ̃ − ρ| <= η·D plus the entrywise F error, D = d·|dO|·|V|. */
    const double ds = eta * (3.0 + eta) * (double)l->head_dim * gm * vm;
    const double e_dy[3] = {beta * ds * km, beta * ds * lq * group * qm, eta * lq * group * gm};
    double worst = 0.0, dx = 0.0;
    for (int t = REF_Q; t <= REF_V; t++) {
        const size_t rows = t == REF_Q ? nq : nk;
        const double *x = t == REF_Q ? p->xq : p->xkv;
        const double xm = max_abs(x, rows * (size_t)l->in[t]);
        double weff = max_abs(l->w[t], (size_t)(l->out[t] * l->in[t]));
        if (ref_is_adapted(l, t)) {
            const double bm = max_abs(l->b[t], (size_t)(l->out[t] * l->rank));
            const double am = max_abs(l->a[t], (size_t)(l->rank * l->in[t]));
            double xam = 0.0; /* max |X·Aᵀ| */
            for (size_t i = 0; i < rows; i++)
                for (int c = 0; c < l->rank; c++) {
                    double acc = 0.0;
                    for (int64_t j = 0; j < l->in[t]; j++)
                        acc += x[i * (size_t)l->in[t] + (size_t)j] * l->a[t][c * l->in[t] + j];
                    xam = fmax(xam, fabs(acc));
                }
            worst = fmax(worst, s * (double)rows * (double)l->out[t] * e_dy[t] * bm * xm);
            worst = fmax(worst, s * (double)rows * e_dy[t] * xam);
            weff += s * (double)l->rank * bm * am;
        }
        dx += (double)l->out[t] * e_dy[t] * weff;
    }
    worst = fmax(worst, dx);
    if (l->cfg.out_proj && ref_is_adapted(l, REF_O)) {
        /* The attention output is off by η·max|V| per entry; dO itself is exact. */
        const double ec = eta * vm, om = max_abs(p->dout, nq * (size_t)l->out[REF_O]);
        const double bm = max_abs(l->b[REF_O], (size_t)(l->out[REF_O] * l->rank));
        const double am = max_abs(l->a[REF_O], (size_t)(l->rank * l->in[REF_O]));
        worst = fmax(worst, s * (double)nq * (double)l->out[REF_O] * om * bm * ec);
        worst = fmax(worst, s * (double)nq * om * (double)l->in[REF_O] * am * ec);
    }
    return worst;
}

static void assert_rel(double got, double want, const char *what, int ci)
{
    ck_assert_msg(isfinite(want) && want > 0.0, "case %d: expected %s %g is not positive",
                  ci, what, want);
    ck_assert_msg(fabs(got - want) <= KA_REL * want,
                  "case %d: %s = %.17g, formula gives %.17g (rel %.3g)", ci, what, got, want,
                  fabs(got - want) / want);
}

START_TEST(test_bounds_known_answer)
{
    const bound_case *bc = &bound_cases[_i];
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &bc->c), 0);
    dyadic_layer(&l, 900 + (uint64_t)_i);
    if (bc->o_dominates) {
        for (int64_t i = 0; i < l.out[REF_Q] * l.in[REF_Q]; i++) {
            l.w[REF_Q][i] = 0.0;
            l.w[REF_V][i] = 0.0;
            l.w[REF_K][i] /= 4.0;
        }
        for (int64_t i = 0; i < l.out[REF_V]; i++) /* max|V| well below 1 */
            l.bias[REF_V][i] /= 4.0;
    }
    ck_assert_int_eq(ref_problem_init(&p, &l, bc->cross, 1, bc->len_q, bc->len_kv, 1), 0);
    uint64_t s = 950 + (uint64_t)_i;
    const size_t nq = (size_t)(p.batch * p.len_q), nk = (size_t)(p.batch * p.len_kv);
    const size_t nout = nq * (size_t)ref_out_cols(&l);
    fill_dyadic(p.xq, nq * (size_t)l.cfg.d_model, &s);
    if (p.cross)
        fill_dyadic(p.xkv, nk * (size_t)l.cfg.d_model, &s);
    fill_dyadic(p.dout, nout, &s);
    if (bc->edge_max) {
        ck_assert(nout % 16 != 0 && nq * (size_t)l.cfg.d_model > 16);
        p.dout[nout - 1] = 2.0;
        p.xq[15] = -2.0;
    }

    double *q = malloc(nq * (size_t)l.q_dim * sizeof(double));
    double *k = malloc(nk * (size_t)l.kv_dim * sizeof(double));
    double *v = malloc(nk * (size_t)l.kv_dim * sizeof(double));
    double *dattn = malloc(nq * (size_t)l.q_dim * sizeof(double));
    ck_assert(q && k && v && dattn);
    ck_assert_int_eq(ref_activations(&l, p.xq, p.xkv, p.batch, p.len_q, p.len_kv, q, k, v,
                                     NULL),
                     0);
    if (l.cfg.out_proj) { /* dC = dO·(W_O + s·B_O·A_O) */
        double *we = ref_effective_weight(&l, REF_O);
        ck_assert_ptr_nonnull(we);
        for (size_t i = 0; i < nq; i++)
            for (int c = 0; c < l.q_dim; c++) {
                double acc = 0.0;
                for (int64_t o = 0; o < l.out[REF_O]; o++)
                    acc += p.dout[i * (size_t)l.out[REF_O] + (size_t)o] * we[o * l.q_dim + c];
                dattn[i * (size_t)l.q_dim + (size_t)c] = acc;
            }
        free(we);
    } else {
        memcpy(dattn, p.dout, nq * (size_t)l.q_dim * sizeof(double));
    }

    double r = 0.0, eta = 0.0;
    int top_degree = 0;
    for (int g = 0; g < l.n_kv_heads; g++) {
        const double rg = group_score_bound(&l, &p, q, k, g);
        const int deg = bc->degree ? bc->degree : degree_for(rg, bc->tol);
        ck_assert_msg(deg > 0, "case %d: group %d has no degree at R %g", _i, g, rg);
        r = fmax(r, rg);
        eta = fmax(eta, eta_of(deg, rg));
        top_degree = deg > top_degree ? deg : top_degree;
    }
    const double want_grad = expected_grad_bound(&l, &p, eta, q, k, v, dattn);

    ref_param xp[2];
    int nxp = 0;
    if (bc->degree)
        xp[nxp++] = (ref_param){LORA_CFG_POLY_DEGREE, 0, bc->degree, 0.0};
    else
        xp[nxp++] = (ref_param){LORA_CFG_TOLERANCE, 1, 0, bc->tol};
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_POLY, 1, xp, nxp, &ad), LORA_OK);
    lib_result res;
    ck_assert_int_eq(lib_run(ad, &l, &p, &res), LORA_OK);
    ck_assert_int_eq(res.info.backend, LORA_BACKEND_POLY);
    ck_assert_int_eq(res.info.poly_degree, top_degree);
    ck_assert_int_eq(res.info.poly_groups, l.n_kv_heads);
    assert_rel(res.info.score_bound, r, "score_bound R", _i);
    assert_rel(res.fwd_info.error_bound, eta, "error_bound (forward)", _i);
    assert_rel(res.info.error_bound, eta, "error_bound", _i);
    assert_rel(res.info.grad_bound, want_grad, "grad_bound", _i);
    lib_result_free(&res);
    lora_adapter_destroy(ad);
    free(q);
    free(k);
    free(v);
    free(dattn);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

Suite *bounds_suite(void)
{
    Suite *s = suite_create("bounds");
    TCase *tc = tcase_create("known_answer");
    tcase_add_loop_test(tc, test_bounds_known_answer, 0,
                        (int)(sizeof bound_cases / sizeof bound_cases[0]));
    suite_add_tcase(s, tc);
    return s;
}
