/* Hugging Face PEFT LoRA adapters: a directory with adapter_config.json and
 * adapter_model.safetensors (docs/format-peft.md). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#include "io.h"
#include "safetensors.h"

#define PEFT_PREFIX "base_model.model.model.layers."
#define PEFT_CONFIG "adapter_config.json"
#define PEFT_WEIGHTS "adapter_model.safetensors"
#define PEFT_MAX_CONFIG (16u << 20)
#define PEFT_MAX_WEIGHTS ((size_t)1 << 40)

static const char *const module_names[PROJ_COUNT] = {"q_proj", "k_proj", "v_proj", "o_proj"};

/* dir + "/" + file into out (size n). 0 when it does not fit. */
static int join_path(char *out, size_t n, const char *dir, const char *file)
{
    const int len = snprintf(out, n, "%s/%s", dir, file);
    return len >= 0 && (size_t)len < n;
}

/* ---- save ------------------------------------------------------------------------- */

static int config_json(const lora_adapter *a0, const int64_t *layers, const size_t *order,
                       size_t count, char **text)
{
    *text = NULL;
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return LORA_ERR_NOMEM;
    int ok = 1;
    cJSON *targets = cJSON_AddArrayToObject(root, "target_modules");
    for (int t = 0; t < PROJ_COUNT && targets; t++)
        if (a0->layer.proj[t].adapted)
            ok &= cJSON_AddItemToArray(targets, cJSON_CreateString(module_names[t]));
    cJSON *lt = cJSON_AddArrayToObject(root, "layers_to_transform");
    for (size_t i = 0; i < count && lt; i++)
        ok &= cJSON_AddItemToArray(lt, cJSON_CreateNumber((double)layers[order[i]]));
    ok &= targets && lt;
    ok &= cJSON_AddStringToObject(root, "peft_type", "LORA") != NULL;
    ok &= cJSON_AddStringToObject(root, "task_type", "CAUSAL_LM") != NULL;
    ok &= cJSON_AddNumberToObject(root, "r", (double)a0->layer.rank) != NULL;
    ok &= cJSON_AddNumberToObject(root, "lora_alpha", io_adapter_alpha(a0)) != NULL;
    ok &= cJSON_AddBoolToObject(root, "use_rslora", io_adapter_rslora(a0)) != NULL;
    ok &= cJSON_AddNumberToObject(root, "lora_dropout", 0.0) != NULL;
    ok &= cJSON_AddStringToObject(root, "bias", "none") != NULL;
    ok &= cJSON_AddBoolToObject(root, "fan_in_fan_out", 0) != NULL;
    ok &= cJSON_AddBoolToObject(root, "use_dora", 0) != NULL;
    ok &= cJSON_AddBoolToObject(root, "inference_mode", 1) != NULL;
    ok &= cJSON_AddBoolToObject(root, "init_lora_weights", 1) != NULL;
    ok &= cJSON_AddObjectToObject(root, "rank_pattern") != NULL;
    ok &= cJSON_AddObjectToObject(root, "alpha_pattern") != NULL;
    ok &= cJSON_AddNullToObject(root, "base_model_name_or_path") != NULL;
    ok &= cJSON_AddNullToObject(root, "modules_to_save") != NULL;
    if (ok)
        *text = cJSON_Print(root);
    cJSON_Delete(root);
    return *text ? LORA_OK : LORA_ERR_NOMEM;
}

LORA_API int lora_save_peft(const char *dir, lora_adapter *const *adapters,
                            const int64_t *layers, size_t count)
{
    size_t *order = NULL;
    int st = io_check_set(adapters, layers, count, &order);
    if (st != LORA_OK)
        return st;
    lora_adapter *a0 = adapters[0];
    const lora_mem *m = &a0->mem;
    char *err = a0->err;
    char path[4096];
    if (!dir) {
        lora_mem_free(m, order);
        return lora_set_error(err, LORA_ERR_INVALID_ARG, "dir is NULL");
    }
    if (!join_path(path, sizeof path, dir, PEFT_WEIGHTS)) {
        lora_mem_free(m, order);
        return lora_set_error(err, LORA_ERR_IO, "path too long: %s", dir);
    }
    if (mkdir(dir, 0777) != 0 && errno != EEXIST) {
        const int e = errno;
        lora_mem_free(m, order);
        return lora_set_error(err, LORA_ERR_IO, "cannot create directory %s: %s", dir,
                              strerror(e));
    }
    /* Tensors in layer order, then Q, K, V, O, then A, B. */
    const layer *l0 = &a0->layer;
    int n_targets = 0;
    for (int t = 0; t < PROJ_COUNT; t++)
        n_targets += l0->proj[t].adapted;
    const size_t n = count * (size_t)n_targets * 2;
    st_entry *e = lora_mem_calloc(m, n, sizeof *e);
    char *names = lora_mem_calloc(m, n, 96);
    io_bytes file = {0};
    char *json = NULL;
    if (!e || !names) {
        st = lora_set_error(err, LORA_ERR_NOMEM, "cannot allocate %zu tensor entries", n);
        goto done;
    }
    size_t k = 0;
    for (size_t i = 0; i < count; i++) {
        const lora_adapter *ad = adapters[order[i]];
        for (int t = 0; t < PROJ_COUNT; t++) {
            const layer_proj *p = &ad->layer.proj[t];
            if (!p->adapted)
                continue;
            for (int w = 0; w < 2; w++) {
                char *name = names + 96 * k;
                snprintf(name, 96, PEFT_PREFIX "%lld.self_attn.%s.lora_%c.weight",
                         (long long)layers[order[i]], module_names[t], w ? 'B' : 'A');
                e[k] = (st_entry){name, w ? p->out : ad->layer.rank,
                                  w ? ad->layer.rank : p->in, w ? p->b : p->a};
                k++;
            }
        }
    }
    if (st_write(m, e, n, &file) != LORA_OK) {
        st = lora_set_error(err, LORA_ERR_NOMEM, "cannot allocate the safetensors file");
        goto done;
    }
    if (config_json(a0, layers, order, count, &json) != LORA_OK) {
        st = lora_set_error(err, LORA_ERR_NOMEM, "cannot build adapter_config.json");
        goto done;
    }
    st = io_write_file_atomic(path, file.p, file.n, err);
    if (st == LORA_OK) {
        join_path(path, sizeof path, dir, PEFT_CONFIG); /* shorter than the weights path */
        st = io_write_file_atomic(path, json, strlen(json), err);
    }
    if (st == LORA_OK)
        err[0] = '\0';
done:
    if (json)
        cJSON_free(json);
    io_bytes_free(m, &file);
    lora_mem_free(m, names);
    lora_mem_free(m, e);
    lora_mem_free(m, order);
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

/* adapter_config.json -> header. */
static int read_config(const lora_mem *m, const char *path, io_header *h, char *err)
{
    unsigned char *buf;
    size_t size;
    int st = io_read_file(m, path, PEFT_MAX_CONFIG, &buf, &size, err);
    if (st != LORA_OK)
        return st;
    if (memchr(buf, '\0', size)) {
        lora_mem_free(m, buf);
        return lora_set_error(err, LORA_ERR_FORMAT, "%s: NUL byte in JSON", path);
    }
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts((const char *)buf, size + 1, &end, 1);
    lora_mem_free(m, buf);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return lora_set_error(err, LORA_ERR_FORMAT, "%s is not a JSON object", path);
    }
    /* PEFT's LoraConfig defaults apply to missing keys (r = 8, lora_alpha = 8). */
    h->rank = 8;
    h->alpha = 8.0;
    h->rslora = 0;
    h->allowed_targets = 0;
    st = LORA_OK;
    const cJSON *x;
#define CFG_FAIL(code, ...) \
    do {                                                     \
        st = lora_set_error(err, code, __VA_ARGS__);         \
        goto out;                                            \
    } while (0)
    if ((x = cJSON_GetObjectItemCaseSensitive(root, "peft_type")) && !cJSON_IsNull(x)) {
        if (!cJSON_IsString(x))
            CFG_FAIL(LORA_ERR_FORMAT, "%s: peft_type is not a string", path);
        if (strcmp(x->valuestring, "LORA") != 0)
            CFG_FAIL(LORA_ERR_UNSUPPORTED, "%s: peft_type '%.32s' is not LORA", path,
                     x->valuestring);
    }
    if ((x = cJSON_GetObjectItemCaseSensitive(root, "r"))) {
        const double r = cJSON_IsNumber(x) ? x->valuedouble : -1.0;
        if (!(r >= 1.0 && r <= (double)LORA_MAX_DIM) || floor(r) != r)
            CFG_FAIL(LORA_ERR_FORMAT, "%s: r is not an integer in [1, 2^24]", path);
        h->rank = (int64_t)r;
    }
    if ((x = cJSON_GetObjectItemCaseSensitive(root, "lora_alpha"))) {
        if (!cJSON_IsNumber(x) || !isfinite(x->valuedouble))
            CFG_FAIL(LORA_ERR_FORMAT, "%s: lora_alpha is not a finite number", path);
        h->alpha = x->valuedouble;
    }
    if ((x = cJSON_GetObjectItemCaseSensitive(root, "use_rslora")) && !cJSON_IsNull(x)) {
        if (!cJSON_IsBool(x))
            CFG_FAIL(LORA_ERR_FORMAT, "%s: use_rslora is not a boolean", path);
        h->rslora = cJSON_IsTrue(x);
    }
    static const char *const unsupported_true[] = {"use_dora", "fan_in_fan_out"};
    for (size_t i = 0; i < 2; i++)
        if ((x = cJSON_GetObjectItemCaseSensitive(root, unsupported_true[i])) &&
            cJSON_IsTrue(x))
            CFG_FAIL(LORA_ERR_UNSUPPORTED, "%s: %s = true is not supported", path,
                     unsupported_true[i]);
    static const char *const patterns[] = {"rank_pattern", "alpha_pattern"};
    for (size_t i = 0; i < 2; i++)
        if ((x = cJSON_GetObjectItemCaseSensitive(root, patterns[i])) && !cJSON_IsNull(x) &&
            (!cJSON_IsObject(x) || x->child))
            CFG_FAIL(LORA_ERR_UNSUPPORTED,
                     "%s: a non-empty %s (per-module rank or alpha) is not supported", path,
                     patterns[i]);
    if ((x = cJSON_GetObjectItemCaseSensitive(root, "target_modules")) && cJSON_IsArray(x)) {
        int mask = 0;
        for (const cJSON *it = x->child; it; it = it->next) {
            if (!cJSON_IsString(it))
                CFG_FAIL(LORA_ERR_FORMAT, "%s: target_modules holds a non-string", path);
            for (int t = 0; t < PROJ_COUNT; t++)
                if (strcmp(it->valuestring, module_names[t]) == 0)
                    mask |= 1 << t;
        }
        h->allowed_targets = mask ? mask : -1; /* -1: none of ours listed */
    } else if (x && !cJSON_IsString(x) && !cJSON_IsNull(x)) {
        CFG_FAIL(LORA_ERR_FORMAT, "%s: target_modules is neither a list nor a string", path);
    }
#undef CFG_FAIL
out:
    cJSON_Delete(root);
    return st;
}

LORA_API int lora_load_peft(lora_adapter **adapters, int64_t *layers, size_t capacity,
                            size_t *count, const char *dir, lora_config *cfg)
{
    int st = io_check_load_args(adapters, layers, capacity, count, dir, "dir", cfg);
    if (st != LORA_OK)
        return st;
    char *err = cfg->err;
    const lora_mem *m = &cfg->mem;
    char path[4096];
    if (!join_path(path, sizeof path, dir, PEFT_WEIGHTS))
        return lora_set_error(err, LORA_ERR_IO, "path too long: %s", dir);
    io_header h;
    char cpath[4096];
    join_path(cpath, sizeof cpath, dir, PEFT_CONFIG);
    st = read_config(m, cpath, &h, err);
    if (st != LORA_OK)
        return st;
    unsigned char *buf = NULL;
    size_t size = 0;
    st = io_read_file(m, path, PEFT_MAX_WEIGHTS, &buf, &size, err);
    if (st != LORA_OK)
        return st;
    st_file sf;
    st = st_parse(m, buf, size, &sf, err);
    if (st != LORA_OK) {
        lora_mem_free(m, buf);
        return st;
    }
    io_factors f = {0};
    for (size_t i = 0; i < sf.n && st == LORA_OK; i++) {
        const st_tensor *t = &sf.t[i];
        io_factor x;
        memset(&x, 0, sizeof x);
        if (!parse_name(t->name, &x.layer, &x.target, &x.which)) {
            st = lora_set_error(err, LORA_ERR_UNSUPPORTED,
                                "tensor '%.100s' is not a LoRA factor of an attention "
                                "projection (q/k/v/o_proj); liblora adapts attention only",
                                t->name);
            break;
        }
        if (!dtype_of(t->dtype, &x.dtype)) {
            st = lora_set_error(err, LORA_ERR_UNSUPPORTED,
                                "tensor %s has dtype %s (F32, F16, BF16, F64 are read)",
                                t->name, t->dtype);
            break;
        }
        if (t->ndim != 2) {
            st = lora_set_error(err, LORA_ERR_FORMAT, "tensor %s has %d dimensions, not 2",
                                t->name, t->ndim);
            break;
        }
        x.rows = t->shape[0];
        x.cols = t->shape[1];
        x.data = t->data;
        x.name = t->name;
        if (io_factors_push(m, &f, &x) != LORA_OK)
            st = lora_set_error(err, LORA_ERR_NOMEM, "cannot allocate tensor entries");
    }
    if (st == LORA_OK) {
        if (h.allowed_targets == -1)
            h.allowed_targets = 0x10; /* no attention module listed: any tensor mismatches */
        st = io_build_adapters(&f, &h, cfg, adapters, layers, capacity, count);
    }
    io_factors_free(m, &f);
    st_free(m, &sf);
    lora_mem_free(m, buf);
    return st;
}
