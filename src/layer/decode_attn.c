/* Attention of a decode step over a KV cache (decode_attn.h). Per unit and chunk of
 * query rows: for each tile of 16 keys (cached, then new), the scores of up to 4 rows
 * at once (one vector per row, 16 keys wide), then per row the online softmax update
 * and acc += p·V over the tile. Keys, values and the rows' state stay in L1 while a
 * tile is in use, so the cache is read from memory once per chunk. */
#include "decode_attn.h"

#include <math.h>
#include <string.h>

#include "../linalg/avx512_kernels.h"
#include "../linalg/vector_exp.h"

/* Query rows of one chunk (their accumulators stay in cache across the tiles). */
#define DQ_CHUNK 64
/* Rows whose scores one pass over a key tile computes. */
#define DQ_GROUP 4
/* exp arguments below this are clamped (glibc's vector expf stays on its fast path);
 * the probabilities of masked keys are set to 0 after the exp. */
#define DQ_EXP_CLAMP (-87.0f)


static size_t pad16(size_t n) { return (n + 15) & ~(size_t)15; }

size_t dattn_part_floats(int64_t head_dim, int64_t max_new)
{
    const int64_t tiles = (max_new + 15) / 16;
    int64_t kt;
    if (max_new < 0 || __builtin_mul_overflow(tiles * 16, head_dim, &kt) ||
        kt > INT64_MAX / 8)
        return 0;
    return pad16((size_t)kt) + pad16((size_t)(DQ_CHUNK * head_dim)) + 2 * DQ_CHUNK + 64;
}

/* Keys of one source: slots 0 .. count-1 exist; slot s holds position
 * ring > 0 ? top - (top - s) mod ring : base + s. */
typedef struct key_src {
    const float *kt, *v;
    int64_t ldv, count;
    int64_t ring, top, base;
} key_src;

static int64_t key_pos(const key_src *src, int64_t slot)
{
    return src->ring > 0 ? src->top - (src->top - slot) % src->ring : src->base + slot;
}

/* ---- kernels: s[r·16 + l] = q_r · k_l for 4 rows over one tile; acc += p·V ---------- */

#ifdef LA_HAVE_AVX512_KERNELS
LA_AVX512 static void tile_scores_avx512(const float *const *q, const float *kt, int64_t hd,
                                         float *s)
{
    __m512 a[DQ_GROUP], b[DQ_GROUP];
#pragma GCC unroll 4
    for (int r = 0; r < DQ_GROUP; r++)
        a[r] = b[r] = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 2 <= hd; d += 2) { /* two chains per row: FMA latency, not loads, bound */
        const __m512 k0 = _mm512_loadu_ps(kt + d * 16), k1 = _mm512_loadu_ps(kt + d * 16 + 16);
#pragma GCC unroll 4
        for (int r = 0; r < DQ_GROUP; r++) {
            a[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][d]), k0, a[r]);
            b[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][d + 1]), k1, b[r]);
        }
    }
    if (d < hd) {
        const __m512 k0 = _mm512_loadu_ps(kt + d * 16);
#pragma GCC unroll 4
        for (int r = 0; r < DQ_GROUP; r++)
            a[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][d]), k0, a[r]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < DQ_GROUP; r++)
        _mm512_storeu_ps(s + 16 * r, _mm512_add_ps(a[r], b[r]));
}

/* acc (hd) += Σ_{l < nk} p[l]·v_l, 128 dims (8 vectors) at a time. */
LA_AVX512 static void tile_pv_avx512(float *acc, const float *p, const float *v, int64_t ldv,
                                     int nk, int64_t hd)
{
    for (int64_t d0 = 0; d0 < hd; d0 += 128) {
        __mmask16 mk[8];
        __m512 a[8];
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) {
            const int64_t left = hd - d0 - 16 * c;
            mk[c] = left >= 16 ? (__mmask16)0xffffu
                               : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
            a[c] = _mm512_maskz_loadu_ps(mk[c], acc + d0 + 16 * c);
        }
        for (int l = 0; l < nk; l++) {
            const __m512 pv = _mm512_set1_ps(p[l]);
            const float *vl = v + l * ldv + d0;
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++)
                a[c] = _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(mk[c], vl + 16 * c), a[c]);
        }
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++)
            _mm512_mask_storeu_ps(acc + d0 + 16 * c, mk[c], a[c]);
    }
}
#endif

static void tile_scores(const la_ctx *la, const float *const *q, const float *kt, int64_t hd,
                        float *s)
{
#ifdef LA_HAVE_AVX512_KERNELS
    if (la->avx512) {
        tile_scores_avx512(q, kt, hd, s);
        return;
    }
#endif
    (void)la;
    for (int r = 0; r < DQ_GROUP; r++)
        for (int l = 0; l < 16; l++) {
            float sum = 0.0f;
            for (int64_t d = 0; d < hd; d++)
                sum += q[r][d] * kt[d * 16 + l];
            s[16 * r + l] = sum;
        }
}

static void tile_pv(const la_ctx *la, float *acc, const float *p, const float *v, int64_t ldv,
                    int nk, int64_t hd)
{
#ifdef LA_HAVE_AVX512_KERNELS
    if (la->avx512) {
        tile_pv_avx512(acc, p, v, ldv, nk, hd);
        return;
    }
#endif
    (void)la;
    for (int l = 0; l < nk; l++)
        for (int64_t d = 0; d < hd; d++)
            acc[d] += p[l] * v[l * ldv + d];
}

/* p[l] = exp(max(p[l] - shift, clamp)) for 16 entries (libmvec's vector expf). */
LA_KERNEL_CLONES static void exp16(float *p, float shift)
{
#pragma omp simd
    for (int l = 0; l < 16; l++) {
        const float t = p[l] - shift;
        p[l] = isgreater(t, DQ_EXP_CLAMP) ? t : DQ_EXP_CLAMP;
    }
#pragma omp simd
    for (int l = 0; l < 16; l++)
        p[l] = expf(p[l]);
}

/* ---- one unit ------------------------------------------------------------------------ */

/* A row's running softmax: max m, sum sum, unnormalised output acc (hd). */
typedef struct row_state {
    float *m, *sum, *acc;
} row_state;

/* One row's update by one tile: raw scores s (16), key positions kpos, nk keys. */
static void row_update(const dattn_job *j, const float *s, const int64_t *kpos, int nk,
                       int64_t qpos, const float *v, int64_t ldv, float *m, float *sum,
                       float *acc)
{
    float p[16];
    unsigned char vis[16];
    float mb = -INFINITY;
    for (int l = 0; l < 16; l++) {
        float x = s[l] * j->scale;
        if (j->softcap > 0.0f)
            x = j->softcap * tanhf(x / j->softcap);
        vis[l] = l < nk && kpos[l] <= qpos && (j->window == 0 || qpos - kpos[l] < j->window);
        p[l] = vis[l] ? x : -INFINITY;
        mb = p[l] > mb ? p[l] : mb;
    }
    if (mb == -INFINITY)
        return;
    const float mn = *m > mb ? *m : mb;
    const float corr = *m == -INFINITY ? 0.0f : expf(*m - mn);
    exp16(p, mn);
    float psum = 0.0f;
    for (int l = 0; l < 16; l++) {
        p[l] = vis[l] ? p[l] : 0.0f;
        psum += p[l];
    }
    if (corr != 1.0f)
        for (int64_t d = 0; d < j->head_dim; d++)
            acc[d] *= corr;
    *sum = *sum * corr + psum;
    *m = mn;
    tile_pv(j->la, acc, p, v, ldv, nk, j->head_dim);
}

/* Rows [r0, r1) of unit (b, g) against every tile of src. */
static void chunk_over_src(const dattn_job *j, const dattn_seq *sq, int64_t g,
                           const key_src *src, int64_t r0, int64_t r1, row_state st)
{
    const int64_t hd = j->head_dim, G = j->n_heads / j->n_kv_heads;
    const int64_t qmin = sq->len + r0 / G, qmax = sq->len + (r1 - 1) / G;
    for (int64_t t = 0; t * 16 < src->count; t++) {
        const int nk = src->count - t * 16 < 16 ? (int)(src->count - t * 16) : 16;
        int64_t kpos[16], kmin = INT64_MAX, kmax = INT64_MIN;
        for (int l = 0; l < nk; l++) {
            kpos[l] = key_pos(src, t * 16 + l);
            kmin = kpos[l] < kmin ? kpos[l] : kmin;
            kmax = kpos[l] > kmax ? kpos[l] : kmax;
        }
        if (kmin > qmax || (j->window > 0 && kmax <= qmin - j->window))
            continue; /* no row of the chunk sees a key of this tile */
        const float *kt = src->kt + t * 16 * hd, *v = src->v + t * 16 * src->ldv;
        for (int64_t r = r0; r < r1; r += DQ_GROUP) {
            const float *q[DQ_GROUP];
            for (int i = 0; i < DQ_GROUP; i++) { /* missing rows repeat the last one */
                const int64_t rr = r + i < r1 ? r + i : r1 - 1;
                q[i] = j->q + (sq->row0 + rr / G) * j->q_dim + (g * G + rr % G) * hd;
            }
            float s[16 * DQ_GROUP];
            tile_scores(j->la, q, kt, hd, s);
            for (int i = 0; i < DQ_GROUP && r + i < r1; i++) {
                const int64_t k = r + i - r0;
                row_update(j, s + 16 * i, kpos, nk, sq->len + (r + i) / G, v, src->ldv,
                           st.m + k, st.sum + k, st.acc + k * hd);
            }
        }
    }
}

/* The new keys of unit (b, g) in tiles (zero past the last key). */
static void new_key_tiles(const dattn_job *j, const dattn_seq *sq, int64_t g, float *kt)
{
    const int64_t hd = j->head_dim, tiles = (sq->n + 15) / 16;
    memset(kt, 0, (size_t)(tiles * 16 * hd) * sizeof(float));
    for (int64_t m = 0; m < sq->n; m++) {
        const float *kr = j->k + (sq->row0 + m) * j->kv_dim + g * hd;
        float *tile = kt + (m / 16) * 16 * hd + m % 16;
        for (int64_t d = 0; d < hd; d++)
            tile[d * 16] = kr[d];
    }
}

static void run_unit(const dattn_job *j, int64_t u, float *ws)
{
    const int64_t b = u / j->n_kv_heads, g = u % j->n_kv_heads, hd = j->head_dim;
    const int64_t G = j->n_heads / j->n_kv_heads;
    const dattn_seq *sq = &j->seqs[b];
    if (sq->n == 0)
        return;
    float *newkt = ws;
    float *acc = newkt + pad16((size_t)(((sq->n + 15) / 16) * 16 * hd));
    float *m = acc + pad16((size_t)(DQ_CHUNK * hd)), *sum = m + DQ_CHUNK;
    new_key_tiles(j, sq, g, newkt);
    const size_t unit_floats = (size_t)(j->slots16 * hd);
    const key_src src[2] = {
        {j->ck + (size_t)u * unit_floats, j->cv + (size_t)u * unit_floats, hd,
         sq->len < j->slots ? sq->len : j->slots, j->slots, sq->len - 1, 0},
        {newkt, j->v + sq->row0 * j->kv_dim + g * hd, j->kv_dim, sq->n, 0, 0, sq->len},
    };
    const int64_t rows = sq->n * G;
    for (int64_t r0 = 0; r0 < rows; r0 += DQ_CHUNK) {
        const int64_t r1 = rows - r0 < DQ_CHUNK ? rows : r0 + DQ_CHUNK;
        for (int64_t k = 0; k < r1 - r0; k++) {
            m[k] = -INFINITY;
            sum[k] = 0.0f;
        }
        memset(acc, 0, (size_t)((r1 - r0) * hd) * sizeof(float));
        const row_state st = {m, sum, acc};
        chunk_over_src(j, sq, g, &src[0], r0, r1, st);
        chunk_over_src(j, sq, g, &src[1], r0, r1, st);
        for (int64_t r = r0; r < r1; r++) { /* every row sees its own key: sum > 0 */
            float *c = j->c + (sq->row0 + r / G) * j->q_dim + (g * G + r % G) * hd;
            const float inv = 1.0f / sum[r - r0];
            for (int64_t d = 0; d < hd; d++)
                c[d] = acc[(r - r0) * hd + d] * inv;
        }
    }
}

void dattn_part(void *job, int part, int parts)
{
    dattn_job *j = job;
    (void)parts;
    float *ws = j->scratch + (size_t)part * j->part_floats;
    const int64_t units = j->batch * j->n_kv_heads;
    for (int64_t u = pool_queue_take(&j->units); u < units; u = pool_queue_take(&j->units))
        run_unit(j, u, ws);
}

void dattn_store(const dattn_job *j, const dattn_seq *s, int64_t b, float *ck, float *cv)
{
    const int64_t hd = j->head_dim, first = s->n > j->slots ? s->n - j->slots : 0;
    for (int64_t g = 0; g < j->n_kv_heads; g++) {
        const size_t at = (size_t)(b * j->n_kv_heads + g) * (size_t)(j->slots16 * hd);
        for (int64_t m = first; m < s->n; m++) {
            const int64_t slot = (s->len + m) % j->slots;
            const float *kr = j->k + (s->row0 + m) * j->kv_dim + g * hd;
            const float *vr = j->v + (s->row0 + m) * j->kv_dim + g * hd;
            float *tile = ck + at + (slot / 16) * 16 * hd + slot % 16;
            for (int64_t d = 0; d < hd; d++)
                tile[d * 16] = kr[d];
            memcpy(cv + at + slot * hd, vr, (size_t)hd * sizeof(float));
        }
    }
}
