/* Vector reductions the API and layer share; written so the compiler vectorises them
 * (OpenMP simd reductions: no fast-math needed). */
#include <math.h>

#include "linalg.h"

LA_VECTOR_CLONES float la_max_abs(const float *x, size_t n)
{
    float m[16] = {0}; /* independent lanes; the compiler maps them to one register */
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) {
            const float a = fabsf(x[i + j]);
            m[j] = a > m[j] ? a : m[j]; /* not fmaxf: a libm call without fast-math */
        }
    float r = 0.0f;
    for (; i < n; i++)
        r = fabsf(x[i]) > r ? fabsf(x[i]) : r;
    for (int j = 0; j < 16; j++)
        r = m[j] > r ? m[j] : r;
    return r;
}

LA_VECTOR_CLONES int64_t la_find_nonfinite(const float *x, size_t n)
{
    /* A vectorised pass over the whole array; the index is looked up only when a
     * non-finite value exists (NaN fails the comparison, ±Inf exceeds FLT_MAX). */
    int bad = 0;
#pragma omp simd reduction(| : bad)
    for (size_t i = 0; i < n; i++)
        bad |= !(fabsf(x[i]) <= 3.40282346638528859812e+38f);
    if (!bad)
        return -1;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]))
            return (int64_t)i;
    return -1;
}
