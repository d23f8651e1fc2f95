/* Exact softmax attention (MATH §2) in FlashAttention-2 order: queries and keys are
 * cut into tiles of ATTN_BQ × ATTN_BK and nothing of size len_q × len_kv is ever
 * formed. The forward runs an online softmax over the key tiles of each query block
 * and keeps the output and one log-sum-exp per row; the backward recomputes each
 * tile's probabilities from the log-sum-exp. Only tiles with a visible pair are
 * computed (masks below): causal attention skips the tiles above the diagonal, and
 * padding, windows and segments skip theirs. Working memory: a few tiles per worker (0.6 MB at head_dim 64), plus,
 * when one (batch, kv head) is split over workers, dQ partials of at most
 * ATTN_SPLIT_ROWS rows (1.8 MB at 2 threads, head_dim 64). Nothing grows with
 * len_q·len_kv.
 *
 * Two implementations of the tiles, same order of work:
 * - fused (CPUs with AVX-512, head_dim a multiple of 16): register-blocked FMA kernels
 *   (src/linalg/avx512_kernels.h) read the operands where they lie, so the softmax
 *   output feeds the next product without a packing pass. BLIS products cost ~30%
 *   more here, most of it in packing the freshly computed P and dS tiles.
 * - BLIS (everything else, and the reference the fused one is tested against): each
 *   product is one single-threaded BLIS call (src/linalg).
 * The elementwise softmax work is vectorised with glibc's libmvec vector expf when the
 * build has it (LORA_HAVE_LIBMVEC); the BLIS path's kernels have an AVX-512 clone
 * chosen at load time.
 *
 * Parallelism and determinism. Forward: one work unit per (batch, head, query block);
 * each unit's arithmetic is fixed, so the schedule does not change the result.
 * Backward: with at least as many (batch, kv head) tasks as threads (and a balanced
 * split), each task is run by one worker and writes its dQ, dK, dV alone. Otherwise
 * the tasks run one after another and the key blocks of a task are dealt by a fixed
 * rule to slots that the workers take dynamically; a slot owns its dK, dV rows and adds
 * into its own dQ partial, and the partials are summed in slot order (exact_backward).
 * Results are bitwise identical for a given thread count (not across thread counts). */
#include <math.h>
#include <string.h>

#include "../linalg/avx512_kernels.h"
#include "backend.h"


/* Tile sizes: S and dP tiles of ATTN_BQ × ATTN_BK floats stay in L2 (2 × 256 KB), and
 * ATTN_BK, ATTN_BQ are at most BLIS's KC for sgemm on x86-64 (384), so the BLIS
 * products that sum over a tile run in one pass. Multiples of 16 (the fused path's
 * vector length). 256 and 384 measured alike for the fused path; 256 uses less memory
 * and wastes less on causal diagonal tiles. -D overrides, for experiments. */
#ifndef ATTN_BQ
#define ATTN_BQ 256
#endif
#ifndef ATTN_BK
#define ATTN_BK 256
#endif

/* Probabilities below PROB_FLUSH = 2^-64 are set to 0. A row's sum is at least 1, so
 * what is dropped is below 2^-64·len_kv, far under float rounding; and it keeps the
 * block products clear of subnormal numbers, which stall the FMA units (a BLIS sgemm
 * on operands near FLT_MIN runs 20 to 200 times slower here). EXP_CLAMP keeps glibc's
 * vector expf on its fast path (it falls back to scalar code below -87.3). */
#define PROB_FLUSH 5.42101086e-20f /* 2^-64 */
#define EXP_CLAMP (-87.0f)

#if defined(LORA_HAVE_LIBMVEC) && defined(__x86_64__)
/* glibc's libmvec has vector variants of expf (_ZGVbN4v_expf ... _ZGVeN16v_expf);
 * declaring them lets the `omp simd` loops below call them (the build's -fopenmp-simd
 * honours the simd pragmas; no OpenMP runtime is involved). <math.h> only does so
 * under -ffast-math. */
#pragma omp declare simd notinbranch
extern float expf(float);
#endif
#if defined(__clang__)
/* clang 14 does not call the declared vector variants (it would need -fveclib=libmvec):
 * the expf loops stay scalar there, which is correct but slower. Not worth a warning. */
#pragma clang diagnostic ignored "-Wpass-failed"
#endif

#if defined(__x86_64__) && defined(__GNUC__) && defined(__gnu_linux__)
/* An AVX-512 clone and a baseline one of each tile kernel, picked at load time. */
#define TILE_KERNEL __attribute__((target_clones("avx512f", "default")))
#else
#define TILE_KERNEL
#endif

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---- masks: which tiles run, and which entries of a tile are hidden --------------- *
 * A tile is a block of query rows against a block of key rows of one batch element.
 * Only valid rows (right padding) are computed: a block's span is its valid rows with
 * the range of their positions and segment ids. From two spans a tile is skipped (no
 * pair visible), full (every pair visible) or partial (hidden scores set to -inf before
 * the softmax, which then gives them probability 0). So the work follows the visible
 * pairs: padding, other segments and keys outside the window cost nothing. */
typedef struct tile_span {
    int64_t n;              /* valid rows, a prefix of the block */
    int64_t pos_lo, pos_hi; /* over the valid rows */
    int32_t seg_lo, seg_hi;
} tile_span;

enum { TILE_SKIP = 0, TILE_FULL = 1, TILE_PARTIAL = 2 };

/* Span of rows [r0, r0 + n) of batch element b: keys when kv, else queries. */
static tile_span span_of(const attn_problem *p, int kv, int64_t b, int64_t r0, int64_t n)
{
    const int64_t len = kv ? attn_kv_len(p, b) : attn_q_len(p, b);
    tile_span t = {.n = len - r0 < n ? len - r0 : n};
    if (t.n <= 0) {
        t.n = 0;
        return t;
    }
    const attn_mask *m = p->mask;
    const int64_t *pos = !m ? NULL : kv ? m->kv_pos : m->q_pos;
    const int32_t *seg = !m ? NULL : kv ? m->kv_seg : m->q_seg;
    const int64_t row0 = b * (kv ? p->len_kv : p->len_q) + r0;
    if (pos) {
        t.pos_lo = t.pos_hi = pos[row0];
        for (int64_t r = 1; r < t.n; r++) {
            t.pos_lo = pos[row0 + r] < t.pos_lo ? pos[row0 + r] : t.pos_lo;
            t.pos_hi = pos[row0 + r] > t.pos_hi ? pos[row0 + r] : t.pos_hi;
        }
    } else {
        t.pos_lo = (kv ? 0 : p->len_kv - p->len_q) + r0;
        t.pos_hi = t.pos_lo + t.n - 1;
    }
    if (seg) {
        t.seg_lo = t.seg_hi = seg[row0];
        for (int64_t r = 1; r < t.n; r++) {
            t.seg_lo = seg[row0 + r] < t.seg_lo ? seg[row0 + r] : t.seg_lo;
            t.seg_hi = seg[row0 + r] > t.seg_hi ? seg[row0 + r] : t.seg_hi;
        }
    }
    return t;
}

/* TILE_SKIP, TILE_FULL or TILE_PARTIAL for queries q against keys k. */
static int tile_class(const attn_problem *p, const tile_span *q, const tile_span *k)
{
    if (q->n == 0 || k->n == 0 || q->seg_hi < k->seg_lo || k->seg_hi < q->seg_lo)
        return TILE_SKIP;
    /* d = pos_i - pos_j ranges over [dlo, dhi]; visibility is an interval of d. */
    const int64_t dlo = q->pos_lo - k->pos_hi, dhi = q->pos_hi - k->pos_lo;
    const int64_t w = p->window;
    if (p->causal ? (dhi < 0 || (w > 0 && dlo >= w)) : (w > 0 && (dlo >= w || -dhi >= w)))
        return TILE_SKIP;
    const int one_segment = q->seg_lo == q->seg_hi && k->seg_lo == k->seg_hi &&
                            q->seg_lo == k->seg_lo;
    const int all_near = p->causal ? dlo >= 0 && (w <= 0 || dhi < w)
                                   : w <= 0 || (dhi < w && -dlo < w);
    return one_segment && all_near ? TILE_FULL : TILE_PARTIAL;
}

/* Hides the pairs of a partial tile: s[r·rs + c·cs] = -inf for query i0 + r (r < nq)
 * and key j0 + c (c < nk) that it does not see (all rows valid). seen (NULL: not
 * wanted): seen[r] = 1 when query r sees a key of the tile. */
static void tile_mask(const attn_problem *p, int64_t b, int64_t i0, int64_t nq, int64_t j0,
                      int64_t nk, float *s, int64_t rs, int64_t cs, float *seen)
{
    for (int64_t r = 0; r < nq; r++) {
        const int64_t pi = attn_q_pos(p, b, i0 + r);
        const int32_t si = attn_q_seg(p, b, i0 + r);
        int any = 0;
        for (int64_t c = 0; c < nk; c++) {
            if (attn_kv_seg(p, b, j0 + c) != si ||
                !attn_distance_visible(p, pi - attn_kv_pos(p, b, j0 + c)))
                s[r * rs + c * cs] = -INFINITY;
            else
                any = 1;
        }
        if (seen && any)
            seen[r] = 1.0f;
    }
}

/* ---- elementwise tile kernels ----------------------------------------------------- */

/* x[j] = exp(x[j] - shift) for j < n. Two loops: GCC vectorises the expf call (into
 * libmvec) only when no select feeds it. Inlined into the kernels' clones. */
static inline __attribute__((always_inline)) void exp_shifted(float *restrict x, int64_t n,
                                                              float shift)
{
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        const float t = x[j] - shift;
        x[j] = isgreater(t, EXP_CLAMP) ? t : EXP_CLAMP;
    }
#pragma omp simd
    for (int64_t j = 0; j < n; j++)
        x[j] = expf(x[j]);
}

/* dst[q] = exp(a[q] - b[q]) for q < n, clamped as exp_shifted (dst may alias a). */
static inline __attribute__((always_inline)) void exp_diff(float *dst, const float *a,
                                                           const float *restrict b,
                                                           int64_t n)
{
#pragma omp simd
    for (int64_t q = 0; q < n; q++) {
        const float t = a[q] - b[q];
        dst[q] = isgreater(t, EXP_CLAMP) ? t : EXP_CLAMP;
    }
#pragma omp simd
    for (int64_t q = 0; q < n; q++)
        dst[q] = expf(dst[q]);
}

/* Online softmax over one tile. s (bq × bk, row stride bk) holds scaled scores (-inf
 * where hidden); on return it holds exp(s - m_new), 0 where hidden. m, l: running row
 * max and sum, updated (a row that has seen only hidden keys keeps m = -inf, l = 0);
 * o (bq × d, row stride ldo): the output accumulator, rescaled by exp(m_old - m_new)
 * unless first (then m, l start here). The exponent's clamp turns -inf - -inf (NaN)
 * into a flushed 0 too. */
TILE_KERNEL
static void tile_online_softmax(float *restrict s, int64_t bq, int64_t bk,
                                float *restrict m, float *restrict l, float *restrict o,
                                int64_t ldo, int64_t d, int first)
{
    for (int64_t r = 0; r < bq; r++) {
        float *restrict row = s + r * bk;
        const int64_t vis = bk;
        float mx = first ? -INFINITY : m[r];
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < vis; j++)
            mx = row[j] > mx ? row[j] : mx;
        exp_shifted(row, vis, mx);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < vis; j++) {
            const float pj = isgreaterequal(row[j], PROB_FLUSH) ? row[j] : 0.0f;
            row[j] = pj;
            sum += pj;
        }
        if (first) {
            l[r] = sum;
        } else {
            float scale = expf(m[r] - mx);
            scale = scale >= PROB_FLUSH ? scale : 0.0f;
            l[r] = l[r] * scale + sum;
            if (scale != 1.0f) {
                float *restrict orow = o + r * ldo;
#pragma omp simd
                for (int64_t c = 0; c < d; c++)
                    orow[c] *= scale;
            }
        }
        m[r] = mx;
    }
}

/* Backward tile: s (scaled, capped scores, -inf where hidden) becomes
 * P = exp(s - lse_r) and dp (dO·Vᵀ) becomes dS = P ⊙ (dP - ρ_r), times the softcap's
 * derivative 1 - (s/cap)² when cap > 0 (s = cap·tanh(S/cap)); both 0 where hidden.
 * Rows stride ld, bk columns each. */
TILE_KERNEL
static void tile_backward_probs(float *restrict s, float *restrict dp, int64_t ld,
                                int64_t bq, int64_t bk, float cap,
                                const float *restrict lse, const float *restrict rho)
{
    const float inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
    for (int64_t r = 0; r < bq; r++) {
        float *restrict prow = s + r * ld, *restrict dsrow = dp + r * ld;
        const float rr = rho[r];
        if (cap > 0.0f) {
#pragma omp simd
            for (int64_t j = 0; j < bk; j++) {
                const float t = prow[j] * inv_cap; /* -inf where hidden: factor 0 */
                dsrow[j] = (dsrow[j] - rr) * (1.0f - fminf(t * t, 1.0f));
            }
        } else {
#pragma omp simd
            for (int64_t j = 0; j < bk; j++)
                dsrow[j] -= rr;
        }
        exp_shifted(prow, bk, lse[r]);
#pragma omp simd
        for (int64_t j = 0; j < bk; j++) {
            const float pj = isgreaterequal(prow[j], PROB_FLUSH) ? prow[j] : 0.0f;
            prow[j] = pj;
            dsrow[j] *= pj;
        }
    }
}

/* Gemma 2's cap on scaled scores: x <- cap·tanh(x/cap) for n entries, through
 * tanh(y) = sign(y)·(1 - e)/(1 + e), e = exp(-2|y|) (no overflow; vector expf). */
TILE_KERNEL
static void tile_softcap(float *restrict x, int64_t n, float cap)
{
    const float inv = 1.0f / cap;
    float e[64];
    for (int64_t j0 = 0; j0 < n; j0 += 64) {
        const int64_t m = n - j0 < 64 ? n - j0 : 64;
        float *restrict xj = x + j0;
#pragma omp simd
        for (int64_t j = 0; j < m; j++)
            e[j] = -2.0f * fabsf(xj[j] * inv);
        exp_shifted(e, m, 0.0f);
#pragma omp simd
        for (int64_t j = 0; j < m; j++)
            xj[j] = copysignf(cap * ((1.0f - e[j]) / (1.0f + e[j])), xj[j]);
    }
}

/* A computed tile's scores, as the products left them, made ready for the softmax:
 * capped (count entries from s), then hidden pairs set to -inf (partial tiles; s[r·rs
 * + c·cs] holds query i0 + r against key j0 + c). seen: as tile_mask's, NULL or set
 * for every row of a full tile. */
static void prepare_scores(const attn_problem *p, int cls, int64_t b, int64_t i0, int64_t nq,
                           int64_t j0, int64_t nk, float *s, int64_t rs, int64_t cs,
                           int64_t count, float *seen)
{
    if (p->softcap > 0.0f)
        tile_softcap(s, count, p->softcap);
    if (cls == TILE_PARTIAL)
        tile_mask(p, b, i0, nq, j0, nk, s, rs, cs, seen);
    else if (seen)
        for (int64_t r = 0; r < nq; r++)
            seen[r] = 1.0f;
}

/* The end of a query block's forward: rows r < nv that saw a key (seen[r] = 1) are
 * divided by their sum l and get lse = m + log l (non-finite scores, l = 0, give NaN as
 * they should); the others (no visible key, padding up to rows) get output 0 and
 * lse = +inf, so the backward's P = 0. */
TILE_KERNEL
static void finish_rows(const float *m, const float *l, const float *seen, int64_t nv,
                        int64_t rows, float *o, int64_t ldo, int64_t d, float *lse)
{
    for (int64_t r = 0; r < rows; r++) {
        float *restrict orow = o + r * ldo;
        if (r >= nv || seen[r] == 0.0f) {
            memset(orow, 0, (size_t)d * sizeof(float));
            lse[r] = INFINITY;
            continue;
        }
        const float inv = 1.0f / l[r];
#pragma omp simd
        for (int64_t c = 0; c < d; c++)
            orow[c] *= inv;
        lse[r] = m[r] + logf(l[r]);
    }
}

/* ρ_i = ⟨dO_i, O_i⟩ for bq rows. */
TILE_KERNEL
static void rows_dot(const float *restrict a, const float *restrict b, int64_t ld,
                     int64_t bq, int64_t d, float *restrict out)
{
    for (int64_t r = 0; r < bq; r++) {
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < d; c++)
            acc += a[r * ld + c] * b[r * ld + c];
        out[r] = acc;
    }
}

/* ---- work split ------------------------------------------------------------------- */

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

/* The fused AVX-512 tiles (below) run when the CPU has AVX-512 and head_dim is a whole
 * number of vectors; otherwise the tiles are BLIS products. Building with
 * -DLORA_EXACT_BLIS_TILES forces the BLIS tiles (for comparison). */
static int use_fused(const attn_problem *p)
{
#if defined(LA_HAVE_AVX512_KERNELS) && !defined(LORA_EXACT_BLIS_TILES)
    return p->la->avx512 && p->head_dim % 16 == 0;
#else
    (void)p;
    return 0;
#endif
}

/* Per-worker scratch in floats: S and dP tiles, four row vectors, and for the fused
 * path the transposed Q block (forward) or K and V blocks (backward). Every part is a
 * multiple of 16 floats, so each starts 64-byte aligned. */
static size_t tile_floats(const attn_problem *p)
{
    size_t n = 2u * ATTN_BQ * ATTN_BK + 4u * ATTN_BQ;
    if (use_fused(p))
        n += 2u * (size_t)p->head_dim * ATTN_BK;
    return n;
}

/* Key-split mode (below): the key blocks of a task are dealt to a fixed number of slots
 * (work queues with a dQ partial each) that the workers take dynamically, and the query
 * rows go in chunks of ATTN_SPLIT_ROWS, so a partial holds at most that many rows. */
#define ATTN_SPLIT_ROWS (4 * ATTN_BQ)
#define ATTN_SLOTS_PER_THREAD 4

static int64_t split_slots(const attn_problem *p)
{
    return min64(ceil_div(p->len_kv, ATTN_BK), ATTN_SLOTS_PER_THREAD * (int64_t)p->threads);
}

/* Backward mode: whole (batch, kv head) tasks per worker when that keeps every worker
 * busy, else the key blocks of each task are split over the workers. */
static int backward_splits_keys(const attn_problem *p)
{
    const int64_t tasks = p->batch * p->n_kv_heads;
    if (p->threads <= 1)
        return 0;
    return !(tasks % p->threads == 0 || tasks >= 4 * (int64_t)p->threads);
}

static size_t exact_workspace_size(const attn_problem *p)
{
    size_t n = (size_t)p->threads * tile_floats(p);
    if (backward_splits_keys(p)) {
        const size_t group = (size_t)(p->n_heads / p->n_kv_heads);
        n += (size_t)(split_slots(p) - 1) * (size_t)min64(p->len_q, ATTN_SPLIT_ROWS) *
             group * (size_t)p->head_dim;
    }
    return n * sizeof(float);
}

typedef struct tile_ws {
    float *s, *dp;                /* ATTN_BQ × ATTN_BK */
    float *m, *l, *rho, *scale;   /* ATTN_BQ each */
    float *packed;                /* fused path: 2 × head_dim × ATTN_BK */
} tile_ws;

static tile_ws worker_ws(const attn_problem *p, void *ws, int worker)
{
    float *base = (float *)ws + (size_t)worker * tile_floats(p);
    tile_ws t = {.s = base, .dp = base + ATTN_BQ * ATTN_BK};
    t.m = t.dp + ATTN_BQ * ATTN_BK;
    t.l = t.m + ATTN_BQ;
    t.rho = t.l + ATTN_BQ;
    t.scale = t.rho + ATTN_BQ;
    t.packed = t.scale + ATTN_BQ;
    return t;
}

#ifdef LA_HAVE_AVX512_KERNELS
/* ---- fused AVX-512 tiles ---------------------------------------------------------- *
 * Every tile product is one la_tile_product call on operands as they lie: the kernels
 * broadcast one operand from any layout (avx512_kernels.h), so only Qᵀ (forward, once
 * per query block) and Kᵀ, Vᵀ (backward, once per key block) are transposed, and the
 * probabilities go from the softmax straight into the next product. Layouts:
 *   forward:  Sᵀ, P as [key][query]  (lanes run over queries: the online softmax's
 *             row max and sum are lane-wise), O rows accumulate in place.
 *   backward: S, P, dP, dS as [query][key]; dV, dK rows and dQ rows accumulate in place.
 */

/* dst[c·rows_pad + r] = src[r·ld + c] for r < rows, c < cols; 0 for rows <= r < rows_pad. */
LA_AVX512 static void pack_transposed(const float *src, int64_t ld, int64_t rows,
                                      int64_t rows_pad, int64_t cols, float *restrict dst)
{
    for (int64_t c = 0; c < cols; c++) {
        float *restrict col = dst + c * rows_pad;
        for (int64_t r = 0; r < rows; r++)
            col[r] = src[r * ld + c];
        for (int64_t r = rows; r < rows_pad; r++)
            col[r] = 0.0f;
    }
}

/* Online softmax over a transposed tile: st has bk rows (keys) of n <= ATTN_BQ floats
 * (queries) holding scaled scores (-inf where hidden); it becomes exp(st - m_new) per
 * query, 0 where hidden. m, l: running max and sum per query, updated; scale receives
 * exp(m_old - m_new) (not set when first). As tile_online_softmax for hidden rows. */
LA_AVX512 static void fused_online_softmax(float *restrict st, int64_t bk, int64_t n,
                                           float *restrict m, float *restrict l,
                                           float *restrict scale, int first)
{
    float mx[ATTN_BQ], sum[ATTN_BQ];
#pragma omp simd
    for (int64_t q = 0; q < n; q++) {
        mx[q] = first ? -INFINITY : m[q];
        sum[q] = 0.0f;
    }
    for (int64_t kk = 0; kk < bk; kk++) {
        const float *restrict row = st + kk * n;
#pragma omp simd
        for (int64_t q = 0; q < n; q++)
            mx[q] = row[q] > mx[q] ? row[q] : mx[q];
    }
    for (int64_t kk = 0; kk < bk; kk++) {
        float *restrict row = st + kk * n;
        exp_diff(row, row, mx, n);
#pragma omp simd
        for (int64_t q = 0; q < n; q++) {
            row[q] = isgreaterequal(row[q], PROB_FLUSH) ? row[q] : 0.0f;
            sum[q] += row[q];
        }
    }
    if (first) {
#pragma omp simd
        for (int64_t q = 0; q < n; q++) {
            l[q] = sum[q];
            m[q] = mx[q];
        }
        return;
    }
    exp_diff(scale, m, mx, n);
#pragma omp simd
    for (int64_t q = 0; q < n; q++) {
        scale[q] = isgreaterequal(scale[q], PROB_FLUSH) ? scale[q] : 0.0f;
        l[q] = l[q] * scale[q] + sum[q];
        m[q] = mx[q];
    }
}

LA_AVX512 static void fused_forward_block(const attn_problem *p, const tile_ws *w, int64_t b,
                                          int64_t h, int64_t i0, const float *q,
                                          const float *k, const float *v, float *o,
                                          float *row_stat)
{
    const int64_t d = p->head_dim, kvh = h / (p->n_heads / p->n_kv_heads);
    const int64_t rows = min64(ATTN_BQ, p->len_q - i0);
    const tile_span qs = span_of(p, 0, b, i0, rows);
    const int64_t bq = qs.n, bqp = round_up(bq, 16);
    const float *qi = q + (b * p->len_q + i0) * p->ldq + h * d;
    const float *kh = k + b * p->len_kv * p->ldkv + kvh * d;
    const float *vh = v + b * p->len_kv * p->ldkv + kvh * d;
    float *oi = o + (b * p->len_q + i0) * p->ldo + h * d;
    float *lse = row_stat + (b * p->n_heads + h) * p->len_q + i0;
    float *qt = w->packed;
    if (bq > 0)
        pack_transposed(qi, p->ldq, bq, bqp, d, qt);
    float *seen = w->rho; /* the forward's use of rho: rows that saw a key */
    memset(seen, 0, ATTN_BQ * sizeof(float));
    int first = 1;
    for (int64_t j0 = 0; j0 < p->len_kv && bq > 0; j0 += ATTN_BK) {
        const tile_span ks = span_of(p, 1, b, j0, min64(ATTN_BK, p->len_kv - j0));
        const int cls = tile_class(p, &qs, &ks);
        if (cls == TILE_SKIP)
            continue;
        const int64_t bk = ks.n;
        /* Sᵀ[key][q] = β·Σ_c K[j0+key][c]·Q[i0+q][c] */
        la_tile_product(1, bqp, bk, d, p->softmax_scale, qt, bqp, kh + j0 * p->ldkv,
                        p->ldkv, w->s, bqp, 0);
        prepare_scores(p, cls, b, i0, bq, j0, bk, w->s, 1, bqp, bk * bqp, seen);
        fused_online_softmax(w->s, bk, bqp, w->m, w->l, w->scale, first);
        if (!first)
            for (int64_t r = 0; r < bq; r++) {
                const float f = w->scale[r];
                if (f != 1.0f) {
                    float *restrict orow = oi + r * p->ldo;
#pragma omp simd
                    for (int64_t c = 0; c < d; c++)
                        orow[c] *= f;
                }
            }
        /* O[q][c] (+)= Σ_key P[key][q]·V[j0+key][c] */
        la_tile_product(0, d, bq, bk, 1.0f, vh + j0 * p->ldkv, p->ldkv, w->s, bqp, oi,
                        p->ldo, !first);
        first = 0;
    }
    finish_rows(w->m, w->l, seen, bq, rows, oi, p->ldo, d, lse);
}
#endif

/* ---- forward ---------------------------------------------------------------------- */

/* Output rows [i0, i0 + ATTN_BQ) of query head h of batch element b. */
static void forward_block(const attn_problem *p, int nt, const tile_ws *w, int64_t b,
                          int64_t h, int64_t i0, const float *q, const float *k,
                          const float *v, float *o, float *row_stat)
{
    const int64_t d = p->head_dim, kvh = h / (p->n_heads / p->n_kv_heads);
    const int64_t rows = min64(ATTN_BQ, p->len_q - i0);
    const tile_span qs = span_of(p, 0, b, i0, rows);
    const int64_t bq = qs.n;
    const float *qi = q + (b * p->len_q + i0) * p->ldq + h * d;
    const float *kh = k + b * p->len_kv * p->ldkv + kvh * d;
    const float *vh = v + b * p->len_kv * p->ldkv + kvh * d;
    float *oi = o + (b * p->len_q + i0) * p->ldo + h * d;
    float *lse = row_stat + (b * p->n_heads + h) * p->len_q + i0;
    float *seen = w->rho; /* the forward's use of rho: rows that saw a key */
    memset(seen, 0, ATTN_BQ * sizeof(float));
    int first = 1;
    for (int64_t j0 = 0; j0 < p->len_kv && bq > 0; j0 += ATTN_BK) {
        const tile_span ks = span_of(p, 1, b, j0, min64(ATTN_BK, p->len_kv - j0));
        const int cls = tile_class(p, &qs, &ks);
        if (cls == TILE_SKIP)
            continue;
        const int64_t bk = ks.n;
        la_gemm(p->la, nt, LA_N, LA_T, bq, bk, d, p->softmax_scale, qi, p->ldq,
                kh + j0 * p->ldkv, p->ldkv, 0.0f, w->s, bk);
        prepare_scores(p, cls, b, i0, bq, j0, bk, w->s, bk, 1, bq * bk, seen);
        tile_online_softmax(w->s, bq, bk, w->m, w->l, oi, p->ldo, d, first);
        la_gemm(p->la, nt, LA_N, LA_N, bq, d, bk, 1.0f, w->s, bk, vh + j0 * p->ldkv,
                p->ldkv, first ? 0.0f : 1.0f, oi, p->ldo);
        first = 0;
    }
    finish_rows(w->m, w->l, seen, bq, rows, oi, p->ldo, d, lse);
}

/* ---- backward --------------------------------------------------------------------- */

/* One (batch, kv head) task, restricted to query rows [i_lo, i_hi) (multiples of
 * ATTN_BQ, or len_q). dq_acc: where this worker adds dQ of query head h0 + g (columns
 * g*d of row i at dq_acc + i*ld_acc). */
typedef struct bwd_task {
    int64_t b, kvh, h0, group;
    int64_t i_lo, i_hi;
    float *dq_acc;
    int64_t ld_acc;
} bwd_task;

/* Key block [j0, j0+bk) of a task against every query block that sees it: adds into
 * dK, dV rows of the block (owned by the caller) and into t->dq_acc. */
static void backward_key_block(const attn_problem *p, int nt, const tile_ws *w,
                               const bwd_task *t, int64_t j0, const float *q,
                               const float *k, const float *v, const float *o,
                               const float *row_stat, const float *do_, float *dk,
                               float *dv)
{
    const int64_t d = p->head_dim;
    const tile_span ks = span_of(p, 1, t->b, j0, min64(ATTN_BK, p->len_kv - j0));
    const int64_t bk = ks.n;
    const float *kj = k + (t->b * p->len_kv + j0) * p->ldkv + t->kvh * d;
    const float *vj = v + (t->b * p->len_kv + j0) * p->ldkv + t->kvh * d;
    float *dkj = dk + (t->b * p->len_kv + j0) * p->ldkv + t->kvh * d;
    float *dvj = dv + (t->b * p->len_kv + j0) * p->ldkv + t->kvh * d;
    for (int64_t g = 0; g < t->group && bk > 0; g++) {
        const int64_t h = t->h0 + g;
        const float *lse_h = row_stat + (t->b * p->n_heads + h) * p->len_q;
        for (int64_t i0 = t->i_lo; i0 < t->i_hi; i0 += ATTN_BQ) {
            const tile_span qs = span_of(p, 0, t->b, i0, min64(ATTN_BQ, p->len_q - i0));
            const int cls = tile_class(p, &qs, &ks);
            if (cls == TILE_SKIP)
                continue;
            const int64_t bq = qs.n;
            const size_t qoff = (size_t)((t->b * p->len_q + i0) * p->ldq + h * d);
            const size_t ooff = (size_t)((t->b * p->len_q + i0) * p->ldo + h * d);
            const float *qi = q + qoff, *oi = o + ooff, *doi = do_ + ooff;
            float *dqi = t->dq_acc + i0 * t->ld_acc + g * d;
            la_gemm(p->la, nt, LA_N, LA_T, bq, bk, d, p->softmax_scale, qi, p->ldq, kj,
                    p->ldkv, 0.0f, w->s, bk);
            prepare_scores(p, cls, t->b, i0, bq, j0, bk, w->s, bk, 1, bq * bk, NULL);
            la_gemm(p->la, nt, LA_N, LA_T, bq, bk, d, 1.0f, doi, p->ldo, vj, p->ldkv, 0.0f,
                    w->dp, bk);
            rows_dot(doi, oi, p->ldo, bq, d, w->rho);
            tile_backward_probs(w->s, w->dp, bk, bq, bk, p->softcap, lse_h + i0, w->rho);
            /* dV_j += Pᵀ·dO_i, dK_j += β·dSᵀ·Q_i, dQ_i += β·dS·K_j */
            la_gemm(p->la, nt, LA_T, LA_N, bk, d, bq, 1.0f, w->s, bk, doi, p->ldo, 1.0f,
                    dvj, p->ldkv);
            la_gemm(p->la, nt, LA_T, LA_N, bk, d, bq, p->softmax_scale, w->dp, bk, qi,
                    p->ldq, 1.0f, dkj, p->ldkv);
            la_gemm(p->la, nt, LA_N, LA_N, bq, d, bk, p->softmax_scale, w->dp, bk, kj,
                    p->ldkv, 1.0f, dqi, t->ld_acc);
        }
    }
}

#ifdef LA_HAVE_AVX512_KERNELS
/* backward_key_block on the fused tiles (layouts above). */
LA_AVX512 static void fused_backward_key_block(const attn_problem *p, const tile_ws *w,
                                               const bwd_task *t, int64_t j0,
                                               const float *q, const float *k,
                                               const float *v, const float *o,
                                               const float *row_stat, const float *do_,
                                               float *dk, float *dv)
{
    const int64_t d = p->head_dim;
    const tile_span ks = span_of(p, 1, t->b, j0, min64(ATTN_BK, p->len_kv - j0));
    const int64_t bk = ks.n, bkp = round_up(bk, 16);
    if (bk == 0)
        return;
    const float *kj = k + (t->b * p->len_kv + j0) * p->ldkv + t->kvh * d;
    const float *vj = v + (t->b * p->len_kv + j0) * p->ldkv + t->kvh * d;
    float *dkj = dk + (t->b * p->len_kv + j0) * p->ldkv + t->kvh * d;
    float *dvj = dv + (t->b * p->len_kv + j0) * p->ldkv + t->kvh * d;
    float *kt = w->packed, *vt = w->packed + d * bkp;
    pack_transposed(kj, p->ldkv, bk, bkp, d, kt);
    pack_transposed(vj, p->ldkv, bk, bkp, d, vt);
    const float beta = p->softmax_scale;
    for (int64_t g = 0; g < t->group; g++) {
        const int64_t h = t->h0 + g;
        const float *lse_h = row_stat + (t->b * p->n_heads + h) * p->len_q;
        for (int64_t i0 = t->i_lo; i0 < t->i_hi; i0 += ATTN_BQ) {
            const tile_span qs = span_of(p, 0, t->b, i0, min64(ATTN_BQ, p->len_q - i0));
            const int cls = tile_class(p, &qs, &ks);
            if (cls == TILE_SKIP)
                continue;
            const int64_t bq = qs.n;
            const size_t qoff = (size_t)((t->b * p->len_q + i0) * p->ldq + h * d);
            const size_t ooff = (size_t)((t->b * p->len_q + i0) * p->ldo + h * d);
            const float *qi = q + qoff, *oi = o + ooff, *doi = do_ + ooff;
            float *dqi = t->dq_acc + i0 * t->ld_acc + g * d;
            /* S[q][key] = β·Σ_c Q[q][c]·K[key][c],  dP[q][key] = Σ_c dO[q][c]·V[key][c] */
            la_tile_product(1, bkp, bq, d, beta, kt, bkp, qi, p->ldq, w->s, bkp, 0);
            prepare_scores(p, cls, t->b, i0, bq, j0, bk, w->s, bkp, 1, bq * bkp, NULL);
            la_tile_product(1, bkp, bq, d, 1.0f, vt, bkp, doi, p->ldo, w->dp, bkp, 0);
            rows_dot(doi, oi, p->ldo, bq, d, w->rho);
            tile_backward_probs(w->s, w->dp, bkp, bq, bk, p->softcap, lse_h + i0, w->rho);
            /* dV[key] += Σ_q P[q][key]·dO[q],  dK[key] += β·Σ_q dS[q][key]·Q[q] */
            la_tile_product(0, d, bk, bq, 1.0f, doi, p->ldo, w->s, bkp, dvj, p->ldkv, 1);
            la_tile_product(0, d, bk, bq, beta, qi, p->ldq, w->dp, bkp, dkj, p->ldkv, 1);
            /* dQ[q] += β·Σ_key dS[q][key]·K[key] */
            la_tile_product(1, d, bq, bk, beta, kj, p->ldkv, w->dp, bkp, dqi, t->ld_acc, 1);
        }
    }
}
#endif

/* Dispatch to the fused tiles or the BLIS ones. */
static void forward_unit(const attn_problem *p, int nt, const tile_ws *w, int64_t b,
                         int64_t h, int64_t i0, const float *q, const float *k,
                         const float *v, float *o, float *row_stat)
{
#ifdef LA_HAVE_AVX512_KERNELS
    if (use_fused(p)) {
        fused_forward_block(p, w, b, h, i0, q, k, v, o, row_stat);
        return;
    }
#endif
    forward_block(p, nt, w, b, h, i0, q, k, v, o, row_stat);
}

static void backward_unit(const attn_problem *p, int nt, const tile_ws *w, const bwd_task *t,
                          int64_t j0, const float *q, const float *k, const float *v,
                          const float *o, const float *row_stat, const float *do_,
                          float *dk, float *dv)
{
#ifdef LA_HAVE_AVX512_KERNELS
    if (use_fused(p)) {
        fused_backward_key_block(p, w, t, j0, q, k, v, o, row_stat, do_, dk, dv);
        return;
    }
#endif
    backward_key_block(p, nt, w, t, j0, q, k, v, o, row_stat, do_, dk, dv);
}

static void zero_rows(float *x, int64_t rows, int64_t cols, int64_t ld)
{
    for (int64_t r = 0; r < rows; r++)
        memset(x + r * ld, 0, (size_t)cols * sizeof(float));
}

static bwd_task make_task(const attn_problem *p, int64_t task, float *dq)
{
    bwd_task t;
    t.b = task / p->n_kv_heads;
    t.kvh = task % p->n_kv_heads;
    t.group = p->n_heads / p->n_kv_heads;
    t.h0 = t.kvh * t.group;
    t.i_lo = 0;
    t.i_hi = p->len_q;
    t.dq_acc = dq + t.b * p->len_q * p->ldq + t.h0 * p->head_dim;
    t.ld_acc = p->ldq;
    return t;
}

/* One whole task: zeroes and fills its dQ, dK, dV. */
static void backward_task(const attn_problem *p, int nt, const tile_ws *w, int64_t task,
                          const float *q, const float *k, const float *v, const float *o,
                          const float *row_stat, const float *do_, float *dq, float *dk,
                          float *dv)
{
    const bwd_task t = make_task(p, task, dq);
    const int64_t d = p->head_dim;
    zero_rows(t.dq_acc, p->len_q, t.group * d, p->ldq);
    zero_rows(dk + t.b * p->len_kv * p->ldkv + t.kvh * d, p->len_kv, d, p->ldkv);
    zero_rows(dv + t.b * p->len_kv * p->ldkv + t.kvh * d, p->len_kv, d, p->ldkv);
    for (int64_t j0 = 0; j0 < p->len_kv; j0 += ATTN_BK)
        backward_unit(p, nt, w, &t, j0, q, k, v, o, row_stat, do_, dk, dv);
}

/* What the parallel parts of exact_forward and exact_backward read (pool_run's ctx). */
typedef struct exact_job {
    const attn_problem *p;
    const float *q, *k, *v, *o, *row_stat, *do_;
    float *out, *out_stat, *dq, *dk, *dv;
    void *ws;
    int64_t count; /* forward units or backward tasks */
    pool_queue queue;
    /* key-split backward: the task, its slots and dQ partials, the chunk of query rows */
    bwd_task whole;
    int64_t slots, chunk_rows, c0, rows;
    float *partials;
} exact_job;

static void forward_part(void *arg, int worker, int workers)
{
    (void)workers;
    exact_job *j = arg;
    const attn_problem *p = j->p;
    const int64_t nqb = ceil_div(p->len_q, ATTN_BQ), heads = p->batch * p->n_heads;
    const tile_ws w = worker_ws(p, j->ws, worker);
    /* Last query blocks first: under causal attention they are the longest. */
    for (int64_t u; (u = pool_queue_take(&j->queue)) < j->count;) {
        const int64_t bh = u % heads, qb = nqb - 1 - u / heads;
        forward_unit(p, 1, &w, bh / p->n_heads, bh % p->n_heads, qb * ATTN_BQ, j->q, j->k,
                     j->v, j->out, j->out_stat);
    }
}

static void exact_forward(const attn_problem *p, const float *q, const float *k,
                          const float *v, float *o, float *row_stat, void *ws)
{
    const int64_t nqb = ceil_div(p->len_q, ATTN_BQ), heads = p->batch * p->n_heads;
    const int64_t units = nqb * heads;
    const int workers = (int)min64(units, p->threads);
    if (workers <= 1) {
        const tile_ws w = worker_ws(p, ws, 0);
        for (int64_t u = 0; u < units; u++)
            forward_unit(p, p->threads, &w, (u % heads) / p->n_heads, u % p->n_heads,
                         (u / heads) * ATTN_BQ, q, k, v, o, row_stat);
        return;
    }
    exact_job j = {.p = p, .q = q, .k = k, .v = v, .out = o, .out_stat = row_stat, .ws = ws,
                   .count = units};
    pool_queue_start(&j.queue);
    pool_run(p->la->pool, workers, forward_part, &j);
}

/* Slot owning key block kb of a task split over `slots`: dealt back and forth
 * (0, 1, .., s-1, s-1, .., 0, 0, ..) so that causal tasks, whose early key blocks see
 * more queries, come out balanced. */
static int64_t key_block_slot(int64_t kb, int64_t slots)
{
    const int64_t round = kb / slots, pos = kb % slots;
    return round % 2 == 0 ? pos : slots - 1 - pos;
}

static void backward_tasks_part(void *arg, int worker, int workers)
{
    (void)workers;
    exact_job *j = arg;
    const tile_ws w = worker_ws(j->p, j->ws, worker);
    for (int64_t t; (t = pool_queue_take(&j->queue)) < j->count;)
        backward_task(j->p, 1, &w, t, j->q, j->k, j->v, j->o, j->row_stat, j->do_, j->dq, j->dk,
                      j->dv);
}

/* Key-split mode: zeroes the task's dK, dV rows (a static share of them). */
static void split_zero_part(void *arg, int worker, int workers)
{
    const exact_job *j = arg;
    const attn_problem *p = j->p;
    const int64_t d = p->head_dim;
    int64_t lo, hi;
    pool_static_range(p->len_kv, worker, workers, &lo, &hi);
    for (int64_t jr = lo; jr < hi; jr++) {
        const size_t off = (size_t)((j->whole.b * p->len_kv + jr) * p->ldkv + j->whole.kvh * d);
        memset(j->dk + off, 0, (size_t)d * sizeof(float));
        memset(j->dv + off, 0, (size_t)d * sizeof(float));
    }
}

/* Key-split mode: the slots of one chunk of query rows, taken dynamically. */
static void split_slots_part(void *arg, int worker, int workers)
{
    (void)workers;
    exact_job *j = arg;
    const attn_problem *p = j->p;
    const tile_ws w = worker_ws(p, j->ws, worker);
    const int64_t nkb = ceil_div(p->len_kv, ATTN_BK), slots = j->slots;
    const int64_t width = (p->n_heads / p->n_kv_heads) * p->head_dim;
    const int64_t c0 = j->c0, rows = j->rows, chunk_rows = j->chunk_rows;
    for (int64_t slot; (slot = pool_queue_take(&j->queue)) < slots;) {
        bwd_task t = j->whole;
        t.i_lo = c0;
        t.i_hi = c0 + rows;
        if (slot > 0) { /* row i of the chunk at partial + (i - c0)*width */
            t.dq_acc = j->partials + (size_t)(slot - 1) * (size_t)(chunk_rows * width) -
                       c0 * width;
            t.ld_acc = width;
        }
        zero_rows(t.dq_acc + c0 * t.ld_acc, rows, width, t.ld_acc);
        for (int64_t kb = 0; kb < nkb; kb++)
            if (key_block_slot(kb, slots) == slot)
                backward_unit(p, 1, &w, &t, kb * ATTN_BK, j->q, j->k, j->v, j->o, j->row_stat,
                              j->do_, j->dk, j->dv);
    }
}

/* Key-split mode: adds the chunk's partials into dQ in slot order (static rows). */
static void split_sum_part(void *arg, int worker, int workers)
{
    const exact_job *j = arg;
    const attn_problem *p = j->p;
    const int64_t width = (p->n_heads / p->n_kv_heads) * p->head_dim;
    const int64_t c0 = j->c0, chunk_rows = j->chunk_rows, slots = j->slots;
    int64_t lo, hi;
    pool_static_range(j->rows, worker, workers, &lo, &hi);
    for (int64_t i = c0 + lo; i < c0 + hi; i++) {
        float *dst = j->whole.dq_acc + i * p->ldq;
        for (int64_t sl = 1; sl < slots; sl++) {
            const float *src = j->partials + (size_t)(sl - 1) * (size_t)(chunk_rows * width) +
                               (size_t)((i - c0) * width);
            for (int64_t c = 0; c < width; c++)
                dst[c] += src[c];
        }
    }
}

static void exact_backward(const attn_problem *p, const float *q, const float *k,
                           const float *v, const float *o, const float *row_stat,
                           const float *do_, float *dq, float *dk, float *dv, void *ws)
{
    const int64_t tasks = p->batch * p->n_kv_heads;
    if (p->threads <= 1) {
        const tile_ws w = worker_ws(p, ws, 0);
        for (int64_t t = 0; t < tasks; t++)
            backward_task(p, 1, &w, t, q, k, v, o, row_stat, do_, dq, dk, dv);
        return;
    }
    exact_job j = {.p = p, .q = q, .k = k, .v = v, .o = o, .row_stat = row_stat, .do_ = do_,
                   .dq = dq, .dk = dk, .dv = dv, .ws = ws, .count = tasks};
    pool *workers_pool = p->la->pool;
    if (!backward_splits_keys(p)) {
        pool_queue_start(&j.queue);
        pool_run(workers_pool, p->threads, backward_tasks_part, &j);
        return;
    }
    /* Key-split mode: tasks one after another. In each, key block kb belongs to slot
     * key_block_slot(kb); for every chunk of query rows, the workers take the slots
     * dynamically, and a slot runs its key blocks in order, adding dQ of the chunk into
     * its own partial (slot 0: dQ itself). After the chunk the partials are summed into
     * dQ in slot order. Which worker runs a slot does not change any sum, so the
     * dynamic schedule keeps the result fixed, and it keeps both cores busy when one is
     * slowed down (a loaded machine) or a causal slot is longer. */
    j.slots = split_slots(p);
    const int workers = (int)min64(j.slots, p->threads);
    j.chunk_rows = min64(p->len_q, ATTN_SPLIT_ROWS);
    j.partials = (float *)ws + (size_t)p->threads * tile_floats(p);
    for (int64_t task = 0; task < tasks; task++) {
        j.whole = make_task(p, task, dq);
        pool_run(workers_pool, workers, split_zero_part, &j);
        for (j.c0 = 0; j.c0 < p->len_q; j.c0 += j.chunk_rows) {
            j.rows = min64(j.chunk_rows, p->len_q - j.c0);
            pool_queue_start(&j.queue);
            pool_run(workers_pool, workers, split_slots_part, &j);
            pool_run(workers_pool, workers, split_sum_part, &j);
        }
    }
}

/* Modelled flops of one forward+backward: 4·d forward, 8·d backward per visible pair
 * and head (masked tiles are skipped). */
static double exact_flops(const attn_problem *p)
{
    return 12.0 * (double)p->head_dim * (double)p->n_heads * attn_visible_pairs(p);
}

/* Exact attention runs every problem, with no error: AUTO's fallback. */
static void exact_plan(const attn_problem *p, double r, const attn_options *o,
                       attn_offer *offer, char *why, size_t why_size)
{
    (void)r, (void)o, (void)why, (void)why_size;
    memset(offer, 0, sizeof *offer);
    offer->status = LORA_OK;
    offer->flops = offer->cost = exact_flops(p);
}

const attn_backend attn_backend_exact = {
    .name = "exact",
    .id = LORA_BACKEND_EXACT,
    .plan = exact_plan,
    .workspace_size = exact_workspace_size,
    .forward = exact_forward,
    .backward = exact_backward,
};
