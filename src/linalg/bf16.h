/* Products with bf16 operands and fp32 accumulation (LORA_COMPUTE_BF16), on CPUs with
 * AVX512_BF16 (VDPBF16PS: Zen 4, Cooper Lake, Sapphire Rapids and later). Operands
 * arrive as float (or as the base weight's own dtype), are rounded to bf16 (nearest
 * even, as torch does) while being packed into the caller's scratch, and every product
 * of two bf16 values is summed in fp32. docs/compute.md has the choices.
 *
 * Call these only when la_cpu_bf16() said yes (every kernel has the target attribute,
 * so the library itself still runs on any x86-64). */
#ifndef LORA_BF16_H
#define LORA_BF16_H

#include <stddef.h>
#include <stdint.h>

#include "linalg.h"
#include "typed.h"

/* 1 when this CPU runs the bf16 kernels (AVX512_BF16 with AVX-512 F/BW/VL) and the
 * environment variable LORA_DISABLE_BF16 is unset or "0" (it masks the instructions, as
 * ONEDNN_MAX_CPU_ISA does, so that the refusal on older CPUs can be exercised). */
int la_cpu_bf16(void);

/* Floats of scratch la_bf16_gemm_w needs with nthreads threads. */
size_t la_bf16_gemm_w_scratch_floats(int nthreads);

/* la_gemm_w (typed.h) with bf16 operands: alpha·X·op(W) + beta·C, tw as there. The
 * result does not depend on nthreads (each entry sums its k blocks in order). */
void la_bf16_gemm_w(const la_ctx *ctx, int nthreads, la_trans tw, int64_t m, int64_t out,
                    int64_t in, float alpha, const float *x, int64_t ldx, la_wmat w,
                    float beta, float *c, int64_t ldc, float *scratch);

/* Floats of scratch la_bf16_tile_product needs for m, n, k up to `most` each. */
size_t la_bf16_tile_scratch_floats(int64_t most);

/* la_tile_product (avx512_kernels.h) with bf16 operands:
 *   C[j·scj + i] = alpha·Σ_k A[k·sa + i]·B(k, j)  (+ C when accumulate),
 * i < m (a multiple of 16), j < n, B(k, j) = b[j·sb + k] when brows else b[k·sb + j].
 * a_kept: A stays unchanged until the next la_bf16_tile_forget (an operand reused
 * across tiles); its packed copy is then kept (up to LA_BF16_KEPT of them) and reused
 * when the same a, sa, m, k come again. */
#define LA_BF16_KEPT 3
void la_bf16_tile_product(int brows, int64_t m, int64_t n, int64_t k, float alpha,
                          const float *a, int64_t sa, const float *b, int64_t sb, float *c,
                          int64_t scj, int accumulate, int a_kept, float *scratch);
/* Operands their producer writes already packed (the attention's P and dS, converted
 * while the softmax pass has their rows at hand, instead of in a pass of their own):
 * the tile scratch holds LA_BF16_OPERANDS such areas, each the packed B of one product
 * with m, n, k up to `most`. Area i (i < LA_BF16_OPERANDS) of a tile scratch: */
#define LA_BF16_OPERANDS 3
uint32_t *la_bf16_tile_operand(float *scratch, int i);
/* dst[l] = bf16 pair (lo[l], hi[l]) for l < n, 0 for n <= l < n rounded up to 16; hi
 * NULL: pairs (lo[l], 0) (an odd k's pad). Two rows 2p, 2p + 1 of an operand so packed
 * at dst + p·round16(n) are la_bf16_tile_product's B with brows 0. */
void la_bf16_pack_pairs(const float *lo, const float *hi, int64_t n, uint32_t *dst);
/* dst[p] = bf16 pair (x[2p], x[2p + 1]) for p < (k + 1) / 2 (odd k: pad 0). Row j so
 * packed at dst + j·((k + 1) / 2) is la_bf16_tile_product's B with brows 1. */
void la_bf16_pack_row(const float *x, int64_t k, uint32_t *dst);
/* la_bf16_tile_product with B packed by the two functions above (in the layout of
 * brows); bp: la_bf16_tile_operand of the same scratch or any other memory. */
void la_bf16_tile_product_packed(int brows, int64_t m, int64_t n, int64_t k, float alpha,
                                 const float *a, int64_t sa, const uint32_t *bp, float *c,
                                 int64_t scj, int accumulate, int a_kept, float *scratch);
/* (Re)starts a tile scratch for m, n, k up to `most`: before its first product, and
 * whenever kept operands' sources may change (drops them). */
void la_bf16_tile_forget(float *scratch, int64_t most);

#endif
