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
 *   more here, most of it in packing the freshly computed P and dS tiles. Under
 *   LORA_COMPUTE_BF16 the same products take bf16 operands (exact_bf16.c, bf16.h).
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
#include "../linalg/bf16.h"
#include "../linalg/vector_exp.h"
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
/* Largest tile side a bf16 tile product sees (with head_dim). */
#define BF16_MOST (ATTN_BQ > ATTN_BK ? ATTN_BQ : ATTN_BK)
_Static_assert(ATTN_BK <= BF16_ROW_MAX, "la_bf16_probs_pair takes rows of a key block");

/* Probabilities below PROB_FLUSH = 2^-64 are set to 0. A row's sum is at least 1, so
 * what is dropped is below 2^-64·len_kv, far under float rounding; and it keeps the
 * block products clear of subnormal numbers, which stall the FMA units (a BLIS sgemm
 * on operands near FLT_MIN runs 20 to 200 times slower here). EXP_CLAMP keeps glibc's
 * vector expf on its fast path (it falls back to scalar code below -87.3). */
#define PROB_FLUSH 5.42101086e-20f /* 2^-64 */
#define EXP_CLAMP (-87.0f)


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

/* Partial tiles are cut into sub-tiles: for each ATTN_SUB-long block of one dimension
 * (the outer one), the ATTN_SUB-long blocks of the other with a visible pair are
 * computed, in runs of consecutive full blocks (no mask) and of consecutive partial
 * ones (masked). A causal diagonal tile so costs 56% of a full one instead of 100% and
 * masks only its diagonal blocks, and segments or windows shorter than a tile cost
 * about their pairs. A multiple of 16 (the fused tiles' vector length). -D overrides. */
#ifndef ATTN_SUB
#define ATTN_SUB 32
#endif
#define ATTN_MAX_SUBS ((ATTN_BQ / ATTN_SUB) * (ATTN_BK / ATTN_SUB))
_Static_assert(ATTN_BQ % ATTN_SUB == 0 && ATTN_BK % ATTN_SUB == 0 && ATTN_SUB % 16 == 0,
               "tiles are whole sub-tiles of whole vectors");

/* Queries [i0 + r0, + nr) against keys [j0 + c0, + nc) of a tile; cls as tile_class's. */
typedef struct sub_tile {
    int64_t r0, nr, c0, nc;
    int cls;
} sub_tile;

/* The sub-tiles of a tile of class cls (not TILE_SKIP) between the query span qs (rows
 * from i0) and the key span ks (keys from j0): the whole tile when it is full, else the
 * cut described at ATTN_SUB, keys outer when keys_outer. Fills out (ATTN_MAX_SUBS at
 * most); returns the count. */
static int sub_tiles(const attn_problem *p, int cls, int64_t b, int64_t i0,
                     const tile_span *qs, int64_t j0, const tile_span *ks, int keys_outer,
                     sub_tile *out)
{
    if (cls == TILE_FULL) {
        out[0] = (sub_tile){0, qs->n, 0, ks->n, TILE_FULL};
        return 1;
    }
    const int64_t n_out = keys_outer ? ks->n : qs->n, n_in = keys_outer ? qs->n : ks->n;
    const int64_t out0 = keys_outer ? j0 : i0, in0 = keys_outer ? i0 : j0;
    const int64_t in_blocks = (n_in + ATTN_SUB - 1) / ATTN_SUB;
    tile_span inner[ATTN_MAX_SUBS];
    for (int64_t t = 0; t < in_blocks; t++)
        inner[t] = span_of(p, !keys_outer, b, in0 + t * ATTN_SUB,
                           min64(ATTN_SUB, n_in - t * ATTN_SUB));
    int count = 0;
    for (int64_t o = 0; o < n_out; o += ATTN_SUB) {
        const tile_span outer = span_of(p, keys_outer, b, out0 + o, min64(ATTN_SUB, n_out - o));
        int64_t run = -1; /* first inner block of the current run */
        int run_cls = TILE_SKIP;
        for (int64_t t = 0; t <= in_blocks; t++) {
            const int c = t == in_blocks ? TILE_SKIP
                          : keys_outer   ? tile_class(p, &inner[t], &outer)
                                         : tile_class(p, &outer, &inner[t]);
            if (c == run_cls)
                continue;
            if (run_cls != TILE_SKIP) { /* the run [run, t) ends */
                const int64_t lo = run * ATTN_SUB, n = min64(t * ATTN_SUB, n_in) - lo;
                out[count++] = keys_outer ? (sub_tile){lo, n, o, outer.n, run_cls}
                                          : (sub_tile){o, outer.n, lo, n, run_cls};
            }
            run = t;
            run_cls = c;
        }
    }
    return count;
}

/* Hides the pairs of a partial tile: s[r·rs + c·cs] = -inf for query i0 + r (r < nq)
 * and key j0 + c (c < nk) that it does not see (all rows valid). rs or cs is 1; the
 * test runs in vectors along that dimension, from the rows' positions and segment ids
 * gathered first. seen (NULL: not wanted): seen[r] = 1 when query r sees a key of the
 * tile. */
LA_KERNEL_CLONES
static void tile_mask(const attn_problem *p, int64_t b, int64_t i0, int64_t nq, int64_t j0,
                      int64_t nk, float *s, int64_t rs, int64_t cs, float *seen)
{
    int64_t qpos[ATTN_BQ], kpos[ATTN_BK];
    int32_t qseg[ATTN_BQ], kseg[ATTN_BK];
    float unwanted[ATTN_BQ];
    float *restrict sn = seen ? seen : unwanted;
    for (int64_t r = 0; r < nq; r++) {
        qpos[r] = attn_q_pos(p, b, i0 + r);
        qseg[r] = attn_q_seg(p, b, i0 + r);
    }
    for (int64_t c = 0; c < nk; c++) {
        kpos[c] = attn_kv_pos(p, b, j0 + c);
        kseg[c] = attn_kv_seg(p, b, j0 + c);
    }
    /* attn_distance_visible as an interval [dlo, dhi] of pos_i - pos_j */
    const int64_t w = p->window;
    const int64_t dhi = w > 0 ? w - 1 : INT64_MAX;
    const int64_t dlo = p->causal ? 0 : w > 0 ? 1 - w : INT64_MIN;
    if (cs == 1) {
        for (int64_t r = 0; r < nq; r++) {
            float *restrict row = s + r * rs;
            const int64_t pi = qpos[r];
            const int32_t si = qseg[r];
            int any = 0;
#pragma omp simd reduction(| : any)
            for (int64_t c = 0; c < nk; c++) {
                const int64_t d = pi - kpos[c];
                const int vis = (kseg[c] == si) & (d >= dlo) & (d <= dhi);
                row[c] = vis ? row[c] : -INFINITY;
                any |= vis;
            }
            if (any)
                sn[r] = 1.0f;
        }
        return;
    }
    for (int64_t c = 0; c < nk; c++) {
        float *restrict col = s + c * cs;
        const int64_t pj = kpos[c];
        const int32_t sj = kseg[c];
#pragma omp simd
        for (int64_t r = 0; r < nq; r++) {
            const int64_t d = qpos[r] - pj;
            const int vis = (qseg[r] == sj) & (d >= dlo) & (d <= dhi);
            col[r] = vis ? col[r] : -INFINITY;
            sn[r] = vis ? 1.0f : sn[r];
        }
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
 * max and sum (from -inf and 0: start_rows), updated (a row that has seen only hidden
 * keys keeps m = -inf, l = 0); o (bq × d, row stride ldo): the output accumulator,
 * rescaled by exp(m_old - m_new), which is 0 while m_old = -inf. The exponent's clamp
 * turns -inf - -inf (NaN) into a flushed 0 too. */
LA_KERNEL_CLONES
static void tile_online_softmax(float *restrict s, int64_t bq, int64_t bk,
                                float *restrict m, float *restrict l, float *restrict o,
                                int64_t ldo, int64_t d)
{
    for (int64_t r = 0; r < bq; r++) {
        float *restrict row = s + r * bk;
        const int64_t vis = bk;
        float mx = m[r];
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
        float scale = expf(m[r] - mx);
        scale = scale >= PROB_FLUSH ? scale : 0.0f;
        l[r] = l[r] * scale + sum;
        if (scale != 1.0f) {
            float *restrict orow = o + r * ldo;
#pragma omp simd
            for (int64_t c = 0; c < d; c++)
                orow[c] *= scale;
        }
        m[r] = mx;
    }
}

/* bf16 compute: where the backward's softmax pass writes P and dS packed for the
 * products (la_bf16_probs_pair) instead of in fp32: pairs of rows (p, ds), rows of dS
 * (ds_rows). */
typedef struct packed_probs {
    uint32_t *p, *ds, *ds_rows;
} packed_probs;

/* Rows r - 1, r (r odd) or r alone (the last, even) of a backward tile, whose dS rows
 * already include the softcap's factor: P and dS packed in one pass (bf16.h). */
static void probs_pair_packed(const float *s, const float *dp, int64_t ld, int64_t r,
                              int64_t bk, const float *lse, const float *shift,
                              const packed_probs *packed)
{
    const int64_t r0 = r - r % 2, at = r0 / 2 * ((bk + 15) / 16 * 16);
    la_bf16_probs_pair(s + r0 * ld, r % 2 ? s + r * ld : NULL, dp + r0 * ld, dp + r * ld,
                       lse + r0, shift, bk, PROB_FLUSH, packed->p + at, packed->ds + at,
                       packed->ds_rows + r0 * ((bk + 1) / 2));
}

/* Backward tile: s (scaled, capped scores, -inf where hidden) becomes
 * P = exp(s - lse_r) and dp (dO·Vᵀ) becomes dS = P ⊙ (dP - ρ_r), times the softcap's
 * derivative 1 - (s/cap)² when cap > 0 (s = cap·tanh(S/cap)); both 0 where hidden.
 * Rows stride ld, bk columns each. packed: NULL, or where P and dS go in bf16 instead
 * (then s and dp keep scores and dP, apart from the softcap's factor). */
LA_KERNEL_CLONES
static void tile_backward_probs(float *restrict s, float *restrict dp, int64_t ld,
                                int64_t bq, int64_t bk, float cap,
                                const float *restrict lse, const float *restrict rho,
                                const packed_probs *packed)
{
    const float inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
    float shifts[2];
    for (int64_t r = 0; r < bq; r++) {
        float *restrict prow = s + r * ld, *restrict dsrow = dp + r * ld;
        const float rr = rho[r];
        if (cap > 0.0f) {
#pragma omp simd
            for (int64_t j = 0; j < bk; j++) {
                const float t = prow[j] * inv_cap; /* -inf where hidden: factor 0 */
                dsrow[j] = (dsrow[j] - rr) * (1.0f - fminf(t * t, 1.0f));
            }
        }
        /* Without the cap, dP - ρ is formed here: one pass over the tile less. */
        const float shift = cap > 0.0f ? 0.0f : rr;
        if (packed) {
            shifts[r % 2] = shift;
            if (r % 2 || r == bq - 1)
                probs_pair_packed(s, dp, ld, r, bk, lse, shifts, packed);
            continue;
        }
        exp_shifted(prow, bk, lse[r]);
#pragma omp simd
        for (int64_t j = 0; j < bk; j++) {
            const float pj = isgreaterequal(prow[j], PROB_FLUSH) ? prow[j] : 0.0f;
            prow[j] = pj;
            dsrow[j] = (dsrow[j] - shift) * pj;
        }
    }
}

/* Gemma 2's cap on scaled scores: x <- cap·tanh(x/cap) for n entries, through
 * tanh(y) = sign(y)·(1 - e)/(1 + e), e = exp(-2|y|) (no overflow; vector expf). */
LA_KERNEL_CLONES
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
LA_KERNEL_CLONES
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
LA_KERNEL_CLONES
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
        n += 2u * (size_t)p->head_dim * ATTN_BK + attn_exact_bf16_tile_floats(p, BF16_MOST);
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
    float *bf16;                  /* fused path in bf16 compute: the products' scratch */
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
    t.bf16 = use_fused(p) && attn_exact_bf16(p) ? t.packed + 2 * p->head_dim * ATTN_BK : NULL;
    return t;
}

/* A backward key block of one (batch, kv head) task: keys [j0, j0 + ATTN_BK), their K,
 * V rows and the dK, dV rows they own; fused tiles: Kᵀ and Vᵀ packed (bkp lanes). */
typedef struct key_block {
    int64_t j0, bkp;
    const float *k, *v, *kt, *vt;
    float *dk, *dv;
} key_block;

/* A backward query block [i0, ..) of head h: its Q, O, dO rows, its log-sum-exps, and
 * where its dQ rows are added (row stride ld_dq). */
typedef struct query_tile {
    int64_t b, i0, ld_dq;
    const float *q, *o, *do_, *lse;
    float *dq;
} query_tile;

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

/* la_tile_product, or its bf16 twin in bf16 compute (w->bf16 set); a_kept: A is the
 * same through the work unit (bf16.h). */
LA_AVX512 static void tile_product(const tile_ws *w, int brows, int64_t m, int64_t n,
                                   int64_t k, float alpha, const float *a, int64_t sa,
                                   const float *b, int64_t sb, float *c, int64_t scj, int acc,
                                   int a_kept)
{
    if (w->bf16)
        la_bf16_tile_product(brows, m, n, k, alpha, a, sa, b, sb, c, scj, acc, a_kept,
                             w->bf16);
    else
        la_tile_product(brows, m, n, k, alpha, a, sa, b, sb, c, scj, acc);
}

/* A product adding into C whose B a softmax pass wrote: packed (bf16 compute; NULL
 * in fp32) or b, sb as la_tile_product's. */
LA_AVX512 static void probs_product(const tile_ws *w, const uint32_t *packed, int brows,
                                    int64_t m, int64_t n, int64_t k, float alpha,
                                    const float *a, int64_t sa, const float *b, int64_t sb,
                                    float *c, int64_t scj, int a_kept)
{
    if (packed)
        la_bf16_tile_product_packed(brows, m, n, k, alpha, a, sa, packed, c, scj, 1, a_kept,
                                    w->bf16);
    else
        la_tile_product(brows, m, n, k, alpha, a, sa, b, sb, c, scj, 1);
}

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
 * query, 0 where hidden. m, l: running max and sum per query (from start_rows),
 * updated; scale receives exp(m_old - m_new). As tile_online_softmax for hidden rows.
 * p_pairs: NULL, or where P goes in bf16 instead (la_bf16_exp_pairs; st keeps the
 * scores). */
LA_AVX512 static void fused_online_softmax(float *restrict st, int64_t bk, int64_t n,
                                           float *restrict m, float *restrict l,
                                           float *restrict scale, uint32_t *p_pairs)
{
    float mx[ATTN_BQ], sum[ATTN_BQ];
#pragma omp simd
    for (int64_t q = 0; q < n; q++) {
        mx[q] = m[q];
        sum[q] = 0.0f;
    }
    for (int64_t kk = 0; kk < bk; kk++) {
        const float *restrict row = st + kk * n;
#pragma omp simd
        for (int64_t q = 0; q < n; q++)
            mx[q] = row[q] > mx[q] ? row[q] : mx[q];
    }
    for (int64_t kk = 0; kk < bk && p_pairs; kk += 2) /* bf16: in one pass */
        la_bf16_exp_pairs(st + kk * n, kk + 1 < bk ? st + (kk + 1) * n : NULL, mx, n,
                          PROB_FLUSH, sum, p_pairs + kk / 2 * n);
    for (int64_t kk = 0; kk < bk && !p_pairs; kk++) {
        float *restrict row = st + kk * n;
        exp_diff(row, row, mx, n);
#pragma omp simd
        for (int64_t q = 0; q < n; q++) {
            row[q] = isgreaterequal(row[q], PROB_FLUSH) ? row[q] : 0.0f;
            sum[q] += row[q];
        }
    }
    exp_diff(scale, m, mx, n);
#pragma omp simd
    for (int64_t q = 0; q < n; q++) {
        scale[q] = isgreaterequal(scale[q], PROB_FLUSH) ? scale[q] : 0.0f;
        l[q] = l[q] * scale[q] + sum[q];
        m[q] = mx[q];
    }
}

/* One sub-tile of a forward query block on the fused tiles: qt holds Qᵀ of the block
 * (bqp lanes), kh and vh the head's K and V from key j0, oi the block's O rows. */
LA_AVX512 static void fused_forward_sub(const attn_problem *p, const tile_ws *w,
                                        const sub_tile *t, int64_t b, int64_t i0, int64_t j0,
                                        const float *qt, int64_t bqp, const float *kh,
                                        const float *vh, float *oi)
{
    const int64_t d = p->head_dim, nr = t->nr, nrp = round_up(nr, 16), nc = t->nc;
    const float *kj = kh + (j0 + t->c0) * p->ldkv, *vj = vh + (j0 + t->c0) * p->ldkv;
    float *o_sub = oi + t->r0 * p->ldo;
    /* Sᵀ[key][q] = β·Σ_c K[key][c]·Q[q][c] */
    tile_product(w, 1, nrp, nc, d, p->softmax_scale, qt + t->r0, bqp, kj, p->ldkv, w->s, nrp,
                 0, 1);
    prepare_scores(p, t->cls, b, i0 + t->r0, nr, j0 + t->c0, nc, w->s, 1, nrp, nc * nrp,
                   w->rho + t->r0);
    uint32_t *p_pairs = w->bf16 ? la_bf16_tile_operand(w->bf16, 0) : NULL;
    fused_online_softmax(w->s, nc, nrp, w->m + t->r0, w->l + t->r0, w->scale + t->r0, p_pairs);
    for (int64_t r = 0; r < nr; r++) {
        const float f = w->scale[t->r0 + r];
        if (f != 1.0f) {
            float *restrict orow = o_sub + r * p->ldo;
#pragma omp simd
            for (int64_t c = 0; c < d; c++)
                orow[c] *= f;
        }
    }
    /* O[q][c] += Σ_key P[key][q]·V[key][c] */
    probs_product(w, p_pairs, 0, d, nr, nc, 1.0f, vj, p->ldkv, w->s, nrp, o_sub, p->ldo, 0);
}

/* One sub-tile of a backward key block on the fused tiles (kb->kt, kb->vt: Kᵀ, Vᵀ of
 * the key block). */
LA_AVX512 static void fused_backward_sub(const attn_problem *p, const tile_ws *w,
                                         const key_block *kb, const query_tile *qt,
                                         const sub_tile *t)
{
    const int64_t d = p->head_dim, nr = t->nr, nc = t->nc, nkp = round_up(nc, 16);
    const float beta = p->softmax_scale;
    const float *qi = qt->q + t->r0 * p->ldq, *oi = qt->o + t->r0 * p->ldo;
    const float *doi = qt->do_ + t->r0 * p->ldo;
    /* S[q][key] = β·Σ_c Q[q][c]·K[key][c],  dP[q][key] = Σ_c dO[q][c]·V[key][c] */
    tile_product(w, 1, nkp, nr, d, beta, kb->kt + t->c0, kb->bkp, qi, p->ldq, w->s, nkp, 0, 1);
    prepare_scores(p, t->cls, qt->b, qt->i0 + t->r0, nr, kb->j0 + t->c0, nc, w->s, nkp, 1,
                   nr * nkp, NULL);
    tile_product(w, 1, nkp, nr, d, 1.0f, kb->vt + t->c0, kb->bkp, doi, p->ldo, w->dp, nkp, 0,
                 1);
    rows_dot(doi, oi, p->ldo, nr, d, w->rho);
    packed_probs pk = {NULL, NULL, NULL};
    if (w->bf16)
        pk = (packed_probs){la_bf16_tile_operand(w->bf16, 0), la_bf16_tile_operand(w->bf16, 1),
                            la_bf16_tile_operand(w->bf16, 2)};
    tile_backward_probs(w->s, w->dp, nkp, nr, nc, p->softcap, qt->lse + t->r0, w->rho,
                        w->bf16 ? &pk : NULL);
    /* dV[key] += Σ_q P[q][key]·dO[q],  dK[key] += β·Σ_q dS[q][key]·Q[q] */
    probs_product(w, pk.p, 0, d, nc, nr, 1.0f, doi, p->ldo, w->s, nkp,
                  kb->dv + t->c0 * p->ldkv, p->ldkv, 0);
    probs_product(w, pk.ds, 0, d, nc, nr, beta, qi, p->ldq, w->dp, nkp,
                  kb->dk + t->c0 * p->ldkv, p->ldkv, 0);
    /* dQ[q] += β·Σ_key dS[q][key]·K[key] */
    probs_product(w, pk.ds_rows, 1, d, nr, nc, beta, kb->k + t->c0 * p->ldkv, p->ldkv, w->dp,
                  nkp, qt->dq + t->r0 * qt->ld_dq, qt->ld_dq, 1);
}
#endif

/* ---- forward ---------------------------------------------------------------------- */

/* One sub-tile of a forward query block on BLIS tiles (qi, oi: the block's Q, O rows). */
static void forward_sub(const attn_problem *p, int nt, const tile_ws *w, const sub_tile *t,
                        int64_t b, int64_t i0, int64_t j0, const float *qi, const float *kh,
                        const float *vh, float *oi)
{
    const int64_t d = p->head_dim, nr = t->nr, nc = t->nc;
    const float *kj = kh + (j0 + t->c0) * p->ldkv, *vj = vh + (j0 + t->c0) * p->ldkv;
    float *o_sub = oi + t->r0 * p->ldo;
    la_gemm(p->la, nt, LA_N, LA_T, nr, nc, d, p->softmax_scale, qi + t->r0 * p->ldq, p->ldq,
            kj, p->ldkv, 0.0f, w->s, nc);
    prepare_scores(p, t->cls, b, i0 + t->r0, nr, j0 + t->c0, nc, w->s, nc, 1, nr * nc,
                   w->rho + t->r0);
    tile_online_softmax(w->s, nr, nc, w->m + t->r0, w->l + t->r0, o_sub, p->ldo, d);
    la_gemm(p->la, nt, LA_N, LA_N, nr, d, nc, 1.0f, w->s, nc, vj, p->ldkv, 1.0f, o_sub,
            p->ldo);
}

/* A query block's start: running max -inf, sums 0, no row has seen a key (w->rho, the
 * forward's use of it), output rows [0, rows) 0. */
static void start_rows(const tile_ws *w, int64_t rows, float *o, int64_t ldo, int64_t d)
{
    for (int64_t r = 0; r < ATTN_BQ; r++) {
        w->m[r] = -INFINITY;
        w->l[r] = 0.0f;
        w->rho[r] = 0.0f;
    }
    for (int64_t r = 0; r < rows; r++)
        memset(o + r * ldo, 0, (size_t)d * sizeof(float));
}

/* Output rows [i0, i0 + ATTN_BQ) of query head h of batch element b, on the fused tiles
 * (fused: Qᵀ packed once into w->packed) or BLIS ones. */
static void forward_block(const attn_problem *p, int nt, const tile_ws *w, int64_t b,
                          int64_t h, int64_t i0, const float *q, const float *k,
                          const float *v, float *o, float *row_stat)
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
    const int fused = use_fused(p);
    start_rows(w, bq, oi, p->ldo, d);
#ifdef LA_HAVE_AVX512_KERNELS
    if (fused && bq > 0)
        pack_transposed(qi, p->ldq, bq, bqp, d, w->packed);
    if (w->bf16) /* Qᵀ's content is new */
        la_bf16_tile_forget(w->bf16, BF16_MOST);
#endif
    sub_tile sub[ATTN_MAX_SUBS];
    for (int64_t j0 = 0; j0 < p->len_kv && bq > 0; j0 += ATTN_BK) {
        const tile_span ks = span_of(p, 1, b, j0, min64(ATTN_BK, p->len_kv - j0));
        const int cls = tile_class(p, &qs, &ks);
        if (cls == TILE_SKIP)
            continue;
        const int count = sub_tiles(p, cls, b, i0, &qs, j0, &ks, 1, sub);
        for (int t = 0; t < count; t++) {
#ifdef LA_HAVE_AVX512_KERNELS
            if (fused) {
                fused_forward_sub(p, w, &sub[t], b, i0, j0, w->packed, bqp, kh, vh, oi);
                continue;
            }
#endif
            forward_sub(p, nt, w, &sub[t], b, i0, j0, qi, kh, vh, oi);
        }
    }
    (void)bqp;
    finish_rows(w->m, w->l, w->rho, bq, rows, oi, p->ldo, d, lse);
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

/* One sub-tile of a backward key block on BLIS tiles. */
static void backward_sub(const attn_problem *p, int nt, const tile_ws *w, const key_block *kb,
                         const query_tile *qt, const sub_tile *t)
{
    const int64_t d = p->head_dim, nr = t->nr, nc = t->nc;
    const float *qi = qt->q + t->r0 * p->ldq, *oi = qt->o + t->r0 * p->ldo;
    const float *doi = qt->do_ + t->r0 * p->ldo;
    const float *kj = kb->k + t->c0 * p->ldkv, *vj = kb->v + t->c0 * p->ldkv;
    la_gemm(p->la, nt, LA_N, LA_T, nr, nc, d, p->softmax_scale, qi, p->ldq, kj, p->ldkv, 0.0f,
            w->s, nc);
    prepare_scores(p, t->cls, qt->b, qt->i0 + t->r0, nr, kb->j0 + t->c0, nc, w->s, nc, 1,
                   nr * nc, NULL);
    la_gemm(p->la, nt, LA_N, LA_T, nr, nc, d, 1.0f, doi, p->ldo, vj, p->ldkv, 0.0f, w->dp, nc);
    rows_dot(doi, oi, p->ldo, nr, d, w->rho);
    tile_backward_probs(w->s, w->dp, nc, nr, nc, p->softcap, qt->lse + t->r0, w->rho, NULL);
    /* dV_j += Pᵀ·dO_i, dK_j += β·dSᵀ·Q_i, dQ_i += β·dS·K_j */
    la_gemm(p->la, nt, LA_T, LA_N, nc, d, nr, 1.0f, w->s, nc, doi, p->ldo, 1.0f,
            kb->dv + t->c0 * p->ldkv, p->ldkv);
    la_gemm(p->la, nt, LA_T, LA_N, nc, d, nr, p->softmax_scale, w->dp, nc, qi, p->ldq, 1.0f,
            kb->dk + t->c0 * p->ldkv, p->ldkv);
    la_gemm(p->la, nt, LA_N, LA_N, nr, d, nc, p->softmax_scale, w->dp, nc, kj, p->ldkv, 1.0f,
            qt->dq + t->r0 * qt->ld_dq, qt->ld_dq);
}

/* Key block [j0, j0 + ATTN_BK) of a task against every query block that sees it: adds
 * into dK, dV rows of the block (owned by the caller) and into t->dq_acc. Fused tiles
 * (Kᵀ, Vᵀ packed once into w->packed) or BLIS ones. */
static void backward_key_block(const attn_problem *p, int nt, const tile_ws *w,
                               const bwd_task *t, int64_t j0, const float *q,
                               const float *k, const float *v, const float *o,
                               const float *row_stat, const float *do_, float *dk,
                               float *dv)
{
    const int64_t d = p->head_dim;
    const tile_span ks = span_of(p, 1, t->b, j0, min64(ATTN_BK, p->len_kv - j0));
    if (ks.n == 0)
        return;
    const size_t kv_off = (size_t)((t->b * p->len_kv + j0) * p->ldkv + t->kvh * d);
    const int64_t bkp = round_up(ks.n, 16);
    const key_block kb = {j0, bkp, k + kv_off, v + kv_off, w->packed, w->packed + d * bkp,
                          dk + kv_off, dv + kv_off};
    const int fused = use_fused(p);
#ifdef LA_HAVE_AVX512_KERNELS
    if (fused) {
        pack_transposed(kb.k, p->ldkv, ks.n, bkp, d, w->packed);
        pack_transposed(kb.v, p->ldkv, ks.n, bkp, d, w->packed + d * bkp);
    }
    if (w->bf16) /* Kᵀ's and Vᵀ's content is new */
        la_bf16_tile_forget(w->bf16, BF16_MOST);
#endif
    sub_tile sub[ATTN_MAX_SUBS];
    for (int64_t g = 0; g < t->group; g++) {
        const int64_t h = t->h0 + g;
        for (int64_t i0 = t->i_lo; i0 < t->i_hi; i0 += ATTN_BQ) {
            const tile_span qs = span_of(p, 0, t->b, i0, min64(ATTN_BQ, p->len_q - i0));
            const int cls = tile_class(p, &qs, &ks);
            if (cls == TILE_SKIP)
                continue;
            const size_t qoff = (size_t)((t->b * p->len_q + i0) * p->ldq + h * d);
            const size_t ooff = (size_t)((t->b * p->len_q + i0) * p->ldo + h * d);
            const query_tile qt = {t->b, i0, t->ld_acc, q + qoff, o + ooff, do_ + ooff,
                                   row_stat + (t->b * p->n_heads + h) * p->len_q + i0,
                                   t->dq_acc + i0 * t->ld_acc + g * d};
            const int count = sub_tiles(p, cls, t->b, i0, &qs, j0, &ks, 0, sub);
            for (int s = 0; s < count; s++) {
#ifdef LA_HAVE_AVX512_KERNELS
                if (fused) {
                    fused_backward_sub(p, w, &kb, &qt, &sub[s]);
                    continue;
                }
#endif
                backward_sub(p, nt, w, &kb, &qt, &sub[s]);
            }
        }
    }
}

/* One forward unit and one backward key block (both tile kinds behind them). */
static void forward_unit(const attn_problem *p, int nt, const tile_ws *w, int64_t b,
                         int64_t h, int64_t i0, const float *q, const float *k,
                         const float *v, float *o, float *row_stat)
{
    forward_block(p, nt, w, b, h, i0, q, k, v, o, row_stat);
}

static void backward_unit(const attn_problem *p, int nt, const tile_ws *w, const bwd_task *t,
                          int64_t j0, const float *q, const float *k, const float *v,
                          const float *o, const float *row_stat, const float *do_,
                          float *dk, float *dv)
{
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
    offer->flops = exact_flops(p);
    offer->cost = offer->flops * attn_exact_cost_ratio(p);
}

const attn_backend attn_backend_exact = {
    .name = "exact",
    .id = LORA_BACKEND_EXACT,
    .plan = exact_plan,
    .workspace_size = exact_workspace_size,
    .forward = exact_forward,
    .backward = exact_backward,
};
