/* Decoding with a KV cache (lora_kv_cache_*, lora_decode, lora_decode_ex): validation,
 * the cache's memory, the projections (src/layer, typed base weights, lora_apply for
 * many tenants) and RoPE; the attention over the cache is src/layer/decode_attn.c. */
#include <string.h>

#include "internal.h"
#include "../layer/decode_attn.h"

struct lora_kv_cache {
    lora_mem mem; /* the creating adapter's allocator */
    int64_t batch, capacity;
    int64_t slots, slots16;  /* slots per (sequence, kv head); a ring when < capacity */
    int64_t n_kv_heads, head_dim, window;
    int64_t *len;            /* (batch) tokens held */
    float *k, *v;            /* decode_attn.h's layout */
};

static int64_t cache_floats_of(int64_t batch, int64_t n_kv, int64_t slots16, int64_t hd)
{
    int64_t n;
    if (__builtin_mul_overflow(batch, n_kv, &n) || __builtin_mul_overflow(n, slots16, &n) ||
        __builtin_mul_overflow(n, hd, &n) || n > (int64_t)(SIZE_MAX / 8))
        return -1;
    return n;
}

LORA_API int lora_kv_cache_create(lora_kv_cache **out, const lora_adapter *ad,
                                  int64_t batch, int64_t capacity)
{
    if (!out)
        return LORA_ERR_INVALID_ARG;
    *out = NULL;
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    if (batch < 1 || capacity < 1 || capacity > INT64_MAX - 16)
        return LORA_ERR_SHAPE;
    const layer *l = &ad->layer;
    /* With a window only the last WINDOW tokens can ever be seen again: keep those. */
    const int64_t slots = l->window > 0 && l->window < capacity ? l->window : capacity;
    const int64_t slots16 = (slots + 15) & ~INT64_C(15);
    const int64_t n = cache_floats_of(batch, l->n_kv_heads, slots16, l->head_dim);
    if (n < 0)
        return LORA_ERR_SHAPE;
    lora_kv_cache *c = lora_mem_calloc(&ad->mem, 1, sizeof *c);
    if (!c)
        return LORA_ERR_NOMEM;
    *c = (lora_kv_cache){.mem = ad->mem, .batch = batch, .capacity = capacity,
                         .slots = slots, .slots16 = slots16, .n_kv_heads = l->n_kv_heads,
                         .head_dim = l->head_dim, .window = l->window};
    /* zeroed: slots past a sequence's length are read (and weighted 0) by the kernel */
    c->len = lora_mem_calloc(&c->mem, (size_t)batch, sizeof *c->len);
    c->k = lora_mem_calloc(&c->mem, (size_t)n, sizeof(float));
    c->v = lora_mem_calloc(&c->mem, (size_t)n, sizeof(float));
    if (!c->len || !c->k || !c->v) {
        lora_kv_cache_destroy(c);
        return LORA_ERR_NOMEM;
    }
    *out = c;
    return LORA_OK;
}

LORA_API void lora_kv_cache_destroy(lora_kv_cache *cache)
{
    if (!cache)
        return;
    const lora_mem mem = cache->mem;
    lora_mem_free(&mem, cache->len);
    lora_mem_free(&mem, cache->k);
    lora_mem_free(&mem, cache->v);
    lora_mem_free(&mem, cache);
}

LORA_API int lora_kv_cache_reset(lora_kv_cache *cache, int64_t b)
{
    if (!cache || b < -1 || b >= cache->batch)
        return LORA_ERR_INVALID_ARG;
    for (int64_t i = b < 0 ? 0 : b; i < (b < 0 ? cache->batch : b + 1); i++)
        cache->len[i] = 0;
    return LORA_OK;
}

LORA_API int lora_kv_cache_length(const lora_kv_cache *cache, int64_t b, int64_t *len)
{
    if (!cache || !len || b < 0 || b >= cache->batch)
        return LORA_ERR_INVALID_ARG;
    *len = cache->len[b];
    return LORA_OK;
}

/* ---- checks ------------------------------------------------------------------------- */

/* The first (0.2) layout of lora_decode_args ends at tenant_of_seq. */
#define DECODE_ARGS_FIRST_SIZE (offsetof(lora_decode_args, tenant_of_seq) + sizeof(void *))

static int read_decode_args(lora_adapter *ad, const lora_decode_args *args,
                            lora_decode_args *dst)
{
    const int st = lora_read_args_struct(ad->err, args, args ? args->struct_size : 0, dst,
                                         sizeof *dst, DECODE_ARGS_FIRST_SIZE,
                                         "lora_decode_args");
    if (st != LORA_OK)
        return st;
    if (dst->flags)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "args->flags = 0x%x must be 0",
                              (unsigned)dst->flags);
    return LORA_OK;
}

/* Tenants: ids in range and geometry as ad's. */
static int check_tenants(lora_adapter *ad, const lora_decode_args *a, int64_t batch)
{
    if (!a->tenants != !a->tenant_of_seq)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "args->%s is NULL but args->%s is set",
                              a->tenants ? "tenant_of_seq" : "tenants",
                              a->tenants ? "tenants" : "tenant_of_seq");
    if (!a->tenants)
        return LORA_OK;
    if (a->n_tenants == 0 || a->n_tenants > (size_t)INT32_MAX)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "args->n_tenants = %zu is outside [1, 2^31 - 1]", a->n_tenants);
    const layer *l = &ad->layer;
    for (size_t i = 0; i < a->n_tenants; i++) {
        const lora_adapter *t = a->tenants[i];
        if (!t)
            return lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "args->tenants[%zu] is NULL",
                                  i);
        const layer *tl = &t->layer;
        if (tl->d_model != l->d_model || tl->n_heads != l->n_heads ||
            tl->n_kv_heads != l->n_kv_heads || tl->head_dim != l->head_dim ||
            tl->out_proj != l->out_proj)
            return lora_set_error(ad->err, LORA_ERR_SHAPE,
                                  "args->tenants[%zu] differs from ad in D_MODEL, N_HEADS, "
                                  "N_KV_HEADS, HEAD_DIM or OUT_PROJ", i);
    }
    for (int64_t b = 0; b < batch; b++)
        if (a->tenant_of_seq[b] < -1 || a->tenant_of_seq[b] >= (int64_t)a->n_tenants)
            return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                                  "args->tenant_of_seq[%lld] = %d is outside [-1, %zu)",
                                  (long long)b, (int)a->tenant_of_seq[b], a->n_tenants);
    return LORA_OK;
}

/* Tokens sequence b takes in this call. */
static int64_t seq_tokens(const lora_decode_args *a, int64_t b, int64_t n_new)
{
    return a->n_tokens ? a->n_tokens[b] : n_new;
}

/* Everything but the values of x; *rows = new tokens in all. */
static int check_shapes(lora_adapter *ad, const lora_decode_args *a,
                        const lora_kv_cache *c, int64_t n_new, int64_t *rows)
{
    const layer *l = &ad->layer;
    if (n_new < 1)
        return lora_set_error(ad->err, LORA_ERR_SHAPE, "n_new = %lld must be >= 1",
                              (long long)n_new);
    if (c->n_kv_heads != l->n_kv_heads || c->head_dim != l->head_dim)
        return lora_set_error(ad->err, LORA_ERR_SHAPE,
                              "cache holds %lld kv heads of %lld dims, ad has %lld of %lld",
                              (long long)c->n_kv_heads, (long long)c->head_dim,
                              (long long)l->n_kv_heads, (long long)l->head_dim);
    if (c->slots < c->capacity && c->window != l->window)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "cache is a ring of WINDOW = %lld tokens, ad has WINDOW = %lld",
                              (long long)c->window, (long long)l->window);
    int64_t total = 0, width = l->d_model > l->q_dim ? l->d_model : l->q_dim, e;
    if (__builtin_mul_overflow(c->batch, n_new, &e) || __builtin_mul_overflow(e, width, &e) ||
        e > (int64_t)(SIZE_MAX / 16))
        return lora_set_error(ad->err, LORA_ERR_SHAPE, "batch x n_new x width overflows");
    for (int64_t b = 0; b < c->batch; b++) {
        const int64_t n = seq_tokens(a, b, n_new);
        if (n < 0 || n > n_new)
            return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                                  "args->n_tokens[%lld] = %lld is outside [0, n_new = %lld]",
                                  (long long)b, (long long)n, (long long)n_new);
        if (n > c->capacity - c->len[b])
            return lora_set_error(ad->err, LORA_ERR_SHAPE,
                                  "sequence %lld holds %lld tokens: %lld more exceed the "
                                  "capacity %lld (nothing was appended)",
                                  (long long)b, (long long)c->len[b], (long long)n,
                                  (long long)c->capacity);
        total += n;
    }
    *rows = total;
    return LORA_OK;
}

static int check_decode(lora_adapter *ad, const lora_decode_args *a, const lora_kv_cache *c,
                        const float *x, int64_t n_new, const float *out, int64_t *rows)
{
    if (!c || !x || !out)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "%s is NULL",
                              !c ? "cache" : !x ? "x" : "out");
    const layer *l = &ad->layer;
    int st = check_shapes(ad, a, c, n_new, rows);
    if (st == LORA_OK)
        st = check_tenants(ad, a, c->batch);
    if (st != LORA_OK)
        return st;
    for (int t = 0; t < PROJ_COUNT; t++)
        if (!l->proj[t].weight.data && (t != PROJ_O || l->out_proj))
            return lora_set_error(ad->err, LORA_ERR_STATE,
                                  "base weight W_%s is not set (lora_adapter_set_base)",
                                  lora_proj_names[t]);
    for (int64_t b = 0; b < c->batch; b++) {
        const size_t n = (size_t)(seq_tokens(a, b, n_new) * l->d_model);
        const int64_t bad = lora_find_nonfinite(x + b * n_new * l->d_model, n);
        if (bad >= 0)
            return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                                  "x has a non-finite entry at index %lld",
                                  (long long)(b * n_new * l->d_model + bad));
    }
    return LORA_OK;
}

/* ---- the step ----------------------------------------------------------------------- */

/* Steps of at most this many rows (on AVX-512) split each projection's columns over
 * the pool: la_gemm_w's register kernel then streams every weight once on all the
 * adapter's threads, and a column's sums do not depend on the split. */
#define DEC_SPLIT_ROWS 16
/* ... for weights of at least this many elements (smaller ones cost less to stream
 * than to hand out to the pool). */
#define DEC_SPLIT_MIN_WEIGHTS (INT64_C(1) << 18)

static int splits_columns(const lora_adapter *ad, int64_t rows)
{
    return rows <= DEC_SPLIT_ROWS && ad->la.avx512 && ad->threads > 1 && ad->la.pool;
}

/* One step's working memory, carved from the adapter's inference buffer. */
typedef struct dec_ws {
    float *x, *q, *k, *v, *c, *o, *xa, *wpanel, *parts, *cols;
    size_t part_floats, cols_floats; /* per part: attention, column split */
    dattn_seq *seqs;
    int32_t *tenant_of_row, *tenant_map;
    const lora_adapter **sub; /* tenants adapting one projection */
} dec_ws;

static size_t carve(size_t *off, size_t n, size_t sz, int *ok)
{
    const size_t at = *off;
    size_t bytes;
    if (__builtin_mul_overflow(n, sz, &bytes) || __builtin_add_overflow(bytes, (size_t)63, &bytes) ||
        __builtin_add_overflow(*off, bytes & ~(size_t)63, off))
        *ok = 0;
    return at;
}

/* The most scratch la_gemm_w needs for a projection of `rows` rows. */
static size_t wpanel_floats(const lora_adapter *ad, int64_t rows)
{
    size_t most = 0;
    for (int t = 0; t < PROJ_COUNT; t++) {
        const layer_proj *p = &ad->layer.proj[t];
        if (!p->weight.data)
            continue;
        const size_t n =
            la_gemm_w_scratch_floats(&ad->la, LA_T, rows, p->weight.dtype, p->out, p->in);
        most = n > most ? n : most;
    }
    return most;
}

static int reserve_ws(lora_adapter *ad, int64_t batch, int64_t rows, int64_t max_new,
                      size_t n_tenants, int parts, dec_ws *w)
{
    const layer *l = &ad->layer;
    const size_t r = (size_t)rows, out_w = (size_t)(l->out_proj ? l->d_model : l->q_dim);
    size_t off = 0;
    int ok = 1;
    w->part_floats = dattn_part_floats(l->head_dim, max_new);
    ok &= w->part_floats > 0;
    const size_t widest = (size_t)(l->d_model > l->q_dim ? l->d_model : l->q_dim);
    w->cols_floats = splits_columns(ad, rows) ? r * (widest + 16 + (size_t)l->rank) + 32 : 0;
    const size_t at[14] = {
        carve(&off, r, (size_t)l->d_model * 4, &ok), carve(&off, r, (size_t)l->q_dim * 4, &ok),
        carve(&off, r, (size_t)l->kv_dim * 4, &ok), carve(&off, r, (size_t)l->kv_dim * 4, &ok),
        carve(&off, r, (size_t)l->q_dim * 4, &ok), carve(&off, r, out_w * 4, &ok),
        carve(&off, r, (size_t)l->rank * 4, &ok), carve(&off, wpanel_floats(ad, rows), 4, &ok),
        carve(&off, (size_t)parts, w->part_floats * 4, &ok),
        carve(&off, (size_t)batch, sizeof(dattn_seq), &ok),
        carve(&off, r, sizeof(int32_t), &ok), carve(&off, n_tenants, sizeof(int32_t), &ok),
        carve(&off, n_tenants, sizeof(void *), &ok),
        carve(&off, (size_t)ad->threads, w->cols_floats * 4, &ok)};
    if (!ok)
        return lora_set_error(ad->err, LORA_ERR_SHAPE, "decode working memory size overflows");
    if (lora_buf_reserve(&ad->mem, &ad->infer_buf, off) != LORA_OK)
        return lora_set_error(ad->err, LORA_ERR_NOMEM,
                              "cannot allocate %zu bytes of decode working memory", off);
    unsigned char *base = ad->infer_buf.ptr;
    float **f[9] = {&w->x, &w->q, &w->k, &w->v, &w->c, &w->o, &w->xa, &w->wpanel, &w->parts};
    for (int i = 0; i < 9; i++)
        *f[i] = (float *)(void *)(base + at[i]);
    w->seqs = (dattn_seq *)(void *)(base + at[9]);
    w->tenant_of_row = (int32_t *)(void *)(base + at[10]);
    w->tenant_map = (int32_t *)(void *)(base + at[11]);
    w->sub = (const lora_adapter **)(void *)(base + at[12]);
    w->cols = (float *)(void *)(base + at[13]);
    return LORA_OK;
}

/* y += the LoRA terms of projection t for every row of a tenant adapting t
 * (lora_apply over those tenants). */
static int add_tenant_terms(lora_adapter *ad, const lora_decode_args *a, const dec_ws *w,
                            int64_t batch, int t, const float *x, int64_t rows, float *y)
{
    size_t n_sub = 0;
    for (size_t i = 0; i < a->n_tenants; i++) {
        const int adapted = a->tenants[i]->layer.proj[t].adapted;
        w->tenant_map[i] = adapted ? (int32_t)n_sub : -1;
        if (adapted)
            w->sub[n_sub++] = a->tenants[i];
    }
    if (n_sub == 0)
        return LORA_OK;
    for (int64_t b = 0; b < batch; b++) {
        const int32_t id = a->tenant_of_seq[b];
        for (int64_t i = 0; i < w->seqs[b].n; i++)
            w->tenant_of_row[w->seqs[b].row0 + i] = id < 0 ? -1 : w->tenant_map[id];
    }
    return lora_apply_with_error(w->sub, n_sub, 1 << t, w->tenant_of_row, x, rows, y, ad->err,
                                 LORA_ERRMSG_SIZE);
}

/* A projection of few rows split into blocks of 16 columns over the pool: each part
 * projects its columns (a slice of W's rows, bias and B) into its own scratch. */
typedef struct cols_job {
    const layer *l;
    int t;
    const la_ctx *la;
    const float *x;
    int64_t rows;
    float *y, *scratch;
    size_t part_floats;
} cols_job;

static void cols_part(void *ctx, int part, int parts)
{
    const cols_job *j = ctx;
    const layer_proj *pr = &j->l->proj[j->t];
    const int64_t blocks = (pr->out + 15) / 16, lo = blocks * part / parts * 16;
    const int64_t hi = blocks * (part + 1) / parts * 16 < pr->out
                           ? blocks * (part + 1) / parts * 16 : pr->out;
    if (lo >= hi)
        return;
    layer sub = *j->l;
    layer_proj *sp = &sub.proj[j->t];
    sp->out = hi - lo;
    sp->weight.data = (const unsigned char *)pr->weight.data +
                      (size_t)(lo * pr->in) * la_dtype_size(pr->weight.dtype);
    sp->bias = pr->bias ? pr->bias + lo : NULL;
    sp->b = pr->adapted ? pr->b + lo * sub.rank : NULL;
    float *yp = j->scratch + (size_t)part * j->part_floats;
    float *xa = yp + (((size_t)(j->rows * (hi - lo)) + 15) & ~(size_t)15);
    layer_project_rows(&sub, j->t, j->la, 1, j->x, j->rows, yp, xa, NULL);
    for (int64_t r = 0; r < j->rows; r++)
        memcpy(j->y + r * pr->out + lo, yp + r * (hi - lo), (size_t)(hi - lo) * sizeof(float));
}

/* y = projection t of x: base (and ad's LoRA, or the tenants') for all rows. */
static int project(lora_adapter *ad, const layer *base, const lora_decode_args *a,
                   const dec_ws *w, int64_t batch, int t, const float *x, int64_t rows, float *y)
{
    if (w->cols_floats > 0 && base->proj[t].out * base->proj[t].in >= DEC_SPLIT_MIN_WEIGHTS) {
        cols_job job = {base, t, &ad->la, x, rows, y, w->cols, w->cols_floats};
        pool_run(ad->la.pool, ad->threads, cols_part, &job);
    } else {
        layer_project_rows(base, t, &ad->la, ad->threads, x, rows, y, w->xa, w->wpanel);
    }
    return a->tenants ? add_tenant_terms(ad, a, w, batch, t, x, rows, y) : LORA_OK;
}

/* Q, K, V of the gathered rows, turned by RoPE at their positions. */
static int project_qkv(lora_adapter *ad, const layer *base, const lora_decode_args *a,
                       const dec_ws *w, int64_t batch, int64_t rows)
{
    const layer *l = &ad->layer;
    int st = LORA_OK;
    for (int t = PROJ_Q; t <= PROJ_V && st == LORA_OK; t++)
        st = project(ad, base, a, w, batch, t, w->x, rows,
                     t == PROJ_Q ? w->q : t == PROJ_K ? w->k : w->v);
    for (int64_t b = 0; b < batch && st == LORA_OK; b++)
        for (int64_t i = 0; i < w->seqs[b].n; i++) {
            const int64_t r = w->seqs[b].row0 + i, pos = w->seqs[b].len + i;
            layer_rope_row(l, &ad->la, pos, w->q + r * l->q_dim, l->n_heads);
            layer_rope_row(l, &ad->la, pos, w->k + r * l->kv_dim, l->n_kv_heads);
        }
    return st;
}

static void attend(lora_adapter *ad, const lora_kv_cache *c, const dec_ws *w, int parts,
                   int64_t batch, dattn_job *job)
{
    const layer *l = &ad->layer;
    *job = (dattn_job){.la = &ad->la, .n_heads = l->n_heads, .n_kv_heads = l->n_kv_heads,
                       .head_dim = l->head_dim, .q_dim = l->q_dim, .kv_dim = l->kv_dim,
                       .scale = l->softmax_scale, .softcap = l->softcap, .window = l->window,
                       .ck = c->k, .cv = c->v, .slots = c->slots, .slots16 = c->slots16,
                       .seqs = w->seqs, .batch = batch, .q = w->q, .k = w->k, .v = w->v,
                       .c = w->c, .scratch = w->parts, .part_floats = w->part_floats};
    pool_queue_start(&job->units);
    pool_run(ad->la.pool, parts, dattn_part, job);
}

/* NONFINITE unless the output and the new keys and values are finite. */
static int check_results(lora_adapter *ad, const dec_ws *w, int64_t rows)
{
    const layer *l = &ad->layer;
    const size_t nkv = (size_t)(rows * l->kv_dim);
    const int64_t bad = lora_find_nonfinite(w->o, (size_t)rows * (size_t)(l->out_proj ? l->d_model : l->q_dim));
    if (bad >= 0)
        return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                              "out would have a NaN/Inf at new row %lld: the finite inputs "
                              "overflow float in this layer (x or the weights too large)",
                              (long long)(bad / (l->out_proj ? l->d_model : l->q_dim)));
    if (lora_find_nonfinite(w->k, nkv) >= 0 || lora_find_nonfinite(w->v, nkv) >= 0)
        return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                              "a new key or value overflows float (x or the weights too "
                              "large)");
    return LORA_OK;
}

/* The step once every check has passed; the cache changes only when it succeeds. */
static int run_decode(lora_adapter *ad, const lora_decode_args *a, lora_kv_cache *c,
                      const float *x, int64_t n_new, float *out, int64_t rows)
{
    const layer *l = &ad->layer;
    const int64_t out_w = l->out_proj ? l->d_model : l->q_dim;
    int64_t max_new = 0;
    for (int64_t b = 0; b < c->batch; b++) {
        const int64_t n = seq_tokens(a, b, n_new);
        max_new = n > max_new ? n : max_new;
    }
    const int64_t units = c->batch * l->n_kv_heads;
    const int parts = units < ad->threads ? (int)units : ad->threads;
    dec_ws w;
    int st = reserve_ws(ad, c->batch, rows > 0 ? rows : 1, max_new, a->tenants ? a->n_tenants : 0,
                        parts, &w);
    if (st != LORA_OK)
        return st;
    for (int64_t b = 0, r = 0; b < c->batch; b++) {
        w.seqs[b] = (dattn_seq){c->len[b], seq_tokens(a, b, n_new), r};
        memcpy(w.x + r * l->d_model, x + b * n_new * l->d_model,
               (size_t)(w.seqs[b].n * l->d_model) * sizeof(float));
        r += w.seqs[b].n;
    }
    layer base = *l; /* with tenants: the base alone, their terms come from lora_apply */
    for (int t = 0; t < PROJ_COUNT && a->tenants; t++)
        base.proj[t].adapted = 0;
    dattn_job job = {0};
    if (rows > 0) {
        st = project_qkv(ad, &base, a, &w, c->batch, rows);
        if (st == LORA_OK)
            attend(ad, c, &w, parts, c->batch, &job);
        if (st == LORA_OK && l->out_proj)
            st = project(ad, &base, a, &w, c->batch, PROJ_O, w.c, rows, w.o);
        else if (st == LORA_OK)
            memcpy(w.o, w.c, (size_t)(rows * l->q_dim) * sizeof(float));
        if (st == LORA_OK)
            st = check_results(ad, &w, rows);
        if (st != LORA_OK)
            return st;
    }
    for (int64_t b = 0; b < c->batch; b++) {
        const dattn_seq *s = &w.seqs[b];
        float *ob = out + b * n_new * out_w;
        memcpy(ob, w.o + s->row0 * out_w, (size_t)(s->n * out_w) * sizeof(float));
        memset(ob + s->n * out_w, 0, (size_t)((n_new - s->n) * out_w) * sizeof(float));
        if (s->n > 0) {
            dattn_store(&job, s, b, c->k, c->v);
            c->len[b] += s->n;
        }
    }
    return LORA_OK;
}

LORA_API int lora_decode_ex(lora_adapter *ad, const lora_decode_args *args,
                            lora_kv_cache *cache, const float *x, int64_t n_new, float *out)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    lora_decode_args a;
    int64_t rows = 0;
    int st = read_decode_args(ad, args, &a);
    if (st == LORA_OK)
        st = check_decode(ad, &a, cache, x, n_new, out, &rows);
    if (st == LORA_OK)
        st = run_decode(ad, &a, cache, x, n_new, out, rows);
    if (st == LORA_OK)
        ad->err[0] = '\0';
    return st;
}

LORA_API int lora_decode(lora_adapter *ad, lora_kv_cache *cache, const float *x,
                         int64_t n_new, float *out)
{
    return lora_decode_ex(ad, NULL, cache, x, n_new, out);
}
