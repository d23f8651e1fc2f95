/* adapter_config.json, read as PEFT reads it (docs/format-peft.md, "What is read"). */
#include "peft_config.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <cjson/cJSON.h>

#define CONFIG_MAX (16u << 20)
#define CONFIG_MAX_RANK (INT64_C(1) << 24) /* LORA_MAX_DIM */
#define REGEX_MAX 1024                     /* bytes of a target_modules regex */

static const char *const module_names[IO_TARGETS] = {"q_proj", "k_proj", "v_proj", "o_proj"};

static const cJSON *item(const cJSON *root, const char *key)
{
    return cJSON_GetObjectItemCaseSensitive(root, key);
}

/* Present and not null. */
static const cJSON *given(const cJSON *root, const char *key)
{
    const cJSON *x = item(root, key);
    return x && !cJSON_IsNull(x) ? x : NULL;
}

/* peft_type, r, lora_alpha, use_rslora (PEFT's LoraConfig defaults: r = lora_alpha = 8). */
static int config_scale(const cJSON *root, const char *path, io_meta *meta, char *err)
{
    *meta = (io_meta){.rank = 8, .alpha = 8.0};
    const cJSON *x;
    if ((x = given(root, "peft_type"))) {
        if (!cJSON_IsString(x))
            return io_error(err, LORA_ERR_FORMAT, "%s: peft_type is not a string", path);
        if (strcmp(x->valuestring, "LORA") != 0)
            return io_error(err, LORA_ERR_UNSUPPORTED, "%s: peft_type '%.32s' is not LORA",
                            path, x->valuestring);
    }
    if ((x = item(root, "r"))) {
        const double r = cJSON_IsNumber(x) ? x->valuedouble : -1.0;
        if (!(r >= 1.0 && r <= (double)CONFIG_MAX_RANK) || floor(r) != r)
            return io_error(err, LORA_ERR_FORMAT, "%s: r is not an integer in [1, 2^24]", path);
        meta->rank = (int64_t)r;
    }
    if ((x = item(root, "lora_alpha"))) {
        if (!cJSON_IsNumber(x) || !isfinite(x->valuedouble))
            return io_error(err, LORA_ERR_FORMAT, "%s: lora_alpha is not a finite number", path);
        meta->alpha = x->valuedouble;
    }
    if ((x = given(root, "use_rslora"))) {
        if (!cJSON_IsBool(x))
            return io_error(err, LORA_ERR_FORMAT, "%s: use_rslora is not a boolean", path);
        meta->rslora = cJSON_IsTrue(x);
    }
    return LORA_OK;
}

/* A list or string that is not empty. */
static int nonempty(const cJSON *x)
{
    return x && ((cJSON_IsArray(x) && x->child) || (cJSON_IsString(x) && x->valuestring[0]) ||
                 (!cJSON_IsArray(x) && !cJSON_IsString(x) && !cJSON_IsBool(x)) ||
                 cJSON_IsTrue(x));
}

/* Keys whose meaning liblora does not implement: loading such an adapter as plain LoRA
 * would compute something else. */
static int config_refusals(const cJSON *root, const char *path, char *err)
{
    static const char *const unsupported_true[] = {"use_dora", "fan_in_fan_out"};
    for (size_t i = 0; i < 2; i++)
        if (cJSON_IsTrue(item(root, unsupported_true[i])))
            return io_error(err, LORA_ERR_UNSUPPORTED, "%s: %s = true is not supported", path,
                            unsupported_true[i]);
    static const char *const patterns[] = {"rank_pattern", "alpha_pattern"};
    for (size_t i = 0; i < 2; i++) {
        const cJSON *x = given(root, patterns[i]);
        if (x && (!cJSON_IsObject(x) || x->child))
            return io_error(err, LORA_ERR_UNSUPPORTED,
                            "%s: a non-empty %s (per-module rank or alpha) is not supported",
                            path, patterns[i]);
    }
    /* Activated LoRA (adapts only tokens from an invocation sequence on), and layer
     * replication (layers stacked from copies) change what the adapter computes. */
    static const char *const variants[] = {"alora_invocation_tokens", "invocation_string",
                                           "layer_replication"};
    for (size_t i = 0; i < 3; i++)
        if (nonempty(given(root, variants[i])))
            return io_error(err, LORA_ERR_UNSUPPORTED, "%s: %s is set: not supported", path,
                            variants[i]);
    /* PiSSA, OLoRA and CorDA adapters not converted at save time belong to a modified
     * base model (PEFT's path_initial_model_for_weight_conversion converts them). */
    const cJSON *init = given(root, "init_lora_weights");
    const char *how = cJSON_IsString(init) ? init->valuestring : "";
    if (strcmp(how, "pissa") == 0 || strncmp(how, "pissa_niter_", 12) == 0 ||
        strcmp(how, "olora") == 0 || strcmp(how, "corda") == 0)
        return io_error(err, LORA_ERR_UNSUPPORTED,
                        "%s: init_lora_weights '%.32s': an unconverted adapter for a modified "
                        "base model is not supported (convert it when saving)",
                        path, how);
    return LORA_OK;
}

/* Whether a target_modules regex stays small once compiled. glibc's regcomp copies the
 * operand of every + and {m,n}, so stacked or nested repetitions grow the automaton
 * exponentially (a fuzzed "x+++...+" took gigabytes). Refused: counted repetition
 * {m,n}, a quantifier applied to a quantifier (but one lazy ?), more than 8 +. */
static int regex_is_tame(const char *py)
{
    int in_class = 0, prev_quant = 0, plus = 0;
    for (const char *p = py; *p; p++) {
        if (*p == '\\') {
            if (!p[1])
                return 0;
            p++;
            prev_quant = 0;
        } else if (in_class) {
            in_class = *p != ']';
        } else if (*p == '[') {
            in_class = 1;
            if (p[1] == '^' || p[1] == ']')
                p++;
            if (*p == '^' && p[1] == ']')
                p++;
            prev_quant = 0;
        } else if (*p == '{') {
            return 0;
        } else if (*p == '*' || *p == '+' || *p == '?') {
            if (prev_quant && !(*p == '?' && prev_quant == 1))
                return 0;
            plus += *p == '+';
            prev_quant = prev_quant ? 2 : 1; /* 2: the lazy ? after a quantifier */
        } else {
            prev_quant = 0;
        }
    }
    return plus <= 8;
}

/* A Python regular expression (re.fullmatch) as a POSIX extended one matching whole
 * keys: "^(...)$", with \d, (?:, and lazy quantifiers rewritten. 0 when it uses syntax
 * that has no POSIX equivalent here. */
static int translate_regex(const char *py, char *out, size_t cap)
{
    size_t n = 0;
    int in_class = 0;
#define EMIT(s)                                          \
    do {                                                 \
        const size_t l_ = strlen(s);                     \
        if (n + l_ + 3 > cap)                            \
            return 0;                                    \
        memcpy(out + n, s, l_);                          \
        n += l_;                                         \
    } while (0)
    EMIT("^(");
    for (const char *p = py; *p; p++) {
        char one[2] = {*p, '\0'};
        if (*p == '\\') {
            const char c = p[1];
            if (!c)
                return 0;
            p++;
            if (c == 'd')
                EMIT(in_class ? "0-9" : "[0-9]");
            else if (in_class && c == 'w')
                EMIT("A-Za-z0-9_");
            else if (in_class && (c == ']' || c == '\\' || c == '^' || c == '-'))
                return 0;
            else if (in_class) {
                one[0] = c;
                EMIT(one);
            } else if (strchr("wsWS", c) || !isalnum((unsigned char)c)) {
                const char esc[3] = {'\\', c, '\0'};
                EMIT(esc);
            } else {
                return 0; /* \b, \A, back-references, ... */
            }
        } else if (in_class) {
            in_class = *p != ']';
            EMIT(one);
        } else if (*p == '[') {
            in_class = 1;
            EMIT(one);
            if (p[1] == '^' || p[1] == ']') { /* a leading ^ or ] belongs to the class */
                one[0] = *++p;
                EMIT(one);
            }
        } else if (*p == '(' && p[1] == '?') {
            if (p[2] != ':')
                return 0; /* lookarounds, named groups, flags */
            EMIT("(");
            p += 2;
        } else if ((*p == '*' || *p == '+' || *p == '?' || *p == '}') && p[1] == '?') {
            EMIT(one); /* lazy = greedy for a whole-key match */
            p++;
        } else {
            EMIT(one);
        }
    }
#undef EMIT
    if (in_class)
        return 0;
    memcpy(out + n, ")$", 3);
    return 1;
}

/* target_modules, layers_to_transform, layers_pattern into rules. */
static int config_targets(const cJSON *root, const char *path, peft_rules *rules, char *err)
{
    const cJSON *x = given(root, "target_modules");
    if (x && cJSON_IsArray(x)) {
        for (const cJSON *it = x->child; it; it = it->next)
            if (!cJSON_IsString(it))
                return io_error(err, LORA_ERR_FORMAT, "%s: target_modules holds a non-string",
                                path);
    } else if (x && cJSON_IsString(x)) {
        char ere[REGEX_MAX + 16];
        if (strcasecmp(x->valuestring, "all-linear") == 0) {
            rules->all_linear = 1;
        } else if (strlen(x->valuestring) > REGEX_MAX || !regex_is_tame(x->valuestring) ||
                   !translate_regex(x->valuestring, ere, sizeof ere) ||
                   regcomp(&rules->regex, ere, REG_EXTENDED | REG_NOSUB) != 0) {
            return io_error(err, LORA_ERR_UNSUPPORTED,
                            "%s: target_modules regex '%.64s' uses syntax liblora cannot "
                            "evaluate",
                            path, x->valuestring);
        } else {
            rules->has_regex = 1;
        }
    } else if (x) {
        return io_error(err, LORA_ERR_FORMAT,
                        "%s: target_modules is neither a list nor a string", path);
    }
    rules->targets = x;
    const cJSON *lt = given(root, "layers_to_transform");
    for (const cJSON *it = cJSON_IsArray(lt) ? lt->child : lt; it;
         it = cJSON_IsArray(lt) ? it->next : NULL)
        if (!cJSON_IsNumber(it) || floor(it->valuedouble) != it->valuedouble)
            return io_error(err, LORA_ERR_FORMAT,
                            "%s: layers_to_transform is not an integer or a list of them", path);
    rules->layers = lt && (!cJSON_IsArray(lt) || lt->child) ? lt : NULL;
    const cJSON *lp = given(root, "layers_pattern");
    for (const cJSON *it = cJSON_IsArray(lp) ? lp->child : lp; it;
         it = cJSON_IsArray(lp) ? it->next : NULL)
        if (!cJSON_IsString(it))
            return io_error(err, LORA_ERR_FORMAT,
                            "%s: layers_pattern is not a string or a list of them", path);
    rules->layers_pattern = lp && (!cJSON_IsArray(lp) || lp->child) &&
                                    (!cJSON_IsString(lp) || lp->valuestring[0])
                                ? lp
                                : NULL;
    return LORA_OK;
}

int peft_config_read(const io_alloc *a, const char *path, io_meta *meta, peft_rules *rules,
                     char *err)
{
    memset(rules, 0, sizeof *rules);
    unsigned char *buf;
    size_t size;
    int st = io_read_file(a, path, CONFIG_MAX, &buf, &size, err);
    if (st != LORA_OK)
        return st;
    if (memchr(buf, '\0', size)) {
        io_free(a, buf);
        return io_error(err, LORA_ERR_FORMAT, "%s: NUL byte in JSON", path);
    }
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts((const char *)buf, size + 1, &end, 1);
    rules->root = root;
    if (!root || !cJSON_IsObject(root))
        st = io_error(err, LORA_ERR_FORMAT, "%s is not a JSON object", path);
    else
        st = io_json_strict(a, (const char *)buf, size, root, path, err);
    io_free(a, buf);
    if (st == LORA_OK)
        st = config_scale(root, path, meta, err);
    if (st == LORA_OK)
        st = config_refusals(root, path, err);
    if (st == LORA_OK)
        st = config_targets(root, path, rules, err);
    return st;
}

/* PEFT finds a module's layer index in its key: the first numbered segment, or the one
 * after layers_pattern. Our keys have one number: found unless a pattern misses. */
static int layer_found(const peft_rules *rules, const char *key)
{
    const cJSON *lp = rules->layers_pattern;
    if (!lp)
        return 1;
    for (const cJSON *it = cJSON_IsArray(lp) ? lp->child : lp; it;
         it = cJSON_IsArray(lp) ? it->next : NULL) {
        char py[REGEX_MAX + 32], ere[2 * REGEX_MAX + 64];
        regex_t re;
        if (strlen(it->valuestring) > REGEX_MAX)
            continue;
        snprintf(py, sizeof py, ".*\\.%s\\.\\d+\\..*", it->valuestring);
        if (!regex_is_tame(py) || !translate_regex(py, ere, sizeof ere) ||
            regcomp(&re, ere, REG_EXTENDED | REG_NOSUB) != 0)
            continue;
        const int hit = regexec(&re, key, 0, NULL, 0) == 0;
        regfree(&re);
        if (hit)
            return 1;
    }
    return 0;
}

static int layer_listed(const cJSON *lt, int64_t layer_index)
{
    for (const cJSON *it = cJSON_IsArray(lt) ? lt->child : lt; it;
         it = cJSON_IsArray(lt) ? it->next : NULL)
        if (it->valuedouble == (double)layer_index)
            return 1;
    return 0;
}

int peft_config_targets(const peft_rules *rules, const io_record *r, char *err)
{
    char key[96];
    snprintf(key, sizeof key, "model.layers.%lld.self_attn.%s", (long long)r->layer,
             module_names[r->target]);
    const cJSON *t = rules->targets;
    if (!t || rules->all_linear)
        return LORA_OK;
    if (rules->has_regex)
        return regexec(&rules->regex, key, 0, NULL, 0) == 0
                   ? LORA_OK
                   : io_error(err, LORA_ERR_FORMAT,
                              "tensor %s: its module %s does not match the target_modules "
                              "regex",
                              r->name, key);
    int found = 0;
    const size_t klen = strlen(key);
    for (const cJSON *it = t->child; it && !found; it = it->next) {
        const size_t n = strlen(it->valuestring);
        found = strcmp(key, it->valuestring) == 0 ||
                (n < klen && key[klen - n - 1] == '.' &&
                 strcmp(key + klen - n, it->valuestring) == 0); /* a dotted suffix */
    }
    if (!found)
        return io_error(err, LORA_ERR_FORMAT,
                        "tensor %s: target_modules does not list its module %s", r->name, key);
    if (rules->layers && (!layer_found(rules, key) || !layer_listed(rules->layers, r->layer)))
        return io_error(err, LORA_ERR_FORMAT,
                        "tensor %s: layer %lld is not in layers_to_transform%s", r->name,
                        (long long)r->layer,
                        rules->layers_pattern ? " (with layers_pattern)" : "");
    return LORA_OK;
}

void peft_config_free(peft_rules *rules)
{
    if (rules->has_regex)
        regfree(&rules->regex);
    cJSON_Delete(rules->root);
    memset(rules, 0, sizeof *rules);
}
