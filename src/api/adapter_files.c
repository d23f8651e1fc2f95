/* Adapter files on the API side: checking an adapter set and turning it into records
 * for the format writers (src/io), and turning a reader's records into adapters:
 * group, validate, resolve, create. */
#include <assert.h>
#include <stddef.h>
#include <math.h>
#include <stdio.h>
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

/* ---- geometry and Q/K row order ---------------------------------------------------- */

/* The geometry a file records of an adapter with resolved values v (RoPE's theta and
 * width only when it rotates). */
static void adapter_geometry(const lora_config_values *v, io_geometry *g)
{
    *g = (io_geometry){0};
    for (int i = 0; i < IO_GEOM_COUNT; i++) {
        const int param = io_geom_params[i];
        if (v->rope == LORA_ROPE_NONE &&
            (param == LORA_CFG_ROPE_THETA || param == LORA_CFG_ROPE_DIM))
            continue;
        int64_t iv = 0;
        if (io_geom_kind_of(i) == IO_GEOM_REAL)
            lora_config_values_get_double(v, param, &g->value[i]);
        else if (lora_config_values_get_int(v, param, &iv) == LORA_OK)
            g->value[i] = (double)iv;
        g->present |= 1u << i;
    }
}

/* The order of an adapter's Q/K rows: its RoPE layout's; without RoPE, Hugging Face's
 * (base weights given in a PEFT/HF checkpoint's order). */
static int adapter_rows(const lora_config_values *v)
{
    return v->rope == LORA_ROPE_INTERLEAVED ? LORA_ROPE_INTERLEAVED : LORA_ROPE_HALF;
}

/* Q/K rows (heads of head_dim rows, cols each) between the HALF order (Hugging Face,
 * rotate_half: dim i pairs with i + rope_dim/2) and the INTERLEAVED one (GGUF llama:
 * 2i pairs with 2i + 1): per head, interleaved row 2i + c is half row c*rope_dim/2 + i
 * for 2i + c < rope_dim; rows past rope_dim stay. convert_hf_to_gguf.py's
 * LlamaModel.permute is this with rope_dim = head_dim. */
static void permute_qk_rows(float *dst, const float *src, int64_t heads, int64_t head_dim,
                            int64_t rope_dim, int64_t cols, int to_interleaved)
{
    const int64_t half = rope_dim / 2;
    for (int64_t h = 0; h < heads; h++)
        for (int64_t r = 0; r < head_dim; r++) {
            const int64_t il = h * head_dim + r;
            const int64_t hf = h * head_dim + (r < rope_dim ? (r % 2) * half + r / 2 : r);
            memcpy(dst + (to_interleaved ? il : hf) * cols,
                   src + (to_interleaved ? hf : il) * cols, (size_t)cols * sizeof(float));
        }
}

/* Record x's rows change order between an adapter with values v and a file whose Q/K
 * rows are in file_rows order (only lora_B of Q and K: A is indexed by the input). */
static int record_permutes(const io_record *x, const lora_config_values *v, int file_rows)
{
    return x->which == LORA_B && (x->target == IO_Q || x->target == IO_K) &&
           adapter_rows(v) != file_rows;
}

/* Permutes a Q/K lora_B (out, rank) of record x between the adapter's order and the
 * file's: to_file = 1 on a save. */
static void permute_record(float *dst, const float *src, const io_record *x,
                           const lora_config_values *v, int file_rows, int to_file)
{
    const int64_t heads = x->target == IO_Q ? v->n_heads : v->n_kv_heads;
    const int to_interleaved = to_file ? file_rows == LORA_ROPE_INTERLEAVED
                                       : adapter_rows(v) == LORA_ROPE_INTERLEAVED;
    permute_qk_rows(dst, src, heads, v->head_dim, v->rope_dim, x->cols, to_interleaved);
}

/* ---- adapter sets ------------------------------------------------------------------ */

/* ad and a0 rotate with the same frequencies (their custom tables, or THETA's). */
static int same_rope_table(const lora_adapter *ad, const lora_adapter *a0)
{
    size_t n, n0;
    const double *f = lora_rope_custom_freqs(ad, &n), *f0 = lora_rope_custom_freqs(a0, &n0);
    return n == n0 && (n == 0 || memcmp(f, f0, n * sizeof *f) == 0);
}

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
        io_geometry g, g0;
        adapter_geometry(&ad->cfg, &g);
        adapter_geometry(&a0->cfg, &g0);
        for (int k = 0; k < IO_GEOM_COUNT; k++)
            if (((g.present ^ g0.present) >> k & 1) || g.value[k] != g0.value[k])
                return lora_set_error(a0->err, LORA_ERR_INVALID_ARG,
                                      "adapters[%zu] differs from adapters[0] in %s (one file "
                                      "records one geometry)",
                                      i, io_geom_key(k) + strlen("liblora."));
        if (!same_rope_table(ad, a0))
            return lora_set_error(a0->err, LORA_ERR_INVALID_ARG,
                                  "adapters[%zu] differs from adapters[0] in its RoPE "
                                  "frequency table (one file records one table)",
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

/* The factors of a checked set as records in file order, and its scale and targets. */
static int set_records(lora_adapter *const *adapters, const int64_t *layers,
                       const size_t *order, size_t count, io_record **out, size_t *n,
                       io_meta *meta)
{
    const lora_adapter *a0 = adapters[0];
    int mask = 0;
    for (int t = 0; t < PROJ_COUNT; t++)
        mask |= a0->layer.proj[t].adapted << t;
    meta->rank = a0->layer.rank;
    meta->alpha = a0->cfg.alpha;
    meta->rslora = (int)a0->cfg.rslora;
    meta->targets = mask;
    size_t total = 0;
    for (io_walk w = {0}; io_walk_next(&w, count, mask);)
        total++;
    io_record *r = lora_mem_calloc(&a0->mem, total ? total : 1, sizeof *r);
    if (!r)
        return lora_set_error(adapters[0]->err, LORA_ERR_NOMEM,
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

/* Copies of the Q/K lora_B records of r[0..n) in the file's row order (one buffer,
 * *perm), the records pointing at them. */
static int permute_for_file(lora_adapter *a0, io_record *r, size_t n, int file_rows,
                            float **perm)
{
    const lora_config_values *v = &a0->cfg;
    size_t total = 0;
    for (size_t k = 0; k < n; k++)
        if (record_permutes(&r[k], v, file_rows))
            total += (size_t)(r[k].rows * r[k].cols);
    *perm = NULL;
    if (total == 0)
        return LORA_OK;
    float *buf = lora_mem_alloc(&a0->mem, total * sizeof(float));
    if (!buf)
        return lora_set_error(a0->err, LORA_ERR_NOMEM, "cannot allocate %zu floats", total);
    size_t at = 0;
    for (size_t k = 0; k < n; k++)
        if (record_permutes(&r[k], v, file_rows)) {
            permute_record(buf + at, r[k].values, &r[k], v, file_rows, 1);
            r[k].values = buf + at;
            at += (size_t)(r[k].rows * r[k].cols);
        }
    *perm = buf;
    return LORA_OK;
}

/* base_model_name_or_path: 1 to 1024 bytes of UTF-8 (shortest forms, no surrogates)
 * without control characters (C0, DEL, C1). */
static int valid_base_model(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    const size_t n = strlen(s);
    if (n == 0 || n > 1024)
        return 0;
    for (size_t i = 0; i < n;) {
        const unsigned c = p[i];
        if (c < 0x80) {
            if (c < 0x20 || c == 0x7f)
                return 0;
            i++;
            continue;
        }
        const size_t len = (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 0;
        static const unsigned min_of_len[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (len == 0 || len > n - i)
            return 0;
        unsigned cp = c & (0x7fu >> len);
        for (size_t j = 1; j < len; j++) {
            if ((p[i + j] & 0xc0) != 0x80)
                return 0;
            cp = cp << 6 | (p[i + j] & 0x3fu);
        }
        if (cp < min_of_len[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff) ||
            cp < 0xa0)
            return 0;
        i += len;
    }
    return 1;
}

/* The first version of lora_save_options: the size a caller's struct has at least. */
#define SAVE_OPTIONS_V1_SIZE (offsetof(lora_save_options, architecture) + sizeof(const char *))

/* Checks options (NULL: defaults) into meta's base model and *arch. */
static int read_save_options(const lora_save_options *o, io_meta *meta, const char **arch,
                             char *err)
{
    if (!o)
        return LORA_OK;
    if (o->struct_size < SAVE_OPTIONS_V1_SIZE)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "options->struct_size = %u is smaller than the first version "
                              "(%zu)",
                              (unsigned)o->struct_size, (size_t)SAVE_OPTIONS_V1_SIZE);
    /* A newer caller's fields this library does not know must be unset. */
    for (size_t i = sizeof *o; i < o->struct_size; i++)
        if (((const unsigned char *)o)[i] != 0)
            return lora_set_error(err, LORA_ERR_UNSUPPORTED,
                                  "options sets a field at byte %zu that this library (%s) "
                                  "does not know",
                                  i, lora_version_string());
    if (o->base_model_name_or_path && !valid_base_model(o->base_model_name_or_path))
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "options->base_model_name_or_path is empty, longer than 1024 "
                              "bytes, not UTF-8 or holds a control character");
    meta->base_model = o->base_model_name_or_path;
    *arch = o->architecture;
    return LORA_OK;
}

enum { FILE_PEFT, FILE_GGUF };

/* Checks the set and writes it in format kind to path. */
static int save_set(int kind, const char *path, lora_adapter *const *adapters,
                    const int64_t *layers, size_t count, const lora_save_options *options)
{
    if (!adapters || !adapters[0])
        return LORA_ERR_INVALID_ARG;
    lora_adapter *a0 = adapters[0];
    if (!layers)
        return lora_set_error(a0->err, LORA_ERR_INVALID_ARG, "layers is NULL");
    if (count == 0)
        return lora_set_error(a0->err, LORA_ERR_INVALID_ARG, "count is 0");
    io_meta meta = {0};
    const char *arch = NULL;
    size_t *order = NULL;
    int st = read_save_options(options, &meta, &arch, a0->err);
    if (st == LORA_OK)
        st = check_members(adapters, layers, count);
    if (st == LORA_OK)
        st = sort_layers(a0, layers, count, &order);
    if (st != LORA_OK)
        return st;
    io_record *r = NULL;
    float *perm = NULL;
    size_t n = 0;
    const io_alloc a = io_alloc_of(&a0->mem);
    const int file_rows = kind == FILE_PEFT ? LORA_ROPE_HALF : io_gguf_qk_rows(arch);
    if (!path)
        st = lora_set_error(a0->err, LORA_ERR_INVALID_ARG, "%s is NULL",
                            kind == FILE_PEFT ? "dir" : "path");
    else
        st = set_records(adapters, layers, order, count, &r, &n, &meta);
    if (st == LORA_OK)
        st = permute_for_file(a0, r, n, file_rows, &perm);
    meta.qk_rows = file_rows;
    adapter_geometry(&a0->cfg, &meta.geom);
    /* io only reads the table it records */
    meta.rope_freqs = (double *)lora_rope_custom_freqs(a0, &meta.n_rope_freqs);
    if (st == LORA_OK)
        st = kind == FILE_PEFT ? io_peft_write(&a, path, &meta, r, n, a0->err)
                               : io_gguf_write(&a, path, &meta, arch, r, n, a0->err);
    if (st == LORA_OK)
        a0->err[0] = '\0';
    lora_mem_free(&a0->mem, perm);
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
    lora_save_options o = {sizeof o, NULL, architecture};
    return save_set(FILE_GGUF, path, adapters, layers, count, &o);
}

LORA_API int lora_save_peft_ex(const char *dir, lora_adapter *const *adapters,
                               const int64_t *layers, size_t count,
                               const lora_save_options *options)
{
    return save_set(FILE_PEFT, dir, adapters, layers, count, options);
}

LORA_API int lora_save_gguf_ex(const char *path, lora_adapter *const *adapters,
                               const int64_t *layers, size_t count,
                               const lora_save_options *options)
{
    return save_set(FILE_GGUF, path, adapters, layers, count, options);
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

/* The geometry a file records must be the config's (v): a layer of other heads, widths,
 * RoPE or masking would compute another function with the same factor shapes. A RoPE
 * layout (HALF or INTERLEAVED) may differ: the rows are converted to the config's. */
static int check_geometry(const io_geometry *file, const lora_config_values *v, char *err)
{
    io_geometry mine;
    adapter_geometry(v, &mine);
    int file_rotates = 0;
    for (int i = 0; i < IO_GEOM_COUNT; i++)
        if (io_geom_params[i] == LORA_CFG_ROPE && ((file->present >> i) & 1))
            file_rotates = file->value[i] != LORA_ROPE_NONE;
    const int both_rotate = file_rotates && v->rope != LORA_ROPE_NONE;
    for (int i = 0; i < IO_GEOM_COUNT; i++) {
        const int param = io_geom_params[i];
        if (!((file->present >> i) & 1) ||
            (!both_rotate && (param == LORA_CFG_ROPE_THETA || param == LORA_CFG_ROPE_DIM)))
            continue; /* RoPE's theta and width matter when both sides rotate */
        const int is_rope = param == LORA_CFG_ROPE;
        if (is_rope ? (file->value[i] != LORA_ROPE_NONE) == (v->rope != LORA_ROPE_NONE)
                    : file->value[i] == mine.value[i])
            continue;
        char fv[32], cv[32];
        if (is_rope) {
            snprintf(fv, sizeof fv, "%s", io_rope_name((int)file->value[i]));
            snprintf(cv, sizeof cv, "%s", io_rope_name((int)mine.value[i]));
        } else {
            snprintf(fv, sizeof fv, "%.17g", file->value[i]);
            snprintf(cv, sizeof cv, "%.17g", mine.value[i]);
        }
        return lora_set_error(err, LORA_ERR_SHAPE,
                              "the file's adapter has %s = %s, the config %s: the config "
                              "must describe the layer the adapter was made for",
                              io_geom_key(i), fv, cv);
    }
    return LORA_OK;
}

/* A RoPE table the file records must fit the config's RoPE (loaded adapters get it). */
static int check_rope_freqs(const io_meta *meta, const lora_config_values *v, char *err)
{
    if (!meta->rope_freqs)
        return LORA_OK;
    if (v->rope == LORA_ROPE_NONE)
        return lora_set_error(err, LORA_ERR_SHAPE,
                              "the file's adapter records " IO_ROPE_FREQS_KEY " (%zu RoPE "
                              "frequencies), the config has no RoPE",
                              meta->n_rope_freqs);
    if (meta->n_rope_freqs != (size_t)(v->rope_dim / 2))
        return lora_set_error(err, LORA_ERR_SHAPE,
                              "the file's " IO_ROPE_FREQS_KEY " has %zu frequencies, the "
                              "config's rope_dim/2 is %lld",
                              meta->n_rope_freqs, (long long)(v->rope_dim / 2));
    return LORA_OK;
}

/* *out: a copy of cfg with the file's rank, alpha, rsLoRA and targets, *v its resolved
 * values; the geometry the file records and every record's shape must fit its layer.
 * *max_floats: the largest record. */
static int resolve_config(const lora_config *cfg, const io_records *rec,
                          const io_meta *meta, const file_shape *fs, lora_config *out,
                          lora_config_values *v_out, size_t *max_floats, char *err)
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
    int st = lora_config_resolve(&out->v, &v, out->err);
    if (st != LORA_OK)
        return lora_set_error(err, st, "the file's adapters do not fit the config: %s",
                              out->err);
    if ((st = check_geometry(&meta->geom, &v, err)) != LORA_OK ||
        (st = check_rope_freqs(meta, &v, err)) != LORA_OK)
        return st;
    *v_out = v;
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
static int create_adapters(const io_source *src, const lora_config *cfg,
                           const lora_config_values *v, size_t max_floats,
                           lora_adapter **adapters, int64_t *layers, char *err)
{
    const io_records *rec = &src->rec;
    /* Two buffers: the file's values, and Q/K rows in the config's order. */
    float *buf = NULL;
    if (max_floats <= SIZE_MAX / (2 * sizeof(float)))
        buf = lora_mem_alloc(&cfg->mem, 2 * max_floats * sizeof(float));
    if (!buf)
        return lora_set_error(err, LORA_ERR_NOMEM, "cannot allocate %zu floats",
                              2 * max_floats);
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
            if (src->meta.rope_freqs &&
                (st = lora_adapter_set_rope_freqs(ad, src->meta.rope_freqs,
                                                  src->meta.n_rope_freqs)) != LORA_OK) {
                lora_set_error(err, st, IO_ROPE_FREQS_KEY ": %s", lora_adapter_last_error(ad));
                break;
            }
        }
        const size_t n = (size_t)(x->rows * x->cols);
        st = io_source_values(src, x, buf, err);
        const int64_t bad = st == LORA_OK ? lora_find_nonfinite(buf, n) : -1;
        if (bad >= 0)
            st = lora_set_error(err, LORA_ERR_NONFINITE,
                                "tensor %s has a NaN/Inf (as float) at element %lld", x->name,
                                (long long)bad);
        const float *values = buf;
        if (st == LORA_OK && ad && record_permutes(x, v, src->meta.qk_rows)) {
            permute_record(buf + max_floats, buf, x, v, src->meta.qk_rows, 0);
            values = buf + max_floats;
        }
        if (st == LORA_OK && ad &&
            (st = lora_adapter_set_param(ad, 1 << x->target, x->which, values, n)) != LORA_OK)
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
    lora_config_values v;
    size_t max_floats = 0;
    if (st == LORA_OK)
        st = group_records(&src.rec, &src.meta, &fs, err);
    if (st == LORA_OK)
        st = resolve_config(cfg, &src.rec, &src.meta, &fs, &file_cfg, &v, &max_floats, err);
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
        st = create_adapters(&src, &file_cfg, &v, max_floats, query ? NULL : adapters, layers,
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
