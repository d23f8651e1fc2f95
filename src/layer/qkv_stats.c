/* The threshold estimator's statistics of the Q, K and V projections of a
 * self-attention input (MATH §3): max |entry| of each (the paper's Γ) and the score
 * bound R, without storing the projections. Rows go in blocks through one product
 * against the stacked effective weights [W_Q; W_K; W_V] (LoRA merged in, bias added),
 * reduced while the block is still in cache. The key mean that centring subtracts is
 * x̄·W_Kᵀ + b_K, so one pass over the rows suffices; under RoPE (Q and K turned by
 * their positions, as the backends see them) the rotated keys' mean is no function of
 * x̄, so a first pass projects, turns and sums the keys block by block.
 *
 * Head slots: the stacked weights' rows, head_dim at a time; slot s < H is query head
 * s, the next KV slots are key heads, the last KV value heads. Wide layers go through
 * the slots in panels so the merged weights never exceed STATS_PANEL_FLOATS. */
#include <math.h>
#include <string.h>

#include "layer.h"

/* Rows of one product block: the block of products (≤ STATS_BLOCK × panel floats)
 * stays in L2 for narrow layers. Fewer rows when that gives every thread a block. */
#define STATS_BLOCK 512
/* Rows per partial column sum of x: fixed, so the key mean and R do not depend on
 * the thread count. */
#define SUM_BLOCK 512
/* Floats of merged weights one panel of head slots may hold (16 MiB). */
#define STATS_PANEL_FLOATS (INT64_C(1) << 22)

typedef struct stats_shape {
    int64_t d_model, d, slots, panel_slots;
    int64_t blk, blocks_per_batch, tasks; /* product blocks, one batch element each */
    int64_t sums_per_batch, sum_tasks;    /* partial column sums of x */
    int nt;
} stats_shape;

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Rows [r0, r0 + n) of batch element b cut to its valid rows (right padding: attn_q_len
 * of the call's arguments); 0 when none is valid. Padding takes no part in any
 * statistic. */
static int64_t valid_rows(const attn_problem *p, int64_t b, int64_t r0, int64_t n)
{
    const int64_t v = attn_q_len(p, b) - r0;
    return v < 0 ? 0 : v < n ? v : n;
}

/* The divisor of batch element b's means: its valid rows (1 when none). */
static double mean_rows(const attn_problem *p, int64_t b)
{
    const int64_t v = attn_q_len(p, b);
    return v > 0 ? (double)v : 1.0;
}

static stats_shape shape_of(const layer *l, const attn_problem *p)
{
    stats_shape s;
    s.d_model = l->d_model;
    s.d = l->head_dim;
    s.slots = l->n_heads + 2 * l->n_kv_heads;
    s.panel_slots = STATS_PANEL_FLOATS / (s.d_model * s.d);
    s.panel_slots = s.panel_slots < 1 ? 1 : s.panel_slots > s.slots ? s.slots : s.panel_slots;
    s.nt = p->threads > 1 ? p->threads : 1;
    const int64_t len = p->len_q;
    int64_t per_batch = ceil_div(len, STATS_BLOCK);
    if (p->batch * per_batch < s.nt) {
        per_batch = ceil_div(s.nt, p->batch);
        const int64_t most = ceil_div(len, 16);
        per_batch = per_batch > most ? most : per_batch;
    }
    s.blk = (ceil_div(len, per_batch) + 15) & ~INT64_C(15);
    s.blocks_per_batch = ceil_div(len, s.blk);
    s.tasks = p->batch * s.blocks_per_batch;
    s.sums_per_batch = ceil_div(len, SUM_BLOCK);
    s.sum_tasks = p->batch * s.sums_per_batch;
    return s;
}

/* Reserves a·b floats at *n, rounded up to 16 (64 bytes), and returns where they start;
 * clears *ok on overflow. */
static size_t take(size_t *n, int64_t a, int64_t b, int *ok)
{
    const size_t at = *n;
    int64_t m;
    size_t r;
    if (__builtin_mul_overflow(a, b, &m) || __builtin_add_overflow((size_t)m, (size_t)15, &r) ||
        __builtin_add_overflow(*n, r & ~(size_t)15, n))
        *ok = 0;
    return at;
}

typedef struct stats_ws {
    float *w, *bias;         /* one panel's merged weights (slots·d, d_model) and biases */
    float *zero;             /* a panel of zeros: the centre of query and value slots,
                                and the bias of a block that already has its own */
    float *kmean;            /* (batch, kv_dim): the key mean of each batch element */
    double *ksum;            /* RoPE: (sum_tasks, kv_dim) column sums of rotated keys */
    double *colsum;          /* (sum_tasks, d_model) partial column sums of x */
    double *slot;            /* (tasks, slots, 2): max ‖·‖² and max |entry| per slot */
    float *worker;           /* per worker: x block (blk, d_model), products (blk, panel) */
    size_t worker_floats;
} stats_ws;

/* Carves ws (NULL: only sizes); returns the floats needed, 0 on overflow. */
static size_t carve(const layer *l, const attn_problem *p, const stats_shape *s, float *ws,
                    stats_ws *w)
{
    const int64_t panel = s->panel_slots * s->d;
    size_t n = 0, per = 0;
    int ok = 1;
    const size_t w_at = take(&n, panel, s->d_model, &ok);
    const size_t bias_at = take(&n, panel, 1, &ok);
    const size_t zero_at = take(&n, panel, 1, &ok);
    const size_t kmean_at = take(&n, p->batch, l->kv_dim, &ok);
    const size_t colsum_at = take(&n, s->sum_tasks, 2 * s->d_model, &ok); /* doubles */
    const size_t slot_at = take(&n, s->tasks, 4 * s->slots, &ok);        /* doubles */
    const size_t ksum_at =
        take(&n, l->rope != LORA_ROPE_NONE ? s->sum_tasks : 0, 2 * l->kv_dim, &ok);
    take(&per, s->blk, s->d_model, &ok);
    take(&per, s->blk, panel, &ok);
    const size_t worker_at = take(&n, s->nt, (int64_t)per, &ok);
    if (!ok)
        return 0;
    if (ws) {
        w->w = ws + w_at;
        w->bias = ws + bias_at;
        w->zero = ws + zero_at;
        w->kmean = ws + kmean_at;
        w->colsum = (double *)(void *)(ws + colsum_at);
        w->slot = (double *)(void *)(ws + slot_at);
        w->ksum = (double *)(void *)(ws + ksum_at);
        w->worker = ws + worker_at;
        w->worker_floats = per;
    }
    return n;
}

size_t layer_qkv_stats_floats(const layer *l, const attn_problem *p)
{
    const stats_shape s = shape_of(l, p);
    return carve(l, p, &s, NULL, NULL);
}

/* Rows r0 .. r0+n-1 of [W_Q; W_K; W_V] + s·[B·A] (one float product per projection:
 * the estimate needs no more) and of the stacked biases into w and bias. Returns the
 * PROJ_* index of a projection whose merged weight is not finite, else -1. */
static int stack_rows(const layer *l, const la_ctx *la, int64_t r0, int64_t n, float *w,
                      float *bias, int threads)
{
    const int64_t in = l->d_model;
    int64_t start = 0;
    for (int t = PROJ_Q; t <= PROJ_V; t++) {
        const layer_proj *pr = &l->proj[t];
        const int64_t lo = r0 > start ? r0 : start;
        const int64_t hi = r0 + n < start + pr->out ? r0 + n : start + pr->out;
        if (lo < hi) {
            const int64_t i0 = lo - start, rows = hi - lo;
            float *dst = w + (lo - r0) * in;
            la_wmat_rows(pr->weight, in, i0, rows, dst);
            if (pr->adapted) {
                la_gemm(la, threads, LA_N, LA_N, rows, in, l->rank, l->lora_scale,
                        pr->b + i0 * l->rank, l->rank, pr->a, in, 1.0f, dst, in);
                if (la_find_nonfinite(dst, (size_t)(rows * in)) >= 0)
                    return t;
            }
            for (int64_t i = 0; i < rows; i++)
                bias[lo - r0 + i] = pr->bias ? pr->bias[i0 + i] : 0.0f;
        }
        start += pr->out;
    }
    return -1;
}

/* Sum and max of 16 lanes by halving (constant trip counts, so each step is one
 * vector operation, not a chain of scalar ones). */
#define LANES_REDUCE(a, op)                                                                \
    do {                                                                                   \
        for (int j_ = 0; j_ < 8; j_++)                                                     \
            a[j_] = op(a[j_], a[j_ + 8]);                                                  \
        for (int j_ = 0; j_ < 4; j_++)                                                     \
            a[j_] = op(a[j_], a[j_ + 4]);                                                  \
        for (int j_ = 0; j_ < 2; j_++)                                                     \
            a[j_] = op(a[j_], a[j_ + 2]);                                                  \
        a[0] = op(a[0], a[1]);                                                             \
    } while (0)
#define LANE_ADD(x, y) ((x) + (y))
#define LANE_MAX(x, y) ((y) > (x) ? (y) : (x))

/* Per slot of one block of products y (n rows, width ns·d, biases not yet added):
 * max ‖row part − c‖² and max |entry| into st[2·slot], c the key mean km for key
 * slots, else 0. Float sums of d squares: the estimate needs R to a few ulps only. */
LA_VECTOR_CLONES static void block_stats(const layer *l, const float *y, int64_t n,
                                         int64_t s0, int64_t ns, const float *bias,
                                         const float *km, const float *zero, double *st)
{
    const int64_t d = l->head_dim, width = ns * d, nh = l->n_heads, nkv = l->n_kv_heads;
    const int64_t dv = d & ~INT64_C(15);
    for (int64_t u = 0; u < ns; u++) {
        const int64_t slot = s0 + u;
        const float *bu = bias + u * d;
        const float *kc = slot >= nh && slot < nh + nkv ? km + (slot - nh) * d : zero;
        float n2max = 0.0f, amax = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            const float *row = y + i * width + u * d;
            float s[16] = {0}, m[16] = {0};
            for (int64_t c = 0; c < dv; c += 16)
                for (int j = 0; j < 16; j++) {
                    const float v = row[c + j] + bu[c + j], e = v - kc[c + j];
                    s[j] += e * e;
                    m[j] = fabsf(v) > m[j] ? fabsf(v) : m[j];
                }
            for (int64_t c = dv; c < d; c++) {
                const float v = row[c] + bu[c], e = v - kc[c];
                s[0] += e * e;
                m[0] = fabsf(v) > m[0] ? fabsf(v) : m[0];
            }
            LANES_REDUCE(s, LANE_ADD);
            LANES_REDUCE(m, LANE_MAX);
            const float n2 = s[0], a = m[0];
            n2max = n2 > n2max ? n2 : n2max;
            amax = a > amax ? a : amax;
        }
        st[2 * slot] = n2max;
        st[2 * slot + 1] = amax;
    }
}

/* acc[c] += Σ_i x[i·w + c] over n rows of width w. */
LA_VECTOR_CLONES static void add_rows(const float *x, int64_t n, int64_t w, double *acc)
{
    for (int64_t i = 0; i < n; i++)
#pragma omp simd
        for (int64_t c = 0; c < w; c++)
            acc[c] += x[i * w + c];
}

/* What a parallel part of the statistics reads (pool_run's ctx): the panel of head
 * slots s0 .. s0+ns-1 and its key columns k0 .. k0+cols-1. */
typedef struct stats_job {
    const layer *l;
    const attn_problem *p;
    const stats_shape *s;
    const stats_ws *w;
    const float *x;
    double *colsum;
    int64_t s0, ns, k0, cols;
} stats_job;

/* A static share of the partial column sums. */
static void sums_part(void *arg, int worker, int workers)
{
    const stats_job *j = arg;
    const stats_shape *s = j->s;
    const int64_t len = j->p->len_q, dm = s->d_model;
    int64_t lo, hi;
    pool_static_range(s->sum_tasks, worker, workers, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        const int64_t b = t / s->sums_per_batch, i0 = (t % s->sums_per_batch) * SUM_BLOCK;
        const int64_t n = valid_rows(j->p, b, i0, SUM_BLOCK);
        double *acc = j->colsum + t * dm;
        memset(acc, 0, (size_t)dm * sizeof *acc);
        add_rows(j->x + (b * len + i0) * dm, n, dm, acc);
    }
}

/* Column sums of x per fixed row block, then the per-batch mean x̄ (in the first
 * block's row of colsum). */
static void input_means(const attn_problem *p, const stats_shape *s, const float *x,
                        double *colsum)
{
    const int64_t len = p->len_q, dm = s->d_model;
    const int nt = (double)len * (double)p->batch * (double)dm > 1e5 ? s->nt : 1;
    stats_job j = {.p = p, .s = s, .x = x, .colsum = colsum};
    pool_run(p->la->pool, nt, sums_part, &j);
    for (int64_t b = 0; b < p->batch; b++) {
        double *mean = colsum + b * s->sums_per_batch * dm;
        for (int64_t t = 1; t < s->sums_per_batch; t++)
            for (int64_t c = 0; c < dm; c++)
                mean[c] += colsum[(b * s->sums_per_batch + t) * dm + c];
        for (int64_t c = 0; c < dm; c++)
            mean[c] /= mean_rows(p, b);
    }
}

/* Adds the panel's biases to a block of products y (rows i0 .. i0+n-1 of batch element
 * b, slots s0 .. s0+ns-1) and turns its query and key slots by RoPE at the rows'
 * positions, as the backends see them. */
static void rotate_block(const layer *l, const attn_problem *p, int64_t b, int64_t i0,
                         int64_t n, int64_t s0, int64_t ns, const float *bias, float *y)
{
    const int64_t d = l->head_dim, width = ns * d, nh = l->n_heads, nk = nh + l->n_kv_heads;
    const int64_t q1 = nh < s0 + ns ? nh : s0 + ns;           /* query slots [s0, q1) */
    const int64_t k0 = s0 > nh ? s0 : nh, k1 = nk < s0 + ns ? nk : s0 + ns; /* keys */
    for (int64_t i = 0; i < n; i++) {
        float *row = y + i * width;
        for (int64_t c = 0; c < width; c++)
            row[c] += bias[c];
        if (s0 < q1)
            layer_rope_row(l, p->la, attn_q_pos(p, b, i0 + i), row, q1 - s0);
        if (k0 < k1)
            layer_rope_row(l, p->la, attn_kv_pos(p, b, i0 + i), row + (k0 - s0) * d,
                           k1 - k0);
    }
}

/* A static share of the key means x̄·W_Kᵀ + b_K of the panel's key columns. */
static void kmean_part(void *arg, int worker, int workers)
{
    const stats_job *j = arg;
    const layer *l = j->l;
    const stats_ws *w = j->w;
    const int64_t dm = j->s->d_model, d = j->s->d, s0 = j->s0, k0 = j->k0, cols = j->cols;
    int64_t lo, hi;
    pool_static_range(j->p->batch * cols, worker, workers, &lo, &hi);
    for (int64_t e = lo; e < hi; e++) {
        const int64_t b = e / cols, c = k0 + e % cols;
        const double *mean = w->colsum + b * j->s->sums_per_batch * dm;
        const float *wr = w->w + (c - s0 * d) * dm;
        double acc = w->bias[c - s0 * d];
        for (int64_t m = 0; m < dm; m++)
            acc += mean[m] * wr[m];
        w->kmean[b * l->kv_dim + (c - l->q_dim)] = (float)acc;
    }
}

/* A static share of the row blocks: one product against the panel each, reduced into
 * the block's per-slot maxima. */
static void blocks_part(void *arg, int worker, int workers)
{
    const stats_job *j = arg;
    const layer *l = j->l;
    const attn_problem *p = j->p;
    const stats_shape *s = j->s;
    const stats_ws *w = j->w;
    const int64_t len = p->len_q, dm = s->d_model, d = s->d, s0 = j->s0, ns = j->ns;
    const float *x = j->x;
    int64_t lo, hi;
    pool_static_range(s->tasks, worker, workers, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        float *xb = w->worker + (size_t)worker * w->worker_floats;
        float *yb = xb + ((size_t)(s->blk * dm + 15) & ~(size_t)15);
        const int64_t b = t / s->blocks_per_batch, i0 = (t % s->blocks_per_batch) * s->blk;
        const int64_t n = valid_rows(p, b, i0, s->blk);
        /* A copy: BLIS reads only library buffers (they carry tail padding). */
        memcpy(xb, x + (b * len + i0) * dm, (size_t)(n * dm) * sizeof(float));
        if (n > 0)
            la_gemm(p->la, 1, LA_N, LA_T, n, ns * d, dm, 1.0f, xb, dm, w->w, dm, 0.0f, yb,
                    ns * d);
        const int rope = l->rope != LORA_ROPE_NONE;
        if (rope)
            rotate_block(l, p, b, i0, n, s0, ns, w->bias, yb);
        block_stats(l, yb, n, s0, ns, rope ? w->zero : w->bias, w->kmean + b * l->kv_dim,
                    w->zero, w->slot + t * 2 * s->slots);
    }
}

/* A static share of the fixed row blocks under RoPE (rotated_key_means): the key rows
 * of the panel's weights, their bias, the turn, and column sums in double in row order. */
static void rotated_sums_part(void *arg, int worker, int workers)
{
    const stats_job *j = arg;
    const layer *l = j->l;
    const attn_problem *p = j->p;
    const stats_shape *s = j->s;
    const stats_ws *w = j->w;
    const int64_t len = p->len_q, dm = s->d_model, d = s->d, cols = j->cols;
    const float *wk = w->w + (j->k0 - j->s0 * d) * dm, *bk = w->bias + (j->k0 - j->s0 * d);
    int64_t lo, hi;
    pool_static_range(s->sum_tasks, worker, workers, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        float *xb = w->worker + (size_t)worker * w->worker_floats;
        float *yb = xb + ((size_t)(s->blk * dm + 15) & ~(size_t)15);
        const int64_t b = t / s->sums_per_batch, i0 = (t % s->sums_per_batch) * SUM_BLOCK;
        const int64_t i1 = i0 + valid_rows(p, b, i0, SUM_BLOCK);
        double *acc = w->ksum + t * l->kv_dim;
        memset(acc, 0, (size_t)cols * sizeof *acc);
        for (int64_t r0 = i0; r0 < i1; r0 += s->blk) {
            const int64_t n = i1 - r0 < s->blk ? i1 - r0 : s->blk;
            memcpy(xb, j->x + (b * len + r0) * dm, (size_t)(n * dm) * sizeof(float));
            la_gemm(p->la, 1, LA_N, LA_T, n, cols, dm, 1.0f, xb, dm, wk, dm, 0.0f, yb, cols);
            for (int64_t i = 0; i < n; i++) {
                float *row = yb + i * cols;
                for (int64_t c = 0; c < cols; c++)
                    row[c] += bk[c];
                layer_rope_row(l, p->la, attn_kv_pos(p, b, r0 + i), row, cols / d);
                for (int64_t c = 0; c < cols; c++)
                    acc[c] += row[c];
            }
        }
    }
}

/* The key mean of the panel's key columns under RoPE: the turned keys' mean is no
 * function of x̄, so the keys are projected and turned block by block and summed in
 * fixed blocks of SUM_BLOCK rows (the mean does not depend on the thread count), then
 * per batch element in block order. */
static void rotated_key_means(stats_job *j)
{
    const layer *l = j->l;
    const stats_shape *s = j->s;
    const int nt = s->sum_tasks < s->nt ? (int)s->sum_tasks : s->nt;
    pool_run(j->p->la->pool, nt, rotated_sums_part, j);
    for (int64_t b = 0; b < j->p->batch; b++)
        for (int64_t c = 0; c < j->cols; c++) {
            double sum = 0.0;
            for (int64_t t = 0; t < s->sums_per_batch; t++)
                sum += j->w->ksum[(b * s->sums_per_batch + t) * l->kv_dim + c];
            j->w->kmean[b * l->kv_dim + (j->k0 - l->q_dim) + c] =
                (float)(sum / mean_rows(j->p, b));
        }
}

int layer_qkv_stats(const layer *l, const attn_problem *p, const float *x, float *ws,
                    layer_qkv_stats_result *out)
{
    const stats_shape s = shape_of(l, p);
    stats_ws w;
    carve(l, p, &s, ws, &w);
    const int64_t dm = s.d_model, d = s.d, nh = l->n_heads;
    input_means(p, &s, x, w.colsum);
    memset(w.zero, 0, (size_t)(s.panel_slots * d) * sizeof(float));
    const int rope = l->rope != LORA_ROPE_NONE;

    for (int64_t s0 = 0; s0 < s.slots; s0 += s.panel_slots) {
        const int64_t ns = s.slots - s0 < s.panel_slots ? s.slots - s0 : s.panel_slots;
        const int bad = stack_rows(l, p->la, s0 * d, ns * d, w.w, w.bias, s.nt);
        if (bad >= 0)
            return bad;
        /* The key mean of the key columns in this panel: x̄·W_Kᵀ + b_K. */
        const int64_t k0 = s0 * d > l->q_dim ? s0 * d : l->q_dim;
        const int64_t k1 = (s0 + ns) * d < l->q_dim + l->kv_dim ? (s0 + ns) * d
                                                                 : l->q_dim + l->kv_dim;
        stats_job j = {l, p, &s, &w, x, w.colsum, s0, ns, k0, k1 - k0};
        if (k0 < k1 && rope) {
            rotated_key_means(&j);
        } else if (k0 < k1) {
            const int nt = (double)p->batch * (double)j.cols * (double)dm > 1e6 ? s.nt : 1;
            pool_run(p->la->pool, nt, kmean_part, &j);
        }
        const int nt = s.tasks < s.nt ? (int)s.tasks : s.nt;
        pool_run(p->la->pool, nt, blocks_part, &j);
    }

    /* Maxima over the blocks of each batch element, then R over its heads. */
    const int64_t group = nh / l->n_kv_heads;
    double amax[3] = {0.0, 0.0, 0.0}, r = 0.0;
    for (int64_t g = 0; g < l->n_kv_heads; g++)
        out->group_r[g] = 0.0;
    for (int64_t b = 0; b < p->batch; b++) {
        double *acc = w.slot + b * s.blocks_per_batch * 2 * s.slots;
        for (int64_t t = 1; t < s.blocks_per_batch; t++) {
            const double *st = acc + t * 2 * s.slots;
            for (int64_t u = 0; u < 2 * s.slots; u++)
                acc[u] = st[u] > acc[u] ? st[u] : acc[u];
        }
        for (int64_t u = 0; u < s.slots; u++) {
            const int which = u < nh ? 0 : u < nh + l->n_kv_heads ? 1 : 2;
            amax[which] = acc[2 * u + 1] > amax[which] ? acc[2 * u + 1] : amax[which];
        }
        for (int64_t h = 0; h < nh; h++) {
            const double rh = fabs((double)p->softmax_scale) *
                              sqrt(acc[2 * h] * acc[2 * (nh + h / group)]);
            double *rg = &out->group_r[h / group];
            *rg = rh > *rg ? rh : *rg;
            r = rh > r ? rh : r;
        }
    }
    for (int i = 0; i < 3; i++)
        out->max_abs[i] = amax[i];
    out->score_bound = r;
    return -1;
}
