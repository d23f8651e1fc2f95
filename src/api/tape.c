/* Tapes: what a training forward saves for its backward, so any number of forwards can
 * be in flight. A tape names its adapter by a random id and the adapter's parameter
 * generation at the forward: a backward with a stale or foreign tape is
 * LORA_ERR_STATE, never a wrong gradient. */
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <sys/random.h>
#endif

#include "internal.h"

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

uint64_t lora_new_handle_id(const void *salt)
{
    /* An id, not a pointer: a new adapter may reuse a destroyed one's address. A global
     * counter would be process-global mutable state, so the id is random. */
    uint64_t id = 0;
#if defined(__linux__)
    if (getrandom(&id, sizeof id, GRND_NONBLOCK) != (ssize_t)sizeof id)
        id = 0;
#endif
    struct timespec real = {0, 0}, mono = {0, 0};
    clock_gettime(CLOCK_REALTIME, &real);
    clock_gettime(CLOCK_MONOTONIC, &mono);
    uint64_t z = id ^ (uint64_t)(uintptr_t)salt ^ (uint64_t)(uintptr_t)&z;
    z = mix64(z + (uint64_t)real.tv_sec * UINT64_C(1000000000) + (uint64_t)real.tv_nsec);
    z = mix64(z + (uint64_t)mono.tv_sec * UINT64_C(1000000000) + (uint64_t)mono.tv_nsec);
    return z ? z : 1;
}

void lora_tape_init(lora_tape *t, const lora_adapter *ad, attn_group_plan *groups)
{
    memset(t, 0, sizeof *t);
    t->mem = ad->mem;
    t->owner_id = ad->id;
    t->groups = groups;
}

int lora_tape_check_owner(const lora_adapter *ad, const lora_tape *t, char *err)
{
    if (t->owner_id != ad->id)
        return lora_set_error(err, LORA_ERR_STATE,
                              "the tape belongs to another adapter (tapes are made per "
                              "adapter: lora_tape_create)");
    return LORA_OK;
}

int lora_tape_check_replay(lora_adapter *ad, const lora_tape *t)
{
    if (t->kind == SAVED_NONE)
        return lora_set_error(ad->err, LORA_ERR_STATE,
                              t == &ad->tape ? "no saved forward: call lora_forward or "
                                               "lora_forward_ex first"
                                             : "the tape holds no forward: record one with "
                                               "lora_forward_ex (args->tape)");
    if (t->generation != ad->params_generation)
        return lora_set_error(ad->err, LORA_ERR_STATE,
                              "the tape's forward ran before the adapter's parameters or base "
                              "weights changed: run the forward again");
    return LORA_OK;
}

void lora_tape_record(lora_tape *t, lora_adapter *ad, const attn_problem *p,
                      const lora_plan *plan, lora_saved_kind kind)
{
    t->problem = *p;
    memcpy(t->groups, plan->groups, (size_t)p->n_kv_heads * sizeof *plan->groups);
    t->eta = plan->run_eta;
    t->generation = ad->params_generation;
    t->call.training_forward = ad->training_forwards++;
    t->kind = kind;
}

LORA_API int lora_tape_create(lora_tape **out, const lora_adapter *ad)
{
    if (!out)
        return LORA_ERR_INVALID_ARG; /* ad is const: no message */
    *out = NULL;
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    /* The tape and its plan groups: one block. */
    const size_t groups = (size_t)ad->layer.n_kv_heads;
    const size_t head = (sizeof(lora_tape) + 63u) & ~(size_t)63u;
    unsigned char *block = lora_mem_alloc(&ad->mem, head + groups * sizeof(attn_group_plan));
    if (!block)
        return LORA_ERR_NOMEM;
    lora_tape *t = (lora_tape *)(void *)block;
    lora_tape_init(t, ad, (attn_group_plan *)(void *)(block + head));
    *out = t;
    return LORA_OK;
}

LORA_API void lora_tape_destroy(lora_tape *tape)
{
    if (!tape)
        return;
    const lora_mem mem = tape->mem; /* the tape's own copy: its adapter may be gone */
    lora_buf_free(&mem, &tape->acts_buf);
    lora_mem_free(&mem, tape);
}
