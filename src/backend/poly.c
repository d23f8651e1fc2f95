/* The polynomial method (MATH §3): exp(β·q·k) ≈ φ(q)·φ(k) with φ the degree-g Taylor
 * monomial features, k = binom(g + d, d) columns. Nothing of size L × L or L × k·d is
 * formed: rows stream in blocks of POLY_BLOCK through running states of k' × (d+1).
 *
 * Notation (per head): d = head_dim, V' = [V, 1] (a column of ones), dO' = [dO, −ρ]
 * with ρ_i = ⟨dO_i, Õ_i⟩, p_g(s) = Σ_{t<=g} s^t/t! = φ_g(q)·φ_g(k), w_i = Σ_j p_g(s_ij)
 * the normaliser. Forward:
 *   Õ_i·w_i, w_i = φ_g(q_i)·Σ_j φ_g(k_j) ⊗ V'_j                     (k × (d+1) state)
 * Backward: MATH §3's dS̃_ij = p_g(s_ij)/w_i·⟨dO'_i, V'_j⟩, with dQ = β·dS̃·K and
 * dK = β·dS̃ᵀ·Q, through the Jacobian of the degree-(g+1) features: p_{g+1}' = p_g, so
 * ∂/∂q φ_{g+1}(q)·φ_{g+1}(k) = p_g(q·k)·k and
 *   dQ_i = qscale/w_i · J_{g+1}(q̂_i)ᵀ·M·dO'_i,   M = Σ_j φ_{g+1}(k̂_j) ⊗ V'_j (prefix)
 *   dK_j = kscale · J_{g+1}(k̂_j)ᵀ·N·V'_j,        N = Σ_i φ_{g+1}(q̂_i)/w_i ⊗ dO'_i (suffix)
 *   dV_j = φ_g(k̂_j)·N[:k, :d]
 * (q̂, k̂ the scaled, centred rows the features see). Both states are k' × (d+1),
 * k' = binom(g + 1 + d, d); Jᵀ is sparse: ∂φ_a/∂x_e = √a_e·φ_(a − e_e), so
 * (J_{g+1}(x)ᵀ·z)_e = Σ_{|b|<=g} φ_b(x)·√(b_e + 1)·z_(b + e_e) (docs/math.md). Two routes
 * (poly_backward_variant picks by the cost model): EXPANDED expands the state through
 * the Jacobian once per change (k × d(d+1)) and multiplies the rows' degree-g features
 * with it (wide products); JACOBIAN multiplies the state with the rows' dO' or V'
 * (k' × rows, d + 1 deep) and contracts sparsely, k·d terms per row: fewer flops, run
 * at a lower rate for small d.
 *
 * Causal attention (not in the paper): the sums over j run over a prefix. Keys before a
 * query block's diagonal sit in the running state; the diagonal block itself is done
 * as a small masked attention with the approximate probabilities φ(q)·φ(k)/w. dK and
 * dV use suffix sums over query blocks, swept from the last block to the first.
 *
 * Key centring (exact, MATH §3): features use k_j − k̄, which shifts each score row by
 * a constant and so leaves probabilities and gradients unchanged while shrinking R.
 * Queries are scaled by β·c and keys by 1/c, c balancing their norms (the product of
 * features is unchanged). */
#include <math.h>
#include <string.h>

#include "backend.h"
#include "poly_model.h"

#define POLY_BLOCK 64

/* The monomial table of degree g + 1 (k' entries; the first k are those of degree <= g):
 * feature m = feature parent[m] · x[var[m]] · fac[m], so every feature x^a/√(a!) is one
 * multiply from an earlier one (a! = Π a_i!). For the backward's Jacobian, per
 * monomial b of degree <= g and variable e: child[b·d + e] is the index of b + e_e and
 * dfac[b·d + e] = √(b_e + 1). The same pairs by child: by_child lists the b·d + e of
 * child a in [term_start[a], term_start[a + 1]). */
typedef struct poly_table {
    int64_t k, k1; /* features of degree <= g and <= g + 1 */
    int32_t *parent, *var, *first; /* first: index of a monomial's first child */
    float *fac;
    int32_t *child;
    float *dfac;
    int32_t *term_start, *by_child;
} poly_table;

/* Rows of the JACOBIAN state product made at once: the product S·augᵀ (k' × B) in
 * slices of this many rows stays in cache until the contraction reads it. */
#define POLY_SLICE 512

/* Per-worker scratch; sizes in floats. */
typedef struct poly_work {
    float *xt;      /* (d × B) transposed, shifted, scaled rows; then Jᵀz (d × B) */
    float *phq;     /* (k' × B) query features, feature-major */
    float *phk;     /* (k' × B) key features */
    float *rows;    /* (B × (d+1)) V' or dO' rows */
    float *prod;    /* EXPANDED: (B × (d(d+1) + d)) features times the expanded state;
                       JACOBIAN: (POLY_SLICE × B) a slice of the state times rows;
                       forward: (B × (d+1)) */
    float *state;   /* (k' × (d+1)) running prefix/suffix state */
    float *jac;     /* EXPANDED: (k × (d(d+1) + d)) the state through the Jacobian */
    int variant;    /* POLY_BACKWARD_* */
    float *diag_f;  /* (B × B) diagonal-block probabilities */
    float *diag_p;  /* (B × B) diagonal-block dP' */
    float *kmean;   /* (d) */
    /* The sweep's masks (attn_mask): the task's segment runs, and per query row the
     * number of its run's keys it sees (a prefix: positions ascend within a run). */
    attn_run *runs;  /* (len_q) */
    int64_t nruns;
    int64_t *cnt;       /* (len_q), indexed by query row */
    const int64_t *vis; /* the running run's part of cnt */
    float *rows_t;  /* ((d+1) × B) rows transposed, for the JACOBIAN state product */
} poly_work;



static int64_t task_count(const attn_problem *p) { return p->batch * p->n_kv_heads; }

static int worker_count(const attn_problem *p)
{
    int64_t t = task_count(p);
    return (int)(t < p->threads ? t : p->threads);
}

/* Fewer tasks than threads: a backward runs each task's dQ sweep and its dK/dV sweep as
 * two parts at once (their products are too small to split well). Only when the dQ
 * sweep writes dQ alone: causal diagonal blocks (backward_diag_block) also add to dK
 * and dV, so causal tasks keep one part (as must any masking that adds such blocks). */
static int split_halves(const attn_problem *p)
{
    return task_count(p) < p->threads && !p->causal;
}

/* Work areas: one per worker, or per half task when split. */
static int64_t work_areas(const attn_problem *p)
{
    return split_halves(p) ? 2 * task_count(p) : worker_count(p);
}

/* The degree-(g+1) count of a run's parameters. */
static int64_t backward_features(const attn_problem *p)
{
    return poly_binom((int)poly_params_of(&p->params).degree + 1, p->head_dim,
                      POLY_MAX_BACKWARD_FEATURES);
}

static size_t table_floats(int64_t k, int64_t k1, int64_t d)
{
    return 5u * (size_t)k1 + 1u + 3u * (size_t)k * (size_t)d;
}

/* Floats of the product buffer and of the expanded state for a variant. */
static size_t prod_floats(int variant, int64_t k1, int64_t d)
{
    const size_t B = POLY_BLOCK, cols = (size_t)d * ((size_t)d + 1) + (size_t)d;
    const size_t slice = (size_t)(k1 < POLY_SLICE ? k1 : POLY_SLICE) * B;
    const size_t fwd = B * ((size_t)d + 1); /* the forward's (B × (d+1)) */
    return variant == POLY_BACKWARD_EXPANDED ? B * cols : slice > fwd ? slice : fwd;
}

static size_t jac_floats(int variant, int64_t k, int64_t d)
{
    const size_t cols = (size_t)d * ((size_t)d + 1) + (size_t)d;
    return variant == POLY_BACKWARD_EXPANDED ? (size_t)k * cols : 0;
}

static size_t work_floats(int variant, int64_t k, int64_t k1, int64_t d)
{
    const size_t d1 = (size_t)d + 1, B = POLY_BLOCK;
    return d * B + 2u * (size_t)k1 * B + B * d1 + prod_floats(variant, k1, d) +
           (size_t)k1 * d1 + jac_floats(variant, k, d) + 2u * B * B + (size_t)d + d1 * B +
           64u;
}

/* Floats of a worker's mask arrays: runs and cnt (int64), aligned to 8 bytes. */
static size_t sweep_floats(const attn_problem *p)
{
    return 2u * (size_t)p->len_q * (sizeof(attn_run) / sizeof(int64_t) + 1u) + 2u;
}

static size_t poly_workspace_size(const attn_problem *p)
{
    const int64_t k = poly_params_of(&p->params).features, k1 = backward_features(p);
    if (k < 0 || k1 < 0)
        return 0;
    return (table_floats(k, k1, p->head_dim) +
            (size_t)work_areas(p) *
                (work_floats(poly_params_of(&p->params).variant, k, k1, p->head_dim) +
                 sweep_floats(p))) *
           sizeof(float);
}

/* The features of degree g + 1, degree by degree; a monomial of degree t extends one of
 * degree t−1 by a variable no smaller than that one's last, so each multi-index appears
 * once. run = the exponent of the last variable, giving the 1/√(a_j + 1) step. */
static void build_monomials(int g1, int64_t d, poly_table *t)
{
    int32_t *run = (int32_t *)t->fac; /* reuses fac as scratch until written */
    int64_t m = 1, lo = 0, hi = 1;    /* previous degree occupies [lo, hi) */
    t->parent[0] = -1;
    t->var[0] = 0;
    run[0] = 0;
    for (int deg = 1; deg <= g1; deg++) {
        for (int64_t par = lo; par < hi; par++) {
            t->first[par] = (int32_t)m;
            for (int64_t j = (par == 0 ? 0 : t->var[par]); j < d; j++) {
                t->parent[m] = (int32_t)par;
                t->var[m] = (int32_t)j;
                run[m] = (par != 0 && t->var[par] == j) ? run[par] + 1 : 1;
                m++;
            }
        }
        lo = hi;
        hi = m;
    }
    for (int64_t i = m - 1; i >= 1; i--) /* run → factor, in place */
        t->fac[i] = 1.0f / sqrtf((float)run[i]);
    t->fac[0] = 1.0f;
}

/* child and dfac of every monomial b of degree <= g. b·x_e is generated from b when e
 * is no smaller than b's last variable; else b·x_e = (parent(b)·x_e)·x_var(b), a
 * generated child of the earlier parent(b)·x_e. Exponents follow parents the same way. */
static void build_jacobian(int64_t d, poly_table *t)
{
    for (int64_t b = 0; b < t->k; b++)
        for (int64_t e = 0; e < d; e++) {
            const int64_t at = b * d + e;
            if (b == 0 || e >= t->var[b]) {
                t->child[at] = t->first[b] + (int32_t)(e - (b == 0 ? 0 : t->var[b]));
                t->dfac[at] = b == 0 ? 0.0f : t->dfac[t->parent[b] * d + e] + (t->var[b] == e);
            } else {
                const int32_t c1 = t->child[t->parent[b] * d + e];
                t->child[at] = t->first[c1] + (t->var[b] - t->var[c1]);
                t->dfac[at] = t->dfac[t->parent[b] * d + e];
            }
        }
    for (int64_t i = 0; i < t->k * d; i++) /* exponent b_e → √(b_e + 1) */
        t->dfac[i] = sqrtf(t->dfac[i] + 1.0f);
}

/* by_child and term_start from child: a counting sort of the k·d pairs by child. */
static void build_terms(int64_t d, poly_table *t)
{
    int32_t *start = t->term_start;
    memset(start, 0, (size_t)(t->k1 + 1) * sizeof(int32_t));
    for (int64_t i = 0; i < t->k * d; i++)
        start[t->child[i] + 1]++;
    for (int64_t a = 0; a < t->k1; a++)
        start[a + 1] += start[a];
    for (int64_t i = 0; i < t->k * d; i++) /* start[a] advances to a's end */
        t->by_child[start[t->child[i]]++] = (int32_t)i;
    for (int64_t a = t->k1; a > 0; a--)
        start[a] = start[a - 1];
    start[0] = 0;
}

/* Features of n rows x (stride ld): ph (nf × n, feature-major) of (x − shift)·scale,
 * the first nf of the table (t->k: degree <= g; t->k1: degree <= g + 1). */
LA_VECTOR_CLONES static void features(const poly_table *t, int64_t nf, int64_t d,
                                      const float *x, int64_t ld, int64_t n,
                                      const float *shift, float scale, float *xt, float *ph)
{
    for (int64_t r = 0; r < n; r++)
        for (int64_t c = 0; c < d; c++)
            xt[c * n + r] = (x[r * ld + c] - (shift ? shift[c] : 0.0f)) * scale;
    for (int64_t r = 0; r < n; r++)
        ph[r] = 1.0f;
    for (int64_t m = 1; m < nf; m++) { /* a parent's row precedes its children's */
        const float *restrict par = ph + (int64_t)t->parent[m] * n;
        const float *restrict xv = xt + (int64_t)t->var[m] * n;
        float *restrict dst = ph + m * n;
        const float f = t->fac[m];
#pragma omp simd
        for (int64_t r = 0; r < n; r++)
            dst[r] = par[r] * xv[r] * f;
    }
}

/* out[m·ldo] += Σ_r ph[m][r]·v[r] for the nf features of n rows (feature-major). */
LA_VECTOR_CLONES static void add_feature_dots(int64_t nf, const float *ph, int64_t n,
                                              const float *v, float *out, int64_t ldo)
{
    for (int64_t m = 0; m < nf; m++) {
        const float *restrict pm = ph + m * n;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t r = 0; r < n; r++)
            s += pm[r] * v[r];
        out[m * ldo] += s;
    }
}

/* acc[r] = Σ_m ph[m][r]·sv[m·lds] for n rows (ph feature-major, nf features). */
LA_VECTOR_CLONES static void feature_combination(int64_t nf, const float *ph, int64_t n,
                                                 const float *sv, int64_t lds, float *acc)
{
    for (int64_t r = 0; r < n; r++)
        acc[r] = 0.0f;
    for (int64_t m = 0; m < nf; m++) {
        const float *restrict pm = ph + m * n;
        const float s = sv[m * lds];
#pragma omp simd
        for (int64_t r = 0; r < n; r++)
            acc[r] += pm[r] * s;
    }
}

/* S (nf × (d+1)) += Φ·rows: features ph (nf × n, feature-major), rows (n × (d+1)). The
 * product covers d columns and the last one (the normaliser's 1 or −ρ) is a dot per
 * feature: d + 1 columns would leave BLIS's 16-wide kernels a one-column edge, which
 * it runs as a matrix-vector product per block of six rows. */
static void state_update(const attn_problem *p, int bt, int64_t nf, const float *ph,
                         int64_t n, const float *rows, float *S)
{
    const int64_t d = p->head_dim, d1 = d + 1;
    float last[POLY_BLOCK];
    la_gemm(p->la, bt, LA_N, LA_N, nf, d, n, 1.0f, ph, n, rows, d1, 1.0f, S, d1);
    for (int64_t r = 0; r < n; r++)
        last[r] = rows[r * d1 + d];
    add_feature_dots(nf, ph, n, last, S + d, d1);
}

/* out (n × (d+1)) = Φᵀ·S for n rows' features ph (nf × n) and a state S (nf × (d+1)):
 * the first d columns as one product, the last (the normaliser) as a combination of
 * feature rows, for the same reason as state_update. */
static void state_apply(const attn_problem *p, int bt, int64_t nf, const float *ph,
                        int64_t n, const float *S, float *out)
{
    const int64_t d = p->head_dim, d1 = d + 1;
    float last[POLY_BLOCK];
    la_gemm(p->la, bt, LA_T, LA_N, n, d, nf, 1.0f, ph, n, S, d1, 0.0f, out, d1);
    feature_combination(nf, ph, n, S + d, d1, last);
    for (int64_t r = 0; r < n; r++)
        out[r * d1 + d] = last[r];
}

/* Per-head geometry shared by forward and backward (recomputed, so bitwise equal). */
typedef struct head_geom {
    const float *q, *k, *v; /* head views */
    float qscale, kscale;
} head_geom;

static void head_setup(const attn_problem *p, int64_t b, int64_t h, const float *q,
                       const float *k, const float *v, float *kmean, head_geom *hg)
{
    const int64_t d = p->head_dim, g = h / (p->n_heads / p->n_kv_heads);
    hg->q = q + b * p->len_q * p->ldq + h * d;
    hg->k = k + b * p->len_kv * p->ldkv + g * d;
    hg->v = v + b * p->len_kv * p->ldkv + g * d;
    /* Centring over the batch element's valid keys, whatever their segment: one shift
     * per key row serves every query, and R (attn_score_bound) bounds the centred
     * scores of all valid pairs, the visible ones among them. */
    const int64_t nq = attn_q_len(p, b), nk = attn_kv_len(p, b);
    for (int64_t c = 0; c < d; c++) {
        double s = 0.0;
        for (int64_t j = 0; j < nk; j++)
            s += hg->k[j * p->ldkv + c];
        kmean[c] = (float)(s / (double)(nk > 0 ? nk : 1));
    }
    double qmax = 0.0, kmax = 0.0;
    for (int64_t i = 0; i < nq; i++) {
        double s = 0.0;
        for (int64_t c = 0; c < d; c++)
            s += (double)hg->q[i * p->ldq + c] * hg->q[i * p->ldq + c];
        qmax = s > qmax ? s : qmax;
    }
    for (int64_t j = 0; j < nk; j++) {
        double s = 0.0;
        for (int64_t c = 0; c < d; c++) {
            const double x = hg->k[j * p->ldkv + c] - kmean[c];
            s += x * x;
        }
        kmax = s > kmax ? s : kmax;
    }
    qmax = sqrt(qmax) * fabs((double)p->softmax_scale);
    kmax = sqrt(kmax);
    const double c = (qmax > 0.0 && kmax > 0.0) ? sqrt(kmax / qmax) : 1.0;
    hg->qscale = (float)(p->softmax_scale * c);
    hg->kscale = (float)(1.0 / c);
}

/* First key of the diagonal of the query block at i0: keys before it are visible to
 * every row of the block and of the later blocks (w->vis ascends), keys from it to the
 * last row's w->vis are masked per row. Causal, the diagonal starts one key before the
 * first row's end, so with default positions it is the square block of the rows' own
 * keys (full product tiles); the start ascends with i0, so the state and the
 * diagonals never overlap. Without causality every key is in the state. */
static int64_t diag_start(const attn_problem *p, const poly_work *w, int64_t i0)
{
    return !p->causal ? p->len_kv : w->vis[i0] > 0 ? w->vis[i0] - 1 : 0;
}

/* 1/w_i, or 0 for a row that sees no key (its output is 0 and it passes no gradient). */
static float inverse_weight(float w) { return w > 0.0f ? 1.0f / w : 0.0f; }

/* nf features (t->k or t->k1) of keys [j0, j0 + n) into phk, of queries into phq. */
static void key_features(const attn_problem *p, const poly_table *t, int64_t nf,
                         const head_geom *hg, const poly_work *w, int64_t j0, int64_t n)
{
    features(t, nf, p->head_dim, hg->k + j0 * p->ldkv, p->ldkv, n, w->kmean, hg->kscale,
             w->xt, w->phk);
}

static void query_features(const attn_problem *p, const poly_table *t, int64_t nf,
                           const head_geom *hg, const poly_work *w, int64_t i0, int64_t n)
{
    features(t, nf, p->head_dim, hg->q + i0 * p->ldq, p->ldq, n, NULL, hg->qscale, w->xt,
             w->phq);
}

/* diag_f (bq × nc) = masked φ(q_i)·φ(k_j)·inv_w_i for query block i0 against the
 * diagonal keys [c0, c0 + nc): key c0+jj is visible to query i0+r iff c0 + jj <
 * w->vis[i0 + r]. phq and phk hold both blocks' features. */
static void diag_probs(const attn_problem *p, int bt, const poly_table *t, poly_work *w,
                       int64_t i0, int64_t bq, int64_t c0, int64_t nc, const float *inv_w)
{
    la_gemm(p->la, bt, LA_T, LA_N, bq, nc, t->k, 1.0f, w->phq, bq, w->phk, nc, 0.0f,
            w->diag_f, nc);
    for (int64_t r = 0; r < bq; r++) {
        const int64_t seen = w->vis[i0 + r] - c0;
        for (int64_t jj = 0; jj < nc; jj++)
            w->diag_f[r * nc + jj] = jj < seen ? w->diag_f[r * nc + jj] * inv_w[r] : 0.0f;
    }
}

/* The forward of one segment run (p: the run as a problem, hg, oh, wrow at its first
 * rows, w->vis its staircase). Query block i0 sees the state of keys [0, p0) and,
 * masked, its diagonal [p0, p1) in chunks of at most a block. */
static void forward_run(const attn_problem *p, int bt, const poly_table *t, poly_work *w,
                        const head_geom *hg, float *oh, float *wrow)
{
    const int64_t d = p->head_dim, d1 = d + 1, kk = t->k;
    memset(w->state, 0, (size_t)(kk * d1) * sizeof(float));
    int64_t absorbed = 0;
    for (int64_t i0 = 0; i0 < p->len_q; i0 += POLY_BLOCK) {
        const int64_t bq = p->len_q - i0 < POLY_BLOCK ? p->len_q - i0 : POLY_BLOCK;
        const int64_t p0 = diag_start(p, w, i0), p1 = w->vis[i0 + bq - 1];
        /* state += Σ_j φ(k_j) ⊗ V'_j over keys now visible to the whole block */
        while (absorbed < p0) {
            const int64_t n = p0 - absorbed < POLY_BLOCK ? p0 - absorbed : POLY_BLOCK;
            key_features(p, t, kk, hg, w, absorbed, n);
            for (int64_t r = 0; r < n; r++) {
                memcpy(w->rows + r * d1, hg->v + (absorbed + r) * p->ldkv,
                       (size_t)d * sizeof(float));
                w->rows[r * d1 + d] = 1.0f;
            }
            state_update(p, bt, kk, w->phk, n, w->rows, w->state);
            absorbed += n;
        }
        query_features(p, t, kk, hg, w, i0, bq);
        state_apply(p, bt, kk, w->phq, bq, w->state, w->prod);
        float ones[POLY_BLOCK];
        for (int64_t r = 0; r < bq; r++)
            ones[r] = 1.0f;
        for (int64_t c0 = p0; c0 < p1; c0 += POLY_BLOCK) { /* the diagonal, causal only */
            const int64_t nc = p1 - c0 < POLY_BLOCK ? p1 - c0 : POLY_BLOCK;
            key_features(p, t, kk, hg, w, c0, nc);
            diag_probs(p, bt, t, w, i0, bq, c0, nc, ones); /* unnormalised here */
            for (int64_t r = 0; r < nc; r++) {
                memcpy(w->rows + r * d1, hg->v + (c0 + r) * p->ldkv, (size_t)d * sizeof(float));
                w->rows[r * d1 + d] = 1.0f;
            }
            la_gemm(p->la, bt, LA_N, LA_N, bq, d1, nc, 1.0f, w->diag_f, nc, w->rows, d1, 1.0f,
                    w->prod, d1);
        }
        for (int64_t r = 0; r < bq; r++) {
            const float *y = w->prod + r * d1;
            const float inv = w->vis[i0 + r] > 0 ? 1.0f / y[d] : 0.0f; /* sees no key: 0 */
            for (int64_t c = 0; c < d; c++)
                oh[(i0 + r) * p->ldo + c] = y[c] * inv;
            wrow[i0 + r] = w->vis[i0 + r] > 0 ? y[d] : 0.0f;
        }
    }
}

/* Run `run` of the task as a problem of its own: rp its sizes (the strides stay), rg
 * the head views at its first rows; w->vis its part of the staircase. */
static void run_view(const attn_problem *p, poly_work *w, const attn_run *run,
                     const head_geom *hg, attn_problem *rp, head_geom *rg)
{
    *rp = *p;
    rp->len_q = run->nq;
    rp->len_kv = run->nk;
    rp->mask = NULL;
    *rg = *hg;
    rg->q += run->qs * p->ldq;
    rg->k += run->ks * p->ldkv;
    rg->v += run->ks * p->ldkv;
    w->vis = w->cnt + run->qs;
}

static void poly_forward_head(const attn_problem *p, int bt, const poly_table *t,
                              poly_work *w, int64_t b, int64_t h, const float *q,
                              const float *k, const float *v, float *o, float *row_stat)
{
    const int64_t d = p->head_dim;
    head_geom hg;
    head_setup(p, b, h, q, k, v, w->kmean, &hg);
    float *oh = o + b * p->len_q * p->ldo + h * d;
    float *wrow = row_stat + (b * p->n_heads + h) * p->len_q;
    for (int64_t i = 0; i < p->len_q; i++) { /* rows no run reaches: padding, no keys */
        memset(oh + i * p->ldo, 0, (size_t)d * sizeof(float));
        wrow[i] = 0.0f;
    }
    for (int64_t r = 0; r < w->nruns; r++) {
        const attn_run *run = &w->runs[r];
        attn_problem rp;
        head_geom rg;
        if (run->nk == 0)
            continue;
        run_view(p, w, run, &hg, &rp, &rg);
        forward_run(&rp, bt, t, w, &rg, oh + run->qs * p->ldo, wrow + run->qs);
    }
}

/* dO'_i = [dO_i, −ρ_i]·scale_i for a block of rows, into out (bq × (d+1)); scale NULL
 * for 1. */
static void augmented_dout(const attn_problem *p, const float *doh, const float *oh,
                           int64_t i0, int64_t bq, const float *scale, float *out)
{
    const int64_t d = p->head_dim;
    for (int64_t r = 0; r < bq; r++) {
        const float *g = doh + (i0 + r) * p->ldo, *o = oh + (i0 + r) * p->ldo;
        const float sc = scale ? scale[r] : 1.0f;
        float rho = 0.0f;
        for (int64_t c = 0; c < d; c++) {
            rho += g[c] * o[c];
            out[r * (d + 1) + c] = g[c] * sc;
        }
        out[r * (d + 1) + d] = -rho * sc;
    }
}

/* V'_j = [V_j, 1] for keys [j0, j0 + n), into rows (n × (d+1)). */
static void augmented_v(const attn_problem *p, const float *vh, int64_t j0, int64_t n,
                        float *rows)
{
    const int64_t d = p->head_dim;
    for (int64_t r = 0; r < n; r++) {
        memcpy(rows + r * (d + 1), vh + (j0 + r) * p->ldkv, (size_t)d * sizeof(float));
        rows[r * (d + 1) + d] = 1.0f;
    }
}

/* One head's views for its backward: the geometry, the saved forward and the gradients
 * (dk, dv rows are its kv head's, shared by the group's query heads). */
typedef struct head_grads {
    head_geom hg;
    const float *oh, *doh, *wrow;
    float *dqh, *dkh, *dvh;
} head_grads;

static void head_grads_setup(const attn_problem *p, poly_work *w, int64_t b, int64_t h,
                             const float *q, const float *k, const float *v, const float *o,
                             const float *row_stat, const float *do_, float *dq, float *dk,
                             float *dv, head_grads *hd)
{
    const int64_t d = p->head_dim, g = h / (p->n_heads / p->n_kv_heads);
    head_setup(p, b, h, q, k, v, w->kmean, &hd->hg);
    hd->oh = o + b * p->len_q * p->ldo + h * d;
    hd->doh = do_ + b * p->len_q * p->ldo + h * d;
    hd->wrow = row_stat + (b * p->n_heads + h) * p->len_q;
    hd->dqh = dq + b * p->len_q * p->ldq + h * d;
    hd->dkh = dk + b * p->len_kv * p->ldkv + g * d;
    hd->dvh = dv + b * p->len_kv * p->ldkv + g * d;
}

/* Query block i0's causal diagonal keys [c0, c0 + nc) (masked by w->vis), as exact
 * attention with approximate probabilities: dS = F ⊙ (dO·Vᵀ − ρ), dQ += β·dS·(K − k̄),
 * dK += β·dSᵀ·Q, dV += Fᵀ·dO. The keys are centred as the prefix state's are (a row of
 * dS sums to zero only over all its keys). phq holds the block's query features; dopr
 * its dO' rows. */
static void backward_diag_block(const attn_problem *p, int bt, const poly_table *t,
                                poly_work *w, const head_grads *hd, int64_t i0, int64_t c0,
                                int64_t nc, int64_t bq, const float *inv_w, const float *dopr)
{
    const int64_t d1 = p->head_dim + 1, d = p->head_dim;
    const float beta = p->softmax_scale;
    const head_geom *hg = &hd->hg;
    key_features(p, t, t->k, hg, w, c0, nc);
    diag_probs(p, bt, t, w, i0, bq, c0, nc, inv_w);
    la_gemm(p->la, bt, LA_N, LA_T, bq, nc, d, 1.0f, hd->doh + i0 * p->ldo, p->ldo,
            hg->v + c0 * p->ldkv, p->ldkv, 0.0f, w->diag_p, nc);
    for (int64_t r = 0; r < bq; r++) {
        const float rho = -dopr[r * d1 + d];
        for (int64_t jj = 0; jj < nc; jj++)
            w->diag_p[r * nc + jj] = w->diag_f[r * nc + jj] * (w->diag_p[r * nc + jj] - rho);
    }
    /* xt holds (K − k̄)ᵀ·kscale of the chunk (key_features) */
    la_gemm(p->la, bt, LA_N, LA_T, bq, d, nc, beta / hg->kscale, w->diag_p, nc, w->xt, nc,
            1.0f, hd->dqh + i0 * p->ldq, p->ldq);
    la_gemm(p->la, bt, LA_T, LA_N, nc, d, bq, beta, w->diag_p, nc, hg->q + i0 * p->ldq,
            p->ldq, 1.0f, hd->dkh + c0 * p->ldkv, p->ldkv);
    la_gemm(p->la, bt, LA_T, LA_N, nc, d, bq, 1.0f, w->diag_f, nc, hd->doh + i0 * p->ldo,
            p->ldo, 1.0f, hd->dvh + c0 * p->ldkv, p->ldkv);
}

/* Columns of an expanded state: d·(d+1) Jacobian columns, plus d for dV. */
static int64_t jac_cols(int64_t d, int with_dv) { return d * (d + 1) + (with_dv ? d : 0); }

/* The Jacobian applied to a state S (k' × (d+1)): jac (k × jac_cols) with
 * jac[b, e·(d+1) + c] = √(b_e + 1)·S[b + e_e, c], so that row i of Φ_g·jac holds
 * (J_{g+1}(x_i)ᵀ·S)[e, c] = Σ_a ∂φ_a/∂x_e·S[a, c] (∂φ_a/∂x_e = √a_e·φ_(a − e_e)). With
 * dv, the last d columns are S[b, c] (c < d): dV's φ_g·N. One pass over k·d·(d+1)
 * entries, rebuilt only when S changed, so the products with it are as wide as the
 * old face-splitting state's. */
static void expand_state(const poly_table *t, int64_t d, const float *S, int with_dv,
                         float *jac)
{
    const int64_t d1 = d + 1, cols = jac_cols(d, with_dv);
    for (int64_t b = 0; b < t->k; b++) {
        float *row = jac + b * cols;
        for (int64_t e = 0; e < d; e++) {
            const float f = t->dfac[b * d + e];
            const float *src = S + (int64_t)t->child[b * d + e] * d1;
            for (int64_t c = 0; c < d1; c++)
                row[e * d1 + c] = f * src[c];
        }
        if (with_dv)
            memcpy(row + d * d1, S + b * d1, (size_t)d * sizeof(float));
    }
}

/* out[r][e] = scale[r]·Σ_c y[r][e·(d+1) + c]·aug[r][c] for n rows (y: ldy floats per
 * row, aug: (d+1) per row); add: accumulate into out instead of overwriting. */
static void contract_rows(int64_t d, int64_t n, const float *y, int64_t ldy, const float *aug,
                          const float *scale, float *out, int64_t ldo, int add)
{
    const int64_t d1 = d + 1;
    for (int64_t r = 0; r < n; r++) {
        const float *yr = y + r * ldy, *ar = aug + r * d1;
        float *o = out + r * ldo;
        for (int64_t e = 0; e < d; e++) {
            float acc = 0.0f;
            for (int64_t c = 0; c < d1; c++)
                acc += yr[e * d1 + c] * ar[c];
            o[e] = (add ? o[e] : 0.0f) + scale[r] * acc;
        }
    }
}

/* The JACOBIAN variant's contraction over the children a in [a0, a1): acc (d × n) +=
 * the terms φ_b(r)·√(b_e + 1)·z[a][r] with b + e_e = a, so that over all a, acc[e][r] =
 * (J_{g+1}ᵀ·z_r)_e; ph (>= k × n) the rows' features, z the slice's rows of S·augᵀ
 * ((a1 − a0) × n), both feature-major. */
LA_VECTOR_CLONES static void jacobian_contract(const poly_table *t, int64_t d,
                                               const float *ph, const float *z, int64_t n,
                                               int64_t a0, int64_t a1, float *acc)
{
    for (int64_t a = a0; a < a1; a++) {
        const float *restrict za = z + (a - a0) * n;
        for (int32_t i = t->term_start[a]; i < t->term_start[a + 1]; i++) {
            const int64_t at = t->by_child[i], b = at / d;
            const float f = t->dfac[at];
            const float *restrict pb = ph + b * n;
            float *restrict ae = acc + (at - b * d) * n;
#pragma omp simd
            for (int64_t r = 0; r < n; r++)
                ae[r] += f * pb[r] * za[r];
        }
    }
}

/* out[r][e] (= or +=) scale[r]·(J_{g+1}(x_r)ᵀ·S·aug_r)_e for n rows whose degree-<=g
 * features are in ph (feature-major) and whose (d+1)-vectors are aug: the state S
 * (k' × (d+1)) through the variant's route. EXPANDED: Φ_gᵀ·jac then a (d+1)-contraction
 * per row (jac = expand_state(S), current). JACOBIAN: z = S·augᵀ (k' × n), then the
 * sparse contraction. */
static void apply_jacobian(const attn_problem *p, int bt, const poly_table *t, poly_work *w,
                           const float *ph, const float *aug, int64_t n, const float *scale,
                           float *out, int64_t ldo, int add, int with_dv)
{
    const int64_t d = p->head_dim, d1 = d + 1, cols = jac_cols(d, with_dv);
    if (w->variant == POLY_BACKWARD_EXPANDED) {
        la_gemm(p->la, bt, LA_T, LA_N, n, cols, t->k, 1.0f, ph, n, w->jac, cols, 0.0f,
                w->prod, cols);
        contract_rows(d, n, w->prod, cols, aug, scale, out, ldo, add);
        return;
    }
    for (int64_t r = 0; r < n; r++) /* augᵀ: the product then runs n (64) wide */
        for (int64_t c = 0; c < d1; c++)
            w->rows_t[c * n + r] = aug[r * d1 + c];
    memset(w->xt, 0, (size_t)(d * n) * sizeof(float));
    for (int64_t a0 = 1; a0 < t->k1; a0 += POLY_SLICE) { /* feature 0 is no child */
        const int64_t a1 = t->k1 - a0 < POLY_SLICE ? t->k1 : a0 + POLY_SLICE;
        la_gemm(p->la, bt, LA_N, LA_N, a1 - a0, n, d1, 1.0f, w->state + a0 * d1, d1,
                w->rows_t, n, 0.0f, w->prod, n);
        jacobian_contract(t, d, ph, w->prod, n, a0, a1, w->xt);
    }
    for (int64_t r = 0; r < n; r++)
        for (int64_t e = 0; e < d; e++)
            out[r * ldo + e] = (add ? out[r * ldo + e] : 0.0f) + scale[r] * w->xt[e * n + r];
}

/* Part 1, dQ: prefix state M = Σ_j φ_{g+1}(k̂_j) ⊗ V'_j (k' × (d+1)), swept over the query
 * blocks; dQ_i = qscale/w_i·J_{g+1}(q̂_i)ᵀ·M·dO'_i. Causal blocks add their diagonal. */
static void backward_dq(const attn_problem *p, int bt, const poly_table *t, poly_work *w,
                        const head_grads *hd)
{
    const int64_t d = p->head_dim, d1 = d + 1;
    float inv_w[POLY_BLOCK], sc[POLY_BLOCK];
    memset(w->state, 0, (size_t)(t->k1 * d1) * sizeof(float));
    int64_t absorbed = 0, expanded = -1;
    for (int64_t i0 = 0; i0 < p->len_q; i0 += POLY_BLOCK) {
        const int64_t bq = p->len_q - i0 < POLY_BLOCK ? p->len_q - i0 : POLY_BLOCK;
        const int64_t p0 = diag_start(p, w, i0), p1 = w->vis[i0 + bq - 1];
        while (absorbed < p0) {
            const int64_t n = p0 - absorbed < POLY_BLOCK ? p0 - absorbed : POLY_BLOCK;
            key_features(p, t, t->k1, &hd->hg, w, absorbed, n);
            augmented_v(p, hd->hg.v, absorbed, n, w->rows);
            state_update(p, bt, t->k1, w->phk, n, w->rows, w->state);
            absorbed += n;
        }
        if (w->variant == POLY_BACKWARD_EXPANDED && expanded != absorbed) {
            expand_state(t, d, w->state, 0, w->jac);
            expanded = absorbed;
        }
        query_features(p, t, t->k, &hd->hg, w, i0, bq); /* the Jacobian needs degree <= g */
        float *dopr = w->rows; /* dO' (bq × (d+1)) */
        augmented_dout(p, hd->doh, hd->oh, i0, bq, NULL, dopr);
        for (int64_t r = 0; r < bq; r++) {
            inv_w[r] = inverse_weight(hd->wrow[i0 + r]);
            sc[r] = hd->hg.qscale * inv_w[r];
        }
        apply_jacobian(p, bt, t, w, w->phq, dopr, bq, sc, hd->dqh + i0 * p->ldq, p->ldq, 0, 0);
        for (int64_t c0 = p0; c0 < p1; c0 += POLY_BLOCK) /* the diagonal, causal only */
            backward_diag_block(p, bt, t, w, hd, i0, c0,
                                p1 - c0 < POLY_BLOCK ? p1 - c0 : POLY_BLOCK, bq, inv_w, dopr);
    }
}

/* dK, dV of keys [j_lo, j_hi) from the suffix state N (every query in it sees them):
 * dK_j = kscale·J_{g+1}(k̂_j)ᵀ·N·V'_j, dV_j = φ_g(k̂_j)·N[:k, :d]. */
static void emit_keys(const attn_problem *p, int bt, const poly_table *t, poly_work *w,
                      const head_grads *hd, int64_t j_lo, int64_t j_hi)
{
    const int64_t d = p->head_dim, d1 = d + 1, cols = jac_cols(d, 1);
    const int expanded = w->variant == POLY_BACKWARD_EXPANDED;
    if (j_lo >= j_hi)
        return;
    if (expanded)
        expand_state(t, d, w->state, 1, w->jac);
    float sc[POLY_BLOCK];
    for (int64_t r = 0; r < POLY_BLOCK; r++)
        sc[r] = hd->hg.kscale;
    for (int64_t j0 = j_lo; j0 < j_hi; j0 += POLY_BLOCK) {
        const int64_t n = j_hi - j0 < POLY_BLOCK ? j_hi - j0 : POLY_BLOCK;
        key_features(p, t, t->k, &hd->hg, w, j0, n); /* the Jacobian needs degree <= g */
        augmented_v(p, hd->hg.v, j0, n, w->rows);
        apply_jacobian(p, bt, t, w, w->phk, w->rows, n, sc, hd->dkh + j0 * p->ldkv, p->ldkv,
                       1, 1);
        if (expanded) /* dV: the last d columns of the product */
            for (int64_t r = 0; r < n; r++) {
                const float *z = w->prod + r * cols + d * d1;
                float *dvj = hd->dvh + (j0 + r) * p->ldkv;
                for (int64_t c = 0; c < d; c++)
                    dvj[c] += z[c];
            }
        else
            la_gemm(p->la, bt, LA_T, LA_N, n, d, t->k, 1.0f, w->phk, n, w->state, d1, 1.0f,
                    hd->dvh + j0 * p->ldkv, p->ldkv);
    }
}

/* N += Σ_i φ_{g+1}(q̂_i)/w_i ⊗ dO'_i over query block i0 (bq rows). */
static void absorb_queries(const attn_problem *p, int bt, const poly_table *t, poly_work *w,
                           const head_grads *hd, int64_t i0, int64_t bq)
{
    float inv_w[POLY_BLOCK];
    for (int64_t r = 0; r < bq; r++)
        inv_w[r] = inverse_weight(hd->wrow[i0 + r]);
    query_features(p, t, t->k1, &hd->hg, w, i0, bq);
    augmented_dout(p, hd->doh, hd->oh, i0, bq, inv_w, w->rows);
    state_update(p, bt, t->k1, w->phq, bq, w->rows, w->state);
}

/* Part 2, dK and dV: suffix state N = Σ_i φ_{g+1}(q̂_i)/w_i ⊗ dO'_i, swept from the last
 * query block; key j takes N of the blocks that see all of it. For blk = last..0: emit
 * the keys whose diagonal block is blk (every later block, already in N, sees all of
 * them), then add blk's queries to N. Finally emit the keys before the first diagonal,
 * which every query sees. */
static void backward_dkdv(const attn_problem *p, int bt, const poly_table *t, poly_work *w,
                          const head_grads *hd)
{
    const int64_t d1 = p->head_dim + 1;
    memset(w->state, 0, (size_t)(t->k1 * d1) * sizeof(float));
    const int64_t nblocks = (p->len_q + POLY_BLOCK - 1) / POLY_BLOCK;
    for (int64_t blk = nblocks - 1; blk >= 0; blk--) {
        const int64_t j_lo = diag_start(p, w, blk * POLY_BLOCK);
        const int64_t j_hi =
            blk + 1 < nblocks ? diag_start(p, w, (blk + 1) * POLY_BLOCK) : p->len_kv;
        emit_keys(p, bt, t, w, hd, j_lo, j_hi);
        const int64_t i0 = blk * POLY_BLOCK;
        absorb_queries(p, bt, t, w, hd, i0,
                       p->len_q - i0 < POLY_BLOCK ? p->len_q - i0 : POLY_BLOCK);
    }
    emit_keys(p, bt, t, w, hd, 0, diag_start(p, w, 0));
}

/* Which sweeps of a backward a part runs (split_halves). */
enum { HALF_DQ = 1, HALF_DKDV = 2, HALF_BOTH = 3 };

static void poly_backward_head(const attn_problem *p, int bt, const poly_table *t,
                               poly_work *w, int64_t b, int64_t h, const float *q,
                               const float *k, const float *v, const float *o,
                               const float *row_stat, const float *do_, float *dq, float *dk,
                               float *dv, int halves)
{
    head_grads hd;
    head_grads_setup(p, w, b, h, q, k, v, o, row_stat, do_, dq, dk, dv, &hd);
    if (halves & HALF_DQ) /* rows no run reaches pass no gradient */
        for (int64_t i = 0; i < p->len_q; i++)
            memset(hd.dqh + i * p->ldq, 0, (size_t)p->head_dim * sizeof(float));
    for (int64_t r = 0; r < w->nruns; r++) {
        const attn_run *run = &w->runs[r];
        attn_problem rp;
        head_grads rd = hd;
        if (run->nk == 0)
            continue;
        run_view(p, w, run, &hd.hg, &rp, &rd.hg);
        rd.oh += run->qs * p->ldo;
        rd.doh += run->qs * p->ldo;
        rd.wrow += run->qs;
        rd.dqh += run->qs * p->ldq;
        rd.dkh += run->ks * p->ldkv;
        rd.dvh += run->ks * p->ldkv;
        if (halves & HALF_DQ)
            backward_dq(&rp, bt, t, w, &rd);
        if (halves & HALF_DKDV)
            backward_dkdv(&rp, bt, t, w, &rd);
    }
}

static void carve_work(const attn_problem *p, const poly_table *t, float *base,
                       poly_work *w)
{
    const size_t d = (size_t)p->head_dim, d1 = d + 1, B = POLY_BLOCK;
    w->variant = poly_params_of(&p->params).variant;
    w->xt = base;
    w->phq = w->xt + d * B;
    w->phk = w->phq + (size_t)t->k1 * B;
    w->rows = w->phk + (size_t)t->k1 * B;
    w->prod = w->rows + B * d1;
    w->state = w->prod + prod_floats(w->variant, t->k1, p->head_dim);
    w->jac = w->state + (size_t)t->k1 * d1;
    w->diag_f = w->jac + jac_floats(w->variant, t->k, p->head_dim);
    w->diag_p = w->diag_f + B * B;
    w->kmean = w->diag_p + B * B;
    /* the mask arrays after the float scratch, aligned to 8 bytes */
    w->rows_t = w->kmean + d;
    const size_t at = ((uintptr_t)(w->rows_t + (d + 1) * B) + 7u) & ~(uintptr_t)7u;
    w->runs = (attn_run *)at;
    w->cnt = (int64_t *)(w->runs + p->len_q);
}

/* The table in the workspace: its arrays, and the first worker's scratch after it.
 * The Jacobian's part is built only for a backward. */
static void carve_table(const attn_problem *p, void *ws, int backward, poly_table *t,
                        float **work0)
{
    const int64_t d = p->head_dim;
    t->k = poly_params_of(&p->params).features;
    t->k1 = backward_features(p);
    t->parent = (int32_t *)ws;
    t->var = t->parent + t->k1;
    t->first = t->var + t->k1;
    t->fac = (float *)(t->first + t->k1);
    t->child = (int32_t *)(t->fac + t->k1);
    t->dfac = (float *)(t->child + t->k * d);
    t->term_start = (int32_t *)(t->dfac + t->k * d);
    t->by_child = t->term_start + t->k1 + 1;
    *work0 = (float *)(t->by_child + t->k * d);
    build_monomials((int)poly_params_of(&p->params).degree + 1, d, t);
    if (backward) {
        build_jacobian(d, t);
        build_terms(d, t);
    }
}

/* The segment runs of batch element b into w (poly_plan admits only masks whose
 * segment ids never decrease along the valid rows, so each segment is one run on each
 * side), and per valid query row the number of its run's keys it sees: the keys at or
 * before its position when causal (positions ascend within a run, so a prefix that
 * grows with the row), else all of them. */
static void task_runs(const attn_problem *p, int64_t b, poly_work *w)
{
    w->nruns = 0;
    for (int64_t i = 0, j = 0; attn_next_run(p, b, &i, &j, &w->runs[w->nruns]);) {
        const attn_run *run = &w->runs[w->nruns++];
        int64_t seen = 0;
        for (int64_t r = 0; r < run->nq; r++) {
            const int64_t pos = attn_q_pos(p, b, run->qs + r);
            while (p->causal && seen < run->nk && attn_kv_pos(p, b, run->ks + seen) <= pos)
                seen++;
            w->cnt[run->qs + r] = p->causal ? seen : run->nk;
        }
    }
}

/* One task = one (batch, kv head): its query heads share dK, dV rows. backward: the
 * HALF_* sweeps to run (0 for a forward). */
static void poly_task(const attn_problem *p, int bt, const poly_table *t, poly_work *w,
                      int64_t task, int backward, const float *q, const float *k,
                      const float *v, const float *o, float *row_stat, const float *do_,
                      float *out, float *dq, float *dk, float *dv)
{
    const int64_t b = task / p->n_kv_heads, g = task % p->n_kv_heads;
    const int64_t group = p->n_heads / p->n_kv_heads, d = p->head_dim;
    task_runs(p, b, w);
    if (backward & HALF_DKDV)
        for (int64_t j = 0; j < p->len_kv; j++) {
            memset(dk + (b * p->len_kv + j) * p->ldkv + g * d, 0, (size_t)d * sizeof(float));
            memset(dv + (b * p->len_kv + j) * p->ldkv + g * d, 0, (size_t)d * sizeof(float));
        }
    for (int64_t h = g * group; h < (g + 1) * group; h++) {
        if (backward)
            poly_backward_head(p, bt, t, w, b, h, q, k, v, o, row_stat, do_, dq, dk, dv,
                               backward);
        else
            poly_forward_head(p, bt, t, w, b, h, q, k, v, out, row_stat);
    }
}

/* What a parallel part of poly_run reads (pool_run's ctx). */
typedef struct poly_job {
    const attn_problem *p;
    const poly_table *t;
    float *work0;
    size_t stride;
    int64_t tasks;
    int backward; /* HALF_* (0: forward) */
    int split;    /* parts are half tasks (split_halves) */
    const float *q, *k, *v, *o, *do_;
    float *row_stat, *out, *dq, *dk, *dv;
} poly_job;

/* A static share of the tasks, with the worker's own work area. */
static void poly_part(void *arg, int worker, int workers)
{
    const poly_job *j = arg;
    poly_work w;
    carve_work(j->p, j->t, j->work0 + (size_t)worker * j->stride, &w);
    if (j->split) { /* part 2i: task i's dQ, part 2i + 1: its dK, dV */
        poly_task(j->p, 1, j->t, &w, worker / 2, worker % 2 ? HALF_DKDV : HALF_DQ, j->q, j->k,
                  j->v, j->o, j->row_stat, j->do_, j->out, j->dq, j->dk, j->dv);
        return;
    }
    int64_t lo, hi;
    pool_static_range(j->tasks, worker, workers, &lo, &hi);
    for (int64_t task = lo; task < hi; task++)
        poly_task(j->p, 1, j->t, &w, task, j->backward, j->q, j->k, j->v, j->o, j->row_stat,
                  j->do_, j->out, j->dq, j->dk, j->dv);
}

/* Same scheduling rule as the exact backend: serial tasks with threaded products when
 * tasks are fewer than threads, else one task per worker with single-threaded ones. */
static void poly_run(const attn_problem *p, void *ws, int backward, const float *q,
                     const float *k, const float *v, const float *o, float *row_stat,
                     const float *do_, float *out, float *dq, float *dk, float *dv)
{
    poly_table t;
    float *work0;
    carve_table(p, ws, backward, &t, &work0);
    const size_t stride =
        work_floats(poly_params_of(&p->params).variant, t.k, t.k1, p->head_dim) +
        sweep_floats(p);
    const int64_t tasks = task_count(p);
    const int workers = worker_count(p);
    if (backward && split_halves(p)) {
        poly_job j = {p, &t, work0, stride, tasks, HALF_BOTH, 1, q, k, v, o, do_,
                      row_stat, out, dq, dk, dv};
        pool_run(p->la->pool, (int)(2 * tasks), poly_part, &j);
        return;
    }
    if (workers <= 1 || tasks < p->threads) {
        poly_work w;
        carve_work(p, &t, work0, &w);
        for (int64_t task = 0; task < tasks; task++)
            poly_task(p, p->threads, &t, &w, task, backward ? HALF_BOTH : 0, q, k, v, o,
                      row_stat, do_, out, dq, dk, dv);
        return;
    }
    poly_job j = {p, &t, work0, stride, tasks, backward ? HALF_BOTH : 0, 0, q, k, v, o, do_,
                  row_stat, out, dq, dk, dv};
    pool_run(p->la->pool, workers, poly_part, &j);
}

static void poly_forward(const attn_problem *p, const float *q, const float *k,
                         const float *v, float *o, float *row_stat, void *ws)
{
    poly_run(p, ws, 0, q, k, v, NULL, row_stat, NULL, o, NULL, NULL, NULL);
}

static void poly_backward(const attn_problem *p, const float *q, const float *k,
                          const float *v, const float *o, const float *row_stat,
                          const float *do_, float *dq, float *dk, float *dv, void *ws)
{
    poly_run(p, ws, 1, q, k, v, o, (float *)row_stat, do_, NULL, dq, dk, dv);
}

const attn_backend attn_backend_poly = {
    .name = "poly",
    .id = LORA_BACKEND_POLY,
    .approximate = 1,
    .plan = poly_plan,
    .workspace_size = poly_workspace_size,
    .forward = poly_forward,
    .backward = poly_backward,
};
