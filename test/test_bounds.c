/* bounds_suite: known answers for the certified bounds of lora_run_info (MATH §3-4,
 * docs/math.md "Error", the bound's derivation above grad_error_bound in
 * src/layer/layer.c). On tiny layers whose weights, inputs and upstream gradients are
 * small dyadic numbers, every float product the library forms before attention (Q, K,
 * V, X·Aᵀ, and dC = dO·W_O,eff) is exact, so the reference's double activations are
 * the library's own; the test then evaluates R (from the float-rounded key mean), η
 * (Taylor error plus the float32 rounding share), grad_bound and loss_grad_bound from
 * docs/math.md §4 itself and compares them with the run info to 1e-12 relative, and
 * finds the smallest certifiable tolerance (the rounding floor) the same way. Under
 * RoPE the rotation is no exact float product, so those cases compare to 1e-6 (float
 * rounding of the turned Q and K), far below the factor up to √2 they check; under
 * dropout at p = 1/2 the dropped inputs X·keep·2 stay exact. */
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

/* k = binom(g + d, d): monomials of degree <= g in d variables. */
static double feature_count(int g, int d)
{
    double k = 1.0;
    for (int i = 1; i <= g; i++)
        k = k * (double)(d + i) / (double)i;
    return k;
}

/* δ'(g, R) = e^R·R^(g+1)/(g+1)! + γ_n·e^(2R), γ_n = n·u/(1 − n·u), u = 2^-24,
 * n = 13g + k + 64 + ⌈L_kv/64⌉ + 4 (docs/math.md §4, "Error" and "Rounding"). */
static double delta_of(int g, double r, int d, int64_t len_kv)
{
    const double u = ldexp(1.0, -24);
    const double n = 13.0 * g + feature_count(g, d) + 64.0 + ceil((double)len_kv / 64.0) + 4.0;
    return exp(r) * pow(r, g + 1) / tgamma(g + 2.0) + n * u / (1.0 - n * u) * exp(2.0 * r);
}

/* η = 2δ'/(1 − δ'). */
static double eta_of(int g, double r, int d, int64_t len_kv)
{
    const double delta = delta_of(g, r, d, len_kv);
    return delta < 1.0 ? 2.0 * delta / (1.0 - delta) : INFINITY;
}

/* Smallest even g <= 20 with δ'(g, R)·(2 + tol) <= tol, or 0 (below the floor). */
static int degree_for(double r, int d, int64_t len_kv, double tol)
{
    for (int g = 2; g <= 20; g += 2)
        if (delta_of(g, r, d, len_kv) * (2.0 + tol) <= tol)
            return g;
    return 0;
}

/* The smallest tolerance any even g <= 20 certifies at R: min_g η(g). */
static double tolerance_floor(double r, int d, int64_t len_kv)
{
    double f = INFINITY;
    for (int g = 2; g <= 20; g += 2)
        f = fmin(f, eta_of(g, r, d, len_kv));
    return f;
}

/* R of one kv-head group: β·max over its query heads and rows of ‖q_i‖₂ times
 * max_j ‖k_j − k̄‖₂, k̄ the key mean rounded to float (the vector the features
 * subtract), per batch element, maxed. */
static double group_score_bound(const ref_layer *l, const ref_problem *p, const double *q,
                                const double *k, int g)
{
    const int d = l->head_dim, group = l->n_heads / l->n_kv_heads;
    double r = 0.0;
    for (int64_t b = 0; b < p->batch; b++) {
        double mean[64] = {0}, kmax = 0.0;
        for (int64_t j = 0; j < p->len_kv; j++) /* exact: dyadic keys */
            for (int c = 0; c < d; c++)
                mean[c] += k[(b * p->len_kv + j) * l->kv_dim + g * d + c];
        for (int c = 0; c < d; c++)
            mean[c] = (double)(float)(mean[c] / (double)p->len_kv);
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
    int far_keys;   /* K not adapted, W_K / 64, b_K = 10^4: keys 10^4 apart from tens of
                       ulps (2^-10), where the float key mean is up to half an ulp from
                       the double one (a few % of R) */
    int small_a;    /* A / 8: the dA terms (|X̃|·|B|) outweigh dB's (|X̃·Aᵀ|) */
} bound_case;

static const bound_case bound_cases[] = {
    /* GQA (2 query heads per kv head), output projection with LoRA, biases. */
    {{.d_model = 4, .n_heads = 2, .n_kv_heads = 1, .rank = 2, .targets = 15, .alpha = 1.0,
      .softmax_scale = 0.25, .out_proj = 1, .bias = 1},
     0, 4, 4, 2, 0.0, 0, 0, 0, 0},
    /* Cross-attention, two kv groups with their own degree (6 and 8) from a tolerance
       just above the second group's floor (1.2e-4: 1e-4 is below it), no output
       projection. */
    {{.d_model = 4, .n_heads = 2, .n_kv_heads = 2, .rank = 2, .targets = 7, .alpha = 4.0,
      .softmax_scale = 0.125, .causal = 1},
     1, 2, 4, 0, 1.5e-4, 0, 0, 0, 0},
    /* dO (5 x 4 = 20 entries) peaks at its last entry, X at entry 15. */
    {{.d_model = 4, .n_heads = 1, .rank = 2, .targets = 7, .alpha = 2.0,
      .softmax_scale = 0.125},
     0, 5, 5, 4, 0.0, 1, 0, 0, 0},
    /* LoRA on O only, under Q and V that do not depend on X (max|V| <= 1/4). */
    {{.d_model = 4, .n_heads = 2, .rank = 2, .targets = 8, .alpha = 2.0,
      .softmax_scale = 0.125, .out_proj = 1, .bias = 1},
     0, 4, 4, 2, 0.0, 0, 1, 0, 0},
    /* Keys near 10^4 (LoRA on Q, V and O), three keys: the mean is no float. */
    {{.d_model = 4, .n_heads = 2, .rank = 2, .targets = 13, .alpha = 2.0,
      .softmax_scale = 0.25, .out_proj = 1, .bias = 1},
     0, 3, 3, 2, 0.0, 0, 0, 1, 0},
    /* Cross-attention over 70 keys: two 64-key blocks summed into the state (the
       rounding count's ⌈L_kv/64⌉). */
    {{.d_model = 4, .n_heads = 2, .n_kv_heads = 1, .rank = 2, .targets = 7, .alpha = 2.0,
      .softmax_scale = 0.03125},
     1, 3, 70, 2, 0.0, 0, 0, 0, 0},
    /* RoPE (HALF, θ = 1: angles up to 6 rad, near π/4 at position 1): dQ and dK are
       turned back, each entry's error bound grows by max |cos| + |sin| over the angles. */
    {{.d_model = 4, .n_heads = 2, .n_kv_heads = 1, .head_dim = 4, .rank = 2, .targets = 7,
      .alpha = 2.0, .softmax_scale = 0.03125, .bias = 1, .rope = 1, .rope_theta = 1.0},
     0, 7, 7, 2, 0.0, 0, 0, 0, 0},
    /* RoPE INTERLEAVED with an output projection, causal cross-attention. */
    {{.d_model = 4, .n_heads = 2, .head_dim = 2, .rank = 2, .targets = 15, .alpha = 2.0,
      .softmax_scale = 0.125, .causal = 1, .out_proj = 1, .rope = 2, .rope_theta = 3.0},
     1, 3, 5, 2, 0.0, 0, 0, 0, 0},
    /* RoPE, LoRA on Q only with s = 4: dA_Q, dB_Q (the query side's turn back)
       dominate the bound. */
    {{.d_model = 4, .n_heads = 1, .head_dim = 4, .rank = 2, .targets = 1, .alpha = 8.0,
      .softmax_scale = 0.03125, .rope = 1, .rope_theta = 1.0},
     0, 6, 6, 2, 0.0, 0, 0, 0, 0},
    /* LoRA dropout p = 1/2 on Q, K, V: the branches saw X·keep·2, dA and dx's LoRA path
       grow by 1/(1 − p) = 2. */
    {{.d_model = 4, .n_heads = 2, .n_kv_heads = 1, .rank = 2, .targets = 7, .alpha = 2.0,
      .softmax_scale = 0.03125, .bias = 1, .dropout = 0.5},
     0, 5, 5, 2, 0.0, 0, 0, 0, 1},
};

/* Magnitudes of the saved forward the bounds read, and the factors of RoPE and
 * dropout: rope_q, rope_k the largest |cos θ| + |sin θ| (cos, sin rounded to float as
 * the library turns) over each side's angles; drop = 1/(1 − p) with the keep masks of
 * the adapted Q, K, V inputs (NULL without dropout). */
typedef struct acts_max {
    double q, k, v, dattn; /* max |Q|, |K|, |V|, |dC| */
    double rope_q, rope_k, drop;
    const uint8_t *keep[3];
} acts_max;

/* Entrywise errors e_dy of dY of Q, K, V carried through the LoRA chain rule of each
 * projection: the largest bound over every dA, dB of Q, K, V and over dX (the three
 * paths summed). Under dropout the branch read X̃ = X·keep/(1 − p). */
static double chain_bound(const ref_layer *l, const ref_problem *p, const acts_max *m,
                          const double e_dy[3])
{
    const size_t nq = (size_t)(p->batch * p->len_q), nk = (size_t)(p->batch * p->len_kv);
    const double s = fabs(l->lora_scale);
    double worst = 0.0, dx = 0.0;
    for (int t = REF_Q; t <= REF_V; t++) {
        const size_t rows = t == REF_Q ? nq : nk;
        const double *x = t == REF_Q ? p->xq : p->xkv;
        double weff = max_abs(l->w[t], (size_t)(l->out[t] * l->in[t]));
        if (ref_is_adapted(l, t)) {
            const double xm = max_abs(x, rows * (size_t)l->in[t]) * m->drop;
            const double bm = max_abs(l->b[t], (size_t)(l->out[t] * l->rank));
            const double am = max_abs(l->a[t], (size_t)(l->rank * l->in[t]));
            double xam = 0.0; /* max |X̃·Aᵀ| */
            for (size_t i = 0; i < rows; i++)
                for (int c = 0; c < l->rank; c++) {
                    double acc = 0.0;
                    for (int64_t j = 0; j < l->in[t]; j++) {
                        const size_t at = i * (size_t)l->in[t] + (size_t)j;
                        const double keep = m->keep[t] ? m->keep[t][at] * m->drop : 1.0;
                        acc += x[at] * keep * l->a[t][c * l->in[t] + j];
                    }
                    xam = fmax(xam, fabs(acc));
                }
            worst = fmax(worst, s * (double)rows * (double)l->out[t] * e_dy[t] * bm * xm);
            worst = fmax(worst, s * (double)rows * e_dy[t] * xam);
            weff += s * (double)l->rank * bm * am * m->drop;
        }
        dx += (double)l->out[t] * e_dy[t] * weff;
    }
    return fmax(worst, dx);
}

/* dA_O and dB_O when dout is off by g and C by c entrywise (0 unless O is adapted);
 * drop: C's dropout factor. */
static double out_factor_bound(const ref_layer *l, const ref_problem *p, double g, double c,
                               double drop)
{
    c *= drop;
    if (!l->cfg.out_proj || !ref_is_adapted(l, REF_O))
        return 0.0;
    const double nq = (double)(p->batch * p->len_q), s = fabs(l->lora_scale);
    const double bm = max_abs(l->b[REF_O], (size_t)(l->out[REF_O] * l->rank));
    const double am = max_abs(l->a[REF_O], (size_t)(l->rank * l->in[REF_O]));
    return fmax(s * nq * (double)l->out[REF_O] * g * bm * c,
                s * nq * g * (double)l->in[REF_O] * am * c);
}

/* dY errors of Q, K, V from a dS row ℓ1 error ds (dQ = β·dS·K; dK = β·dSᵀ·Q summed
 * over L_q rows and G query heads) and dV's error dv. */
static void dy_errors(const ref_layer *l, const ref_problem *p, const acts_max *m, double ds,
                      double dv, double e_dy[3])
{
    const double beta = fabs(l->softmax_scale);
    const double group = (double)(l->n_heads / l->n_kv_heads);
    e_dy[REF_Q] = beta * ds * m->k * m->rope_q;
    e_dy[REF_K] = beta * ds * (double)p->len_q * group * m->q * m->rope_k;
    e_dy[REF_V] = dv;
}

/* grad_bound: D = d_h·max|dO|·max|V|, dS rows off by η(3 + η)·D in ℓ1, dV by
 * η·L_q·G·max|dO|; the attention output by η·max|V| (into O's factors). */
static double expected_grad_bound(const ref_layer *l, const ref_problem *p, double eta,
                                  const acts_max *m)
{
    const double ds = eta * (3.0 + eta) * (double)l->head_dim * m->dattn * m->v;
    const double group = (double)(l->n_heads / l->n_kv_heads);
    double e_dy[3];
    dy_errors(l, p, m, ds, eta * (double)p->len_q * group * m->dattn, e_dy);
    const size_t nout = (size_t)(p->batch * p->len_q) * (size_t)ref_out_cols(l);
    return fmax(chain_bound(l, p, m, e_dy),
                out_factor_bound(l, p, max_abs(p->dout, nout), eta * m->v, m->drop));
}

/* Largest row and column ℓ1 norms of |W_O| + s·|B_O|·|A_O| as docs/math.md bounds those
 * of W_O + s·B_O·A_O: rows ‖W_o,:‖₁ + s·‖B_o,:‖₁·max_r ‖A_r,:‖₁, columns
 * ‖W_:,c‖₁ + s·max_r ‖B_:,r‖₁·‖A_:,c‖₁. */
static void out_weight_l1(const ref_layer *l, double drop, double *row_max, double *col_max)
{
    const int64_t out = l->out[REF_O], in = l->in[REF_O], r = l->rank;
    const int adapted = ref_is_adapted(l, REF_O);
    const double s = fabs(l->lora_scale) * drop;
    double a_row = 0.0, b_col = 0.0;
    for (int64_t c = 0; adapted && c < r; c++) {
        double sa = 0.0, sb = 0.0;
        for (int64_t j = 0; j < in; j++)
            sa += fabs(l->a[REF_O][c * in + j]);
        for (int64_t o = 0; o < out; o++)
            sb += fabs(l->b[REF_O][o * r + c]);
        a_row = fmax(a_row, sa);
        b_col = fmax(b_col, sb);
    }
    *row_max = *col_max = 0.0;
    for (int64_t o = 0; o < out; o++) {
        double w = 0.0, b = 0.0;
        for (int64_t j = 0; j < in; j++)
            w += fabs(l->w[REF_O][o * in + j]);
        for (int64_t c = 0; adapted && c < r; c++)
            b += fabs(l->b[REF_O][o * r + c]);
        *row_max = fmax(*row_max, w + s * b * a_row);
    }
    for (int64_t j = 0; j < in; j++) {
        double w = 0.0, a = 0.0;
        for (int64_t o = 0; o < out; o++)
            w += fabs(l->w[REF_O][o * in + j]);
        for (int64_t c = 0; adapted && c < r; c++)
            a += fabs(l->a[REF_O][c * in + j]);
        *col_max = fmax(*col_max, w + s * b_col * a);
    }
}

/* loss_grad_bound − grad_bound: the exact gradient map applied to Δ = õut − out,
 * |Δ| <= ε = η·max|V| (times W_O's row ℓ1 bound), dC <= m = ε (times its column ℓ1
 * bound); dS rows <= 2·d_h·m·max|V| in ℓ1, dV <= L_q·G·m, the exact C <= max|V|. */
static double expected_loss_term(const ref_layer *l, const ref_problem *p, double eta,
                                 const acts_max *m)
{
    double eps = eta * m->v, dc = eps;
    if (l->cfg.out_proj) {
        double row_max, col_max;
        out_weight_l1(l, m->drop, &row_max, &col_max);
        eps *= row_max;
        dc = eps * col_max;
    }
    const double group = (double)(l->n_heads / l->n_kv_heads);
    double e_dy[3];
    dy_errors(l, p, m, 2.0 * (double)l->head_dim * dc * m->v, (double)p->len_q * group * dc,
              e_dy);
    return fmax(chain_bound(l, p, m, e_dy), out_factor_bound(l, p, eps, m->v, m->drop));
}

static void assert_rel(double got, double want, const char *what, int ci)
{
    const double rel = bound_cases[ci].c.rope ? 1e-6 : KA_REL;
    ck_assert_msg(isfinite(want) && want > 0.0, "case %d: expected %s %g is not positive",
                  ci, what, want);
    ck_assert_msg(fabs(got - want) <= rel * want,
                  "case %d: %s = %.17g, formula gives %.17g (rel %.3g)", ci, what, got, want,
                  fabs(got - want) / want);
}

/* One case's layer and problem (dyadic), and what the bounds read of its forward:
 * the double activations (the library's own, every product being exact), their
 * maxima and each kv group's R. */
typedef struct bound_setup {
    ref_layer l;
    ref_problem p;
    acts_max m;
    double group_r[8];
    uint8_t *keep[3];
} bound_setup;

/* max |cos θ| + |sin θ| over the angles pos·inv_freq[i] of n default positions from
 * first (1 without RoPE), cos and sin rounded to float. */
static double rope_gain_of(const ref_layer *l, int64_t first, int64_t n)
{
    if (!l->cfg.rope)
        return 1.0;
    double f[64], gain = 1.0;
    const int half = ref_rope_dim(l) / 2;
    ref_rope_inv_freq(l, f);
    for (int64_t i = 0; i < n; i++)
        for (int c = 0; c < half; c++) {
            const double angle = (double)(first + i) * f[c];
            gain = fmax(gain, fabs((double)(float)cos(angle)) + fabs((double)(float)sin(angle)));
        }
    return gain;
}

static void shape_case(const bound_case *bc, ref_layer *l)
{
    if (bc->o_dominates) {
        for (int64_t i = 0; i < l->out[REF_Q] * l->in[REF_Q]; i++) {
            l->w[REF_Q][i] = 0.0;
            l->w[REF_V][i] = 0.0;
            l->w[REF_K][i] /= 4.0;
        }
        for (int64_t i = 0; i < l->out[REF_V]; i++) /* max|V| well below 1 */
            l->bias[REF_V][i] /= 4.0;
    }
    for (int t = REF_Q; bc->small_a && t <= REF_V; t++)
        for (int64_t i = 0; ref_is_adapted(l, t) && i < l->rank * l->in[t]; i++)
            l->a[t][i] /= 8.0;
    if (bc->far_keys) { /* K = X·W_Kᵀ/64 + 10^4: multiples of 2^-10 below 2^14, exact */
        for (int64_t i = 0; i < l->out[REF_K] * l->in[REF_K]; i++)
            l->w[REF_K][i] /= 64.0;
        for (int64_t i = 0; i < l->out[REF_K]; i++)
            l->bias[REF_K][i] = 1e4;
    }
}

static void bound_setup_init(bound_setup *bs, int ci)
{
    const bound_case *bc = &bound_cases[ci];
    ref_layer *l = &bs->l;
    ref_problem *p = &bs->p;
    ck_assert_int_eq(ref_layer_init(l, &bc->c), 0);
    dyadic_layer(l, 900 + (uint64_t)ci);
    shape_case(bc, l);
    ck_assert_int_eq(ref_problem_init(p, l, bc->cross, 1, bc->len_q, bc->len_kv, 1), 0);
    uint64_t s = 950 + (uint64_t)ci;
    const size_t nq = (size_t)(p->batch * p->len_q), nk = (size_t)(p->batch * p->len_kv);
    const size_t nout = nq * (size_t)ref_out_cols(l);
    fill_dyadic(p->xq, nq * (size_t)l->cfg.d_model, &s);
    if (p->cross)
        fill_dyadic(p->xkv, nk * (size_t)l->cfg.d_model, &s);
    fill_dyadic(p->dout, nout, &s);
    if (bc->edge_max) {
        ck_assert(nout % 16 != 0 && nq * (size_t)l->cfg.d_model > 16);
        p->dout[nout - 1] = 2.0;
        p->xq[15] = -2.0;
    }

    double *q = malloc(nq * (size_t)l->q_dim * sizeof(double));
    double *k = malloc(nk * (size_t)l->kv_dim * sizeof(double));
    double *v = malloc(nk * (size_t)l->kv_dim * sizeof(double));
    double *dattn = malloc(nq * (size_t)l->q_dim * sizeof(double));
    ck_assert(q && k && v && dattn);
    ref_attn_args ra;
    memset(&ra, 0, sizeof ra);
    memset(bs->keep, 0, sizeof bs->keep);
    for (int t = REF_Q; t <= REF_V && l->cfg.dropout > 0.0; t++) { /* training forward 0 */
        if (!ref_is_adapted(l, t))
            continue;
        const int64_t rows = t == REF_Q ? (int64_t)nq : (int64_t)nk;
        bs->keep[t] = malloc((size_t)(rows * l->in[t]));
        ck_assert_ptr_nonnull(bs->keep[t]);
        lib_keep_mask(0, 0, t, rows, l->in[t], l->cfg.dropout, bs->keep[t]);
        ra.keep[t] = bs->keep[t];
    }
    ck_assert(l->cfg.dropout == 0.0 || !l->cfg.out_proj); /* dC would need O's mask */
    ck_assert_int_eq(ref_activations_ex(l, &ra, p->xq, p->cross ? p->xkv : NULL, p->batch,
                                        p->len_q, p->len_kv, q, k, v, NULL),
                     0);
    if (l->cfg.out_proj) { /* dC = dO·(W_O + s·B_O·A_O) */
        double *we = ref_effective_weight(l, REF_O);
        ck_assert_ptr_nonnull(we);
        for (size_t i = 0; i < nq; i++)
            for (int c = 0; c < l->q_dim; c++) {
                double acc = 0.0;
                for (int64_t o = 0; o < l->out[REF_O]; o++)
                    acc += p->dout[i * (size_t)l->out[REF_O] + (size_t)o] * we[o * l->q_dim + c];
                dattn[i * (size_t)l->q_dim + (size_t)c] = acc;
            }
        free(we);
    } else {
        memcpy(dattn, p->dout, nq * (size_t)l->q_dim * sizeof(double));
    }
    bs->m = (acts_max){max_abs(q, nq * (size_t)l->q_dim), max_abs(k, nk * (size_t)l->kv_dim),
                       max_abs(v, nk * (size_t)l->kv_dim),
                       max_abs(dattn, nq * (size_t)l->q_dim),
                       rope_gain_of(l, p->len_kv - p->len_q, p->len_q),
                       rope_gain_of(l, 0, p->len_kv),
                       l->cfg.dropout > 0.0 ? 1.0 / (1.0 - l->cfg.dropout) : 1.0,
                       {bs->keep[0], bs->keep[1], bs->keep[2]}};
    ck_assert_int_le(l->n_kv_heads, 8);
    for (int g = 0; g < l->n_kv_heads; g++)
        bs->group_r[g] = group_score_bound(l, p, q, k, g);
    free(q);
    free(k);
    free(v);
    free(dattn);
}

static void bound_setup_free(bound_setup *bs)
{
    for (int t = 0; t < 3; t++)
        free(bs->keep[t]);
    ref_problem_free(&bs->p);
    ref_layer_free(&bs->l);
}

static lora_adapter *poly_adapter(const ref_layer *l, int degree, double tol)
{
    ref_param xp = degree ? (ref_param){LORA_CFG_POLY_DEGREE, 0, degree, 0.0}
                          : (ref_param){LORA_CFG_TOLERANCE, 1, 0, tol};
    lora_adapter *ad = NULL;
    ck_assert_int_eq(ref_make_adapter_ex(l, LORA_BACKEND_POLY, 1, &xp, 1, &ad), LORA_OK);
    return ad;
}

START_TEST(test_bounds_known_answer)
{
    const bound_case *bc = &bound_cases[_i];
    bound_setup bs;
    bound_setup_init(&bs, _i);
    const ref_layer *l = &bs.l;
    const ref_problem *p = &bs.p;
    double r = 0.0, eta = 0.0;
    int top_degree = 0, low_degree = 100;
    for (int g = 0; g < l->n_kv_heads; g++) {
        const double rg = bs.group_r[g];
        const int deg = bc->degree ? bc->degree : degree_for(rg, l->head_dim, p->len_kv, bc->tol);
        ck_assert_msg(deg > 0, "case %d: group %d has no degree at R %g", _i, g, rg);
        r = fmax(r, rg);
        eta = fmax(eta, eta_of(deg, rg, l->head_dim, p->len_kv));
        top_degree = deg > top_degree ? deg : top_degree;
        low_degree = deg < low_degree ? deg : low_degree;
    }
    if (!bc->degree && l->n_kv_heads > 1) /* the case is about degrees per group */
        ck_assert_int_lt(low_degree, top_degree);
    const double want_grad = expected_grad_bound(l, p, eta, &bs.m);
    const double want_loss = want_grad + expected_loss_term(l, p, eta, &bs.m);

    lora_adapter *ad = poly_adapter(l, bc->degree, bc->tol);
    lib_result res;
    ck_assert_int_eq(lib_run(ad, l, p, &res), LORA_OK);
    ck_assert_int_eq(res.info.backend, LORA_BACKEND_POLY);
    ck_assert_int_eq(res.info.poly_degree, top_degree);
    ck_assert_int_eq(res.info.poly_groups, l->n_kv_heads);
    assert_rel(res.info.score_bound, r, "score_bound R", _i);
    assert_rel(res.fwd_info.error_bound, eta, "error_bound (forward)", _i);
    assert_rel(res.info.error_bound, eta, "error_bound", _i);
    assert_rel(res.info.grad_bound, want_grad, "grad_bound", _i);
    assert_rel(res.info.loss_grad_bound, want_loss, "loss_grad_bound", _i);
    lib_result_free(&res);
    lora_adapter_destroy(ad);
    bound_setup_free(&bs);
}
END_TEST

/* The rounding floor: a tolerance just above the smallest any degree certifies at the
 * layer's R (every group's) runs at that degree; just below it forced POLY refuses
 * the forward with LORA_ERR_TOLERANCE. */
START_TEST(test_bounds_tolerance_floor)
{
    bound_setup bs;
    bound_setup_init(&bs, _i);
    const ref_layer *l = &bs.l;
    const ref_problem *p = &bs.p;
    double floor_tol = 0.0;
    for (int g = 0; g < l->n_kv_heads; g++)
        floor_tol = fmax(floor_tol, tolerance_floor(bs.group_r[g], l->head_dim, p->len_kv));
    /* floor_tol is above the rounding share alone: 2·γ_n·e^(2R) at g = 2 */
    ck_assert(floor_tol > 2e-6 && floor_tol < 1e-2);
    for (int side = -1; side <= 1; side += 2) {
        /* under RoPE the float-turned R differs from the double one by ~1e-7 */
        const double tol = floor_tol * (1.0 + side * (l->cfg.rope ? 1e-5 : 1e-9));
        lora_adapter *ad = poly_adapter(l, 0, tol);
        lib_result res;
        const int st = lib_run(ad, l, p, &res);
        if (side < 0) {
            ck_assert_msg(st == LORA_ERR_TOLERANCE, "tolerance %.17g below the floor: status %d",
                          tol, st);
            ck_assert_ptr_nonnull(strstr(res.call, "forward"));
        } else {
            ck_assert_msg(st == LORA_OK, "tolerance %.17g above the floor: status %d", tol, st);
            double eta = 0.0;
            for (int g = 0; g < l->n_kv_heads; g++) {
                const int deg = degree_for(bs.group_r[g], l->head_dim, p->len_kv, tol);
                ck_assert_int_gt(deg, 0);
                eta = fmax(eta, eta_of(deg, bs.group_r[g], l->head_dim, p->len_kv));
            }
            ck_assert(eta <= tol);
            assert_rel(res.info.error_bound, eta, "error_bound at the floor", _i);
        }
        lib_result_free(&res);
        lora_adapter_destroy(ad);
    }
    bound_setup_free(&bs);
}
END_TEST

Suite *bounds_suite(void)
{
    Suite *s = suite_create("bounds");
    TCase *tc = tcase_create("known_answer");
    const int ncases = (int)(sizeof bound_cases / sizeof bound_cases[0]);
    tcase_add_loop_test(tc, test_bounds_known_answer, 0, ncases);
    tcase_add_loop_test(tc, test_bounds_tolerance_floor, 0, ncases);
    suite_add_tcase(s, tc);
    return s;
}
