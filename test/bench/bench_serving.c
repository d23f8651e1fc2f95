/* Serving costs against memory streaming, measured in the same run (docs/serving.md).
 *
 * A Llama-3-8B-shaped layer: d_model 4096, 32 heads, 8 kv heads, head_dim 128, output
 * projection, LoRA rank 16 on Q, K, V, O; LORA_CFG_THREADS 1 and one-thread streaming,
 * timings interleaved so both see the same machine load; medians of --reps runs.
 *
 * 1. lora_apply, 64 rows spread over 16 tenants (4 rows each, in shuffled order), for
 *    each target, against one plain pass over the bytes it must touch: the 16 tenants'
 *    factors of that target (copies of the same size), x, and y read and written.
 * 2. One decode row through the layer (lora_forward, batch 1, one token: every base
 *    weight read once) with a float base and with a bf16 base (both borrowed), against
 *    a plain pass over the float and the bf16 weight bytes.
 * 3. The typed projection alone, 1..8 rows x 4096 -> 4096: a layer whose cost is W_Q
 *    (K and V one head of 128 wide, no output projection; one token per sequence, so
 *    attention is a copy), with f32, bf16 and f16 bases, against a plain pass over W_Q.
 * 4. One decode step over a KV cache of 4096 tokens (lora_decode, --threads threads,
 *    default 2) for batch 1 and batch 8, float and bf16 base, against a plain pass (same
 *    threads) over the base weights once plus the sequences' K/V bytes.
 *
 *   bench_serving [--reps N] [--threads T]   (T: LORA_CFG_THREADS, default 1; the
 *   projection and apply sections stream on one thread, so compare their ratios at
 *   T = 1; the decode steps run on T threads, default 2, and stream on as many) */
#include <lora.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_common.h"

#define D_MODEL 4096
#define N_HEADS 32
#define N_KV_HEADS 8
#define HEAD_DIM 128
#define RANK 16
#define TENANTS 16
#define ROWS 64
#define MAX_REPS 101

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (!p) {
        fprintf(stderr, "out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

/* One pass over n bytes (a multiple of 64), 16 independent lanes; the result is kept
 * so the reads are not optimised away. */
static volatile float sink;
static void stream_read(const void *p, size_t n)
{
    const uint32_t *w = p;
    uint32_t acc[16] = {0};
    for (size_t i = 0; i + 16 <= n / 4; i += 16)
        for (int j = 0; j < 16; j++)
            acc[j] ^= w[i + j];
    uint32_t r = 0;
    for (int j = 0; j < 16; j++)
        r ^= acc[j];
    sink = (float)r;
}

static void stream_update(float *y, size_t n) /* read and write */
{
    for (size_t i = 0; i < n; i++)
        y[i] += 1.0f;
}

static int bench_threads = 1; /* --threads */

static lora_config *layer_config(void)
{
    lora_config *cfg = NULL;
    CHECK(lora_config_create(&cfg));
    CHECK(lora_config_set_int(cfg, LORA_CFG_D_MODEL, D_MODEL));
    CHECK(lora_config_set_int(cfg, LORA_CFG_N_HEADS, N_HEADS));
    CHECK(lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, N_KV_HEADS));
    CHECK(lora_config_set_int(cfg, LORA_CFG_HEAD_DIM, HEAD_DIM));
    CHECK(lora_config_set_int(cfg, LORA_CFG_OUT_PROJ, 1));
    CHECK(lora_config_set_int(cfg, LORA_CFG_TARGETS, 15));
    CHECK(lora_config_set_int(cfg, LORA_CFG_RANK, RANK));
    CHECK(lora_config_set_int(cfg, LORA_CFG_THREADS, bench_threads));
    CHECK(lora_config_set_int(cfg, LORA_CFG_BACKEND, LORA_BACKEND_EXACT));
    return cfg;
}

static void random_factors(lora_adapter *ad)
{
    const int targets[4] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V, LORA_TARGET_O};
    for (int t = 0; t < 4; t++)
        for (int which = 0; which < 2; which++) {
            int64_t r, c;
            CHECK(lora_adapter_param_shape(ad, targets[t], which, &r, &c));
            const size_t n = (size_t)(r * c);
            float *v = xmalloc(n * sizeof(float));
            for (size_t i = 0; i < n; i++)
                v[i] = 0.02f * urand();
            CHECK(lora_adapter_set_param(ad, targets[t], which, v, n));
            free(v);
        }
}

static void bench_apply(lora_adapter *const *tenants, int reps)
{
    const int targets[4] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V, LORA_TARGET_O};
    const char *names[4] = {"Q", "K", "V", "O"};
    printf("lora_apply: %d rows over %d tenants (4 rows each, shuffled), rank %d\n", ROWS,
           TENANTS, RANK);
    printf("%-6s %10s %14s %12s %8s\n", "target", "shape", "apply_us", "stream_us", "ratio");
    int32_t tid[ROWS];
    for (int r = 0; r < ROWS; r++)
        tid[r] = r % TENANTS;
    for (int r = ROWS - 1; r > 0; r--) { /* shuffle */
        const int k = (int)((urand() + 1.0f) * 0.5f * (float)(r + 1)) % (r + 1);
        const int32_t t = tid[r];
        tid[r] = tid[k];
        tid[k] = t;
    }
    for (int t = 0; t < 4; t++) {
        int64_t rank, in, out, r2;
        CHECK(lora_adapter_param_shape(tenants[0], targets[t], LORA_A, &rank, &in));
        CHECK(lora_adapter_param_shape(tenants[0], targets[t], LORA_B, &out, &r2));
        /* The bytes a streaming pass reads: copies of every tenant's factors, x, y. */
        const size_t factor_floats = (size_t)(rank * (in + out)) * TENANTS;
        float *factors = xmalloc(factor_floats * sizeof(float));
        for (int i = 0; i < TENANTS; i++) {
            float *at = factors + (size_t)i * (size_t)(rank * (in + out));
            CHECK(lora_adapter_get_param(tenants[i], targets[t], LORA_A, at,
                                         (size_t)(rank * in)));
            CHECK(lora_adapter_get_param(tenants[i], targets[t], LORA_B, at + rank * in,
                                         (size_t)(rank * out)));
        }
        float *x = xmalloc((size_t)(ROWS * in) * sizeof(float));
        float *y = xmalloc((size_t)(ROWS * out) * sizeof(float));
        for (int64_t i = 0; i < ROWS * in; i++)
            x[i] = urand();
        memset(y, 0, (size_t)(ROWS * out) * sizeof(float));
        double ta[MAX_REPS], ts[MAX_REPS];
        for (int k = 0; k < reps; k++) {
            double t0 = now();
            CHECK(lora_apply((const lora_adapter *const *)tenants, TENANTS, targets[t], tid, x,
                             ROWS, y));
            ta[k] = now() - t0;
            t0 = now();
            stream_read(factors, factor_floats * sizeof(float));
            stream_read(x, (size_t)(ROWS * in) * sizeof(float));
            stream_update(y, (size_t)(ROWS * out));
            ts[k] = now() - t0;
        }
        const double ma = median(ta, reps), ms = median(ts, reps);
        char shape[32];
        snprintf(shape, sizeof shape, "%lldx%lld", (long long)out, (long long)in);
        printf("%-6s %10s %14.1f %12.1f %8.2f\n", names[t], shape, 1e6 * ma, 1e6 * ms, ma / ms);
        free(factors);
        free(x);
        free(y);
    }
}

/* bf16 of a float, round to nearest even. */
static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static void bench_decode_row(int reps)
{
    const int targets[4] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V, LORA_TARGET_O};
    const int64_t q = N_HEADS * HEAD_DIM, kv = N_KV_HEADS * HEAD_DIM;
    const int64_t outs[4] = {q, kv, kv, D_MODEL}, ins[4] = {D_MODEL, D_MODEL, D_MODEL, q};
    float *wf[4];
    uint16_t *wb[4];
    size_t total = 0;
    lora_config *cfg = layer_config();
    lora_adapter *af = NULL, *ab = NULL;
    CHECK(lora_adapter_create(&af, cfg));
    CHECK(lora_adapter_create(&ab, cfg));
    lora_config_destroy(cfg);
    random_factors(af);
    CHECK(lora_adapter_copy_params(ab, af));
    for (int t = 0; t < 4; t++) {
        const size_t n = (size_t)(outs[t] * ins[t]);
        total += n;
        wf[t] = xmalloc(n * sizeof(float));
        wb[t] = xmalloc(n * sizeof(uint16_t));
        const float scale = 1.0f / sqrtf((float)ins[t]);
        for (size_t i = 0; i < n; i++) {
            wb[t][i] = to_bf16(scale * urand());
            const uint32_t u = (uint32_t)wb[t][i] << 16;
            memcpy(&wf[t][i], &u, sizeof u);
        }
        CHECK(lora_adapter_set_base_borrowed(af, targets[t], wf[t], NULL));
        CHECK(lora_adapter_set_base_typed(ab, targets[t], wb[t], LORA_DTYPE_BF16, NULL,
                                          LORA_BASE_BORROW));
    }
    float x[D_MODEL], yf[D_MODEL], yb[D_MODEL];
    for (int i = 0; i < D_MODEL; i++)
        x[i] = urand();
    double tf[MAX_REPS], tb[MAX_REPS], sf[MAX_REPS], sb[MAX_REPS];
    for (int k = 0; k < reps; k++) {
        double t0 = now();
        CHECK(lora_forward(af, x, 1, 1, yf));
        tf[k] = now() - t0;
        t0 = now();
        CHECK(lora_forward(ab, x, 1, 1, yb));
        tb[k] = now() - t0;
        t0 = now();
        for (int t = 0; t < 4; t++)
            stream_read(wf[t], (size_t)(outs[t] * ins[t]) * sizeof(float));
        sf[k] = now() - t0;
        t0 = now();
        for (int t = 0; t < 4; t++)
            stream_read(wb[t], (size_t)(outs[t] * ins[t]) * sizeof(uint16_t));
        sb[k] = now() - t0;
    }
    double maxdiff = 0.0;
    for (int i = 0; i < D_MODEL; i++)
        maxdiff = fmax(maxdiff, fabs((double)yf[i] - yb[i]));
    const double mf = median(tf, reps), mb = median(tb, reps);
    const double msf = median(sf, reps), msb = median(sb, reps);
    printf("\none decode row through the layer (lora_forward, 1 token; %.0f MB float, %.0f MB "
           "bf16 of base weights)\n",
           (double)total * 4 / 1e6, (double)total * 2 / 1e6);
    printf("%-6s %12s %12s %8s\n", "base", "forward_us", "stream_us", "ratio");
    printf("%-6s %12.1f %12.1f %8.2f\n", "f32", 1e6 * mf, 1e6 * msf, mf / msf);
    printf("%-6s %12.1f %12.1f %8.2f\n", "bf16", 1e6 * mb, 1e6 * msb, mb / msb);
    printf("bf16 / f32 forward: %.2f; max |y_bf16 - y_f32| = %.3g (same weight values)\n",
           mb / mf, maxdiff);
    lora_adapter_destroy(af);
    lora_adapter_destroy(ab);
    for (int t = 0; t < 4; t++) {
        free(wf[t]);
        free(wb[t]);
    }
}

/* ---- decode steps over a KV cache --------------------------------------------------- */

#define CONTEXT 4096
#define DECODE_BATCH 8

/* One pass over n bytes split over `threads` threads (as many as the decode uses):
 * plain pthreads, created per pass (microseconds against the milliseconds of a pass),
 * so no spinning runtime competes with the library's workers between passes. */
typedef struct stream_part {
    const char *p;
    size_t n;
    uint32_t acc;
} stream_part;

static void *stream_part_run(void *arg)
{
    stream_part *s = arg;
    const uint32_t *w = (const uint32_t *)(const void *)s->p;
    uint32_t lanes[16] = {0};
    for (size_t i = 0; i + 16 <= s->n / 4; i += 16)
        for (int j = 0; j < 16; j++)
            lanes[j] ^= w[i + j];
    for (int j = 0; j < 16; j++)
        s->acc ^= lanes[j];
    return NULL;
}

#define MAX_STREAM_THREADS 64
static void stream_read_threads(const void *p, size_t n, int threads)
{
    threads = threads > MAX_STREAM_THREADS ? MAX_STREAM_THREADS : threads;
    stream_part parts[MAX_STREAM_THREADS];
    pthread_t tid[MAX_STREAM_THREADS];
    const size_t chunk = (n / (size_t)threads) & ~(size_t)63;
    for (int t = 0; t < threads; t++) {
        parts[t] = (stream_part){(const char *)p + (size_t)t * chunk,
                                 t == threads - 1 ? n - (size_t)t * chunk : chunk, 0};
        if (t > 0 && pthread_create(&tid[t], NULL, stream_part_run, &parts[t]) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            exit(1);
        }
    }
    stream_part_run(&parts[0]);
    uint32_t acc = parts[0].acc;
    for (int t = 1; t < threads; t++) {
        pthread_join(tid[t], NULL);
        acc ^= parts[t].acc;
    }
    sink = (float)acc;
}

/* Fills every sequence of cache to CONTEXT tokens through a cheap adapter of the same
 * kv heads and head_dim (d_model 64, one query head per kv head): the cached values do
 * not matter for timing, only their number. */
static void prefill(lora_kv_cache *cache, int64_t batch, int threads)
{
    lora_config *cfg = NULL;
    CHECK(lora_config_create(&cfg));
    CHECK(lora_config_set_int(cfg, LORA_CFG_D_MODEL, 64));
    CHECK(lora_config_set_int(cfg, LORA_CFG_N_HEADS, N_KV_HEADS));
    CHECK(lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, N_KV_HEADS));
    CHECK(lora_config_set_int(cfg, LORA_CFG_HEAD_DIM, HEAD_DIM));
    CHECK(lora_config_set_int(cfg, LORA_CFG_OUT_PROJ, 0));
    CHECK(lora_config_set_int(cfg, LORA_CFG_THREADS, threads));
    lora_adapter *cheap = NULL;
    CHECK(lora_adapter_create(&cheap, cfg));
    lora_config_destroy(cfg);
    const int64_t kvd = N_KV_HEADS * HEAD_DIM;
    float *w = xmalloc((size_t)(kvd * 64) * sizeof(float));
    for (int64_t i = 0; i < kvd * 64; i++)
        w[i] = 0.1f * urand();
    for (int t = 0; t < 3; t++)
        CHECK(lora_adapter_set_base_borrowed(cheap, 1 << t, w, NULL));
    const int64_t chunk = 512;
    float *x = xmalloc((size_t)(batch * chunk * 64) * sizeof(float));
    float *out = xmalloc((size_t)(batch * chunk * kvd) * sizeof(float));
    for (int64_t i = 0; i < batch * chunk * 64; i++)
        x[i] = urand();
    for (int64_t at = 0; at < CONTEXT; at += chunk)
        CHECK(lora_decode(cheap, cache, x, chunk, out));
    lora_adapter_destroy(cheap);
    free(w), free(x), free(out);
}

/* Median seconds of one decode step (one token per sequence) of ad on cache. */
static double time_steps(lora_adapter *ad, lora_kv_cache *cache, int64_t batch, int reps,
                         double *stream, const float *const *w, const size_t *wbytes,
                         const void *kv, size_t kv_bytes, int threads)
{
    float *x = xmalloc((size_t)(batch * D_MODEL) * sizeof(float));
    float *y = xmalloc((size_t)(batch * D_MODEL) * sizeof(float));
    for (int64_t i = 0; i < batch * D_MODEL; i++)
        x[i] = urand();
    double t[MAX_REPS], s[MAX_REPS];
    CHECK(lora_decode(ad, cache, x, 1, y)); /* warm: working memory, pool threads */
    for (int k = 0; k < reps; k++) {
        double t0 = now();
        CHECK(lora_decode(ad, cache, x, 1, y));
        t[k] = now() - t0;
        t0 = now();
        for (int i = 0; i < 4; i++)
            stream_read_threads(w[i], wbytes[i], threads);
        stream_read_threads(kv, kv_bytes, threads);
        s[k] = now() - t0;
    }
    free(x), free(y);
    *stream = median(s, reps);
    return median(t, reps);
}

static void bench_decode_cache(int reps, int threads)
{
    const int targets[4] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V, LORA_TARGET_O};
    const int64_t q = N_HEADS * HEAD_DIM, kv = N_KV_HEADS * HEAD_DIM;
    const int64_t outs[4] = {q, kv, kv, D_MODEL}, ins[4] = {D_MODEL, D_MODEL, D_MODEL, q};
    lora_config *cfg = layer_config();
    CHECK(lora_config_set_int(cfg, LORA_CFG_THREADS, threads));
    lora_adapter *af = NULL, *ab = NULL;
    CHECK(lora_adapter_create(&af, cfg));
    CHECK(lora_adapter_create(&ab, cfg));
    lora_config_destroy(cfg);
    random_factors(af);
    CHECK(lora_adapter_copy_params(ab, af));
    float *wf[4];
    uint16_t *wb[4];
    size_t bf[4], bb[4];
    for (int t = 0; t < 4; t++) {
        const size_t n = (size_t)(outs[t] * ins[t]);
        wf[t] = xmalloc(n * sizeof(float));
        wb[t] = xmalloc(n * sizeof(uint16_t));
        bf[t] = n * sizeof(float), bb[t] = n * sizeof(uint16_t);
        for (size_t i = 0; i < n; i++) {
            wf[t][i] = urand() / sqrtf((float)ins[t]);
            wb[t][i] = to_bf16(wf[t][i]);
        }
        CHECK(lora_adapter_set_base_borrowed(af, targets[t], wf[t], NULL));
        CHECK(lora_adapter_set_base_typed(ab, targets[t], wb[t], LORA_DTYPE_BF16, NULL,
                                          LORA_BASE_BORROW));
    }
    const size_t kv_seq = (size_t)CONTEXT * (size_t)kv * 2 * sizeof(float); /* K and V */
    void *kvbuf = xmalloc(kv_seq * DECODE_BATCH);
    memset(kvbuf, 1, kv_seq * DECODE_BATCH);
    printf("\ndecode step over a KV cache (lora_decode, context %d, %d threads; streaming: "
           "the base weights once + the sequences' K/V bytes, same threads)\n",
           CONTEXT, threads);
    printf("%-6s %6s %12s %12s %8s\n", "base", "batch", "step_us", "stream_us", "ratio");
    const int64_t batches[2] = {1, DECODE_BATCH};
    double step[2][2];
    for (int bi = 0; bi < 2; bi++) {
        const int64_t batch = batches[bi];
        lora_kv_cache *cache = NULL;
        CHECK(lora_kv_cache_create(&cache, af, batch, CONTEXT + MAX_REPS + 2));
        prefill(cache, batch, threads);
        for (int dt = 0; dt < 2; dt++) {
            double stream;
            lora_adapter *ad = dt == 0 ? af : ab;
            step[dt][bi] = time_steps(ad, cache, batch, reps, &stream,
                                      dt == 0 ? (const float *const *)wf
                                              : (const float *const *)(void *)wb,
                                      dt == 0 ? bf : bb, kvbuf, kv_seq * (size_t)batch, threads);
            printf("%-6s %6lld %12.1f %12.1f %8.2f\n", dt == 0 ? "f32" : "bf16",
                   (long long)batch, 1e6 * step[dt][bi], 1e6 * stream, step[dt][bi] / stream);
        }
        lora_kv_cache_destroy(cache);
    }
    printf("bf16 / f32 step: batch 1 %.2f, batch %d %.2f (targets: ratio <= 1.25, bf16/f32 "
           "batch 1 <= 0.6)\n",
           step[1][0] / step[0][0], DECODE_BATCH, step[1][1] / step[0][1]);
    lora_adapter_destroy(af);
    lora_adapter_destroy(ab);
    for (int t = 0; t < 4; t++)
        free(wf[t]), free(wb[t]);
    free(kvbuf);
}

/* bf16 bits -> IEEE half bits (values of the benchmark are normal halves). */
static uint16_t bf16_to_f16(uint16_t b)
{
    const uint32_t u = (uint32_t)b << 16;
    const uint32_t sign = (u >> 16) & 0x8000u, e = (u >> 23) & 0xffu, m = u & 0x7fffffu;
    if (e < 113) /* below half's normal range: 0 */
        return (uint16_t)sign;
    return (uint16_t)(sign | ((e - 112) << 10) | (m >> 13));
}

/* The projection x·W_Qᵀ of m one-token sequences (layer_config with one kv head and no
 * output projection: W_K and W_V add 1/16 of W_Q's bytes). */
static void bench_projection(int reps)
{
    const int64_t n = (int64_t)D_MODEL * D_MODEL, kvn = (int64_t)HEAD_DIM * D_MODEL;
    const int dtypes[3] = {LORA_DTYPE_F32, LORA_DTYPE_BF16, LORA_DTYPE_F16};
    float *wf = xmalloc((size_t)n * sizeof(float)), *kvf = xmalloc((size_t)kvn * sizeof(float));
    uint16_t *wb = xmalloc((size_t)n * 2), *wh = xmalloc((size_t)n * 2);
    uint16_t *kvb = xmalloc((size_t)kvn * 2), *kvh = xmalloc((size_t)kvn * 2);
    for (int64_t i = 0; i < n + kvn; i++) {
        uint16_t *b = i < n ? &wb[i] : &kvb[i - n], *h = i < n ? &wh[i] : &kvh[i - n];
        float *f = i < n ? &wf[i] : &kvf[i - n];
        *b = to_bf16(urand() / 64.0f);
        *h = bf16_to_f16(*b);
        const uint32_t u = (uint32_t)*b << 16;
        memcpy(f, &u, sizeof u);
    }
    const void *w[3] = {wf, wb, wh}, *kv[3] = {kvf, kvb, kvh};
    lora_adapter *ad[3];
    for (int d = 0; d < 3; d++) {
        lora_config *cfg = layer_config();
        CHECK(lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, 1));
        CHECK(lora_config_set_int(cfg, LORA_CFG_OUT_PROJ, 0));
        CHECK(lora_config_set_int(cfg, LORA_CFG_TARGETS, LORA_TARGET_Q | LORA_TARGET_V));
        CHECK(lora_adapter_create(&ad[d], cfg));
        lora_config_destroy(cfg);
        CHECK(lora_adapter_set_base_typed(ad[d], LORA_TARGET_Q, w[d], dtypes[d], NULL,
                                          LORA_BASE_BORROW));
        CHECK(lora_adapter_set_base_typed(ad[d], LORA_TARGET_K, kv[d], dtypes[d], NULL,
                                          LORA_BASE_BORROW));
        CHECK(lora_adapter_set_base_typed(ad[d], LORA_TARGET_V, kv[d], dtypes[d], NULL,
                                          LORA_BASE_BORROW));
    }
    float *x = xmalloc(8 * D_MODEL * sizeof(float)), *y = xmalloc(8 * D_MODEL * sizeof(float));
    for (int i = 0; i < 8 * D_MODEL; i++)
        x[i] = urand();
    const lora_attn_args args = {.struct_size = sizeof args, .flags = LORA_FWD_INFER};
    printf("\nprojection x·W_Qᵀ, 4096 -> 4096, one-token sequences (LORA_FWD_INFER; "
           "stream = one pass over W_Q as f32 / as 16-bit)\n");
    printf("%-5s %10s %10s %10s %11s %11s %9s %9s\n", "rows", "f32_us", "bf16_us", "f16_us",
           "stream32_us", "stream16_us", "bf16/f32", "f16/f32");
    for (int m = 1; m <= 8; m++) {
        double t[3][MAX_REPS], s32[MAX_REPS], s16[MAX_REPS];
        for (int k = 0; k < reps; k++) {
            for (int d = 0; d < 3; d++) {
                const double t0 = now();
                CHECK(lora_forward_ex(ad[d], &args, x, NULL, m, 1, 1, y));
                t[d][k] = now() - t0;
            }
            double t0 = now();
            stream_read(wf, (size_t)n * sizeof(float));
            s32[k] = now() - t0;
            t0 = now();
            stream_read(wb, (size_t)n * 2);
            s16[k] = now() - t0;
        }
        const double mf = median(t[0], reps), mb = median(t[1], reps), mh = median(t[2], reps);
        printf("%-5d %10.1f %10.1f %10.1f %11.1f %11.1f %9.2f %9.2f\n", m, 1e6 * mf, 1e6 * mb,
               1e6 * mh, 1e6 * median(s32, reps), 1e6 * median(s16, reps), mb / mf, mh / mf);
    }
    for (int d = 0; d < 3; d++)
        lora_adapter_destroy(ad[d]);
    free(wf);
    free(wb);
    free(wh);
    free(kvf);
    free(kvb);
    free(kvh);
    free(x);
    free(y);
}

int main(int argc, char **argv)
{
    int reps = 21, threads = 2;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
            reps = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            bench_threads = atoi(argv[++i]) < 1 ? 1 : atoi(argv[i]);
            threads = bench_threads;
        } else {
            fprintf(stderr, "usage: %s [--reps N] [--threads T]\n", argv[0]);
            return 2;
        }
    }
    reps = reps < 1 ? 1 : reps > MAX_REPS ? MAX_REPS : reps;
    lora_config *cfg = layer_config();
    lora_adapter *tenants[TENANTS];
    for (int i = 0; i < TENANTS; i++) {
        CHECK(lora_adapter_create(&tenants[i], cfg));
        random_factors(tenants[i]);
    }
    lora_config_destroy(cfg);
    bench_apply(tenants, reps);
    for (int i = 0; i < TENANTS; i++)
        lora_adapter_destroy(tenants[i]);
    bench_decode_row(reps);
    bench_projection(reps);
    bench_decode_cache(reps, threads);
    return 0;
}
