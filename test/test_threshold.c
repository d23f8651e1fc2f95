/* threshold_suite: lora_threshold_estimate on inputs whose Γ, R, degree, rank, η and
 * modelled flops are known exactly; the estimator leaves the saved forward, gradients
 * and run info alone; LORA_BACKEND_AUTO picks EXACT for large R, short L or wide heads
 * and POLY for small R, narrow heads and long L, as the report says; forced POLY and
 * LORA_ERR_TOLERANCE, explicit degrees, the feature limits; bad inputs of the new
 * parameters and of the estimator. */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "../src/backend/poly_calibration.h" /* the rate ratios AUTO uses (data only) */
#include "helpers.h"
#include "suites.h"

/* The limits of MATH §3 / lora.h as the library documents them (src/backend/poly_model.h):
 * k = binom(g + d, d) <= 2^16 columns, the backward's binom(g + 1 + d, d) <= 2^17,
 * g <= 20. */
#define MAX_FEATURES (INT64_C(1) << 16)
#define MAX_BACKWARD_FEATURES (INT64_C(1) << 17)
#define MAX_DEGREE 20

static int64_t binom(int64_t n, int64_t k)
{
    int64_t c = 1;
    for (int64_t i = 1; i <= k; i++)
        c = c * (n - k + i) / i;
    return c;
}

static int within_limits(int g, int64_t d)
{
    if (d > 64 && g > 2)
        return 0; /* binom(g + d, d) > 2^16 already: keeps binom() from overflowing */
    return binom(g + d, d) <= MAX_FEATURES && binom(g + 1 + d, d) <= MAX_BACKWARD_FEATURES;
}

static double taylor_delta(int g, double r)
{
    double t = exp(r);
    for (int i = 1; i <= g + 1; i++)
        t *= r / i;
    return t;
}

/* docs/math.md, "Rounding": the float32 share γ_n·e^(2R) with n = 13g + k + 64 +
 * ⌈L_kv/64⌉ + 4, u = 2^-24, added to the Taylor δ. */
static double delta_of(int g, double r, int64_t d, int64_t len_kv)
{
    const double n = 13.0 * g + (double)binom(g + d, d) + 64.0 +
                     ceil((double)len_kv / 64.0) + 4.0;
    const double u = ldexp(1.0, -24);
    return taylor_delta(g, r) + n * u / (1.0 - n * u) * exp(2.0 * r);
}

static double eta_of(int g, double r, int64_t d, int64_t len_kv)
{
    const double dl = delta_of(g, r, d, len_kv);
    return dl < 1.0 ? 2.0 * dl / (1.0 - dl) : INFINITY;
}

/* MATH §3's rule: the smallest even g with δ'(g, R)·(2 + tol) <= tol, within limits. */
static int expected_degree(double r, double tol, int64_t d, int64_t len_kv)
{
    for (int g = 2; g <= MAX_DEGREE && within_limits(g, d); g += 2)
        if (delta_of(g, r, d, len_kv) * (2.0 + tol) <= tol)
            return g;
    return 0;
}

/* The estimator never stores Q, K, V: it takes the key mean as x̄·W_Kᵀ + b_K and sums
 * in float, so its R matches the forward's (mean of the stored keys, double sums) up
 * to rounding only. */
#define R_AGREEMENT 1e-6

static int close_rel(double a, double b, double rel)
{
    return fabs(a - b) <= rel * fmax(fabs(a), fabs(b)) || (a == b);
}

static lora_threshold_report estimate(lora_adapter *ad, const float *x, int64_t batch,
                                      int64_t len)
{
    lora_threshold_report r;
    memset(&r, 0xA5, sizeof r);
    r.struct_size = sizeof r;
    const int st = lora_threshold_estimate(ad, x, batch, len, &r);
    ck_assert_msg(st == LORA_OK, "lora_threshold_estimate: %s (%s)", lora_status_string(st),
                  lora_adapter_last_error(ad));
    return r;
}

static lora_run_info run_info(const lora_adapter *ad)
{
    lora_run_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    ck_assert_int_eq(lora_adapter_get_run_info(ad, &info), LORA_OK);
    return info;
}

#define REPORT_FMT                                                                         \
    "report: backend %d gamma q %.9g k %.9g v %.9g ratio %.9g R %.9g degree %lld rank %lld " \
    "eta %.6g flops exact %.6g poly %.6g"
#define REPORT_ARGS(r)                                                                     \
    (r).recommended_backend, (r).gamma_q, (r).gamma_k, (r).gamma_v, (r).gamma_ratio,       \
        (r).score_bound, (long long)(r).poly_degree, (long long)(r).poly_rank,             \
        (r).error_bound, (r).flops_exact, (r).flops_poly

/* Degree, rank and η of a report follow from its R, the tolerance and head_dim (or the
 * explicit degree). */
static void assert_degree_fields(const lora_threshold_report *r, double tol, int explicit_g,
                                 int64_t d, int64_t len, const char *what)
{
    const int g = explicit_g > 0 ? (within_limits(explicit_g, d) ? explicit_g : 0)
                                 : expected_degree(r->score_bound, tol, d, len);
    ck_assert_msg(r->poly_degree == g, "%s: poly_degree %lld, expected %d (R %.9g tol %g d %lld)",
                  what, (long long)r->poly_degree, g, r->score_bound, tol, (long long)d);
    if (g > 0) {
        ck_assert_msg(r->poly_rank == binom(g + d, d), "%s: poly_rank %lld, binom(%d+%lld) = %lld",
                      what, (long long)r->poly_rank, g, (long long)d,
                      (long long)binom(g + d, d));
        const double eta = eta_of(g, r->score_bound, d, len);
        ck_assert_msg(close_rel(r->error_bound, eta, 1e-12),
                      "%s: error_bound %.12g, eta(%d, %.9g) = %.12g", what, r->error_bound, g,
                      r->score_bound, eta);
        ck_assert_msg(isfinite(r->flops_poly) && r->flops_poly > 0.0, "%s: flops_poly %g",
                      what, r->flops_poly);
    } else {
        ck_assert_msg(r->poly_rank == 0 && !(r->error_bound <= tol),
                      "%s: no degree, yet rank %lld and error_bound %g", what,
                      (long long)r->poly_rank, r->error_bound);
        ck_assert_int_eq(r->recommended_backend, LORA_BACKEND_EXACT);
    }
    /* AUTO's rule, read off the report (one kv-head group, or groups alike) */
    const double ratio = poly_calibrated_ratio(d);
    const int poly = g > 0 && r->error_bound <= tol && r->flops_poly * ratio < r->flops_exact;
    ck_assert_msg(r->recommended_backend == (poly ? LORA_BACKEND_POLY : LORA_BACKEND_EXACT),
                  "%s: recommended %d but certified=%d and flops_poly*%g %s flops_exact ("
                  REPORT_FMT ")",
                  what, r->recommended_backend, g > 0 && r->error_bound <= tol, ratio,
                  r->flops_poly * ratio < r->flops_exact ? "<" : ">=", REPORT_ARGS(*r));
}

/* ---- 3. estimator known answers -------------------------------------------------------- */

/* d_model = head_dim = 4, one head, W_Q = W_K = W_V = I with biases, LoRA on Q and V
 * with the default init (B = 0: it adds nothing). Softmax scale 1/16. */
static lora_adapter *known_adapter(double tol, int degree, int causal, int backend)
{
    lora_config *cfg = cfg_new(4);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_TARGETS, LORA_TARGET_Q | LORA_TARGET_V),
                     LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RANK, 2), LORA_OK);
    ck_assert_int_eq(lora_config_set_double(cfg, LORA_CFG_SOFTMAX_SCALE, 0.0625), LORA_OK);
    ck_assert_int_eq(lora_config_set_double(cfg, LORA_CFG_TOLERANCE, tol), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_POLY_DEGREE, degree), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_CAUSAL, causal), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_BACKEND, backend), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_SEED, 5), LORA_OK);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    lora_config_destroy(cfg);
    const float eye[16] = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1};
    const float bq[4] = {0, 0, 0, 1}, bk[4] = {0, 0, 0, -3}, bv[4] = {0, 0, -4, 0};
    ck_assert_int_eq(lora_adapter_set_base(ad, LORA_TARGET_Q, eye, bq), LORA_OK);
    ck_assert_int_eq(lora_adapter_set_base(ad, LORA_TARGET_K, eye, bk), LORA_OK);
    ck_assert_int_eq(lora_adapter_set_base(ad, LORA_TARGET_V, eye, bv), LORA_OK);
    float b[8], a[8];
    ck_assert_int_eq(lora_adapter_get_param(ad, LORA_TARGET_Q, LORA_B, b, 8), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_param(ad, LORA_TARGET_Q, LORA_A, a, 8), LORA_OK);
    for (int i = 0; i < 8; i++)
        ck_assert_msg(b[i] == 0.0f, "default init must leave B = 0");
    int nonzero = 0;
    for (int i = 0; i < 8; i++)
        nonzero += a[i] != 0.0f;
    ck_assert_msg(nonzero > 0, "default init should give a nonzero A");
    return ad;
}

/* Batch element 0: rows (2,0,0,0), (0,-1,0,0), (0,0,.5,0), 0. With the biases
 *   q = x + (0,0,0,1):  max|q| = 2, max|q|_2^2 = 5
 *   k = x + (0,0,0,-3): max|k| = 3; centring removes the bias: k - mean(k) = x - mean(x),
 *                       mean(x) = (.5,-.25,.125,0), largest |x_0 - mean|^2 = 2.25 +
 *                       .0625 + .015625 = 2.328125
 *   v = x + (0,0,-4,0): max|v| = 4
 *   R_0 = β·sqrt(5·2.328125) = sqrt(11.640625)/16.
 * Batch element 1: rows (0,0,0,3), (0,0,0,-3), 0, 0: q_4 = 4,-2,1,1 (max|q| = 4 = |q|_2),
 * k_4 = 0,-6,-3,-3 (max|k| = 6), mean(x) = 0 so |k - mean(k)|_2 <= 3, v = (0,0,-4,±3):
 * max|v| = 4. R_1 = β·4·3 = 0.75: the batch maximum. */
static const float known_x[2 * 4 * 4] = {
    2, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0.5f, 0, 0, 0, 0, 0,
    0, 0, 0, 3, 0, 0, 0, -3, 0, 0, 0,    0, 0, 0, 0, 0,
};

START_TEST(test_estimate_known_answers)
{
    /* by hand from δ(g, 0.75) = e^0.75·0.75^(g+1)/(g+1)!: δ(2) = 0.149, δ(4) = 4.19e-3,
     * δ(6) = 5.6e-5, δ(8) = 4.4e-7, plus the float32 share n·u·e^1.5 at L = 4, d = 4
     * (k = 15, 70, 210, 495: 2.9e-5, 3.6e-5, 9.5e-5, 1.8e-4), so η(6) = 3.0e-4 is the
     * smallest η of any degree: tolerances 1e-4 and below have none. The exact
     * boundaries: a tolerance just above η(g) gives g, just below gives g + 2 (none
     * below η(6)). */
    double tols[11] = {0.5, 1e-3, 1e-4, 1e-12, 1e-300};
    int want_g[11] = {2, 6, 0, 0, 0};
    for (int g = 2, t = 5; g <= 6; g += 2, t += 2) {
        tols[t] = eta_of(g, 0.75, 4, 4) * (1.0 + 1e-9);
        want_g[t] = g;
        tols[t + 1] = eta_of(g, 0.75, 4, 4) * (1.0 - 1e-9);
        want_g[t + 1] = g < 6 ? g + 2 : 0;
    }
    for (int causal = 0; causal <= 1; causal++)
        for (size_t t = 0; t < sizeof tols / sizeof tols[0]; t++) {
            lora_adapter *ad = known_adapter(tols[t], 0, causal, LORA_BACKEND_AUTO);
            char what[96];
            snprintf(what, sizeof what, "known answers, tol %g causal %d", tols[t], causal);
            /* batch 2 */
            lora_threshold_report r = estimate(ad, known_x, 2, 4);
            ck_assert_msg(r.gamma_q == 4.0 && r.gamma_k == 6.0 && r.gamma_v == 4.0,
                          "%s: " REPORT_FMT ", want gamma 4, 6, 4", what, REPORT_ARGS(r));
            ck_assert_msg(close_rel(r.gamma_ratio, 6.0 / sqrt(log(4.0)), 1e-12),
                          "%s: gamma_ratio %.12g, want 6/sqrt(ln 4) = %.12g", what,
                          r.gamma_ratio, 6.0 / sqrt(log(4.0)));
            ck_assert_msg(close_rel(r.score_bound, 0.75, 1e-12),
                          "%s: score_bound %.12g, want 0.75", what, r.score_bound);
            ck_assert_msg(r.poly_degree == want_g[t] &&
                              want_g[t] == expected_degree(0.75, tols[t], 4, 4),
                          "%s: degree %lld, by hand %d, by formula %d", what,
                          (long long)r.poly_degree, want_g[t],
                          expected_degree(0.75, tols[t], 4, 4));
            assert_degree_fields(&r, tols[t], 0, 4, 4, what);
            const double fe = 12.0 * 4 * 4 * 4 * 2 * 1 * (causal ? 0.5 : 1.0);
            ck_assert_msg(r.flops_exact == fe, "%s: flops_exact %.17g, want %.17g", what,
                          r.flops_exact, fe);
            ck_assert_int_eq(r.recommended_backend, LORA_BACKEND_EXACT); /* L = 4 */
            /* batch element 0 alone */
            r = estimate(ad, known_x, 1, 4);
            const double r0 = 0.0625 * sqrt(5.0) * sqrt(2.328125);
            ck_assert_msg(r.gamma_q == 2.0 && r.gamma_k == 3.0 && r.gamma_v == 4.0 &&
                              close_rel(r.gamma_ratio, 3.0 / sqrt(log(4.0)), 1e-12) &&
                              close_rel(r.score_bound, r0, 1e-12),
                          "%s, batch 1: " REPORT_FMT ", want gamma 2, 3, 4, ratio %.9g, R %.9g",
                          what, REPORT_ARGS(r), 3.0 / sqrt(log(4.0)), r0);
            assert_degree_fields(&r, tols[t], 0, 4, 4, what);
            ck_assert(r.flops_exact == fe / 2.0);
            /* L = 1: ln 2 in the ratio; R = 0 (one key is its own mean) */
            r = estimate(ad, known_x, 1, 1);
            ck_assert_msg(r.gamma_q == 2.0 && r.gamma_k == 3.0 && r.gamma_v == 4.0 &&
                              close_rel(r.gamma_ratio, 3.0 / sqrt(log(2.0)), 1e-12) &&
                              r.score_bound == 0.0,
                          "%s, L = 1: " REPORT_FMT, what, REPORT_ARGS(r));
            /* the forward reports the same R */
            float out[32];
            ck_assert_int_eq(lora_forward(ad, known_x, 2, 4, out), LORA_OK);
            const lora_run_info info = run_info(ad);
            ck_assert_msg(close_rel(info.score_bound, 0.75, 1e-12),
                          "%s: run info score_bound %.12g, want 0.75", what, info.score_bound);
            ck_assert_int_eq(info.backend, LORA_BACKEND_EXACT);
            lora_adapter_destroy(ad);
        }
}
END_TEST

/* An explicit LORA_CFG_POLY_DEGREE is what the report gives, its η whatever it is; the
 * flops model is linear in L for POLY and quadratic for EXACT. */
START_TEST(test_estimate_explicit_degree)
{
    for (int g = 2; g <= 6; g += 2) {
        lora_adapter *ad = known_adapter(1e-3, g, 0, LORA_BACKEND_AUTO);
        lora_threshold_report r = estimate(ad, known_x, 2, 4);
        char what[64];
        snprintf(what, sizeof what, "explicit degree %d", g);
        ck_assert_msg(r.poly_degree == g && r.poly_rank == binom(g + 4, 4),
                      "%s: " REPORT_FMT, what, REPORT_ARGS(r));
        assert_degree_fields(&r, 1e-3, g, 4, 4, what);
        if (g < 6)
            ck_assert_msg(r.error_bound > 1e-3, "%s: eta %g should exceed the tolerance", what,
                          r.error_bound);
        /* x at twice the length: both halves the known rows (R is unchanged since the
         * second copy of batch 0 has the same mean) */
        float x2[2 * 8 * 4];
        for (int b = 0; b < 2; b++)
            for (int h = 0; h < 2; h++)
                memcpy(x2 + (b * 8 + h * 4) * 4, known_x + b * 16, 16 * sizeof(float));
        const lora_threshold_report r2 = estimate(ad, x2, 2, 8);
        ck_assert_msg(r2.flops_poly == 2.0 * r.flops_poly && r2.flops_exact == 4.0 * r.flops_exact,
                      "%s: flops at L=8 (%g, %g) vs L=4 (%g, %g): want x2 for POLY, x4 exact",
                      what, r2.flops_poly, r2.flops_exact, r.flops_poly, r.flops_exact);
        lora_adapter_destroy(ad);
    }
}
END_TEST

/* Random layers with GQA, biases, LoRA with B != 0 on every target, batch 2: Γ, R and
 * the degree fields against the double reference. */
/* What an estimate on p's input should report, from the reference: Γ of Q, K, V and
 * R. *x receives the input in float (malloc'd). */
typedef struct ref_expect {
    double gq, gk, gv, r;
} ref_expect;

static ref_expect reference_expect(const ref_layer *l, const ref_problem *p, float **x)
{
    const size_t nq = (size_t)(p->batch * p->len_q);
    double *q = malloc(nq * (size_t)l->q_dim * sizeof(double));
    double *k = malloc(nq * (size_t)l->kv_dim * sizeof(double));
    double *v = malloc(nq * (size_t)l->kv_dim * sizeof(double));
    *x = malloc(nq * (size_t)l->cfg.d_model * sizeof(float));
    ck_assert(q && k && v && *x);
    ck_assert_int_eq(
        ref_activations(l, p->xq, p->xq, p->batch, p->len_q, p->len_q, q, k, v, NULL), 0);
    ref_to_float(p->xq, *x, nq * (size_t)l->cfg.d_model);
    const ref_expect e = {
        .gq = ref_max_abs(q, nq * (size_t)l->q_dim),
        .gk = ref_max_abs(k, nq * (size_t)l->kv_dim),
        .gv = ref_max_abs(v, nq * (size_t)l->kv_dim),
        .r = ref_score_bound(l, q, k, p->batch, p->len_q, p->len_q),
    };
    free(q);
    free(k);
    free(v);
    return e;
}

START_TEST(test_estimate_random_layers)
{
    static const struct {
        ref_config c;
        int batch, len;
        double tol;
    } rc[] = {
        {{.d_model = 8, .n_heads = 2, .rank = 2, .targets = 7, .bias = 1}, 2, 50, 1e-3},
        {{.d_model = 16, .n_heads = 4, .n_kv_heads = 2, .rank = 3, .targets = 15, .out_proj = 1,
          .bias = 1, .causal = 1},
         2, 70, 1e-2},
        {{.d_model = 12, .n_heads = 3, .n_kv_heads = 1, .head_dim = 5, .rank = 2, .targets = 3,
          .softmax_scale = 0.05},
         3, 33, 1e-5},
        /* d_h 8, g 2 (k 45): POLY's model wins from L ~ 625 */
        {{.d_model = 8, .n_heads = 1, .rank = 2, .targets = 4, .bias = 1}, 1, 700, 1e-3},
    };
    for (size_t c = 0; c < sizeof rc / sizeof rc[0]; c++) {
        ref_layer l;
        ref_problem p;
        ck_assert_int_eq(ref_layer_init(&l, &rc[c].c), 0);
        ref_layer_randomize(&l, 300 + c, 1.0, 0.7);
        ck_assert_int_eq(ref_problem_init(&p, &l, 0, rc[c].batch, rc[c].len, 0, 400 + c), 0);
        if (c == 3) /* small R: AUTO picks POLY (d_h 8 at L = 700) */
            problem_set_score_bound(&l, &p, 0.05);
        float *x;
        const ref_expect ex = reference_expect(&l, &p, &x);
        const double gq = ex.gq, gk = ex.gk, gv = ex.gv, rr = ex.r;
        const ref_param xp[] = {{LORA_CFG_TOLERANCE, 1, 0, rc[c].tol}};
        lora_adapter *ad = NULL;
        ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_AUTO, 1, xp, 1, &ad), LORA_OK);
        const lora_threshold_report r = estimate(ad, x, p.batch, p.len_q);
        char what[600], desc[512];
        snprintf(what, sizeof what, "random layer %zu [%s]", c, ref_describe(&l, &p, desc, sizeof desc));
        ck_assert_msg(close_rel(r.gamma_q, gq, 1e-5) && close_rel(r.gamma_k, gk, 1e-5) &&
                          close_rel(r.gamma_v, gv, 1e-5) &&
                          close_rel(r.gamma_ratio, fmax(gq, gk) / sqrt(log((double)p.len_q)), 1e-5) &&
                          close_rel(r.score_bound, rr, 1e-5),
                      "%s: " REPORT_FMT "; reference gamma %.9g %.9g %.9g R %.9g", what,
                      REPORT_ARGS(r), gq, gk, gv, rr);
        assert_degree_fields(&r, rc[c].tol, 0, l.head_dim, p.len_q, what);
        const double fe = 12.0 * (double)p.len_q * (double)p.len_q * l.head_dim * p.batch *
                          l.n_heads * (l.cfg.causal ? 0.5 : 1.0);
        ck_assert_msg(r.flops_exact == fe, "%s: flops_exact %.17g, want %.17g", what,
                      r.flops_exact, fe);
        if (c == 3)
            ck_assert_msg(r.recommended_backend == LORA_BACKEND_POLY, "%s: " REPORT_FMT, what,
                          REPORT_ARGS(r));
        /* AUTO runs what the report recommends, and reports the same R */
        lib_result res;
        ck_assert_int_eq(lib_run(ad, &l, &p, &res), LORA_OK);
        ck_assert_msg(res.info.backend == r.recommended_backend &&
                          close_rel(res.info.score_bound, r.score_bound, R_AGREEMENT),
                      "%s: forward ran backend %d with R %.17g; report %d, R %.17g", what,
                      res.info.backend, res.info.score_bound, r.recommended_backend,
                      r.score_bound);
        lib_result_free(&res);
        lora_adapter_destroy(ad);
        free(x);
        ref_problem_free(&p);
        ref_layer_free(&l);
    }
}
END_TEST

/* The estimator's blocked pass (row blocks per batch element, fewer rows when threads
 * would idle; head-slot panels of the merged weights for wide layers) against the
 * reference projections: sequence lengths around the block sizes (16-row granularity,
 * 512-row blocks and column sums), 1 to 3 threads, and a layer wide enough for three
 * panels whose boundaries cut through the query and key heads. The report does not
 * depend on the thread count. */
START_TEST(test_estimate_blocks_and_panels)
{
    static const struct {
        ref_config c;
        int batch, len;
    } bc[] = {
        {{.d_model = 16, .n_heads = 4, .n_kv_heads = 2, .rank = 3, .targets = 15, .out_proj = 1,
          .bias = 1},
         3, 1},
        {{.d_model = 16, .n_heads = 4, .n_kv_heads = 2, .rank = 3, .targets = 15, .out_proj = 1,
          .bias = 1},
         2, 17},
        {{.d_model = 12, .n_heads = 3, .n_kv_heads = 1, .head_dim = 5, .rank = 2, .targets = 2},
         1, 513},
        {{.d_model = 24, .n_heads = 2, .head_dim = 16, .rank = 4, .targets = 5, .bias = 1}, 2,
         1030},
        /* 12 query + 6 key + 6 value slots of 128 rows by 2048: panels of 16 slots */
        {{.d_model = 2048, .n_heads = 12, .n_kv_heads = 6, .head_dim = 128, .rank = 2,
          .targets = 7, .bias = 1},
         2, 5},
    };
    for (size_t c = 0; c < sizeof bc / sizeof bc[0]; c++) {
        ref_layer l;
        ref_problem p;
        ck_assert_int_eq(ref_layer_init(&l, &bc[c].c), 0);
        ref_layer_randomize(&l, 700 + c, 1.0, 0.7);
        ck_assert_int_eq(ref_problem_init(&p, &l, 0, bc[c].batch, bc[c].len, 0, 800 + c), 0);
        /* The largest row last in one batch element: a block that misses its tail shows. */
        const int64_t last = ((int64_t)c % p.batch + 1) * p.len_q - 1;
        for (int64_t m = 0; m < l.cfg.d_model; m++)
            p.xq[last * l.cfg.d_model + m] *= 4.0; /* exact in float */
        float *x;
        const ref_expect ex = reference_expect(&l, &p, &x);
        const double gq = ex.gq, gk = ex.gk, gv = ex.gv, rr = ex.r;
        /* Rounding of the key mean is absolute, on the scale of the uncentred bound
         * (it shows when keys barely spread: with one key the true R is 0). */
        const double r_slack = 1e-6 * l.softmax_scale * l.head_dim * gq * gk;
        char what[600], desc[512];
        snprintf(what, sizeof what, "case %zu [%s]", c, ref_describe(&l, &p, desc, sizeof desc));
        lora_threshold_report first;
        for (int threads = 1; threads <= 3; threads++) {
            lora_adapter *ad = NULL;
            ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_AUTO, threads, &ad), LORA_OK);
            const lora_threshold_report r = estimate(ad, x, p.batch, p.len_q);
            ck_assert_msg(close_rel(r.gamma_q, gq, 1e-5) && close_rel(r.gamma_k, gk, 1e-5) &&
                              close_rel(r.gamma_v, gv, 1e-5) &&
                              fabs(r.score_bound - rr) <= 1e-5 * rr + r_slack,
                          "%s, %d threads: " REPORT_FMT "; reference gamma %.9g %.9g %.9g R %.9g",
                          what, threads, REPORT_ARGS(r), gq, gk, gv, rr);
            if (threads == 1)
                first = r;
            else
                ck_assert_msg(memcmp(&r, &first, sizeof r) == 0,
                              "%s: the report with %d threads differs from 1 thread's", what,
                              threads);
            lora_adapter_destroy(ad);
        }
        free(x);
        ref_problem_free(&p);
        ref_layer_free(&l);
    }
}
END_TEST

/* The estimator does not touch the saved forward, the gradients or the run info: a
 * backward after an estimate (on other inputs, longer) equals one without it, bitwise. */
START_TEST(test_estimate_keeps_state)
{
    const int backends[] = {LORA_BACKEND_EXACT, LORA_BACKEND_POLY};
    const ref_config c = {.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .rank = 2,
                          .targets = 15, .out_proj = 1, .bias = 1, .causal = 1};
    ref_layer l;
    ref_problem p, p2;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 21, 1.0, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, 70, 0, 22), 0);
    ck_assert_int_eq(ref_problem_init(&p2, &l, 0, 3, 200, 0, 23), 0);
    problem_set_score_bound(&l, &p, 0.3);
    const size_t nx = (size_t)(p.batch * p.len_q * l.cfg.d_model);
    const size_t nx2 = (size_t)(p2.batch * p2.len_q * l.cfg.d_model);
    const size_t nout = (size_t)(p.batch * p.len_q * ref_out_cols(&l));
    float *x = malloc(nx * sizeof(float)), *x2 = malloc(nx2 * sizeof(float));
    float *out = malloc(nout * sizeof(float)), *dout = malloc(nout * sizeof(float));
    float *dx = malloc(nx * sizeof(float));
    ck_assert(x && x2 && out && dout && dx);
    ref_to_float(p.xq, x, nx);
    ref_to_float(p2.xq, x2, nx2);
    ref_to_float(p.dout, dout, nout);
    for (size_t b = 0; b < 2; b++) {
        const ref_param xp[] = {{LORA_CFG_POLY_DEGREE, 0, 2, 0.0},
                                {LORA_CFG_MEASURE_ROWS, 0, 5, 0.0}};
        lora_adapter *ad = NULL;
        ck_assert_int_eq(ref_make_adapter_ex(&l, backends[b], 1, xp, 2, &ad), LORA_OK);
        lib_result base;
        ck_assert_int_eq(lib_run(ad, &l, &p, &base), LORA_OK);
        ck_assert_int_eq(base.info.backend, backends[b]);
        /* forward, estimate (longer input, other batch), backward */
        ck_assert_int_eq(lora_adapter_zero_grad(ad), LORA_OK);
        ck_assert_int_eq(lora_forward(ad, x, p.batch, p.len_q, out), LORA_OK);
        const lora_run_info before = run_info(ad);
        estimate(ad, x2, p2.batch, p2.len_q);
        estimate(ad, x, p.batch, p.len_q);
        lora_run_info mid = run_info(ad);
        ck_assert_msg(memcmp(&before, &mid, sizeof before) == 0,
                      "backend %d: lora_threshold_estimate changed the run info", backends[b]);
        ck_assert_int_eq(lora_backward(ad, dout, dx), LORA_OK);
        lib_result now;
        memset(&now, 0, sizeof now);
        now.out = out;
        now.dxq = dx;
        now.nout = nout;
        now.nxq = nx;
        now.ngrads = base.ngrads;
        now.grads = malloc((base.ngrads + 1) * sizeof(float));
        ck_assert_ptr_nonnull(now.grads);
        float *g = now.grads;
        static const int tb[REF_NPROJ] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V,
                                          LORA_TARGET_O};
        for (int t = 0; t < REF_NPROJ; t++) {
            if (!ref_is_adapted(&l, t))
                continue;
            const size_t na = (size_t)(l.rank * l.in[t]), nb = (size_t)(l.out[t] * l.rank);
            ck_assert_int_eq(lora_adapter_get_grad(ad, tb[t], LORA_A, g, na), LORA_OK);
            ck_assert_int_eq(lora_adapter_get_grad(ad, tb[t], LORA_B, g + na, nb), LORA_OK);
            g += na + nb;
        }
        ck_assert_msg(lib_result_same(&base, &now),
                      "backend %d: forward, estimate, backward differs from forward, backward",
                      backends[b]);
        const lora_run_info after_bwd = run_info(ad);
        ck_assert_msg(memcmp(&after_bwd, &base.info, sizeof after_bwd) == 0,
                      "backend %d: run info after backward differs with an estimate in between",
                      backends[b]);
        /* estimate after backward: gradients and run info unchanged */
        estimate(ad, x2, p2.batch, p2.len_q);
        float *g2 = malloc((base.ngrads + 1) * sizeof(float));
        ck_assert_ptr_nonnull(g2);
        g = g2;
        for (int t = 0; t < REF_NPROJ; t++) {
            if (!ref_is_adapted(&l, t))
                continue;
            const size_t na = (size_t)(l.rank * l.in[t]), nb = (size_t)(l.out[t] * l.rank);
            ck_assert_int_eq(lora_adapter_get_grad(ad, tb[t], LORA_A, g, na), LORA_OK);
            ck_assert_int_eq(lora_adapter_get_grad(ad, tb[t], LORA_B, g + na, nb), LORA_OK);
            g += na + nb;
        }
        ck_assert_msg(memcmp(g2, now.grads, base.ngrads * sizeof(float)) == 0,
                      "backend %d: lora_threshold_estimate changed the gradients", backends[b]);
        mid = run_info(ad);
        ck_assert_msg(memcmp(&mid, &base.info, sizeof mid) == 0,
                      "backend %d: estimate after backward changed the run info", backends[b]);
        /* and a second backward of the same forward still accumulates the same amount */
        ck_assert_int_eq(lora_backward(ad, dout, dx), LORA_OK);
        free(g2);
        free(now.grads);
        lib_result_free(&base);
        lora_adapter_destroy(ad);
    }
    free(x);
    free(x2);
    free(out);
    free(dout);
    free(dx);
    ref_problem_free(&p);
    ref_problem_free(&p2);
    ref_layer_free(&l);
}
END_TEST

/* ---- 4. AUTO ------------------------------------------------------------------------ */

typedef struct auto_case {
    const char *name;
    int d_model, heads, causal, batch, len;
    double r, tol;
    int degree;   /* LORA_CFG_POLY_DEGREE, 0 = from the tolerance */
    int want;     /* expected recommended backend */
    int check;    /* compare with the reference (small enough) */
} auto_case;

/* Flops model at d_h = 4, g = 2 (k = 15): flops_exact / flops_poly is 0.3 at L = 16, 11
 * at L = 600, 1.9 at L = 100; causal (diagonal blocks of 64) 0.3 at L = 128, 9.5 at
 * 4096. The calibrated rate ratio of head_dim <= 8 (src/backend/poly_calibration.h) is
 * about 1 (measured rates 0.4-1.05 of EXACT's); cases away from it by 3x or more have
 * a fixed answer, the L = 100 case (want -1) is decided by the ratio itself. */
static const auto_case acases[] = {
    {"small R, d_h 4, L 600", 4, 1, 0, 1, 600, 0.1, 1e-3, 0, LORA_BACKEND_POLY, 1},
    {"small R, 2 heads of 4, batch 2, L 600", 8, 2, 0, 2, 600, 0.1, 1e-3, 0, LORA_BACKEND_POLY,
     0},
    {"small R, d_h 4, causal, L 4096", 4, 1, 1, 1, 4096, 0.1, 1e-3, 0, LORA_BACKEND_POLY, 0},
    {"small R, d_h 4, causal, L 128 (too short for causal)", 4, 1, 1, 1, 128, 0.1, 1e-3, 0,
     LORA_BACKEND_EXACT, 1},
    {"large R = 4, d_h 4, L 300", 4, 1, 0, 1, 300, 4.0, 1e-3, 0, LORA_BACKEND_EXACT, 1},
    {"huge R = 40: no degree", 4, 1, 0, 1, 300, 40.0, 1e-3, 0, LORA_BACKEND_EXACT, 0},
    {"short L = 16", 4, 1, 0, 1, 16, 0.1, 1e-3, 0, LORA_BACKEND_EXACT, 1},
    {"wide head d_h 64, L 300", 64, 1, 0, 1, 300, 0.1, 1e-3, 0, LORA_BACKEND_EXACT, 0},
    {"explicit g 2 not certified (R 0.5, tol 1e-3)", 4, 1, 0, 1, 600, 0.5, 1e-3, 2,
     LORA_BACKEND_EXACT, 1},
    {"explicit g 2 certified (R 0.5, tol 0.1)", 4, 1, 0, 1, 600, 0.5, 0.1, 2, LORA_BACKEND_POLY,
     1},
    {"d_h 4, L 100: flops within 2x, the calibrated ratio decides", 4, 1, 0, 1, 100, 0.1,
     1e-3, 0, -1, 1},
    {"explicit g 4 beyond the limits at d_h 64", 64, 1, 0, 1, 64, 0.05, 1e-3, 4,
     LORA_BACKEND_EXACT, 1},
};
#define N_ACASES ((int)(sizeof acases / sizeof acases[0]))

START_TEST(test_auto_dispatch)
{
    const auto_case *ac = &acases[_i];
    const ref_config c = {.d_model = ac->d_model, .n_heads = ac->heads, .rank = 2,
                          .targets = 5, .causal = ac->causal, .bias = 1};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 500 + (uint64_t)_i, 1.0, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, ac->batch, ac->len, 0, 600 + (uint64_t)_i), 0);
    problem_set_score_bound(&l, &p, ac->r);
    const ref_param xp[] = {{LORA_CFG_TOLERANCE, 1, 0, ac->tol},
                            {LORA_CFG_POLY_DEGREE, 0, ac->degree, 0.0}};
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_AUTO, 1, xp, 2, &ad), LORA_OK);
    const size_t nx = (size_t)(p.batch * p.len_q * l.cfg.d_model);
    float *x = malloc(nx * sizeof(float));
    ck_assert_ptr_nonnull(x);
    ref_to_float(p.xq, x, nx);
    const lora_threshold_report r = estimate(ad, x, p.batch, p.len_q);
    assert_degree_fields(&r, ac->tol, ac->degree, l.head_dim, p.len_q, ac->name);
    const double ratio = poly_calibrated_ratio(l.head_dim);
    const int want = ac->want >= 0 ? ac->want
                     : r.flops_poly * ratio < r.flops_exact ? LORA_BACKEND_POLY
                                                            : LORA_BACKEND_EXACT;
    ck_assert_msg(r.recommended_backend == want, "%s: recommended %d, want %d (" REPORT_FMT ")",
                  ac->name, r.recommended_backend, want, REPORT_ARGS(r));
    if (ac->want < 0)
        ck_assert_msg(r.flops_poly < r.flops_exact && r.flops_exact <= 2.0 * r.flops_poly &&
                          r.error_bound <= ac->tol,
                      "%s: L no longer between the flops: " REPORT_FMT, ac->name,
                      REPORT_ARGS(r));
    if (want == LORA_BACKEND_POLY)
        ck_assert_msg(r.flops_poly * ratio < r.flops_exact && r.error_bound <= ac->tol,
                      "%s: " REPORT_FMT, ac->name, REPORT_ARGS(r));
    if (ac->check) {
        ref_errors e;
        char msg[512], desc[512];
        ref_compare_adapter(ad, &l, &p, &e);
        /* EXACT: float precision; POLY: within the (certified-loose) tolerance */
        const double tol = want == LORA_BACKEND_EXACT ? TOL_F32 : fmax(ac->tol, TOL_F32);
        ck_assert_msg(e.status == LORA_OK && e.max <= tol, "%s: %s [%s]", ac->name,
                      ref_errors_format(&e, msg, sizeof msg), ref_describe(&l, &p, desc, sizeof desc));
    } else {
        const size_t nout = (size_t)(p.batch * p.len_q * ref_out_cols(&l));
        float *out = malloc(nout * sizeof(float)), *dout = malloc(nout * sizeof(float));
        ck_assert(out && dout);
        ref_to_float(p.dout, dout, nout);
        ck_assert_int_eq(lora_forward(ad, x, p.batch, p.len_q, out), LORA_OK);
        ck_assert_int_eq(lora_backward(ad, dout, NULL), LORA_OK);
        for (size_t i = 0; i < nout; i++)
            ck_assert_msg(isfinite(out[i]), "%s: non-finite output", ac->name);
        free(out);
        free(dout);
    }
    const lora_run_info info = run_info(ad);
    ck_assert_msg(info.backend == r.recommended_backend,
                  "%s: AUTO ran %d, the report recommends %d", ac->name, info.backend,
                  r.recommended_backend);
    if (info.backend == LORA_BACKEND_POLY)
        ck_assert_msg(info.poly_degree == r.poly_degree && info.poly_rank == r.poly_rank &&
                          close_rel(info.error_bound, r.error_bound, 1e-5) &&
                          info.grad_bound > 0.0,
                      "%s: run info degree %lld rank %lld eta %g grad_bound %g vs " REPORT_FMT,
                      ac->name, (long long)info.poly_degree, (long long)info.poly_rank,
                      info.error_bound, info.grad_bound, REPORT_ARGS(r));
    else
        ck_assert_msg(info.poly_degree == 0 && info.poly_rank == 0 && info.error_bound == 0.0 &&
                          info.grad_bound == 0.0,
                      "%s: EXACT run info degree %lld rank %lld eta %g grad_bound %g", ac->name,
                      (long long)info.poly_degree, (long long)info.poly_rank, info.error_bound,
                      info.grad_bound);
    ck_assert_msg(close_rel(info.score_bound, r.score_bound, R_AGREEMENT),
                  "%s: run info R %.17g, report %.17g", ac->name, info.score_bound,
                  r.score_bound);
    free(x);
    lora_adapter_destroy(ad);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* AUTO decides per call: one adapter alternating long small-R inputs (POLY) with short
 * ones (EXACT) and a large-R long one (EXACT) gives each call's backend, the right
 * results, and bitwise the same results when an input comes back. */
/* AUTO decides per kv-head group. A GQA layer (4 query heads of 4 on 2 kv heads)
 * with R = 0.1, then the second kv head's keys scaled by 9 (W_K, bias and B rows:
 * exact), so its R is up to 0.9: AUTO runs the first group on POLY (g = 2) and the
 * second on EXACT (g = 6 would certify but cost more). The second group's output
 * columns equal the reference to float precision, the first's are within η·max|V|,
 * and every result is within the tolerance. Forced POLY runs both groups, each at
 * the degree of its own R, and the run info reports the larger degree and η. Also
 * causal at L = 1024 and cross-attention (200 queries, 320 keys). */
START_TEST(test_auto_per_group)
{
    const int causal = _i == 1, cross = _i == 2;
    const ref_config c = {.d_model = 8, .n_heads = 4, .n_kv_heads = 2, .head_dim = 4,
                          .rank = 2, .targets = 7, .bias = 1, .causal = causal};
    const double tol = 1e-3;
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 1500 + (uint64_t)_i, 1.0, 0.5);
    /* causal POLY pays from L ~ 924 at d_h 4 (the diagonal blocks) */
    ck_assert_int_eq(ref_problem_init(&p, &l, cross, 2, causal ? 1024 : cross ? 200 : 300, 320,
                                      1600 + (uint64_t)_i),
                     0);
    problem_set_score_bound(&l, &p, 0.1);
    for (int row = 4; row < 8; row++) { /* kv head 1: rows 4..7 of the key projection */
        for (int m = 0; m < l.cfg.d_model; m++)
            l.w[REF_K][row * l.cfg.d_model + m] *= 9.0;
        l.bias[REF_K][row] *= 9.0;
        for (int r = 0; r < l.rank; r++)
            l.b[REF_K][row * l.rank + r] *= 9.0;
    }
    double vmax;
    const double rr = problem_score_bound(&l, &p, &vmax);
    const int g_big = expected_degree(rr, tol, 4, p.len_kv);
    ck_assert_msg(g_big >= 4, "R %.4g: degree %d", rr, g_big);
    const size_t nx = (size_t)(p.batch * p.len_q * l.cfg.d_model);
    const size_t nxkv = (size_t)(p.batch * p.len_kv * l.cfg.d_model);
    const size_t nout = (size_t)(p.batch * p.len_q * l.q_dim);
    float *x = malloc(nx * sizeof(float)), *xkv = malloc(nxkv * sizeof(float));
    float *out = malloc(nout * sizeof(float));
    double *ref_out = malloc(nout * sizeof(double));
    ck_assert(x && xkv && out && ref_out);
    ref_to_float(p.xq, x, nx);
    ref_to_float(p.xkv, xkv, nxkv);
    ref_forward(&l, p.xq, p.xkv, p.batch, p.len_q, p.len_kv, ref_out);
    const double omax = ref_max_abs(ref_out, nout);
    char desc[512];
    ref_describe(&l, &p, desc, sizeof desc);
    const int backends[] = {LORA_BACKEND_AUTO, LORA_BACKEND_POLY};
    for (int bi = 0; bi < 2; bi++) {
        const ref_param xp[] = {{LORA_CFG_TOLERANCE, 1, 0, tol}};
        lora_adapter *ad = NULL;
        ck_assert_int_eq(ref_make_adapter_ex(&l, backends[bi], 1, xp, 1, &ad), LORA_OK);
        if (!cross) { /* the estimator is for self-attention */
            const lora_threshold_report r = estimate(ad, x, p.batch, p.len_q);
            ck_assert_msg(close_rel(r.score_bound, rr, 1e-5) && r.poly_groups == 1 &&
                              r.recommended_backend == LORA_BACKEND_POLY && r.poly_degree == g_big,
                          "backend %d: poly_groups %lld, " REPORT_FMT "; reference R %.9g [%s]",
                          backends[bi], (long long)r.poly_groups, REPORT_ARGS(r), rr, desc);
            /* flops_poly is AUTO's plan: group 0 on POLY (g = 2), group 1 EXACT (half of
             * flops_exact), not POLY at the largest group's degree */
            ck_assert_msg(r.flops_poly > 0.5 * r.flops_exact && r.flops_poly < r.flops_exact,
                          "flops_poly %.6g not between half of flops_exact %.6g and all of it",
                          r.flops_poly, r.flops_exact);
        }
        ck_assert_int_eq(cross ? lora_forward_cross(ad, x, xkv, p.batch, p.len_q, p.len_kv, out)
                               : lora_forward(ad, x, p.batch, p.len_q, out),
                         LORA_OK);
        const lora_run_info info = run_info(ad);
        ck_assert_msg(close_rel(info.score_bound, rr, 1e-5), "backend %d: R %.9g, reference %.9g",
                      backends[bi], info.score_bound, rr);
        const int64_t want_groups = backends[bi] == LORA_BACKEND_AUTO ? 1 : 2;
        const int64_t want_degree = backends[bi] == LORA_BACKEND_AUTO ? 2 : g_big;
        ck_assert_msg(info.backend == LORA_BACKEND_POLY && info.poly_groups == want_groups &&
                          info.poly_degree == want_degree && info.error_bound > 0.0 &&
                          info.error_bound <= tol,
                      "backend %d: ran %d, poly_groups %lld, degree %lld, eta %g [%s]",
                      backends[bi], info.backend, (long long)info.poly_groups,
                      (long long)info.poly_degree, info.error_bound, desc);
        /* per head: heads 0, 1 read kv head 0 (POLY), heads 2, 3 kv head 1 */
        for (int h = 0; h < 4; h++) {
            double err = 0.0;
            for (int64_t i = 0; i < p.batch * p.len_q; i++)
                for (int cc = 0; cc < 4; cc++) {
                    const size_t at = (size_t)(i * l.q_dim + h * 4 + cc);
                    err = fmax(err, fabs(out[at] - ref_out[at]));
                }
            const int exact = h >= 2 && backends[bi] == LORA_BACKEND_AUTO;
            const double allowed = (exact ? 0.0 : info.error_bound * vmax) + 1e-5 * omax;
            ck_assert_msg(err <= allowed, "backend %d, head %d (%s): max error %g > %g [%s]",
                          backends[bi], h, exact ? "exact" : "poly", err, allowed, desc);
        }
        ref_errors e;
        char msg[512];
        ref_compare_adapter(ad, &l, &p, &e);
        ck_assert_msg(e.status == LORA_OK && e.max <= tol, "backend %d: %s [%s]", backends[bi],
                      ref_errors_format(&e, msg, sizeof msg), desc);
        lora_adapter_destroy(ad);
    }
    free(x);
    free(xkv);
    free(out);
    free(ref_out);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

START_TEST(test_auto_per_call)
{
    const ref_config c = {.d_model = 8, .n_heads = 2, .rank = 2, .targets = 15,
                          .out_proj = 1, .bias = 1};
    ref_layer l;
    ref_problem pl, ps, pr;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 61, 1.0, 0.5);
    ck_assert_int_eq(ref_problem_init(&pl, &l, 0, 2, 300, 0, 62), 0);
    ck_assert_int_eq(ref_problem_init(&ps, &l, 0, 3, 16, 0, 63), 0);
    ck_assert_int_eq(ref_problem_init(&pr, &l, 0, 1, 300, 0, 64), 0);
    problem_set_score_bound(&l, &pl, 0.1);
    const size_t n = (size_t)(pr.batch * pr.len_q * l.cfg.d_model);
    for (size_t i = 0; i < n; i++) /* no bias-free scaling needed: R grows ~ 16x */
        pr.xq[i] *= 4.0;
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_AUTO, 1, &ad), LORA_OK);
    const ref_problem *seq[] = {&pl, &ps, &pr, &pl, &ps};
    const int want[] = {LORA_BACKEND_POLY, LORA_BACKEND_EXACT, LORA_BACKEND_EXACT,
                        LORA_BACKEND_POLY, LORA_BACKEND_EXACT};
    lib_result first[2];
    for (int k = 0; k < 5; k++) {
        ref_errors e;
        char msg[512];
        ref_compare_adapter(ad, &l, seq[k], &e);
        const lora_run_info info = run_info(ad);
        ck_assert_msg(info.backend == want[k], "call %d: AUTO ran %d, want %d (R %g)", k,
                      info.backend, want[k], info.score_bound);
        const double tol = want[k] == LORA_BACKEND_POLY ? 1e-3 : TOL_F32;
        ck_assert_msg(e.status == LORA_OK && e.max <= tol, "call %d (backend %d): %s", k,
                      info.backend, ref_errors_format(&e, msg, sizeof msg));
        lib_result res;
        ck_assert_int_eq(lib_run(ad, &l, seq[k], &res), LORA_OK);
        if (k < 2)
            first[k] = res;
        else {
            if (k >= 3)
                ck_assert_msg(lib_result_same(&res, &first[k - 3]),
                              "call %d: results differ from the same input's first call", k);
            lib_result_free(&res);
        }
    }
    lib_result_free(&first[0]);
    lib_result_free(&first[1]);
    lora_adapter_destroy(ad);
    ref_problem_free(&pl);
    ref_problem_free(&ps);
    ref_problem_free(&pr);
    ref_layer_free(&l);
}
END_TEST

/* ---- 5. forced POLY, tolerance, limits ------------------------------------------------ */

/* Forced POLY at d_h 16 (degrees above 4 exceed 2^16 features): R = 1 cannot meet
 * tolerance 1e-3 -> LORA_ERR_TOLERANCE with a message; parameters and gradients are
 * kept, the saved forward is dropped, and the adapter works again on smaller inputs. */
START_TEST(test_forced_poly_tolerance)
{
    const ref_config c = {.d_model = 16, .rank = 2, .targets = 7};
    ref_layer l;
    ref_problem big, small;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 41, 1.0, 0.5);
    ck_assert_int_eq(ref_problem_init(&big, &l, 0, 1, 80, 0, 42), 0);
    ck_assert_int_eq(ref_problem_init(&small, &l, 0, 1, 80, 0, 42), 0);
    const double rbig = problem_set_score_bound(&l, &big, 1.0);
    const size_t nx = (size_t)(big.batch * big.len_q * l.cfg.d_model);
    for (size_t i = 0; i < nx; i++) /* no biases: R scales as the square of x */
        small.xq[i] = (double)(float)(big.xq[i] * 0.125);
    const double rsmall = problem_score_bound(&l, &small, NULL);
    ck_assert(fabs(rsmall - rbig / 64.0) < 1e-6);
    ck_assert_int_eq(expected_degree(rbig, 1e-3, 16, big.len_q), 0);
    ck_assert_int_eq(expected_degree(rsmall, 1e-3, 16, small.len_q), 2);

    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_POLY, 1, NULL, 0, &ad), LORA_OK);
    lib_result first;
    ck_assert_int_eq(lib_run(ad, &l, &small, &first), LORA_OK);
    ck_assert_int_eq(first.info.backend, LORA_BACKEND_POLY);
    ck_assert_int_eq(first.info.poly_degree, 2);

    float *xb = malloc(nx * sizeof(float)), *out = malloc(nx * sizeof(float));
    float *now = malloc(first.ngrads * sizeof(float));
    ck_assert(xb && out && now);
    ref_to_float(big.xq, xb, nx);
    /* the estimate works under forced POLY and says why */
    const lora_threshold_report r = estimate(ad, xb, 1, big.len_q);
    ck_assert_msg(r.poly_degree == 0 && r.poly_rank == 0 &&
                      r.recommended_backend == LORA_BACKEND_EXACT,
                  "unreachable tolerance: " REPORT_FMT, REPORT_ARGS(r));
    const int st = lora_forward(ad, xb, 1, big.len_q, out);
    ck_assert_msg(st == LORA_ERR_TOLERANCE, "forced POLY at R %.3g, d_h 16, tol 1e-3: got %s",
                  rbig, lora_status_string(st));
    const char *m = lora_adapter_last_error(ad);
    ck_assert_msg(m && strlen(m) > 10, "no message for LORA_ERR_TOLERANCE: '%s'", m ? m : "");
    /* gradients kept */
    const int tb[3] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V};
    float *g = now;
    for (int t = 0; t < 3; t++) {
        const size_t na = (size_t)(l.rank * l.in[t]), nb = (size_t)(l.out[t] * l.rank);
        ck_assert_int_eq(lora_adapter_get_grad(ad, tb[t], LORA_A, g, na), LORA_OK);
        ck_assert_int_eq(lora_adapter_get_grad(ad, tb[t], LORA_B, g + na, nb), LORA_OK);
        g += na + nb;
    }
    ck_assert_msg(memcmp(now, first.grads, first.ngrads * sizeof(float)) == 0,
                  "LORA_ERR_TOLERANCE changed the gradients");
    /* the saved forward is dropped */
    ck_assert_int_eq(lora_backward(ad, out, NULL), LORA_ERR_STATE);
    /* and the adapter still works, bitwise as before */
    lib_result again;
    ck_assert_int_eq(lib_run(ad, &l, &small, &again), LORA_OK);
    ck_assert_msg(lib_result_same(&first, &again),
                  "after LORA_ERR_TOLERANCE the adapter gives other results");
    lib_result_free(&again);
    lora_adapter_destroy(ad);

    /* an explicit degree overrides the tolerance: runs, eta above it */
    const ref_param xp[] = {{LORA_CFG_POLY_DEGREE, 0, 2, 0.0}, {LORA_CFG_TOLERANCE, 1, 0, 1e-6}};
    ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_POLY, 1, xp, 2, &ad), LORA_OK);
    ck_assert_int_eq(lib_run(ad, &l, &big, &again), LORA_OK);
    ck_assert_msg(again.info.backend == LORA_BACKEND_POLY && again.info.poly_degree == 2 &&
                      close_rel(again.info.error_bound, eta_of(2, rbig, 16, big.len_q), 1e-6) &&
                      again.info.error_bound > 1e-6,
                  "explicit degree: backend %d degree %lld eta %g (eta(2, %.4g) = %g)",
                  again.info.backend, (long long)again.info.poly_degree,
                  again.info.error_bound, rbig, eta_of(2, rbig, 16, big.len_q));
    ref_errors e;
    char msg[512];
    ref_compare_adapter(ad, &l, &big, &e);
    ck_assert_msg(e.status == LORA_OK && e.max < 0.05 && e.max > 1e-5,
                  "explicit g=2 at R=1, d_h 16: %s", ref_errors_format(&e, msg, sizeof msg));
    lib_result_free(&again);
    lora_adapter_destroy(ad);

    /* forced EXACT never runs POLY, whatever R, L and MEASURE_ROWS say */
    const ref_param xe[] = {{LORA_CFG_POLY_DEGREE, 0, 2, 0.0}, {LORA_CFG_MEASURE_ROWS, 0, 8, 0.0}};
    ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_EXACT, 1, xe, 2, &ad), LORA_OK);
    ck_assert_int_eq(lib_run(ad, &l, &small, &again), LORA_OK);
    ck_assert_msg(again.info.backend == LORA_BACKEND_EXACT && again.info.poly_degree == 0 &&
                      again.info.poly_rank == 0 && again.info.error_bound == 0.0 &&
                      again.info.grad_bound == 0.0 && again.info.measured_out_error == -1.0 &&
                      again.info.measured_dq_error == -1.0 &&
                      close_rel(again.info.score_bound, rsmall, 1e-5),
                  "forced EXACT run info: backend %d degree %lld rank %lld eta %g bound %g "
                  "measured %g %g R %g",
                  again.info.backend, (long long)again.info.poly_degree,
                  (long long)again.info.poly_rank, again.info.error_bound,
                  again.info.grad_bound, again.info.measured_out_error,
                  again.info.measured_dq_error, again.info.score_bound);
    ck_assert_msg(ref_check(&l, LORA_BACKEND_EXACT, 1, &small, TOL_F32, &e), "forced EXACT: %s",
                  ref_errors_format(&e, msg, sizeof msg));
    lib_result_free(&again);
    lora_adapter_destroy(ad);

    lib_result_free(&first);
    free(xb);
    free(out);
    free(now);
    ref_problem_free(&big);
    ref_problem_free(&small);
    ref_layer_free(&l);
}
END_TEST

/* Degrees whose features exceed the limits: d_h 64 with g = 4 (814 385 columns) and
 * d_h 100 with g = 2 (5 151 columns, but 176 851 of degree 3 for the backward): forced
 * POLY is
 * LORA_ERR_UNSUPPORTED; without an explicit degree, forced POLY is LORA_ERR_TOLERANCE
 * when no degree within limits meets it; AUTO falls back to EXACT and is right. */
START_TEST(test_poly_limits)
{
    static const struct {
        int head_dim, degree;
        double r, tol;
        int forced_status;
    } lc[] = {
        {64, 4, 0.05, 1e-3, LORA_ERR_UNSUPPORTED},
        {100, 2, 0.05, 1e-3, LORA_ERR_UNSUPPORTED},
        {64, 0, 0.5, 1e-3, LORA_ERR_TOLERANCE}, /* needs g = 6: beyond 2^16 columns */
        {64, 2, 0.01, 1e-3, LORA_OK},          /* 2145 columns, 47 905 of degree 3: runs */
    };
    for (size_t i = 0; i < sizeof lc / sizeof lc[0]; i++) {
        const ref_config c = {.d_model = 8, .head_dim = lc[i].head_dim, .rank = 2, .targets = 5};
        ref_layer l;
        ref_problem p;
        ck_assert_int_eq(ref_layer_init(&l, &c), 0);
        ref_layer_randomize(&l, 70 + i, 1.0, 0.5);
        ck_assert_int_eq(ref_problem_init(&p, &l, 0, 1, 24, 0, 80 + i), 0);
        problem_set_score_bound(&l, &p, lc[i].r);
        const int lim = lc[i].degree > 0 ? within_limits(lc[i].degree, lc[i].head_dim) : 1;
        ck_assert_int_eq(lim, lc[i].forced_status != LORA_ERR_UNSUPPORTED);
        const ref_param xp[] = {{LORA_CFG_POLY_DEGREE, 0, lc[i].degree, 0.0},
                                {LORA_CFG_TOLERANCE, 1, 0, lc[i].tol}};
        lora_adapter *ad = NULL;
        ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_POLY, 1, xp, 2, &ad), LORA_OK);
        lib_result res;
        const int st = lib_run(ad, &l, &p, &res);
        ck_assert_msg(st == lc[i].forced_status,
                      "forced POLY d_h %d degree %d R %g: %s, want %s (%s)", lc[i].head_dim,
                      lc[i].degree, lc[i].r, lora_status_string(st),
                      lora_status_string(lc[i].forced_status), lora_adapter_last_error(ad));
        if (st != LORA_OK)
            ck_assert_msg(strlen(lora_adapter_last_error(ad)) > 10, "no message for %s",
                          lora_status_string(st));
        else
            ck_assert_int_eq(res.info.poly_rank, binom(2 + 64, 64));
        lib_result_free(&res);
        /* the estimate works whatever forced POLY would do, and says EXACT when the
         * degree is out of limits */
        float *x = malloc((size_t)(p.len_q * 8) * sizeof(float));
        ck_assert_ptr_nonnull(x);
        ref_to_float(p.xq, x, (size_t)(p.len_q * 8));
        const lora_threshold_report rep = estimate(ad, x, 1, p.len_q);
        free(x);
        assert_degree_fields(&rep, lc[i].tol, lc[i].degree, lc[i].head_dim, p.len_q, "limits");
        ck_assert_int_eq(rep.recommended_backend, LORA_BACKEND_EXACT);
        lora_adapter_destroy(ad);
        /* AUTO: EXACT, right */
        ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_AUTO, 1, xp, 2, &ad), LORA_OK);
        ref_errors e;
        char msg[512];
        ref_compare_adapter(ad, &l, &p, &e);
        ck_assert_msg(e.status == LORA_OK && e.max <= TOL_F32, "AUTO d_h %d degree %d: %s",
                      lc[i].head_dim, lc[i].degree, ref_errors_format(&e, msg, sizeof msg));
        const lora_run_info info = run_info(ad);
        ck_assert_int_eq(info.backend, LORA_BACKEND_EXACT);
        lora_adapter_destroy(ad);
        ref_problem_free(&p);
        ref_layer_free(&l);
    }
}
END_TEST

/* AUTO always finds a backend: exact attention plans every problem, so no input,
 * tolerance or explicit degree makes AUTO fail where POLY cannot run (wide heads, a
 * huge R, a tolerance no degree meets, a degree beyond the feature limits; self,
 * causal and cross-attention, GQA). Each call runs EXACT on every kv-head group and
 * matches the reference; the merged forward and the estimate agree. */
START_TEST(test_auto_always_plans)
{
    static const struct {
        int head_dim, heads, kv_heads, degree, causal, cross;
        double r, tol;
    } pc[] = {
        {128, 2, 1, 0, 0, 0, 40.0, 1e-12}, /* no degree within limits at d_h 128 */
        {64, 4, 2, 20, 0, 0, 0.05, 1e-3},  /* explicit degree beyond the limits */
        {4, 4, 2, 0, 1, 0, 30.0, 1e-9},    /* causal GQA, R far too large */
        {2, 2, 1, 2, 0, 1, 8.0, 1e-6},     /* cross: explicit degree, eta above tol */
        {8, 4, 4, 0, 1, 1, 1e3, 1e-3},     /* exp(R) overflows: no certificate at all */
    };
    const int i = _i;
    const ref_config c = {.d_model = 8, .n_heads = pc[i].heads, .n_kv_heads = pc[i].kv_heads,
                          .head_dim = pc[i].head_dim, .rank = 2, .targets = 7,
                          .causal = pc[i].causal};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 2100 + (uint64_t)i, 1.0, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, pc[i].cross, 2, 40, 48, 2200 + (uint64_t)i), 0);
    problem_set_score_bound(&l, &p, pc[i].r);
    const ref_param xp[] = {{LORA_CFG_POLY_DEGREE, 0, pc[i].degree, 0.0},
                            {LORA_CFG_TOLERANCE, 1, 0, pc[i].tol}};
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter_ex(&l, LORA_BACKEND_AUTO, 1, xp, 2, &ad), LORA_OK);
    ref_errors e;
    char msg[512], desc[512];
    ref_describe(&l, &p, desc, sizeof desc);
    ref_compare_adapter(ad, &l, &p, &e);
    ck_assert_msg(e.status == LORA_OK && e.max <= TOL_F32, "case %d: %s [%s]", i,
                  ref_errors_format(&e, msg, sizeof msg), desc);
    lora_run_info info = run_info(ad);
    ck_assert_msg(info.backend == LORA_BACKEND_EXACT && info.poly_groups == 0 &&
                      info.error_bound == 0.0 && info.grad_bound == 0.0,
                  "case %d: AUTO ran %d on %lld POLY groups, eta %g [%s]", i, info.backend,
                  (long long)info.poly_groups, info.error_bound, desc);
    const size_t nx = (size_t)(p.batch * p.len_q * l.cfg.d_model);
    const size_t nxkv = (size_t)(p.batch * p.len_kv * l.cfg.d_model);
    float *x = malloc(nx * sizeof(float)), *xkv = malloc(nxkv * sizeof(float));
    float *out = malloc((size_t)(p.batch * p.len_q * l.q_dim) * sizeof(float));
    ck_assert(x && xkv && out);
    ref_to_float(p.xq, x, nx);
    ref_to_float(p.xkv, xkv, nxkv);
    const int st = pc[i].cross
                       ? lora_forward_merged_cross(ad, x, xkv, p.batch, p.len_q, p.len_kv, out)
                       : lora_forward_merged(ad, x, p.batch, p.len_q, out);
    info = run_info(ad);
    ck_assert_msg(st == LORA_OK && info.backend == LORA_BACKEND_EXACT,
                  "case %d: merged forward %s, backend %d (%s)", i, lora_status_string(st),
                  info.backend, lora_adapter_last_error(ad));
    if (!pc[i].cross) {
        const lora_threshold_report r = estimate(ad, x, p.batch, p.len_q);
        ck_assert_msg(r.recommended_backend == LORA_BACKEND_EXACT && r.poly_groups == 0,
                      "case %d: " REPORT_FMT, i, REPORT_ARGS(r));
    }
    free(x);
    free(xkv);
    free(out);
    lora_adapter_destroy(ad);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* ---- 6. bad inputs -------------------------------------------------------------------- */

START_TEST(test_new_params_bad_values)
{
    lora_config *cfg = cfg_new(8);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_POLY_DEGREE, 4), LORA_OK);
    ck_assert_int_eq(lora_config_set_double(cfg, LORA_CFG_TOLERANCE, 0.01), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_MEASURE_ROWS, 3), LORA_OK);
    const int64_t bad_deg[] = {1, 3, 19, 21, -2, -1, 22, 40, INT64_MAX, INT64_MIN};
    for (size_t i = 0; i < sizeof bad_deg / sizeof bad_deg[0]; i++) {
        ck_assert_msg(lora_config_set_int(cfg, LORA_CFG_POLY_DEGREE, bad_deg[i]) ==
                          LORA_ERR_INVALID_ARG,
                      "POLY_DEGREE %lld accepted", (long long)bad_deg[i]);
        ck_assert_msg(strlen(lora_config_last_error(cfg)) > 0, "no message for degree %lld",
                      (long long)bad_deg[i]);
    }
    const int64_t good_deg[] = {0, 2, 20};
    int64_t v;
    for (size_t i = 0; i < 3; i++) {
        ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_POLY_DEGREE, good_deg[i]), LORA_OK);
        ck_assert_int_eq(lora_config_get_int(cfg, LORA_CFG_POLY_DEGREE, &v), LORA_OK);
        ck_assert_int_eq(v, good_deg[i]);
    }
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_POLY_DEGREE, 4), LORA_OK);
    const struct {
        double v;
        int st;
    } bad_tol[] = {{0.0, LORA_ERR_INVALID_ARG},  {-0.0, LORA_ERR_INVALID_ARG},
                   {-1e-3, LORA_ERR_INVALID_ARG}, {-INFINITY, LORA_ERR_NONFINITE},
                   {INFINITY, LORA_ERR_NONFINITE}, {NAN, LORA_ERR_NONFINITE}};
    for (size_t i = 0; i < sizeof bad_tol / sizeof bad_tol[0]; i++) {
        const int st = lora_config_set_double(cfg, LORA_CFG_TOLERANCE, bad_tol[i].v);
        ck_assert_msg(st == bad_tol[i].st, "TOLERANCE %g: %s, want %s", bad_tol[i].v,
                      lora_status_string(st), lora_status_string(bad_tol[i].st));
    }
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_MEASURE_ROWS, -1), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_MEASURE_ROWS, INT64_MIN),
                     LORA_ERR_INVALID_ARG);
    /* wrong types */
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_TOLERANCE, 1), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_config_set_double(cfg, LORA_CFG_POLY_DEGREE, 2.0), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_config_set_double(cfg, LORA_CFG_MEASURE_ROWS, 2.0),
                     LORA_ERR_INVALID_ARG);
    /* every failure left the config as it was */
    double d;
    ck_assert_int_eq(lora_config_get_int(cfg, LORA_CFG_POLY_DEGREE, &v), LORA_OK);
    ck_assert_int_eq(v, 4);
    ck_assert_int_eq(lora_config_get_double(cfg, LORA_CFG_TOLERANCE, &d), LORA_OK);
    ck_assert(d == 0.01);
    ck_assert_int_eq(lora_config_get_int(cfg, LORA_CFG_MEASURE_ROWS, &v), LORA_OK);
    ck_assert_int_eq(v, 3);
    ck_assert_int_eq(lora_config_validate(cfg), LORA_OK);
    lora_config_destroy(cfg);
}
END_TEST

START_TEST(test_estimate_bad_inputs)
{
    const ref_config c = {.d_model = 8, .n_heads = 2, .rank = 2, .targets = 7, .bias = 1};
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 90, 1.0, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, 20, 0, 91), 0);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_AUTO, 1, &ad), LORA_OK);
    lib_result base;
    ck_assert_int_eq(lib_run(ad, &l, &p, &base), LORA_OK);
    /* a saved forward to keep across the failures */
    const size_t nx = (size_t)(p.batch * p.len_q * 8), nout = (size_t)(p.batch * p.len_q * l.q_dim);
    float *x = malloc(nx * sizeof(float)), *out = malloc(nout * sizeof(float));
    float *dout = malloc(nout * sizeof(float)), *dx = malloc(nx * sizeof(float));
    ck_assert(x && out && dout && dx);
    ref_to_float(p.xq, x, nx);
    ref_to_float(p.dout, dout, nout);
    ck_assert_int_eq(lora_adapter_zero_grad(ad), LORA_OK);
    ck_assert_int_eq(lora_forward(ad, x, p.batch, p.len_q, out), LORA_OK);

    lora_threshold_report r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    ck_assert_int_eq(lora_threshold_estimate(NULL, x, 2, 20, &r), LORA_ERR_INVALID_ARG);
#define BAD(call, want)                                                                  \
    do {                                                                                 \
        const int st_ = (call);                                                          \
        ck_assert_msg(st_ == (want), "%s: %s, want %s", #call, lora_status_string(st_),  \
                      lora_status_string(want));                                         \
        ck_assert_msg(strlen(lora_adapter_last_error(ad)) > 0, "%s: no message", #call); \
    } while (0)
    BAD(lora_threshold_estimate(ad, NULL, 2, 20, &r), LORA_ERR_INVALID_ARG);
    BAD(lora_threshold_estimate(ad, x, 2, 20, NULL), LORA_ERR_INVALID_ARG);
    /* the first version ends with flops_poly */
    const uint32_t first_size = (uint32_t)offsetof(lora_threshold_report, poly_groups);
    const uint32_t small_sizes[] = {0, 4, (uint32_t)offsetof(lora_threshold_report, flops_poly),
                                    first_size - 1};
    for (size_t i = 0; i < sizeof small_sizes / sizeof small_sizes[0]; i++) {
        r.struct_size = small_sizes[i];
        BAD(lora_threshold_estimate(ad, x, 2, 20, &r), LORA_ERR_INVALID_ARG);
    }
    /* a caller built against the first version: filled up to flops_poly, no further */
    memset(&r, 0x5A, sizeof r);
    r.struct_size = first_size;
    ck_assert_int_eq(lora_threshold_estimate(ad, x, 2, 20, &r), LORA_OK);
    ck_assert_msg(r.struct_size == first_size && r.flops_exact > 0.0 &&
                      ((const unsigned char *)&r)[first_size] == 0x5A,
                  "first-version report: struct_size %u, flops_exact %g", r.struct_size,
                  r.flops_exact);
    r.struct_size = sizeof r;
    BAD(lora_threshold_estimate(ad, x, 0, 20, &r), LORA_ERR_SHAPE);
    BAD(lora_threshold_estimate(ad, x, 2, 0, &r), LORA_ERR_SHAPE);
    BAD(lora_threshold_estimate(ad, x, -1, 20, &r), LORA_ERR_SHAPE);
    BAD(lora_threshold_estimate(ad, x, 2, -20, &r), LORA_ERR_SHAPE);
    BAD(lora_threshold_estimate(ad, x, INT64_MAX, INT64_MAX, &r), LORA_ERR_SHAPE);
    x[77] = NAN;
    BAD(lora_threshold_estimate(ad, x, 2, 20, &r), LORA_ERR_NONFINITE);
    x[77] = -INFINITY;
    BAD(lora_threshold_estimate(ad, x, 2, 20, &r), LORA_ERR_NONFINITE);
    x[77] = (float)p.xq[77];
    /* a larger struct_size (a newer caller) is fine and nothing past sizeof is written */
    struct {
        lora_threshold_report r;
        unsigned char tail[64];
    } big;
    memset(&big, 0x5A, sizeof big);
    big.r.struct_size = sizeof big;
    ck_assert_int_eq(lora_threshold_estimate(ad, x, 2, 20, &big.r), LORA_OK);
    for (size_t i = 0; i < sizeof big.tail; i++)
        ck_assert_msg(big.tail[i] == 0x5A, "estimate wrote past sizeof(lora_threshold_report)");
    ck_assert(big.r.score_bound > 0.0 && big.r.gamma_q > 0.0);
    /* the saved forward survived every failure: the backward equals the baseline */
    ck_assert_int_eq(lora_backward(ad, dout, dx), LORA_OK);
    ck_assert_msg(memcmp(dx, base.dxq, nx * sizeof(float)) == 0 &&
                      memcmp(out, base.out, nout * sizeof(float)) == 0,
                  "failed estimates disturbed the saved forward");
#undef BAD
    lora_adapter_destroy(ad);

    /* base weights unset: STATE */
    lora_config *cfg = cfg_new(8);
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    ck_assert_int_eq(lora_threshold_estimate(ad, x, 2, 20, &r), LORA_ERR_STATE);
    ck_assert(strlen(lora_adapter_last_error(ad)) > 0);
    const float w[64] = {0};
    ck_assert_int_eq(lora_adapter_set_base(ad, LORA_TARGET_Q, w, NULL), LORA_OK);
    ck_assert_int_eq(lora_adapter_set_base(ad, LORA_TARGET_K, w, NULL), LORA_OK);
    ck_assert_int_eq(lora_threshold_estimate(ad, x, 2, 20, &r), LORA_ERR_STATE);
    ck_assert_int_eq(lora_adapter_set_base(ad, LORA_TARGET_V, w, NULL), LORA_OK);
    ck_assert_int_eq(lora_threshold_estimate(ad, x, 2, 20, &r), LORA_OK);
    ck_assert_msg(r.score_bound == 0.0 && r.gamma_q == 0.0,
                  "zero weights: R %g, gamma_q %g", r.score_bound, r.gamma_q);
    /* W_Q + s·B·A overflows although W_Q, A and B are finite: NONFINITE, naming W_Q */
    const float big_w[64] = {[0 ... 63] = 3e38f};
    ck_assert_int_eq(lora_adapter_set_base(ad, LORA_TARGET_Q, big_w, NULL), LORA_OK);
    float factor[64];
    for (int i = 0; i < 64; i++)
        factor[i] = 1e19f; /* A: (8, 8), B: (8, 8); B·A = 8e38 per entry, s = 1 */
    ck_assert_int_eq(lora_adapter_set_param(ad, LORA_TARGET_Q, LORA_A, factor, 64), LORA_OK);
    ck_assert_int_eq(lora_adapter_set_param(ad, LORA_TARGET_Q, LORA_B, factor, 64), LORA_OK);
    ck_assert_int_eq(lora_threshold_estimate(ad, x, 2, 20, &r), LORA_ERR_NONFINITE);
    ck_assert_msg(strstr(lora_adapter_last_error(ad), "W_Q") != NULL, "message: %s",
                  lora_adapter_last_error(ad));
    lora_adapter_destroy(ad);
    lora_config_destroy(cfg);

    free(x);
    free(out);
    free(dout);
    free(dx);
    lib_result_free(&base);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

Suite *threshold_suite(void)
{
    Suite *s = suite_create("threshold");
    TCase *tc = tcase_create("estimate");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_estimate_known_answers);
    tcase_add_test(tc, test_estimate_explicit_degree);
    tcase_add_test(tc, test_estimate_random_layers);
    tcase_add_test(tc, test_estimate_blocks_and_panels);
    tcase_add_test(tc, test_estimate_keeps_state);
    suite_add_tcase(s, tc);
    tc = tcase_create("auto");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_auto_dispatch, 0, N_ACASES);
    tcase_add_test(tc, test_auto_per_call);
    tcase_add_loop_test(tc, test_auto_per_group, 0, 3); /* self, causal, cross */
    suite_add_tcase(s, tc);
    tc = tcase_create("forced");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_forced_poly_tolerance);
    tcase_add_test(tc, test_poly_limits);
    tcase_add_loop_test(tc, test_auto_always_plans, 0, 5);
    suite_add_tcase(s, tc);
    tc = tcase_create("bad_inputs");
    tcase_add_test(tc, test_new_params_bad_values);
    tcase_add_test(tc, test_estimate_bad_inputs);
    suite_add_tcase(s, tc);
    return s;
}
