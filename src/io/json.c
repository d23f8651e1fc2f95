/* JSON read the way Python's json (and so PEFT and the safetensors reference) reads it,
 * as far as it changes what a file means: cJSON keeps the first of two equal keys where
 * Python keeps the last, and it cuts a string at an escaped NUL. Both are refused. */
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "io.h"

/* The first "\u0000" escape inside a string of text[0..len), or NULL. */
static const char *escaped_nul(const char *text, size_t len)
{
    int in_string = 0;
    for (size_t i = 0; i < len; i++) {
        if (text[i] == '"') {
            in_string = !in_string;
        } else if (in_string && text[i] == '\\' && i + 1 < len) {
            if (text[i + 1] == 'u' && i + 5 < len && memcmp(text + i + 2, "0000", 4) == 0)
                return text + i;
            i++; /* the escaped character (for \uXXXX the digits are plain) */
        }
    }
    return NULL;
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The first key that appears twice in one object of the tree at x, or NULL (*nomem set
 * when the check could not allocate). */
static const char *duplicate_key(const io_alloc *a, const cJSON *x, int *nomem)
{
    if (!cJSON_IsObject(x) && !cJSON_IsArray(x))
        return NULL;
    size_t n = 0;
    for (const cJSON *c = x->child; c; c = c->next)
        n++;
    if (cJSON_IsObject(x) && n > 1) {
        const char **names = io_calloc(a, n, sizeof *names);
        if (!names) {
            *nomem = 1;
            return NULL;
        }
        size_t k = 0;
        for (const cJSON *c = x->child; c; c = c->next)
            names[k++] = c->string ? c->string : "";
        qsort(names, n, sizeof *names, cmp_name);
        const char *dup = NULL;
        for (size_t i = 1; i < n && !dup; i++)
            if (strcmp(names[i], names[i - 1]) == 0)
                dup = names[i];
        io_free(a, names);
        if (dup)
            return dup;
    }
    for (const cJSON *c = x->child; c && !*nomem; c = c->next) {
        const char *dup = duplicate_key(a, c, nomem); /* depth: cJSON's nesting limit */
        if (dup)
            return dup;
    }
    return NULL;
}

int io_json_strict(const io_alloc *a, const char *text, size_t len, const void *root,
                   const char *what, char *err)
{
    if (escaped_nul(text, len))
        return io_error(err, LORA_ERR_FORMAT,
                        "%s: a string holds \\u0000 (an embedded NUL is not accepted)", what);
    int nomem = 0;
    const char *dup = duplicate_key(a, root, &nomem);
    if (nomem)
        return io_error(err, LORA_ERR_NOMEM, "%s: cannot allocate the key check", what);
    if (dup)
        return io_error(err, LORA_ERR_FORMAT,
                        "%s: key '%.64s' appears twice in one object (readers disagree on "
                        "which one counts)",
                        what, dup);
    return LORA_OK;
}
