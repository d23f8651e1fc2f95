/* The invalidation hook: everything derived from an adapter's parameters (its base
 * weights, factors and scale) is dropped when they change. */
#include "internal.h"

void lora_adapter_params_changed(lora_adapter *ad)
{
    ad->tape.kind = SAVED_NONE; /* the saved activations belong to the old layer */
    ad->params_generation++;    /* and so do every other tape's (lora_tape_check_replay) */
    ad->merged_valid = 0;       /* merge.c rebuilds the merged weights on next use */
}
