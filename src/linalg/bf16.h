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
 * by the softmax pass itself instead of in a pass of their own):
 * the tile scratch holds LA_BF16_OPERANDS such areas, each the packed B of one product
 * with m, n, k up to `most`. Area i (i < LA_BF16_OPERANDS) of a tile scratch: */
#define LA_BF16_OPERANDS 3
uint32_t *la_bf16_tile_operand(float *scratch, int i);
/* Softmax passes that write their bf16 operands in one pass over registers, with an
 * exp of about 3e-6 relative error (the values are rounded to bf16 next); entries
 * exp(..) below flush become 0, inputs below -87 count as -87 (-inf, NaN too).
 * Forward, two rows lo, hi (hi NULL: one) of n lanes: x = exp(x - shift[lane]) added
 * to sum[lane], written as pairs to dst (dst[l] = pair (lo[l], hi[l]): la_bf16_tile_product's
 * packed B with brows 0, rows 2p, 2p + 1 at p·round16(n)); lo, hi keep their scores). */
void la_bf16_exp_pairs(const float *lo, const float *hi, const float *shift, int64_t n, float flush,
                       float *sum, uint32_t *dst);
/* Backward, rows s0, s1 (s1 NULL: one) of n <= BF16_ROW_MAX entries: P = exp(s - lse[r])
 * and dS = (dp - shift[r])·P, written as pairs of P to p_dst, of dS to ds_dst and as
 * rows of dS to ds_rows ((n + 1) / 2 words of pairs each, odd n padded with 0: the
 * packed B with brows 1), all padded as the products' layouts want. */
#define BF16_ROW_MAX 256
void la_bf16_probs_pair(const float *s0, const float *s1, const float *dp0, const float *dp1,
                        const float *lse, const float *shift, int64_t n, float flush,
                        uint32_t *p_dst, uint32_t *ds_dst, uint32_t *ds_rows);
/* la_bf16_tile_product with B packed by the two functions above (in the layout of
 * brows); bp: la_bf16_tile_operand of the same scratch or any other memory. */
void la_bf16_tile_product_packed(int brows, int64_t m, int64_t n, int64_t k, float alpha,
                                 const float *a, int64_t sa, const uint32_t *bp, float *c,
                                 int64_t scj, int accumulate, int a_kept, float *scratch);
/* (Re)starts a tile scratch for m, n, k up to `most`: before its first product, and
 * whenever kept operands' sources may change (drops them). */
void la_bf16_tile_forget(float *scratch, int64_t most);

#endif
