/* Build configuration, derived from the compiler and the target when the build does
 * not state it, so every way of building liblora (the Makefile, the amalgamation, a
 * vendored source list; docs/vendoring.md) keeps the fast paths without extra flags.
 * Included first by src/linalg/linalg.h, which every library file reaches.
 *
 * LORA_HAVE_LIBMVEC     glibc's libmvec supplies vector expf for the exact backend's
 *                       softmax. Derived on x86-64 glibc >= 2.22, where libm.so and
 *                       libm.a pull libmvec in, so -lm links it. -DLORA_NO_LIBMVEC: off.
 * LORA_BLIS_STATIC      libblis.a is linked: BLIS's per-architecture context lookup
 *                       (bli_gks_lookup_nat_cntx, not exported by libblis.so) is
 *                       called directly, to pick the AVX-512 (skx) kernels.
 * LORA_BLIS_LOOKUP_WEAK derived when LORA_BLIS_STATIC is not given (ELF, GCC or clang,
 *                       x86-64): the lookup is a weak reference, used when the final
 *                       link has libblis.a and skipped at run time otherwise.
 *                       -DLORA_NO_BLIS_LOOKUP: never use it.
 * The AVX-512 tile kernels and target_clones need no macro: they follow from __GNUC__
 * and __x86_64__ and are chosen at run time from the CPU (src/linalg). */
#ifndef LORA_BUILD_CONFIG_H
#define LORA_BUILD_CONFIG_H

#if defined(__has_include)
#if __has_include(<features.h>)
#include <features.h> /* __GLIBC__, __GLIBC_MINOR__ */
#endif
#endif

#if !defined(LORA_HAVE_LIBMVEC) && !defined(LORA_NO_LIBMVEC) && defined(__x86_64__) && \
    defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 22))
#define LORA_HAVE_LIBMVEC 1
#endif
#if defined(LORA_NO_LIBMVEC)
#undef LORA_HAVE_LIBMVEC
#endif

#if !defined(LORA_BLIS_STATIC) && !defined(LORA_NO_BLIS_LOOKUP) && defined(__x86_64__) && \
    defined(__GNUC__) && defined(__ELF__)
#define LORA_BLIS_LOOKUP_WEAK 1
#endif
#if defined(LORA_NO_BLIS_LOOKUP)
#undef LORA_BLIS_STATIC
#endif

#endif
