/* adapter_config.json as PEFT reads it (peft_config.c): the scale, the keys that change
 * what an adapter means, and which modules the adapter targets. */
#ifndef LORA_IO_PEFT_CONFIG_H
#define LORA_IO_PEFT_CONFIG_H

#include <regex.h>

#include "io.h"

/* PEFT's rules for "is module key adapted?" (tuners_utils.check_target_module_exists). */
typedef struct peft_rules {
    void *root;              /* the config's cJSON tree, owned */
    const void *targets;     /* target_modules: an array or a string; NULL: any module */
    const void *layers;      /* layers_to_transform in use (number, non-empty array), or NULL */
    const void *layers_pattern; /* a string or an array, or NULL */
    int all_linear;          /* target_modules "all-linear": every projection */
    int has_regex;
    regex_t regex;           /* target_modules as a string, compiled to match whole keys */
} peft_rules;

/* Reads the config at path into meta (PEFT's defaults for missing keys) and rules.
 * Errors: IO, FORMAT (malformed, duplicate key, embedded NUL, wrong types),
 * UNSUPPORTED (a key that changes the adapter's meaning, naming it), NOMEM. */
int peft_config_read(const io_alloc *a, const char *path, io_meta *meta, peft_rules *rules,
                     char *err);
/* LORA_OK when the config targets record r (PEFT's module name
 * model.layers.{i}.self_attn.{q,k,v,o}_proj), else FORMAT naming the tensor. */
int peft_config_targets(const peft_rules *rules, const io_record *r, char *err);
void peft_config_free(peft_rules *rules);

#endif
