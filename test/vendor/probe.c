/* Compiled with the whole amalgamation in its translation unit and linked with
 * libblis.a (make amalgamation-check, check-vendor): checks that a build given no
 * feature macros keeps the fast paths src/build_config.h derives. */
#include "liblora.c"

#include <stdio.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GLIBC__) && !defined(LORA_HAVE_LIBMVEC) && \
    !defined(LORA_NO_LIBMVEC)
#error "src/build_config.h did not derive LORA_HAVE_LIBMVEC on x86-64 glibc"
#endif

int main(void)
{
    la_ctx ctx;
    la_ctx_init(&ctx, 1);
    printf("probe: BLIS kernels %s, AVX-512 CPU %s, libmvec %s\n", ctx.arch,
           ctx.avx512 ? "yes" : "no",
#if defined(LORA_HAVE_LIBMVEC)
           "yes"
#else
           "no"
#endif
    );
#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__)
    /* libblis.a is linked: on AVX-512 CPUs the skx context must have been found. */
    if (ctx.avx512 && strcmp(ctx.arch, "skx") != 0) {
        fprintf(stderr, "probe: AVX-512 CPU but BLIS kernels %s, not skx\n", ctx.arch);
        return 1;
    }
#endif
    return 0;
}
