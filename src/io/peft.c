/* Hugging Face PEFT LoRA adapters: a directory with adapter_config.json and
 * adapter_model.safetensors (docs/format-peft.md). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "io.h"
#include "peft_config.h"
#include "safetensors.h"

#define PEFT_PREFIX "base_model.model.model.layers."
#define PEFT_CONFIG "adapter_config.json"
#define PEFT_WEIGHTS "adapter_model.safetensors"
#define PEFT_MAX_NAME 96 /* bytes of a written tensor name, with the NUL */

static const char *const module_names[IO_TARGETS] = {"q_proj", "k_proj", "v_proj", "o_proj"};

/* dir + "/" + file into out (size n). 0 when it does not fit. */
static int join_path(char *out, size_t n, const char *dir, const char *file)
{
    const int len = snprintf(out, n, "%s/%s", dir, file);
    return len >= 0 && (size_t)len < n;
}

/* ---- save ------------------------------------------------------------------------- */

/* The distinct layers of r[0..n) (in file order, so increasing) as a JSON array. */
static cJSON *layer_list(const io_record *r, size_t n)
{
    cJSON *lt = cJSON_CreateArray();
    for (size_t i = 0; i < n && lt; i++)
        if ((i == 0 || r[i].layer != r[i - 1].layer) &&
            !cJSON_AddItemToArray(lt, cJSON_CreateNumber((double)r[i].layer))) {
            cJSON_Delete(lt);
            lt = NULL;
        }
    return lt;
}

static int config_json(const io_meta *meta, const io_record *r, size_t n, char **text)
{
    *text = NULL;
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return LORA_ERR_NOMEM;
    int ok = 1;
    cJSON *targets = cJSON_AddArrayToObject(root, "target_modules");
    for (int t = 0; t < IO_TARGETS && targets; t++)
        if ((meta->targets >> t) & 1)
            ok &= cJSON_AddItemToArray(targets, cJSON_CreateString(module_names[t]));
    cJSON *lt = layer_list(r, n);
    ok &= targets && lt && cJSON_AddItemToObject(root, "layers_to_transform", lt);
    ok &= cJSON_AddStringToObject(root, "peft_type", "LORA") != NULL;
    ok &= cJSON_AddStringToObject(root, "task_type", "CAUSAL_LM") != NULL;
    ok &= cJSON_AddNumberToObject(root, "r", (double)meta->rank) != NULL;
    ok &= cJSON_AddNumberToObject(root, "lora_alpha", meta->alpha) != NULL;
    ok &= cJSON_AddBoolToObject(root, "use_rslora", meta->rslora) != NULL;
    ok &= cJSON_AddNumberToObject(root, "lora_dropout", 0.0) != NULL;
    ok &= cJSON_AddStringToObject(root, "bias", "none") != NULL;
    ok &= cJSON_AddBoolToObject(root, "fan_in_fan_out", 0) != NULL;
    ok &= cJSON_AddBoolToObject(root, "use_dora", 0) != NULL;
    ok &= cJSON_AddBoolToObject(root, "inference_mode", 1) != NULL;
    ok &= cJSON_AddBoolToObject(root, "init_lora_weights", 1) != NULL;
    ok &= cJSON_AddObjectToObject(root, "rank_pattern") != NULL;
    ok &= cJSON_AddObjectToObject(root, "alpha_pattern") != NULL;
    ok &= (meta->base_model
               ? cJSON_AddStringToObject(root, "base_model_name_or_path", meta->base_model)
               : cJSON_AddNullToObject(root, "base_model_name_or_path")) != NULL;
    ok &= cJSON_AddNullToObject(root, "modules_to_save") != NULL;
    if (ok)
        *text = cJSON_Print(root);
    cJSON_Delete(root);
    return *text ? LORA_OK : LORA_ERR_NOMEM;
}

/* The __metadata__ strings: the scale ("r", "lora_alpha", "use_rslora", as in the
 * config), so a reader can tell a weights file from another save than its config's, and
 * the geometry (liblora.*). */
typedef struct meta_strings {
    char r[24], alpha[32], geom[IO_GEOM_COUNT][32];
    char *freqs; /* the RoPE table as JSON array text (cJSON's memory), or NULL */
    const char *kv[2 * (4 + IO_GEOM_COUNT)];
    size_t n; /* pairs in kv */
} meta_strings;

/* A number as JSON text (cJSON's: locale-independent, round-trips doubles). */
static int number_text(double v, char *out, size_t n)
{
    cJSON *x = cJSON_CreateNumber(v);
    char *t = x ? cJSON_PrintUnformatted(x) : NULL;
    const int ok = t && strlen(t) < n;
    if (ok)
        strcpy(out, t);
    cJSON_free(t);
    cJSON_Delete(x);
    return ok;
}

/* A number from JSON text; 0 if v is not exactly one. */
static int text_number(const char *v, double *d)
{
    cJSON *x = cJSON_Parse(v);
    const int ok = cJSON_IsNumber(x);
    if (ok)
        *d = x->valuedouble;
    cJSON_Delete(x);
    return ok;
}

/* Geometry field i of value v as __metadata__ text. */
static int geom_text(int i, double v, char *out, size_t n)
{
    switch (io_geom_kind_of(i)) {
    case IO_GEOM_INT: return snprintf(out, n, "%lld", (long long)v) < (int)n;
    case IO_GEOM_FLAG: return snprintf(out, n, "%s", v != 0.0 ? "true" : "false") < (int)n;
    case IO_GEOM_ROPE: return snprintf(out, n, "%s", io_rope_name((int)v)) < (int)n;
    default: return number_text(v, out, n);
    }
}

/* The RoPE table as "[f0,f1,...]" (cJSON's numbers: locale-independent, exact). */
static char *freqs_text(const double *f, size_t n)
{
    cJSON *arr = n <= (size_t)INT32_MAX ? cJSON_CreateDoubleArray(f, (int)n) : NULL;
    char *t = arr ? cJSON_PrintUnformatted(arr) : NULL;
    cJSON_Delete(arr);
    return t;
}

static int file_metadata(const io_meta *meta, meta_strings *m)
{
    m->freqs = NULL;
    if (!number_text((double)meta->rank, m->r, sizeof m->r) ||
        !number_text(meta->alpha, m->alpha, sizeof m->alpha))
        return LORA_ERR_NOMEM;
    const char *kv[6] = {"r", m->r, "lora_alpha", m->alpha, "use_rslora",
                         meta->rslora ? "true" : "false"};
    memcpy(m->kv, kv, sizeof kv);
    m->n = 3;
    for (int i = 0; i < IO_GEOM_COUNT; i++) {
        if (!((meta->geom.present >> i) & 1))
            continue;
        if (!geom_text(i, meta->geom.value[i], m->geom[i], sizeof m->geom[i]))
            return LORA_ERR_NOMEM;
        m->kv[2 * m->n] = io_geom_key(i);
        m->kv[2 * m->n + 1] = m->geom[i];
        m->n++;
    }
    if (meta->rope_freqs) {
        if (!(m->freqs = freqs_text(meta->rope_freqs, meta->n_rope_freqs)))
            return LORA_ERR_NOMEM;
        m->kv[2 * m->n] = IO_ROPE_FREQS_KEY;
        m->kv[2 * m->n + 1] = m->freqs;
        m->n++;
    }
    return LORA_OK;
}

/* The safetensors file of the records (names built here). */
static int weights_file(const io_alloc *a, const io_meta *meta, const io_record *r, size_t n,
                        io_bytes *file)
{
    st_entry *e = io_calloc(a, n ? n : 1, sizeof *e);
    char *names = io_calloc(a, n ? n : 1, PEFT_MAX_NAME);
    int st = e && names ? LORA_OK : LORA_ERR_NOMEM;
    for (size_t k = 0; k < n && st == LORA_OK; k++) {
        char *name = names + PEFT_MAX_NAME * k;
        snprintf(name, PEFT_MAX_NAME, PEFT_PREFIX "%lld.self_attn.%s.lora_%c.weight",
                 (long long)r[k].layer, module_names[r[k].target],
                 r[k].which == LORA_B ? 'B' : 'A');
        e[k] = (st_entry){name, r[k].rows, r[k].cols, r[k].values};
    }
    meta_strings m = {.freqs = NULL};
    if (st == LORA_OK)
        st = file_metadata(meta, &m);
    if (st == LORA_OK)
        st = st_write(a, e, n, m.kv, m.n, file);
    cJSON_free(m.freqs);
    io_free(a, names);
    io_free(a, e);
    return st;
}

/* Stages both files, then renames the weights and the config into place: a failure
 * before the renames leaves the old pair untouched; a pair torn between the renames is
 * refused by the loader (the weights' __metadata__ contradicts the old config). */
static int replace_pair(const char *dir, const io_bytes *weights, const char *json,
                        char *err)
{
    char path[IO_PATH_MAX];
    io_staged w, c;
    if (!join_path(path, sizeof path, dir, PEFT_WEIGHTS))
        return io_error(err, LORA_ERR_IO, "path too long: %s", dir);
    int st = io_stage(path, weights->p, weights->n, &w, err);
    if (st != LORA_OK)
        return st;
    join_path(path, sizeof path, dir, PEFT_CONFIG); /* shorter than the weights path */
    st = io_stage(path, json, strlen(json), &c, err);
    if (st != LORA_OK) {
        io_discard(&w);
        return st;
    }
    st = io_commit(&w, err);
    if (st == LORA_OK)
        st = io_commit(&c, err);
    io_discard(&c);
    return st;
}

int io_peft_write(const io_alloc *a, const char *dir, const io_meta *meta, const io_record *r,
                  size_t n, char *err)
{
    char parent[IO_PATH_MAX];
    if (!join_path(parent, sizeof parent, dir, PEFT_WEIGHTS))
        return io_error(err, LORA_ERR_IO, "path too long: %s", dir);
    const int created = mkdir(dir, 0777) == 0;
    if (!created && errno != EEXIST)
        return io_error(err, LORA_ERR_IO, "cannot create directory %s: %s", dir,
                        strerror(errno));
    io_bytes file = {0};
    char *json = NULL;
    int st;
    if (weights_file(a, meta, r, n, &file) != LORA_OK)
        st = io_error(err, LORA_ERR_NOMEM, "cannot allocate the safetensors file");
    else if (config_json(meta, r, n, &json) != LORA_OK)
        st = io_error(err, LORA_ERR_NOMEM, "cannot build adapter_config.json");
    else
        st = replace_pair(dir, &file, json, err);
    if (json)
        cJSON_free(json);
    io_bytes_free(a, &file);
    if (created && st != LORA_OK) {
        rmdir(dir); /* what this save created, and only that (empty again) */
    } else if (created) {
        /* The new directory's entry in its parent. */
        snprintf(parent, sizeof parent, "%s/..", dir);
        io_fsync_dir(parent);
    }
    return st;
}

/* ---- load ------------------------------------------------------------------------- */

/* PEFT name -> (layer, target, which); 0 when the name is not a LoRA factor of an
 * attention projection. */
static int parse_name(const char *name, int64_t *layer_idx, int *target, int *which)
{
    const size_t plen = strlen(PEFT_PREFIX);
    if (strncmp(name, PEFT_PREFIX, plen) != 0)
        return 0;
    const char *s = name + plen, *dot = strchr(s, '.');
    if (!dot || (*layer_idx = io_parse_layer(s, (size_t)(dot - s))) < 0)
        return 0;
    s = dot;
    static const char attn[] = ".self_attn.";
    if (strncmp(s, attn, sizeof attn - 1) != 0)
        return 0;
    s += sizeof attn - 1;
    return io_match_factor(s, module_names, ".lora_A.weight", ".lora_B.weight", target,
                           which);
}

static int dtype_of(const char *s, io_dtype *d)
{
    static const struct {
        const char *name;
        io_dtype d;
    } map[] = {{"F32", IO_F32}, {"F16", IO_F16}, {"BF16", IO_BF16}, {"F64", IO_F64}};
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (strcmp(s, map[i].name) == 0) {
            *d = map[i].d;
            return 1;
        }
    return 0;
}

/* One safetensors tensor as a record. */
static int tensor_record(const st_file *sf, const st_tensor *t, io_record *x, char *err)
{
    memset(x, 0, sizeof *x);
    if (!parse_name(t->name, &x->layer, &x->target, &x->which))
        return io_error(err, LORA_ERR_UNSUPPORTED,
                        "tensor '%.100s' is not a LoRA factor of an attention projection "
                        "(q/k/v/o_proj); liblora adapts attention only",
                        t->name);
    if (!dtype_of(t->dtype, &x->dtype))
        return io_error(err, LORA_ERR_UNSUPPORTED,
                        "tensor %s has dtype %s (F32, F16, BF16, F64 are read)", t->name,
                        t->dtype);
    if (t->ndim != 2)
        return io_error(err, LORA_ERR_FORMAT, "tensor %s has %d dimensions, not 2", t->name,
                        t->ndim);
    x->rows = t->shape[0];
    x->cols = t->shape[1];
    x->offset = sf->data_start + t->offset;
    x->name = t->name;
    return LORA_OK;
}

/* The weights' __metadata__ (r, lora_alpha, use_rslora, when present: liblora writes
 * them) must agree with the config: else the pair comes from two saves. */
static int check_scale_metadata(const cJSON *md, const io_meta *meta, char *err)
{
    static const char *const keys[3] = {"r", "lora_alpha", "use_rslora"};
    for (int k = 0; md && k < 3; k++) {
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(md, keys[k]);
        if (!x)
            continue;
        const char *v = cJSON_IsString(x) ? x->valuestring : NULL;
        double d = 0.0;
        const int bad = !v || (k < 2 ? !text_number(v, &d)
                                     : strcmp(v, "true") != 0 && strcmp(v, "false") != 0);
        if (bad)
            return io_error(err, LORA_ERR_FORMAT,
                            PEFT_WEIGHTS ": __metadata__ %s is not a %s string", keys[k],
                            k < 2 ? "number" : "true/false");
        const int agrees = k == 0   ? d == (double)meta->rank
                           : k == 1 ? d == meta->alpha
                                    : (strcmp(v, "true") == 0) == (meta->rslora != 0);
        if (!agrees)
            return io_error(err, LORA_ERR_FORMAT,
                            PEFT_CONFIG " and " PEFT_WEIGHTS " disagree on %s (config: %.17g, "
                            "weights' __metadata__: %.40s): the files come from different "
                            "saves",
                            keys[k],
                            k == 0 ? (double)meta->rank : k == 1 ? meta->alpha : meta->rslora,
                            v);
    }
    return LORA_OK;
}

/* The geometry the weights' __metadata__ records (liblora.*, when present). */
static int read_metadata_geometry(const cJSON *md, io_geometry *g, char *err)
{
    for (int i = 0; i < IO_GEOM_COUNT && md; i++) {
        const cJSON *x = cJSON_GetObjectItemCaseSensitive(md, io_geom_key(i));
        if (!x)
            continue;
        const char *v = cJSON_IsString(x) ? x->valuestring : "";
        const io_geom_kind kind = io_geom_kind_of(i);
        double d = -1.0;
        if (kind == IO_GEOM_INT)
            d = (double)io_parse_layer(v, strlen(v)); /* digits, < 2^31; -1 else */
        else if (kind == IO_GEOM_FLAG)
            d = strcmp(v, "true") == 0 ? 1.0 : strcmp(v, "false") == 0 ? 0.0 : -1.0;
        else if (kind == IO_GEOM_ROPE)
            d = io_rope_of_name(v, strlen(v));
        else if (!text_number(v, &d) || !isfinite(d) || d <= 0.0)
            d = -1.0;
        if (d < 0.0)
            return io_error(err, LORA_ERR_FORMAT,
                            PEFT_WEIGHTS ": __metadata__ %s is not %s", io_geom_key(i),
                            kind == IO_GEOM_INT    ? "a decimal integer string"
                            : kind == IO_GEOM_FLAG ? "\"true\" or \"false\""
                            : kind == IO_GEOM_ROPE ? "\"none\", \"half\" or \"interleaved\""
                                                   : "a number > 0");
        g->present |= 1u << i;
        g->value[i] = d;
    }
    return LORA_OK;
}

/* The RoPE table the weights' __metadata__ records (liblora.rope_freqs, when present):
 * JSON array text of 1 .. IO_MAX_ROPE_FREQS numbers, finite and >= 0. */
static int read_metadata_freqs(const io_alloc *a, const cJSON *md, io_meta *meta, char *err)
{
    const cJSON *x = md ? cJSON_GetObjectItemCaseSensitive(md, IO_ROPE_FREQS_KEY) : NULL;
    if (!x)
        return LORA_OK;
    cJSON *arr = cJSON_IsString(x) ? cJSON_ParseWithOpts(x->valuestring, NULL, 1) : NULL;
    const int n = cJSON_IsArray(arr) ? cJSON_GetArraySize(arr) : 0;
    int st = n >= 1 && n <= IO_MAX_ROPE_FREQS ? LORA_OK : LORA_ERR_FORMAT;
    if (st == LORA_OK && !(meta->rope_freqs = io_calloc(a, (size_t)n, sizeof(double))))
        st = LORA_ERR_NOMEM;
    int i = 0;
    for (const cJSON *v = arr ? arr->child : NULL; st == LORA_OK && v; v = v->next, i++) {
        if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble < 0.0)
            st = LORA_ERR_FORMAT;
        else
            meta->rope_freqs[i] = v->valuedouble;
    }
    cJSON_Delete(arr);
    meta->n_rope_freqs = meta->rope_freqs ? (size_t)n : 0; /* the source frees the table */
    if (st == LORA_ERR_NOMEM)
        return io_error(err, st, "cannot allocate %d frequencies", n);
    if (st != LORA_OK)
        return io_error(err, st,
                        PEFT_WEIGHTS ": __metadata__ " IO_ROPE_FREQS_KEY " is not a JSON "
                        "array of 1 to %d finite numbers >= 0",
                        IO_MAX_ROPE_FREQS);
    return LORA_OK;
}

int io_peft_read(const io_alloc *a, const char *dir, io_source *s, char *err)
{
    io_source_init(s, a);
    char path[4096], cpath[4096];
    if (!join_path(path, sizeof path, dir, PEFT_WEIGHTS))
        return io_error(err, LORA_ERR_IO, "path too long: %s", dir);
    join_path(cpath, sizeof cpath, dir, PEFT_CONFIG);
    peft_rules rules;
    int st = peft_config_read(a, cpath, &s->meta, &rules, err);
    uint64_t size = 0;
    if (st == LORA_OK)
        st = io_open_regular(path, &s->fd, &size, err);
    st_file sf;
    if (st == LORA_OK)
        st = st_parse(a, s->fd, size, &sf, err);
    if (st != LORA_OK) {
        peft_config_free(&rules);
        return st;
    }
    s->json = sf.json; /* the records' names point into it */
    sf.json = NULL;
    st = check_scale_metadata(sf.metadata, &s->meta, err);
    if (st == LORA_OK)
        st = read_metadata_geometry(sf.metadata, &s->meta.geom, err);
    if (st == LORA_OK)
        st = read_metadata_freqs(a, sf.metadata, &s->meta, err);
    s->meta.qk_rows = LORA_ROPE_HALF; /* Hugging Face's order (rotate_half) */
    for (size_t i = 0; i < sf.n && st == LORA_OK; i++) {
        io_record x;
        st = tensor_record(&sf, &sf.t[i], &x, err);
        if (st == LORA_OK)
            st = peft_config_targets(&rules, &x, err);
        if (st == LORA_OK && io_records_push(a, &s->rec, &x) != LORA_OK)
            st = io_error(err, LORA_ERR_NOMEM, "cannot allocate tensor entries");
    }
    st_free(a, &sf);
    peft_config_free(&rules);
    return st;
}
