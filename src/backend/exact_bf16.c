/* LORA_COMPUTE_BF16 in the exact backend: when its tiles take bf16 operands and what
 * that does to its cost. The tile products themselves are src/linalg/bf16.c's; exact.c
 * calls them in place of the fp32 register kernels, on the same operands, so the
 * softmax, its statistics and every accumulation stay fp32. */
#include "backend.h"

#include "../linalg/bf16.h"

/* Exact attention's modelled cost in bf16 relative to fp32, for AUTO: VDPBF16PS does
 * twice the multiply-adds of an FMA, but packing to bf16 and the fp32 softmax are not
 * faster, so the products' share gains less than 2x. */
#define EXACT_BF16_COST_RATIO 0.6

int attn_exact_bf16(const attn_problem *p)
{
    /* The bf16 tiles replace the fused fp32 ones, which need whole vectors of head_dim
     * (la_cpu_bf16 already required AVX-512). */
    return p->la->bf16 && p->la->avx512 && p->head_dim % 16 == 0;
}

double attn_exact_cost_ratio(const attn_problem *p)
{
    return attn_exact_bf16(p) ? EXACT_BF16_COST_RATIO : 1.0;
}

size_t attn_exact_bf16_tile_floats(const attn_problem *p, int64_t tile)
{
    if (!attn_exact_bf16(p))
        return 0;
    return la_bf16_tile_scratch_floats(tile > p->head_dim ? tile : p->head_dim);
}
