/* Adapter files on the API side: checking an adapter set and turning it into records
 * for the format writers (src/io), and turning a reader's records into adapters:
 * group, validate, resolve, create. */
#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../io/io.h"
#include "internal.h"

static_assert(IO_ERRMSG_SIZE == LORA_ERRMSG_SIZE, "io writes into the handles' buffers");
static_assert((int)IO_Q == (int)PROJ_Q && (int)IO_K == (int)PROJ_K &&
                  (int)IO_V == (int)PROJ_V && (int)IO_O == (int)PROJ_O &&
                  (int)IO_TARGETS == (int)PROJ_COUNT,
              "io's targets are the layer's projections");

/* ---- memory ------------------------------------------------------------------------ */

static void *mem_alloc(void *ctx, size_t size) { return lora_mem_alloc(ctx, size); }
static void mem_free(void *ctx, void *ptr) { lora_mem_free(ctx, ptr); }

static io_alloc io_alloc_of(const lora_mem *m)
{
    return (io_alloc){mem_alloc, mem_free, (void *)m};
}

/* ---- adapter sets ------------------------------------------------------------------ */

/* Every adapter is there, its layer in range, and it matches adapters[0]. */
static int check_members(lora_adapter *const *adapters, const int64_t *layers, size_t count)
{
    lora_adapter *a0 = adapters[0];
    for (size_t i = 0; i < count; i++) {
        const lora_adapter *ad = adapters[i];
        if (!ad)
            return lora_set_error(a0->err, LORA_ERR_INVALID_ARG, "adapters[%zu] is NULL", i);
        if (layers[i] < 0 || layers[i] >= IO_MAX_LAYER)
            return lora_set_error(a0->err, LORA_ERR_INVALID_ARG,
                                  "layers[%zu] = %lld is outside [0, 2^31)", i,
                                  (long long)layers[i]);
        if (ad->layer.rank != a0->layer.rank || ad->cfg.alpha != a0->cfg.alpha ||
            ad->cfg.rslora != a0->cfg.rslora)
            return lora_set_error(a0->err, LORA_ERR_INVALID_ARG,
                                  "adapters[%zu] differs from adapters[0] in rank, alpha or "
                                  "rsLoRA (one file holds one rank and scale)",
                                  i);
        for (int t = 0; t < PROJ_COUNT; t++) {
            const layer_proj *p = &ad->layer.proj[t], *q = &a0->layer.proj[t];
            if (p->adapted != q->adapted ||
                (p->adapted && (p->in != q->in || p->out != q->out)))
                return lora_set_error(a0->err, LORA_ERR_INVALID_ARG,
                                      "adapters[%zu] differs from adapters[0] in target %s "
                                      "(adapted or shape)",
                                      i, lora_proj_names[t]);
        }
    }
    return LORA_OK;
}

typedef struct layer_ref {
    int64_t layer;
    size_t idx;
} layer_ref;

static int cmp_layer_ref(const void *a, const void *b)
{
    const layer_ref *x = a, *y = b;
    return (x->layer > y->layer) - (x->layer < y->layer);
}

/* *order: indices into adapters in increasing layer order (allocated through a0's mem);
 * a duplicate layer is INVALID_ARG. */
static int sort_layers(lora_adapter *a0, const int64_t *layers, size_t count, size_t **order)
{
    layer_ref *refs = lora_mem_calloc(&a0->mem, count, sizeof *refs);
    size_t *ord = lora_mem_calloc(&a0->mem, count, sizeof *ord);
    int st = LORA_OK;
    if (!refs || !ord)
        st = lora_set_error(a0->err, LORA_ERR_NOMEM, "cannot allocate %zu layer entries",
                            count);
    for (size_t i = 0; i < count && st == LORA_OK; i++)
        refs[i] = (layer_ref){layers[i], i};
    if (st == LORA_OK)
        qsort(refs, count, sizeof *refs, cmp_layer_ref);
    for (size_t i = 0; i < count && st == LORA_OK; i++) {
        if (i > 0 && refs[i].layer == refs[i - 1].layer)
            st = lora_set_error(a0->err, LORA_ERR_INVALID_ARG, "layer %lld appears twice",
                                (long long)refs[i].layer);
        ord[i] = refs[i].idx;
    }
    lora_mem_free(&a0->mem, refs);
    if (st != LORA_OK) {
        lora_mem_free(&a0->mem, ord);
        return st;
    }
    *order = ord;
    return LORA_OK;
}

/* The factors of a checked set as records in file order, and its metadata. */
static int set_records(lora_adapter *const *adapters, const int64_t *layers,
                       const size_t *order, size_t count, io_record **out, size_t *n,
                       io_meta *meta)
{
    const lora_adapter *a0 = adapters[0];
    int mask = 0;
    for (int t = 0; t < PROJ_COUNT; t++)
        mask |= a0->layer.proj[t].adapted << t;
    *meta = (io_meta){a0->layer.rank, a0->cfg.alpha, (int)a0->cfg.rslora, mask};
    size_t total = 0;
    for (io_walk w = {0}; io_walk_next(&w, count, mask);)
        total++;
    io_record *r = lora_mem_calloc(&a0->mem, total ? total : 1, sizeof *r);
    if (!r)
        return lora_set_error(lora_err_buf(a0), LORA_ERR_NOMEM,
                              "cannot allocate %zu tensor entries", total);
    size_t k = 0;
    for (io_walk w = {0}; io_walk_next(&w, count, mask); k++) {
        const lora_adapter *ad = adapters[order[w.layer]];
        const layer_proj *p = &ad->layer.proj[w.target];
        const int is_b = w.which == LORA_B;
        r[k] = (io_record){.layer = layers[order[w.layer]], .target = w.target,
                           .which = w.which, .rows = is_b ? p->out : ad->layer.rank,
                           .cols = is_b ? ad->layer.rank : p->in, .dtype = IO_F32,
                           .values = is_b ? p->b : p->a};
    }
    *out = r;
    *n = total;
    return LORA_OK;
}

enum { FILE_PEFT, FILE_GGUF };

/* Checks the set and writes it in format kind to path. */
static int save_set(int kind, const char *path, lora_adapter *const *adapters,
                    const int64_t *layers, size_t count, const char *architecture)
{
    if (!adapters || !adapters[0])
        return LORA_ERR_INVALID_ARG;
    lora_adapter *a0 = adapters[0];
    if (!layers)
        return lora_set_error(a0->err, LORA_ERR_INVALID_ARG, "layers is NULL");
    if (count == 0)
        return lora_set_error(a0->err, LORA_ERR_INVALID_ARG, "count is 0");
    size_t *order = NULL;
    int st = check_members(adapters, layers, count);
    if (st == LORA_OK)
        st = sort_layers(a0, layers, count, &order);
    if (st != LORA_OK)
        return st;
    io_record *r = NULL;
    size_t n = 0;
    io_meta meta;
    const io_alloc a = io_alloc_of(&a0->mem);
    if (!path)
        st = lora_set_error(a0->err, LORA_ERR_INVALID_ARG, "%s is NULL",
                            kind == FILE_PEFT ? "dir" : "path");
    else
        st = set_records(adapters, layers, order, count, &r, &n, &meta);
    if (st == LORA_OK)
        st = kind == FILE_PEFT ? io_peft_write(&a, path, &meta, r, n, a0->err)
                               : io_gguf_write(&a, path, &meta, architecture, r, n, a0->err);
    if (st == LORA_OK)
        a0->err[0] = '\0';
    lora_mem_free(&a0->mem, r);
    lora_mem_free(&a0->mem, order);
    return st;
}

LORA_API int lora_save_peft(const char *dir, lora_adapter *const *adapters,
                            const int64_t *layers, size_t count)
{
    return save_set(FILE_PEFT, dir, adapters, layers, count, NULL);
}

LORA_API int lora_save_gguf(const char *path, lora_adapter *const *adapters,
                            const int64_t *layers, size_t count, const char *architecture)
{
    return save_set(FILE_GGUF, path, adapters, layers, count, architecture);
}

/* ---- loading: group, validate, resolve, create -------------------------------------- */

static int cmp_record(const void *a, const void *b)
{
    const io_record *x = a, *y = b;
    if (x->layer != y->layer)
        return (x->layer > y->layer) - (x->layer < y->layer);
    if (x->target != y->target)
        return x->target - y->target;
    return x->which - y->which;
}

/* What the records of a file make: layers, one target mask, one rank. */
typedef struct file_shape {
    size_t n_layers;
    int mask;
    int64_t rank;
} file_shape;

/* The records r[0..n) of one layer (sorted): no duplicate, A and B of each target, one
 * rank. *targets: the layer's target mask. */
static int check_layer(const io_record *r, size_t n, const io_meta *meta, int64_t *rank,
                       int *targets, char *err)
{
    int bits = 0; /* bit 2*t + which */
    for (size_t j = 0; j < n; j++) {
        const io_record *x = &r[j];
        const int bit = 1 << (2 * x->target + x->which);
        if (bits & bit)
            return lora_set_error(err, LORA_ERR_FORMAT, "tensor %s appears twice", x->name);
        bits |= bit;
        const int64_t rr = x->which == LORA_A ? x->rows : x->cols;
        if (rr < 1)
            return lora_set_error(err, LORA_ERR_FORMAT, "tensor %s has rank %lld", x->name,
                                  (long long)rr);
        if (*rank == 0)
            *rank = rr;
        else if (rr != *rank)
            return lora_set_error(err, LORA_ERR_FORMAT,
                                  "tensor %s has rank %lld, expected %lld%s", x->name,
                                  (long long)rr, (long long)*rank,
                                  meta->rank ? " (the config's r)" : "");
    }
    *targets = 0;
    for (int t = 0; t < PROJ_COUNT; t++) {
        const int ab = (bits >> (2 * t)) & 3;
        if (ab == 1 || ab == 2)
            return lora_set_error(err, LORA_ERR_FORMAT,
                                  "layer %lld has lora_%s but not lora_%s of target %s",
                                  (long long)r->layer, ab == 1 ? "A" : "B",
                                  ab == 1 ? "B" : "A", lora_proj_names[t]);
        if (ab == 3)
            *targets |= 1 << t;
    }
    return LORA_OK;
}

/* Groups the records by layer (sorting them) and checks that every layer adapts the
 * same targets with one rank, as the metadata declares. */
static int group_records(io_records *rec, const io_meta *meta, file_shape *fs, char *err)
{
    if (rec->n == 0)
        return lora_set_error(err, LORA_ERR_FORMAT, "the file holds no LoRA factors");
    qsort(rec->v, rec->n, sizeof *rec->v, cmp_record);
    *fs = (file_shape){0, -1, meta->rank};
    for (size_t i = 0, j; i < rec->n; i = j) {
        for (j = i; j < rec->n && rec->v[j].layer == rec->v[i].layer;)
            j++;
        int targets = 0;
        const int st = check_layer(rec->v + i, j - i, meta, &fs->rank, &targets, err);
        if (st != LORA_OK)
            return st;
        if (fs->mask >= 0 && targets != fs->mask)
            return lora_set_error(err, LORA_ERR_FORMAT,
                                  "layer %lld adapts targets 0x%x, layer %lld adapts 0x%x: "
                                  "every layer must adapt the same projections",
                                  (long long)rec->v[i].layer, (unsigned)targets,
                                  (long long)rec->v[0].layer, (unsigned)fs->mask);
        fs->mask = targets;
        fs->n_layers++;
    }
    return LORA_OK;
}

/* *out: a copy of cfg with the file's rank, alpha, rsLoRA and targets; every record's
 * shape must fit its layer. *max_floats: the largest record. */
static int resolve_config(const lora_config *cfg, const io_records *rec,
                          const io_meta *meta, const file_shape *fs, lora_config *out,
                          size_t *max_floats, char *err)
{
    *out = *cfg;
    const double alpha = isnan(meta->alpha) ? (double)fs->rank : meta->alpha;
    if (lora_config_set_int(out, LORA_CFG_RANK, fs->rank) != LORA_OK ||
        lora_config_set_double(out, LORA_CFG_ALPHA, alpha) != LORA_OK ||
        lora_config_set_int(out, LORA_CFG_RSLORA, meta->rslora) != LORA_OK ||
        lora_config_set_int(out, LORA_CFG_TARGETS, fs->mask) != LORA_OK)
        return lora_set_error(err, LORA_ERR_FORMAT,
                              "the file's rank %lld, alpha %g or targets 0x%x are out of "
                              "range: %s",
                              (long long)fs->rank, alpha, (unsigned)fs->mask, out->err);
    lora_config_values v;
    const int st = lora_config_resolve(&out->v, &v, out->err);
    if (st != LORA_OK)
        return lora_set_error(err, st, "the file's adapters do not fit the config: %s",
                              out->err);
    const int64_t q_dim = v.n_heads * v.head_dim, kv_dim = v.n_kv_heads * v.head_dim;
    const int64_t ins[PROJ_COUNT] = {v.d_model, v.d_model, v.d_model, q_dim};
    const int64_t outs[PROJ_COUNT] = {q_dim, kv_dim, kv_dim, v.d_model};
    *max_floats = 0;
    for (size_t i = 0; i < rec->n; i++) {
        const io_record *x = &rec->v[i];
        const int64_t want_rows = x->which == LORA_A ? fs->rank : outs[x->target];
        const int64_t want_cols = x->which == LORA_A ? ins[x->target] : fs->rank;
        if (x->rows != want_rows || x->cols != want_cols)
            return lora_set_error(err, LORA_ERR_SHAPE,
                                  "tensor %s is (%lld, %lld); the config's layer needs "
                                  "(%lld, %lld)",
                                  x->name, (long long)x->rows, (long long)x->cols,
                                  (long long)want_rows, (long long)want_cols);
        const size_t n = (size_t)(x->rows * x->cols);
        *max_floats = n > *max_floats ? n : *max_floats;
    }
    return LORA_OK;
}

/* Reads every record's values (checking them) and, when adapters is not NULL, creates
 * one adapter per layer from cfg holding them. On failure nothing is left created. */
static int create_adapters(const io_source *src, const lora_config *cfg, size_t max_floats,
                           lora_adapter **adapters, int64_t *layers, char *err)
{
    const io_records *rec = &src->rec;
    float *buf = lora_mem_alloc(&cfg->mem, max_floats * sizeof(float));
    if (!buf)
        return lora_set_error(err, LORA_ERR_NOMEM, "cannot allocate %zu floats", max_floats);
    size_t made = 0;
    lora_adapter *ad = NULL;
    int st = LORA_OK;
    for (size_t i = 0; i < rec->n && st == LORA_OK; i++) {
        const io_record *x = &rec->v[i];
        if (adapters && (i == 0 || x->layer != rec->v[i - 1].layer)) {
            st = lora_adapter_create(&ad, cfg);
            if (st != LORA_OK) {
                lora_set_error(err, st, "cannot create the adapter of layer %lld",
                               (long long)x->layer);
                break;
            }
            adapters[made] = ad;
            layers[made++] = x->layer;
        }
        const size_t n = (size_t)(x->rows * x->cols);
        st = io_source_values(src, x, buf, err);
        const int64_t bad = st == LORA_OK ? lora_find_nonfinite(buf, n) : -1;
        if (bad >= 0)
            st = lora_set_error(err, LORA_ERR_NONFINITE,
                                "tensor %s has a NaN/Inf (as float) at element %lld", x->name,
                                (long long)bad);
        if (st == LORA_OK && ad &&
            (st = lora_adapter_set_param(ad, 1 << x->target, x->which, buf, n)) != LORA_OK)
            lora_set_error(err, st, "tensor %s: %s", x->name, lora_adapter_last_error(ad));
    }
    lora_mem_free(&cfg->mem, buf);
    if (st != LORA_OK)
        for (size_t i = 0; i < made; i++) {
            lora_adapter_destroy(adapters[i]);
            adapters[i] = NULL;
        }
    return st;
}

/* Reads a file of format kind and makes its adapters (lora_load_peft in lora.h). */
static int load_set(int kind, lora_adapter **adapters, int64_t *layers, size_t capacity,
                    size_t *count, const char *path, lora_config *cfg)
{
    if (!cfg)
        return LORA_ERR_INVALID_ARG;
    char *err = cfg->err;
    if (!count)
        return lora_set_error(err, LORA_ERR_INVALID_ARG, "count is NULL");
    *count = 0;
    if (!path)
        return lora_set_error(err, LORA_ERR_INVALID_ARG, "%s is NULL",
                              kind == FILE_PEFT ? "dir" : "path");
    if (capacity > 0 && (!adapters || !layers))
        return lora_set_error(err, LORA_ERR_INVALID_ARG, "%s is NULL with capacity %zu",
                              !adapters ? "adapters" : "layers", capacity);
    const io_alloc a = io_alloc_of(&cfg->mem);
    io_source src;
    int st = kind == FILE_PEFT ? io_peft_read(&a, path, &src, err)
                               : io_gguf_read(&a, path, &src, err);
    file_shape fs = {0, 0, 0};
    lora_config file_cfg;
    size_t max_floats = 0;
    if (st == LORA_OK)
        st = group_records(&src.rec, &src.meta, &fs, err);
    if (st == LORA_OK)
        st = resolve_config(cfg, &src.rec, &src.meta, &fs, &file_cfg, &max_floats, err);
    const int query = !adapters && capacity == 0;
    if (st == LORA_OK && !query && (!adapters || !layers))
        st = lora_set_error(err, LORA_ERR_INVALID_ARG, "%s is NULL",
                            adapters ? "layers" : "adapters");
    if (st == LORA_OK && !query && capacity < fs.n_layers) {
        *count = fs.n_layers;
        st = lora_set_error(err, LORA_ERR_INVALID_ARG,
                            "capacity %zu is less than the file's %zu layers", capacity,
                            fs.n_layers);
    }
    if (st == LORA_OK)
        st = create_adapters(&src, &file_cfg, max_floats, query ? NULL : adapters, layers,
                             err);
    io_source_free(&src);
    if (st == LORA_OK) {
        *count = fs.n_layers;
        err[0] = '\0';
    }
    return st;
}

LORA_API int lora_load_peft(lora_adapter **adapters, int64_t *layers, size_t capacity,
                            size_t *count, const char *dir, lora_config *cfg)
{
    return load_set(FILE_PEFT, adapters, layers, capacity, count, dir, cfg);
}

LORA_API int lora_load_gguf(lora_adapter **adapters, int64_t *layers, size_t capacity,
                            size_t *count, const char *path, lora_config *cfg)
{
    return load_set(FILE_GGUF, adapters, layers, capacity, count, path, cfg);
}
