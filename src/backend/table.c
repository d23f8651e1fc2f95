/* The backends AUTO chooses from. A new backend is its own file defining one
 * attn_backend, a line here, and its lora_backend value in include/lora.h
 * (docs/design.md, "Adding a backend"). */
#include "backend.h"

extern const attn_backend attn_backend_exact;
extern const attn_backend attn_backend_poly;

/* Order of preference at equal cost. Exact first: it plans every problem, so AUTO
 * always finds a backend. */
const attn_backend *const attn_backends[] = {
    &attn_backend_exact,
    &attn_backend_poly,
    NULL,
};

const attn_backend *attn_backend_of(int id)
{
    for (const attn_backend *const *b = attn_backends; *b; b++)
        if ((*b)->id == id)
            return *b;
    return NULL;
}
