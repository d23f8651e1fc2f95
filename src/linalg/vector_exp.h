/* For the softmax kernels (exact attention's tiles, the decode step): glibc libmvec's
 * vector expf inside `omp simd` loops, and an AVX-512 clone of each kernel beside the
 * baseline one. Include it only where those loops live: the declaration changes how
 * every expf loop of the includer is compiled. */
#ifndef LORA_LINALG_VECTOR_EXP_H
#define LORA_LINALG_VECTOR_EXP_H

#include <math.h>

#if defined(LORA_HAVE_LIBMVEC) && defined(__x86_64__)
/* libmvec has vector variants of expf (_ZGVbN4v_expf ... _ZGVeN16v_expf); declaring
 * them lets `omp simd` loops call them (the build's -fopenmp-simd honours the simd
 * pragmas; no OpenMP runtime is involved). <math.h> only does so under -ffast-math. */
#pragma omp declare simd notinbranch
extern float expf(float);
#endif
#if defined(__clang__)
/* clang 14 does not call the declared vector variants (it would need -fveclib=libmvec):
 * the expf loops stay scalar there, which is correct but slower. Not worth a warning. */
#pragma clang diagnostic ignored "-Wpass-failed"
#endif

/* An AVX-512 clone and a baseline one of a kernel, picked at load time. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__gnu_linux__)
#define LA_KERNEL_CLONES __attribute__((target_clones("avx512f", "default")))
#else
#define LA_KERNEL_CLONES
#endif

#endif
