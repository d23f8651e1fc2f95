/* Projections and LoRA terms of one attention layer (MATH §2, "From a projection
 * gradient to the adapter"): dW is never formed, only dA and dB. Also RoPE on the
 * projected Q and K (and back on dQ, dK), PEFT's dropout on the LoRA branches' input,
 * and the zero rows of padded queries. */
#include "layer.h"

#include <math.h>
#include <string.h>

#include "../linalg/bf16.h"

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

/* Scratch floats the products with 16-bit base weights need (forward and dx alike). */
static size_t wpanel_floats(const layer *l, const attn_problem *p)
{
    size_t most = 0;
    for (int t = 0; t < PROJ_COUNT; t++) {
        const layer_proj *pr = &l->proj[t];
        if (!pr->weight.data)
            continue;
        for (int tw = LA_N; tw <= LA_T; tw++) {
            const size_t n = la_gemm_w_scratch_floats(p->la, (la_trans)tw, proj_rows(p, t),
                                                      pr->weight.dtype, pr->out, pr->in);
            most = n > most ? n : most;
        }
    }
    if (p->la->bf16 && la_bf16_gemm_w_scratch_floats(p->la->threads) > most)
        most = la_bf16_gemm_w_scratch_floats(p->la->threads);
    return most;
}

/* Widest input of an adapted projection (0 when none is adapted): the row width of
 * the dropout block buffer. */
static int64_t widest_adapted_in(const layer *l)
{
    int64_t w = 0;
    for (int t = 0; t < PROJ_COUNT; t++)
        if (l->proj[t].adapted && l->proj[t].in > w)
            w = l->proj[t].in;
    return w;
}

/* Floats of the dropout block buffer (0 without dropout). */
static size_t drop_buf_floats(const layer *l)
{
    return l->dropout > 0.0 ? (size_t)LAYER_DROP_ROWS * (size_t)widest_adapted_in(l) : 0;
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
    ok &= mul_add(&n, drop_buf_floats(l), 1);
    ok &= mul_add(&n, wpanel_floats(l, p), 1); /* last: BLIS reads past it into padding */
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
    if (drop_buf_floats(l) > 0) {
        a->drop_buf = buf;
        buf += drop_buf_floats(l);
    }
    a->wpanel = wpanel_floats(l, p) > 0 ? buf : NULL;
}

size_t layer_scratch_floats(const layer *l, const attn_problem *p)
{
    const size_t nq = (size_t)(p->batch * p->len_q), nk = (size_t)(p->batch * p->len_kv);
    size_t n = attn_measure_scratch_floats(p); /* first: it holds doubles */
    int ok = mul_add(&n, nq, (l->out_proj ? 2u : 1u) * (size_t)l->q_dim); /* [dC,] dQ */
    ok &= mul_add(&n, nk, 2u * (size_t)l->kv_dim);   /* dK, dV */
    ok &= mul_add(&n, nq > nk ? nq : nk, (size_t)l->rank); /* dY·B */
    return ok ? n : 0;
}

/* ---- dropout ---------------------------------------------------------------------- */

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

#define GOLDEN UINT64_C(0x9E3779B97F4A7C15)

/* The mask of one target in one forward: element (row, col) is kept when the top 32
 * bits of mix64(row_key(row) + (col + 1)·GOLDEN) are >= threshold = ceil(p·2³²). */
typedef struct drop_mask {
    uint64_t key, threshold;
    float scale; /* 1/(1-p) */
} drop_mask;

static drop_mask drop_mask_of(uint64_t seed, uint64_t forward_count, int t, double p)
{
    drop_mask m;
    m.key = mix64(mix64(mix64(seed + GOLDEN) ^ forward_count) ^ (uint64_t)t);
    m.threshold = (uint64_t)ceil(p * 4294967296.0);
    m.scale = (float)(1.0 / (1.0 - p));
    return m;
}

static uint64_t drop_row_key(const drop_mask *m, int64_t row)
{
    return mix64(m->key ^ (uint64_t)row);
}

static int drop_kept(const drop_mask *m, uint64_t row_key, int64_t col)
{
    return (mix64(row_key + (uint64_t)(col + 1) * GOLDEN) >> 32) >= m->threshold;
}

int layer_dropout_keep(uint64_t seed, uint64_t forward_count, int t, int64_t row,
                       int64_t col, double p)
{
    const drop_mask m = drop_mask_of(seed, forward_count, t, p);
    return drop_kept(&m, drop_row_key(&m, row), col);
}

/* dst (n, in) = x rows [r0, r0 + n) of width in, dropped: kept entries times 1/(1-p),
 * the others 0. */
static void drop_rows(const drop_mask *m, const float *x, int64_t r0, int64_t n, int64_t in,
                      float *dst)
{
    for (int64_t r = 0; r < n; r++) {
        const uint64_t rk = drop_row_key(m, r0 + r);
        const float *xr = x + (r0 + r) * in;
        float *dr = dst + r * in;
        for (int64_t c = 0; c < in; c++)
            dr[c] = drop_kept(m, rk, c) ? xr[c] * m->scale : 0.0f;
    }
}

/* The dropout of projection t in the forward that left a, or NULL when off. */
static const drop_mask *drop_of(const layer *l, const layer_acts *a, int t, drop_mask *m)
{
    if (!a->dropout || !l->proj[t].adapted)
        return NULL;
    *m = drop_mask_of(l->seed, a->forward_count, t, l->dropout);
    return m;
}

/* ---- projections --------------------------------------------------------------------- */

/* The product with the base weight (la_gemm_w's arguments): bf16 operands under
 * LORA_COMPUTE_BF16. The LoRA products stay fp32 (docs/compute.md). */
static void base_product(const la_ctx *la, int nt, la_trans tw, int64_t rows,
                         const layer_proj *pr, const float *x, int64_t ldx, float beta, float *c,
                         int64_t ldc, float *wpanel)
{
    if (la->bf16)
        la_bf16_gemm_w(la, nt, tw, rows, pr->out, pr->in, 1.0f, x, ldx, pr->weight, beta, c,
                       ldc, wpanel);
    else
        la_gemm_w(la, nt, tw, rows, pr->out, pr->in, 1.0f, x, ldx, pr->weight, beta, c, ldc,
                  wpanel);
}

/* xa (rows, rank) = X̃·Aᵀ, X̃ = x or, with dropout (dm), x dropped block by block in buf. */
static void lora_down(const layer *l, const layer_proj *pr, const la_ctx *la, int nt,
                      const float *x, int64_t rows, const drop_mask *dm, float *buf, float *xa)
{
    if (!dm) {
        la_gemm(la, nt, LA_N, LA_T, rows, l->rank, pr->in, 1.0f, x, pr->in, pr->a, pr->in,
                0.0f, xa, l->rank);
        return;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += LAYER_DROP_ROWS) {
        const int64_t n = rows - r0 < LAYER_DROP_ROWS ? rows - r0 : LAYER_DROP_ROWS;
        drop_rows(dm, x, r0, n, pr->in, buf);
        la_gemm(la, nt, LA_N, LA_T, n, l->rank, pr->in, 1.0f, buf, pr->in, pr->a, pr->in,
                0.0f, xa + r0 * l->rank, l->rank);
    }
}

/* y (rows, out) = x·Wᵀ + bias + s·(X̃·Aᵀ)·Bᵀ, keeping xa = X̃·Aᵀ (X̃: lora_down). */
static void proj_forward(const layer *l, const layer_proj *pr, const la_ctx *la, int nt,
                         const float *x, int64_t rows, float *y, float *xa,
                         const drop_mask *dm, float *buf, float *wpanel)
{
    base_product(la, nt, LA_T, rows, pr, x, pr->in, 0.0f, y, pr->out, wpanel);
    if (pr->bias)
        for (int64_t i = 0; i < rows; i++)
            for (int64_t j = 0; j < pr->out; j++)
                y[i * pr->out + j] += pr->bias[j];
    if (pr->adapted) {
        lora_down(l, pr, la, nt, x, rows, dm, buf, xa);
        la_gemm(la, nt, LA_N, LA_T, rows, pr->out, l->rank, l->lora_scale, xa, l->rank,
                pr->b, l->rank, 1.0f, y, pr->out);
    }
}

/* With dropout: dA += s·(dY·B)ᵀ·X̃ and dX += s·((dY·B)·A) ⊙ keep/(1-p), block by block
 * (dx NULL: dA only). */
static void proj_backward_dropped(const layer *l, const layer_proj *pr, const la_ctx *la,
                                  int nt, const float *x, int64_t rows, const float *dyb,
                                  float *dx, const drop_mask *dm, float *buf)
{
    const float s = l->lora_scale;
    for (int64_t r0 = 0; r0 < rows; r0 += LAYER_DROP_ROWS) {
        const int64_t n = rows - r0 < LAYER_DROP_ROWS ? rows - r0 : LAYER_DROP_ROWS;
        drop_rows(dm, x, r0, n, pr->in, buf);
        la_gemm(la, nt, LA_T, LA_N, l->rank, pr->in, n, s, dyb + r0 * l->rank, l->rank, buf,
                pr->in, 1.0f, pr->da, pr->in);
        if (!dx)
            continue;
        la_gemm(la, nt, LA_N, LA_N, n, pr->in, l->rank, s * dm->scale, dyb + r0 * l->rank,
                l->rank, pr->a, pr->in, 0.0f, buf, pr->in);
        for (int64_t r = 0; r < n; r++) {
            const uint64_t rk = drop_row_key(dm, r0 + r);
            float *dxr = dx + (r0 + r) * pr->in;
            const float *br = buf + r * pr->in;
            for (int64_t c = 0; c < pr->in; c++)
                if (drop_kept(dm, rk, c))
                    dxr[c] += br[c];
        }
    }
}

/* From dY (rows, out): dA += s·(dY·B)ᵀ·X̃, dB += s·dYᵀ·XA, and dX = (or +=) dY·W + the
 * LoRA path (dY·W_eff without dropout). */
static void proj_backward(const layer *l, const layer_proj *pr, const la_ctx *la, int nt,
                          const float *x, const float *xa, int64_t rows, const float *dy,
                          float *dx, int accumulate, float *dyb, const drop_mask *dm,
                          float *buf, float *wpanel)
{
    const float s = l->lora_scale;
    if (pr->adapted) {
        la_gemm(la, nt, LA_N, LA_N, rows, l->rank, pr->out, 1.0f, dy, pr->out, pr->b,
                l->rank, 0.0f, dyb, l->rank);
        if (!dm)
            la_gemm(la, nt, LA_T, LA_N, l->rank, pr->in, rows, s, dyb, l->rank, x, pr->in,
                    1.0f, pr->da, pr->in);
        la_gemm(la, nt, LA_T, LA_N, pr->out, l->rank, rows, s, dy, pr->out, xa, l->rank,
                1.0f, pr->db, l->rank);
    }
    if (dx) {
        base_product(la, nt, LA_N, rows, pr, dy, pr->out, accumulate ? 1.0f : 0.0f, dx, pr->in,
                     wpanel);
        if (pr->adapted && !dm)
            la_gemm(la, nt, LA_N, LA_N, rows, pr->in, l->rank, s, dyb, l->rank, pr->a,
                    pr->in, 1.0f, dx, pr->in);
    }
    if (pr->adapted && dm)
        proj_backward_dropped(l, pr, la, nt, x, rows, dyb, dx, dm, buf);
}

/* One projection of rows of x without dropout (decoding): proj_forward's y and xa. */
void layer_project_rows(const layer *l, int t, const la_ctx *la, int nt, const float *x,
                        int64_t rows, float *y, float *xa, float *wpanel)
{
    proj_forward(l, &l->proj[t], la, nt, x, rows, y, xa, NULL, NULL, wpanel);
}

/* ---- RoPE ----------------------------------------------------------------------------- */

#if defined(LORA_HAVE_LIBMVEC) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include "../linalg/avx512_kernels.h"
/* glibc libmvec's 8-lane double cos and sin (at most 4 ulp in double, so the float
 * they round to is the correctly rounded one but in rare ties). */
__m512d _ZGVeN8v_cos(__m512d x);
__m512d _ZGVeN8v_sin(__m512d x);
#define ROPE_VECTOR_ANGLES 1

/* c[i], s[i] = cos, sin of pos·freq[i] for the first n - n % 8 pairs; returns them. */
LA_AVX512 static int64_t rope_angles8(int64_t pos, const double *freq, int64_t n, float *c,
                                      float *s)
{
    const __m512d vp = _mm512_set1_pd((double)pos);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m512d a = _mm512_mul_pd(vp, _mm512_loadu_pd(freq + i));
        _mm256_storeu_ps(c + i, _mm512_cvtpd_ps(_ZGVeN8v_cos(a)));
        _mm256_storeu_ps(s + i, _mm512_cvtpd_ps(_ZGVeN8v_sin(a)));
    }
    return i;
}
#endif

/* c[i], s[i] = cos, sin of the angle pos·freq[i] (i < n), in double, rounded to float
 * (vector cos and sin on CPUs with AVX-512: the scalar ones cost more than the rest of
 * RoPE together). */
static void rope_angles(const layer *l, int vector, int64_t pos, int64_t n, float *c, float *s)
{
    int64_t i = 0;
#ifdef ROPE_VECTOR_ANGLES
    if (vector)
        i = rope_angles8(pos, l->rope_freqs, n, c, s);
#else
    (void)vector;
#endif
    for (; i < n; i++) {
        const double angle = (double)pos * l->rope_freqs[i];
        c[i] = (float)cos(angle);
        s[i] = (float)sin(angle);
    }
}

/* Turns `heads` heads of row x and `heads2` of row x2 (NULL: none) by position pos:
 * each pair's angle pos·inv_freq[i] in double, once, its cos and sin applied in float
 * to every head. inverse turns by -angle. vector: the CPU has AVX-512. */
static void rope_rows2(const layer *l, int vector, int64_t pos, int inverse, float *x,
                       int64_t heads, float *x2, int64_t heads2)
{
    enum { CHUNK = 64 };
    const int64_t half = l->rope_dim / 2, hd = l->head_dim;
    const int inter = l->rope == LORA_ROPE_INTERLEAVED;
    float cs[CHUNK], sn[CHUNK];
    for (int64_t i0 = 0; i0 < half; i0 += CHUNK) {
        const int64_t n = half - i0 < CHUNK ? half - i0 : CHUNK;
        rope_angles(l, vector, pos, n, cs, sn);
        for (int64_t i = i0; i < i0 + n; i++) {
            const float c = cs[i - i0], sv = inverse ? -sn[i - i0] : sn[i - i0];
            const int64_t ia = inter ? 2 * i : i, ib = inter ? 2 * i + 1 : i + half;
            for (int64_t h = 0; h < heads + heads2; h++) {
                float *v = h < heads ? x + h * hd : x2 + (h - heads) * hd;
                const float va = v[ia], vb = v[ib];
                v[ia] = va * c - vb * sv;
                v[ib] = vb * c + va * sv;
            }
        }
    }
}

static int rope_vector(const la_ctx *la)
{
#ifdef ROPE_VECTOR_ANGLES
    return la->avx512;
#else
    (void)la;
    return 0;
#endif
}

void layer_rope_row(const layer *l, const la_ctx *la, int64_t pos, float *x, int64_t heads)
{
    if (l->rope != LORA_ROPE_NONE)
        rope_rows2(l, rope_vector(la), pos, 0, x, heads, NULL, 0);
}

/* layer_rope's work, split over the pool by rows (rows are independent). */
typedef struct rope_job {
    const layer *l;
    const attn_problem *p;
    float *q, *k;
    int inverse, shared, vector;
} rope_job;

static void rope_part(void *arg, int part, int parts)
{
    const rope_job *j = arg;
    const layer *l = j->l;
    const attn_problem *p = j->p;
    const int64_t q_rows = p->batch * p->len_q, kv_rows = j->shared ? 0 : p->batch * p->len_kv;
    int64_t lo, hi;
    pool_static_range(q_rows + kv_rows, part, parts, &lo, &hi);
    for (int64_t r = lo; r < hi; r++) {
        if (r < q_rows) {
            const int64_t b = r / p->len_q, i = r % p->len_q;
            rope_rows2(l, j->vector, attn_q_pos(p, b, i), j->inverse, j->q + r * l->q_dim,
                       l->n_heads, j->shared ? j->k + r * l->kv_dim : NULL,
                       j->shared ? l->n_kv_heads : 0);
        } else {
            const int64_t rk = r - q_rows, b = rk / p->len_kv, jk = rk % p->len_kv;
            rope_rows2(l, j->vector, attn_kv_pos(p, b, jk), j->inverse, j->k + rk * l->kv_dim,
                       l->n_kv_heads, NULL, 0);
        }
    }
}

/* Rows per thread below which RoPE runs on the calling thread. */
#define ROPE_MIN_ROWS_PER_THREAD 512

void layer_rope(const layer *l, const attn_problem *p, float *q, float *k, int inverse)
{
    if (l->rope == LORA_ROPE_NONE)
        return;
    /* Q row i and K row i share their position (self-attention by default): one angle
     * table for both. */
    const int shared = p->len_q == p->len_kv && (!p->mask || p->mask->q_pos == p->mask->kv_pos);
    rope_job j = {l, p, q, k, inverse, shared, rope_vector(p->la)};
    const int64_t rows = p->batch * (p->len_q + (shared ? 0 : p->len_kv));
    const int64_t most = rows / ROPE_MIN_ROWS_PER_THREAD;
    const int64_t parts = most < p->threads ? most : p->threads;
    pool_run(p->la->pool, parts > 1 ? (int)parts : 1, rope_part, &j);
}

/* Zeroes the rows of padded queries of y (batch·len_q rows of width cols). */
static void zero_padded_rows(const attn_problem *p, float *y, int64_t cols)
{
    for (int64_t b = 0; b < p->batch && p->mask && p->mask->q_len; b++)
        for (int64_t i = attn_q_len(p, b); i < p->len_q; i++)
            memset(y + (b * p->len_q + i) * cols, 0, (size_t)cols * sizeof(float));
}

void layer_project(const layer *l, const attn_problem *p, layer_acts *a)
{
    const int64_t nq = p->batch * p->len_q, nk = p->batch * p->len_kv;
    drop_mask m[3];
    proj_forward(l, &l->proj[PROJ_Q], p->la, p->threads, a->xq, nq, a->q, a->xa[PROJ_Q],
                 drop_of(l, a, PROJ_Q, &m[0]), a->drop_buf, a->wpanel);
    proj_forward(l, &l->proj[PROJ_K], p->la, p->threads, a->xkv, nk, a->k, a->xa[PROJ_K],
                 drop_of(l, a, PROJ_K, &m[1]), a->drop_buf, a->wpanel);
    proj_forward(l, &l->proj[PROJ_V], p->la, p->threads, a->xkv, nk, a->v, a->xa[PROJ_V],
                 drop_of(l, a, PROJ_V, &m[2]), a->drop_buf, a->wpanel);
    layer_rope(l, p, a->q, a->k, 0);
}

void layer_attend(const layer *l, const attn_group_plan *plan, const attn_problem *p,
                  layer_acts *a, float *out, float *ws, double *measured)
{
    const int64_t nq = p->batch * p->len_q;
    attn_dispatch_forward(p, plan, a->q, a->k, a->v, a->attn, a->row_stat,
                          ws + layer_scratch_floats(l, p));
    *measured = attn_dispatch_measure(p, plan, a->q, a->k, a->v, a->attn, NULL, NULL, ws);
    drop_mask m;
    if (l->out_proj)
        proj_forward(l, &l->proj[PROJ_O], p->la, p->threads, a->attn, nq, out,
                     a->xa[PROJ_O], drop_of(l, a, PROJ_O, &m), a->drop_buf, a->wpanel);
    else
        memcpy(out, a->attn, (size_t)nq * (size_t)l->q_dim * sizeof(float));
    zero_padded_rows(p, out, l->out_proj ? l->d_model : l->q_dim);
}


static double max3(double a, double b, double c)
{
    return a > b ? (a > c ? a : c) : (b > c ? b : c);
}

/* Magnitudes the error bounds read off the saved forward. */
typedef struct bound_inputs {
    double qm, km, vm;   /* max |Q|, |K|, |V| */
    double d, lq, group; /* head_dim, len_q, query heads per kv head */
    double beta, s, rank;
    size_t nq, nk;       /* query and key rows */
    double rope_q, rope_k; /* rope_gain of the query and of the key rows */
    double drop;         /* 1/(1 − p) when the forward dropped the LoRA inputs, else 1 */
} bound_inputs;

/* What turning dQ or dK back (RoPE's inverse) does to an entrywise error bound e: a
 * pair (a, b) turned by −θ becomes (e_a·cos θ + e_b·sin θ, e_b·cos θ − e_a·sin θ), so
 * each entry is at most (|cos θ| + |sin θ|)·e, up to √2 (θ = π/4). The largest such
 * factor over the angles pos·inv_freq[i] the rows of one side (keys: the key rows) were
 * turned by; 1 without RoPE. */
static double rope_gain(const layer *l, const attn_problem *p, int keys)
{
    double gain = 1.0;
    const int64_t rows = keys ? p->len_kv : p->len_q, half = l->rope_dim / 2;
    for (int64_t b = 0; l->rope != LORA_ROPE_NONE && b < p->batch; b++)
        for (int64_t i = 0; i < rows; i++) {
            const int64_t pos = keys ? attn_kv_pos(p, b, i) : attn_q_pos(p, b, i);
            for (int64_t f = 0; f < half; f++) {
                const double angle = (double)pos * l->rope_freqs[f]; /* as rope_rows2 */
                gain = fmax(gain, fabs((double)(float)cos(angle)) +
                                      fabs((double)(float)sin(angle)));
            }
        }
    return gain;
}

static bound_inputs bound_inputs_of(const layer *l, const attn_problem *p,
                                    const layer_acts *a)
{
    bound_inputs b;
    b.nq = (size_t)(p->batch * p->len_q);
    b.nk = (size_t)(p->batch * p->len_kv);
    b.qm = la_max_abs(a->q, b.nq * (size_t)l->q_dim);
    b.km = la_max_abs(a->k, b.nk * (size_t)l->kv_dim);
    b.vm = la_max_abs(a->v, b.nk * (size_t)l->kv_dim);
    b.d = (double)l->head_dim;
    b.lq = (double)p->len_q;
    b.group = (double)(l->n_heads / l->n_kv_heads);
    b.beta = fabs(l->softmax_scale);
    b.s = fabs(l->lora_scale);
    b.rank = (double)l->rank;
    b.rope_q = rope_gain(l, p, 0);
    b.rope_k = rope_gain(l, p, 1);
    b.drop = a->dropout ? 1.0 / (1.0 - l->dropout) : 1.0;
    return b;
}

/* Errors ey[t] (entrywise) of dY of the Q, K, V projections carried to every adapter
 * gradient and dx entry they reach: the largest such bound. Each projection gradient
 * multiplies its dY error by the sizes and magnitudes of its other factors (dW = s·B·A
 * chain); dx sums the three paths. Dropout: the LoRA branch saw X̃ = X ⊙ keep/(1 − p),
 * so dA's |X̃| and dx's LoRA path grow by 1/(1 − p) (dB reads X̃·Aᵀ as saved). */
static double proj_chain_bound(const layer *l, const layer_acts *a, const bound_inputs *in,
                               const double ey[PROJ_O])
{
    double bound = 0.0, dx = 0.0;
    for (int t = PROJ_Q; t <= PROJ_V; t++) {
        const layer_proj *pr = &l->proj[t];
        const size_t rows = t == PROJ_Q ? in->nq : in->nk;
        const double xm = la_max_abs(t == PROJ_Q ? a->xq : a->xkv, rows * (size_t)pr->in) *
                          (pr->adapted ? in->drop : 1.0);
        const double wm = la_wmat_max_abs(pr->weight, (size_t)(pr->out * pr->in));
        double weff = wm;
        if (pr->adapted) {
            const double bm = la_max_abs(pr->b, (size_t)(pr->out * l->rank));
            const double am = la_max_abs(pr->a, (size_t)(l->rank * pr->in));
            const double xam = la_max_abs(a->xa[t], rows * (size_t)l->rank);
            bound = max3(bound, in->s * (double)rows * (double)pr->out * ey[t] * bm * xm,
                         in->s * (double)rows * ey[t] * xam);
            weff += in->s * in->rank * bm * am * in->drop;
        }
        dx += (double)pr->out * ey[t] * weff;
    }
    return bound > dx ? bound : dx;
}

/* dY errors of Q, K, V from one of dS: row ℓ1 norm ds_row; dQ = β·dS·K,
 * dK = β·dSᵀ·Q (column sums over Lq rows and G query heads), turned back by RoPE
 * (rope_gain), plus dV's error dv. */
static void attn_dy_errors(const bound_inputs *in, double ds_row, double dv,
                           double ey[PROJ_O])
{
    ey[PROJ_Q] = in->beta * ds_row * in->km * in->rope_q;
    ey[PROJ_K] = in->beta * ds_row * in->lq * in->group * in->qm * in->rope_k;
    ey[PROJ_V] = dv;
}

/* Gradients of the output projection's factors when dout carries error g and C error
 * c (entrywise): dA_O = s·(dout·B_O)ᵀ·C̃, dB_O = s·doutᵀ·(C̃·A_Oᵀ), C̃ = C or, with
 * dropout, C ⊙ keep/(1 − p) (its error c/(1 − p)). 0 unless O is adapted. */
static double out_adapter_bound(const layer *l, const bound_inputs *in, double g, double c)
{
    const layer_proj *po = &l->proj[PROJ_O];
    if (!l->out_proj || !po->adapted)
        return 0.0;
    const double bm = la_max_abs(po->b, (size_t)(po->out * l->rank));
    const double am = la_max_abs(po->a, (size_t)(l->rank * po->in));
    const double nq = (double)in->nq, cd = c * in->drop;
    return fmax(in->s * nq * (double)po->out * g * bm * cd,
                in->s * nq * g * (double)po->in * am * cd);
}

/* MATH §4 made concrete, for the given dout. With |F̃ − F| <= η·F entrywise and
 * D = d·max|dO|·max|V| bounding |dP|: |ρ̃ − ρ| <= η·D, so each row of dS̃ − dS has ℓ1
 * norm <= η(3 + η)·D. Then per entry: dQ <= β·η(3+η)·D·max|K|; dK <= β·η(3+η)·D·Lq·G·
 * max|Q| and dV <= η·Lq·G·max|dO| (column sums of F are at most Lq, G query heads per
 * kv head); the attention output carries η·max|V| into the output projection's
 * factors. */
static double grad_error_bound(const layer *l, const layer_acts *a, const bound_inputs *in,
                               const float *dattn, const float *dout, double eta)
{
    const double gm = la_max_abs(dattn, in->nq * (size_t)l->q_dim);
    double ey[PROJ_O];
    attn_dy_errors(in, eta * (3.0 + eta) * in->d * gm * in->vm, eta * in->lq * in->group * gm,
                   ey);
    double bound = proj_chain_bound(l, a, in, ey);
    if (l->out_proj) {
        const double gom = la_max_abs(dout, in->nq * (size_t)l->proj[PROJ_O].out);
        bound = fmax(bound, out_adapter_bound(l, in, gom, eta * in->vm));
    }
    return bound;
}

/* Largest ℓ1 norms of the rows and of the columns of W + s·B·A, bounded through
 * |B·A| <= |B|·|A|: rows by ‖W_o‖₁ + s·‖B_o‖₁·max_r‖A_r‖₁, columns likewise; drop
 * (1/(1 − p) under dropout) scales the LoRA part, whose input was X̃. */
static void weff_l1_norms(const layer *l, const layer_proj *pr, double drop,
                          double *row_max, double *col_max)
{
    double a_row = 0.0, b_col = 0.0; /* max_r ‖A_r,:‖₁, max_r ‖B_:,r‖₁ */
    if (pr->adapted)
        for (int64_t r = 0; r < l->rank; r++) {
            double sa = 0.0, sb = 0.0;
            for (int64_t c = 0; c < pr->in; c++)
                sa += fabs(pr->a[r * pr->in + c]);
            for (int64_t o = 0; o < pr->out; o++)
                sb += fabs(pr->b[o * l->rank + r]);
            a_row = fmax(a_row, sa);
            b_col = fmax(b_col, sb);
        }
    const double s = fabs(l->lora_scale) * drop;
    *row_max = *col_max = 0.0;
    for (int64_t o = 0; o < pr->out; o++) {
        double w = 0.0, b = 0.0;
        for (int64_t c = 0; c < pr->in; c++)
            w += fabs(la_wmat_at(pr->weight, (size_t)(o * pr->in + c)));
        for (int64_t r = 0; pr->adapted && r < l->rank; r++)
            b += fabs(pr->b[o * l->rank + r]);
        *row_max = fmax(*row_max, w + s * b * a_row);
    }
    for (int64_t c = 0; c < pr->in; c++) {
        double w = 0.0, a = 0.0;
        for (int64_t o = 0; o < pr->out; o++)
            w += fabs(la_wmat_at(pr->weight, (size_t)(o * pr->in + c)));
        for (int64_t r = 0; pr->adapted && r < l->rank; r++)
            a += fabs(pr->a[r * pr->in + c]);
        *col_max = fmax(*col_max, w + s * b_col * a);
    }
}

/* The loss term of the certificate (docs/math.md, "The gradient of the true loss").
 * With dout = out~ − Y (lora_mse_loss on the approximate output) in place of the true
 * out − Y, dout is off by Δ = out~ − out, |Δ| <= ε = η·max|V| (times W_O's largest row
 * ℓ1 norm with an output projection). The exact gradient map is linear in dout, so
 * the extra error is that map applied to Δ: |dP| <= d·m·max|V| and |ρ| likewise with m
 * the bound on dC = Δ·W_O, so dS has row ℓ1 norm <= 2·d·m·max|V|; dV = Pᵀ·Δ <= Lq·G·m;
 * the exact C = P·V is at most max|V|. */
static double loss_error_term(const layer *l, const layer_acts *a, const bound_inputs *in,
                              double eta)
{
    double eps = eta * in->vm, m = eps;
    if (l->out_proj) {
        double row_max, col_max;
        weff_l1_norms(l, &l->proj[PROJ_O], in->drop, &row_max, &col_max);
        eps *= row_max;
        m = eps * col_max;
    }
    double ey[PROJ_O];
    attn_dy_errors(in, 2.0 * in->d * m * in->vm, in->lq * in->group * m, ey);
    return fmax(proj_chain_bound(l, a, in, ey), out_adapter_bound(l, in, eps, in->vm));
}

void layer_backward(const layer *l, const attn_group_plan *plan, const attn_problem *p,
                    const layer_acts *a, float *dout, float *dxq, float *dxkv,
                    float *ws, double eta, double *grad_bound, double *loss_grad_bound,
                    double *measured)
{
    drop_mask m[PROJ_COUNT];
    zero_padded_rows(p, dout, l->out_proj ? l->d_model : l->q_dim);
    const la_ctx *la = p->la;
    const int nt = p->threads;
    const int64_t nq = p->batch * p->len_q, nk = p->batch * p->len_kv;
    /* dC (the attention output's gradient) only exists with an output projection */
    float *dc = ws + attn_measure_scratch_floats(p);
    float *dq = dc + (l->out_proj ? nq * l->q_dim : 0), *dk = dq + nq * l->q_dim;
    float *dv = dk + nk * l->kv_dim, *dyb = dv + nk * l->kv_dim;
    const float *dattn = dout;
    if (l->out_proj) {
        proj_backward(l, &l->proj[PROJ_O], la, nt, a->attn, a->xa[PROJ_O], nq, dout, dc, 0,
                      dyb, drop_of(l, a, PROJ_O, &m[PROJ_O]), a->drop_buf, a->wpanel);
        dattn = dc;
    }
    attn_dispatch_backward(p, plan, a->q, a->k, a->v, a->attn, a->row_stat, dattn, dq, dk,
                           dv, ws + layer_scratch_floats(l, p));
    *measured = attn_dispatch_measure(p, plan, a->q, a->k, a->v, a->attn, dattn, dq, ws);
    layer_rope(l, p, dq, dk, 1);
    const int shared_dx = dxq != NULL && dxq == dxkv;
    proj_backward(l, &l->proj[PROJ_Q], la, nt, a->xq, a->xa[PROJ_Q], nq, dq, dxq, 0, dyb,
                  drop_of(l, a, PROJ_Q, &m[PROJ_Q]), a->drop_buf, a->wpanel);
    proj_backward(l, &l->proj[PROJ_K], la, nt, a->xkv, a->xa[PROJ_K], nk, dk, dxkv,
                  shared_dx, dyb, drop_of(l, a, PROJ_K, &m[PROJ_K]), a->drop_buf, a->wpanel);
    proj_backward(l, &l->proj[PROJ_V], la, nt, a->xkv, a->xa[PROJ_V], nk, dv, dxkv, 1, dyb,
                  drop_of(l, a, PROJ_V, &m[PROJ_V]), a->drop_buf, a->wpanel);
    *grad_bound = *loss_grad_bound = 0.0;
    if (eta > 0.0 && !isfinite(eta)) /* no certificate (δ >= 1); avoids ∞·0 at dout = 0 */
        *grad_bound = *loss_grad_bound = INFINITY;
    else if (eta > 0.0) {
        const bound_inputs in = bound_inputs_of(l, p, a);
        *grad_bound = grad_error_bound(l, a, &in, dattn, dout, eta);
        *loss_grad_bound = *grad_bound + loss_error_term(l, a, &in, eta);
    }
}
