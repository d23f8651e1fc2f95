/* When la_gemm (blis_linalg.c) splits a product over threads. A header of its own so
 * tests size their layers from the same numbers (test/test_split.c). */
#ifndef LORA_GEMM_SPLIT_H
#define LORA_GEMM_SPLIT_H

/* Smallest share of a product worth a thread of its own (flops). */
#define LA_MIN_FLOPS_PER_THREAD 4e6
/* Row or column ranges of a split product are multiples of this (a multiple of the
 * register block sizes of BLIS's x86-64 sgemm kernels: 32 × 12, 6 × 16, ...). */
#define LA_SPLIT_ALIGN 96

#endif
