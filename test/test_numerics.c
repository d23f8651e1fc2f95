/* numerics_suite: numerical robustness at the edges of the input range. Each case
 * checks that every output and gradient is finite and matches the double reference
 * (ref_check), or, where no float computation can, that the call returns a clear status:
 *   - attention logits up to +-1e4 (large softmax scale), exact and AUTO backends
 *     (outputs to 1e-4; Q/K gradients within float32's own conditioning, see
 *     test_large_logits), and POLY forced on them (LORA_ERR_TOLERANCE, not garbage);
 *   - input scales 1e-6 .. 1e3 (W_Q, W_K compensating, so the logits stay O(1), and
 *     uncompensated: finite outputs that stay convex combinations of V);
 *   - L = 1 (self and cross, causal or not), denormal inputs and weights, all-equal
 *     rows, all-zero input, rank larger than d_model. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "suites.h"

static const ref_config base_cfg = {.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .rank = 2,
                                    .targets = 15, .out_proj = 1, .bias = 1};

/* Rounds every entry through float, so the library and the reference hold the same. */
static void to_float_grid(double *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (double)(float)x[i];
}

static size_t nx(const ref_problem *p, const ref_layer *l, int kv)
{
    return (size_t)(p->batch * (kv ? p->len_kv : p->len_q) * l->cfg.d_model);
}

static void check_case(const ref_layer *l, const ref_problem *p, int backend, double tol,
                       const char *what)
{
    ref_errors e;
    char msg[512], desc[512];
    const int ok = ref_check(l, backend, 1, p, tol, &e);
    ck_assert_msg(ok, "%s: %s [%s]", what, ref_errors_format(&e, msg, sizeof msg),
                  ref_describe(l, p, desc, sizeof desc));
}

/* Largest |logit| = softmax_scale * max |q_i . k_j| of the reference's projections. */
static double max_logit(const ref_layer *l, const ref_problem *p)
{
    /* Projections by hand: q = x W_Q^T + b (+ LoRA), as the reference does. */
    const int d = l->cfg.d_model;
    double m = 0.0;
    const size_t rows = (size_t)(p->batch * p->len_q);
    double *q = calloc(rows * (size_t)l->q_dim, sizeof(double));
    double *k = calloc(rows * (size_t)l->kv_dim, sizeof(double));
    ck_assert(q && k);
    for (int pr = REF_Q; pr <= REF_K; pr++) {
        double *y = pr == REF_Q ? q : k;
        const int out = (int)l->out[pr];
        for (size_t r = 0; r < rows; r++)
            for (int o = 0; o < out; o++) {
                double acc = l->bias[pr] ? l->bias[pr][o] : 0.0;
                for (int i = 0; i < d; i++) {
                    double w = l->w[pr][(size_t)o * (size_t)d + (size_t)i];
                    if (l->a[pr])
                        for (int t = 0; t < l->rank; t++)
                            w += l->lora_scale * l->b[pr][(size_t)o * (size_t)l->rank + (size_t)t] *
                                 l->a[pr][(size_t)t * (size_t)d + (size_t)i];
                    acc += p->xq[r * (size_t)d + (size_t)i] * w;
                }
                y[r * (size_t)out + (size_t)o] = acc;
            }
    }
    const int group = l->n_heads / l->n_kv_heads;
    for (int64_t b = 0; b < p->batch; b++)
        for (int h = 0; h < l->n_heads; h++)
            for (int64_t i = 0; i < p->len_q; i++)
                for (int64_t j = 0; j < p->len_q; j++) {
                    double s = 0.0;
                    for (int c = 0; c < l->head_dim; c++)
                        s += q[(size_t)(b * p->len_q + i) * (size_t)l->q_dim +
                               (size_t)(h * l->head_dim + c)] *
                             k[(size_t)(b * p->len_q + j) * (size_t)l->kv_dim +
                               (size_t)((h / group) * l->head_dim + c)];
                    m = fmax(m, fabs(s * l->softmax_scale));
                }
    free(q);
    free(k);
    return m;
}

/* Logits up to +-1e4: softmax scale chosen so the largest logit is about target. */
START_TEST(test_large_logits)
{
    const double targets[] = {1e2, 1e3, 1e4};
    const double target = targets[_i];
    ref_layer l;
    ref_problem p;
    ref_config c = base_cfg;
    c.causal = 1;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 5, 1.5, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, 9, 9, 6), 0);
    const double m1 = max_logit(&l, &p);
    ck_assert(m1 > 0.0);
    /* softmax_scale must be float-representable to mean the same to both sides. */
    c.softmax_scale = (double)(float)(l.softmax_scale * target / m1);
    ref_layer_free(&l);
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 5, 1.5, 0.5);
    const double m2 = max_logit(&l, &p);
    ck_assert_msg(m2 > 0.5 * target && m2 < 2.0 * target, "max logit %g, wanted ~%g", m2,
                  target);
    /* Float32 scores of size M carry rounding of about M * 2^-24, and near-one-hot
     * softmax rows make dS = P (dP - D) a cancellation: the gradients through the scores
     * (dA, dB of Q and K) lose accuracy like 2^-24 * M^2 (measured: 2e-3 at M = 1e3,
     * 0.2 at M = 1e4), as in any float32 attention. The output, the value and output
     * projections' gradients and dx stay accurate. */
    const double eps = 0x1p-24;
    const double tol_qk = fmax(TOL_F32, 0.1 * eps * m2 * m2);
    const double tol_dx = fmax(TOL_F32, 16.0 * eps * m2);
    for (int be = 0; be < 2; be++) {
        lora_adapter *ad0 = NULL;
        ref_errors e;
        char msg[512];
        ck_assert_int_eq(ref_make_adapter(&l, be ? LORA_BACKEND_AUTO : LORA_BACKEND_EXACT, 1,
                                          &ad0),
                         LORA_OK);
        ref_compare_adapter(ad0, &l, &p, &e);
        lora_adapter_destroy(ad0);
        ref_errors_format(&e, msg, sizeof msg);
        ck_assert_msg(e.status == LORA_OK, "max |logit| %g: status %d", m2, e.status);
        ck_assert_msg(e.out <= TOL_F32 && e.da[REF_V] <= TOL_F32 && e.db[REF_V] <= TOL_F32 &&
                          e.da[REF_O] <= TOL_F32 && e.db[REF_O] <= TOL_F32,
                      "max |logit| %g: %s", m2, msg);
        ck_assert_msg(e.dxq <= tol_dx, "max |logit| %g, dx over %g: %s", m2, tol_dx, msg);
        for (int t = REF_Q; t <= REF_K; t++)
            ck_assert_msg(e.da[t] <= tol_qk && e.db[t] <= tol_qk,
                          "max |logit| %g, Q/K gradients over %g: %s", m2, tol_qk, msg);
    }
    /* POLY forced cannot certify such scores: a clear status, no garbage. */
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_POLY, 1, &ad), LORA_OK);
    const size_t n = nx(&p, &l, 0), nout = (size_t)(p.batch * p.len_q * ref_out_cols(&l));
    float *x = malloc(n * sizeof(float)), *out = malloc(nout * sizeof(float));
    ck_assert(x && out);
    ref_to_float(p.xq, x, n);
    const int st = lora_forward(ad, x, p.batch, p.len_q, out);
    ck_assert_msg(st == LORA_ERR_TOLERANCE || st == LORA_ERR_UNSUPPORTED,
                  "POLY forced at max |logit| %g: status %d (%s), want TOLERANCE", m2, st,
                  lora_status_string(st));
    ck_assert(lora_adapter_last_error(ad)[0] != '\0');
    lora_threshold_report r = {.struct_size = sizeof r};
    ck_assert_int_eq(lora_threshold_estimate(ad, x, p.batch, p.len_q, &r), LORA_OK);
    ck_assert_int_eq(r.recommended_backend, LORA_BACKEND_EXACT);
    ck_assert(isfinite(r.score_bound) && r.score_bound >= 0.9 * m2);
    free(x);
    free(out);
    lora_adapter_destroy(ad);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* Inputs scaled by s with W_Q, W_K, W_V scaled by 1/s: the same attention, reached
 * through tiny or huge activations. */
START_TEST(test_input_scales_compensated)
{
    const double scales[] = {1e-6, 1e-3, 1e-1, 1e1, 1e3};
    const double s = scales[_i];
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &base_cfg), 0);
    ref_layer_randomize(&l, 7, 1.5, 0.5);
    for (int t = REF_Q; t <= REF_V; t++) {
        const size_t nw = (size_t)(l.out[t] * l.in[t]), na = (size_t)(l.rank * l.in[t]);
        for (size_t i = 0; i < nw; i++)
            l.w[t][i] /= s;
        for (size_t i = 0; i < na; i++)
            l.a[t][i] /= s;
        to_float_grid(l.w[t], nw);
        to_float_grid(l.a[t], na);
    }
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, 6, 6, 8), 0);
    const size_t n = nx(&p, &l, 0);
    for (size_t i = 0; i < n; i++)
        p.xq[i] *= s;
    to_float_grid(p.xq, n);
    char what[64];
    snprintf(what, sizeof what, "inputs x %g, weights / %g", s, s);
    check_case(&l, &p, LORA_BACKEND_EXACT, TOL_F32, what);
    check_case(&l, &p, LORA_BACKEND_AUTO, TOL_F32, what);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* Inputs scaled by s alone (no output projection): logits from ~1e-12 to ~1e6. Outputs
 * and gradients stay finite, and every output is a convex combination of the values. */
START_TEST(test_input_scales_raw)
{
    const double scales[] = {1e-6, 1e-2, 1e2, 1e3};
    const double s = scales[_i];
    ref_config c = base_cfg;
    c.out_proj = 0;
    c.targets = 7;
    c.bias = 0;
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 9, 1.5, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 1, 7, 7, 10), 0);
    const size_t n = nx(&p, &l, 0);
    for (size_t i = 0; i < n; i++)
        p.xq[i] *= s;
    to_float_grid(p.xq, n);
    if (s <= 1e-2) { /* tiny logits: plainly comparable */
        check_case(&l, &p, LORA_BACKEND_EXACT, TOL_F32, "raw small inputs");
    }
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_AUTO, 1, &ad), LORA_OK);
    const size_t nout = (size_t)(p.len_q * l.q_dim);
    float *x = malloc(n * sizeof(float)), *out = malloc(nout * sizeof(float));
    float *dx = malloc(n * sizeof(float)), *dout = malloc(nout * sizeof(float));
    ck_assert(x && out && dx && dout);
    ref_to_float(p.xq, x, n);
    ck_assert_int_eq(lora_forward(ad, x, 1, p.len_q, out), LORA_OK);
    /* V = x (W_V + s B A)^T: bounds per column. */
    double vmin[64], vmax[64];
    for (int c2 = 0; c2 < l.kv_dim; c2++) {
        vmin[c2] = INFINITY;
        vmax[c2] = -INFINITY;
    }
    for (int64_t j = 0; j < p.len_q; j++)
        for (int o = 0; o < l.kv_dim; o++) {
            double acc = 0.0;
            for (int i = 0; i < l.cfg.d_model; i++) {
                double w = l.w[REF_V][(size_t)o * (size_t)l.cfg.d_model + (size_t)i];
                for (int t = 0; t < l.rank; t++)
                    w += l.lora_scale * l.b[REF_V][(size_t)o * (size_t)l.rank + (size_t)t] *
                         l.a[REF_V][(size_t)t * (size_t)l.cfg.d_model + (size_t)i];
                acc += p.xq[(size_t)j * (size_t)l.cfg.d_model + (size_t)i] * w;
            }
            vmin[o] = fmin(vmin[o], acc);
            vmax[o] = fmax(vmax[o], acc);
        }
    const int group = l.n_heads / l.n_kv_heads;
    for (int64_t i = 0; i < p.len_q; i++)
        for (int h = 0; h < l.n_heads; h++)
            for (int c2 = 0; c2 < l.head_dim; c2++) {
                const float y = out[(size_t)i * (size_t)l.q_dim + (size_t)(h * l.head_dim + c2)];
                const int vc = (h / group) * l.head_dim + c2;
                const double slack = 1e-5 * fmax(fabs(vmin[vc]), fabs(vmax[vc])) + 1e-30;
                ck_assert_msg(isfinite(y) && y >= vmin[vc] - slack && y <= vmax[vc] + slack,
                              "scale %g: out %g outside the values' range [%g, %g]", s, y,
                              vmin[vc], vmax[vc]);
            }
    fill_uniform(dout, nout, 11, 1.0f);
    ck_assert_int_eq(lora_backward(ad, dout, dx), LORA_OK);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(isfinite(dx[i]), "scale %g: dx[%zu] = %g", s, i, dx[i]);
    size_t np = 0;
    ck_assert_int_eq(lora_adapter_param_count(ad, &np), LORA_OK);
    float *g = malloc(np * sizeof(float));
    ck_assert_ptr_nonnull(g);
    ck_assert_int_eq(lora_adapter_get_grads_flat(ad, g, np), LORA_OK);
    for (size_t i = 0; i < np; i++)
        ck_assert_msg(isfinite(g[i]), "scale %g: gradient %zu = %g", s, i, g[i]);
    free(g);
    free(x);
    free(out);
    free(dx);
    free(dout);
    lora_adapter_destroy(ad);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* L = 1: one query and one key (self and cross, causal and not, batch 1 and 3). */
START_TEST(test_length_one)
{
    const int causal = _i & 1, cross = (_i >> 1) & 1, batch = (_i >> 2) ? 3 : 1;
    ref_config c = base_cfg;
    c.causal = causal;
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 13, 1.5, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, cross, batch, 1, 1, 14), 0);
    char what[64];
    snprintf(what, sizeof what, "L = 1, causal %d, cross %d, batch %d", causal, cross, batch);
    check_case(&l, &p, LORA_BACKEND_EXACT, TOL_F32, what);
    check_case(&l, &p, LORA_BACKEND_AUTO, TOL_F32, what);
    ref_problem_free(&p);
    ref_layer_free(&l);
    /* Cross with one key and several queries (non-causal), and several keys for one. */
    if (!causal) {
        ck_assert_int_eq(ref_layer_init(&l, &c), 0);
        ref_layer_randomize(&l, 13, 1.5, 0.5);
        ck_assert_int_eq(ref_problem_init(&p, &l, 1, batch, 5, 1, 15), 0);
        check_case(&l, &p, LORA_BACKEND_EXACT, TOL_F32, "len_q 5, len_kv 1");
        ref_problem_free(&p);
        ref_layer_free(&l);
    }
}
END_TEST

/* Denormal inputs (and denormal weights): the results are the reference's. */
START_TEST(test_denormals)
{
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &base_cfg), 0);
    ref_layer_randomize(&l, 17, 1.5, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, 5, 5, 18), 0);
    const size_t n = nx(&p, &l, 0);
    if (_i == 0) { /* every input denormal: the biases carry the layer */
        for (size_t i = 0; i < n; i++)
            p.xq[i] *= 1e-39;
    } else if (_i == 1) { /* half the inputs denormal */
        for (size_t i = 0; i < n; i += 2)
            p.xq[i] *= 1e-40;
    } else { /* denormal base weights of Q and K */
        for (int t = REF_Q; t <= REF_K; t++) {
            const size_t nw = (size_t)(l.out[t] * l.in[t]);
            for (size_t i = 0; i < nw; i++)
                l.w[t][i] *= 1e-39;
            to_float_grid(l.w[t], nw);
        }
    }
    to_float_grid(p.xq, n);
    int denormals = 0;
    for (size_t i = 0; i < n; i++)
        denormals += p.xq[i] != 0.0 && fabs(p.xq[i]) < FLT_MIN;
    ck_assert(_i == 2 || denormals > 0);
    check_case(&l, &p, LORA_BACKEND_EXACT, TOL_F32, "denormals");
    check_case(&l, &p, LORA_BACKEND_AUTO, TOL_F32, "denormals (AUTO)");
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* All rows equal (every token the same), and an all-zero input: equal scores. */
START_TEST(test_equal_rows)
{
    ref_layer l;
    ref_problem p;
    ref_config c = base_cfg;
    c.causal = _i & 1;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 19, 1.5, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, 0, 2, 8, 8, 20), 0);
    const int64_t d = l.cfg.d_model;
    for (int64_t r = 0; r < p.batch * p.len_q; r++)
        for (int64_t i = 0; i < d; i++)
            p.xq[r * d + i] = (_i & 2) ? 0.0 : p.xq[i];
    check_case(&l, &p, LORA_BACKEND_EXACT, TOL_F32, (_i & 2) ? "all-zero input" : "equal rows");
    check_case(&l, &p, LORA_BACKEND_AUTO, TOL_F32, (_i & 2) ? "all-zero input (AUTO)"
                                                            : "equal rows (AUTO)");
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* Rank larger than d_model (and than the head width). */
START_TEST(test_rank_above_width)
{
    const int ranks[] = {9, 16, 64};
    ref_config c = base_cfg;
    c.rank = ranks[_i];
    c.causal = 1;
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &c), 0);
    ref_layer_randomize(&l, 23, 1.5, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, _i == 1, 2, 5, 7, 24), 0);
    char what[64];
    snprintf(what, sizeof what, "rank %d > d_model %d", c.rank, c.d_model);
    check_case(&l, &p, LORA_BACKEND_EXACT, TOL_F32, what);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

Suite *numerics_suite(void)
{
    Suite *s = suite_create("numerics");
    TCase *tc = tcase_create("numerics");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_large_logits, 0, 3);
    tcase_add_loop_test(tc, test_input_scales_compensated, 0, 5);
    tcase_add_loop_test(tc, test_input_scales_raw, 0, 4);
    tcase_add_loop_test(tc, test_length_one, 0, 8);
    tcase_add_loop_test(tc, test_denormals, 0, 3);
    tcase_add_loop_test(tc, test_equal_rows, 0, 4);
    tcase_add_loop_test(tc, test_rank_above_width, 0, 3);
    suite_add_tcase(s, tc);
    return s;
}
