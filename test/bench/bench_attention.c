/* The cost of the 0.2 attention options in the exact backend, each against its
 * baseline in the same run (timings interleaved, medians), through the public API:
 * one head, head_dim = d_model = 64, LoRA rank 8 on Q, K, V, LORA_CFG_THREADS = T.
 * One forward + backward per repetition. The comparisons and the targets they are
 * meant to meet:
 *
 *   rope     RoPE (HALF) vs none, causal, L = 8192          ratio <= 1.05
 *   padding  batch 4 x 8192 with rows [4096, 8192) of each element padding (q_lens),
 *            vs unpadded, causal                              ratio <= 0.60
 *   packed   one row of 16 sequences of 512 (segments, positions restarting) vs one
 *            causal sequence of 8192                          ratio <= 0.10
 *   window   WINDOW = 1024 vs full causal, L = 16384          ratio <= 1.3 x the visible
 *            pairs' share of the causal pairs
 *
 *   bench_attention [--threads T] [--reps N] [--only rope|padding|packed|window] [--cpu]
 * Prints one line per comparison: the two medians, the median of the repetitions'
 * ratios (each repetition times a and b back to back, so a load change between
 * repetitions cancels), the goal figure derived from it, its target, and ok or MISSED.
 * --cpu times the process's CPU time instead of the wall clock (with --threads 1, a
 * figure that a loaded machine disturbs much less).
 *
 * packed, padding and window also time the baseline's layer with WINDOW = 1 (each query
 * sees one key: the layer's cost without attention, projections and LoRA terms
 * included), f, and print the attention's own figure, ((a - f) / (b - f)) / share: at
 * head_dim = d_model = 64 the projections are a visible part of a sparse layer's time. */
#define _GNU_SOURCE
#include <lora.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_common.h"

#define HEAD_DIM 64
#define RANK 8
#define MAX_REPS 31

/* An exact-backend layer; rope and window as LORA_CFG_ROPE / LORA_CFG_WINDOW. */
static lora_adapter *make_adapter(int threads, int rope, int64_t window)
{
    lora_config *cfg;
    lora_adapter *ad;
    CHECK(lora_config_create(&cfg));
    CHECK(lora_config_set_int(cfg, LORA_CFG_D_MODEL, HEAD_DIM));
    CHECK(lora_config_set_int(cfg, LORA_CFG_TARGETS,
                              LORA_TARGET_Q | LORA_TARGET_K | LORA_TARGET_V));
    CHECK(lora_config_set_int(cfg, LORA_CFG_RANK, RANK));
    CHECK(lora_config_set_int(cfg, LORA_CFG_BACKEND, LORA_BACKEND_EXACT));
    CHECK(lora_config_set_int(cfg, LORA_CFG_THREADS, threads));
    CHECK(lora_config_set_int(cfg, LORA_CFG_CAUSAL, 1));
    CHECK(lora_config_set_int(cfg, LORA_CFG_ROPE, rope));
    CHECK(lora_config_set_int(cfg, LORA_CFG_WINDOW, window));
    CHECK(lora_config_set_int(cfg, LORA_CFG_INIT, LORA_INIT_GAUSSIAN));
    CHECK(lora_adapter_create(&ad, cfg));
    lora_config_destroy(cfg);
    static float w[HEAD_DIM * HEAD_DIM], b[HEAD_DIM * RANK];
    const int targets[3] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V};
    for (int t = 0; t < 3; t++) {
        for (int i = 0; i < HEAD_DIM * HEAD_DIM; i++)
            w[i] = urand() * 0.2f;
        CHECK(lora_adapter_set_base(ad, targets[t], w, NULL));
        for (int i = 0; i < HEAD_DIM * RANK; i++)
            b[i] = urand() * 0.1f;
        CHECK(lora_adapter_set_param(ad, targets[t], LORA_B, b, HEAD_DIM * RANK));
    }
    return ad;
}

/* One side of a comparison: an adapter, its call arguments and its inputs. */
typedef struct side {
    lora_adapter *ad;
    lora_attn_args args;
    int64_t batch, len;
    float *x, *out, *dout, *dx;
} side;

static void side_init(side *s, lora_adapter *ad, int64_t batch, int64_t len)
{
    memset(s, 0, sizeof *s);
    s->ad = ad;
    s->args.struct_size = sizeof s->args;
    s->batch = batch;
    s->len = len;
    const size_t n = (size_t)(batch * len) * HEAD_DIM;
    s->x = malloc(n * sizeof(float));
    s->out = malloc(n * sizeof(float));
    s->dout = malloc(n * sizeof(float));
    s->dx = malloc(n * sizeof(float));
    if (!s->x || !s->out || !s->dout || !s->dx) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++) {
        s->x[i] = urand();
        s->dout[i] = urand();
    }
}

static int use_cpu_time;

static double clock_now(void)
{
    if (!use_cpu_time)
        return now();
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double side_step(side *s)
{
    const double t0 = clock_now();
    CHECK(lora_forward_ex(s->ad, &s->args, s->x, NULL, s->batch, s->len, s->len, s->out));
    CHECK(lora_backward_ex(s->ad, NULL, s->dout, s->dx, NULL));
    return clock_now() - t0;
}

static void side_free(side *s)
{
    free(s->x);
    free(s->out);
    free(s->dout);
    free(s->dx);
    lora_adapter_destroy(s->ad);
}

/* Times a and b (forward + backward) back to back, reps times, and f after them when
 * not NULL. Prints both medians and the goal figure: the median of the repetitions'
 * ratios a/b, divided by `share` (1 unless the goal is stated against a share), against
 * the target; with f, the attention's own figure too (above). */
static void compare(const char *name, side *a, side *b, side *f, int reps, double share,
                    const char *goal, double target)
{
    side_step(a); /* warm-up: buffers, page faults */
    side_step(b);
    if (f)
        side_step(f);
    double ta[MAX_REPS], tb[MAX_REPS], ratio[MAX_REPS], tf[MAX_REPS], own[MAX_REPS];
    for (int r = 0; r < reps; r++) {
        ta[r] = side_step(a);
        tb[r] = side_step(b);
        ratio[r] = ta[r] / tb[r] / share;
        if (f) {
            tf[r] = side_step(f);
            own[r] = (ta[r] - tf[r]) / (tb[r] - tf[r]) / share;
        }
    }
    const double figure = median(ratio, reps);
    printf("%-8s %9.4f s vs %9.4f s  %-28s %6.3f  (target <= %.3f)  %s\n", name,
           median(ta, reps), median(tb, reps), goal, figure, target,
           figure <= target ? "ok" : "MISSED");
    if (f)
        printf("%-8s attention only (window-1 layer %.4f s subtracted): %.3f\n", "",
               median(tf, reps), median(own, reps));
}

/* The layer of b with WINDOW = 1 (no attention to speak of), the same inputs. */
static void side_fixed(side *f, const side *b, int threads)
{
    side_init(f, make_adapter(threads, LORA_ROPE_NONE, 1), b->batch, b->len);
}

static void bench_rope(int threads, int reps)
{
    side a, b;
    side_init(&a, make_adapter(threads, LORA_ROPE_HALF, 0), 1, 8192);
    side_init(&b, make_adapter(threads, LORA_ROPE_NONE, 0), 1, 8192);
    compare("rope", &a, &b, NULL, reps, 1.0, "with / without RoPE", 1.05);
    side_free(&a);
    side_free(&b);
}

static void bench_padding(int threads, int reps)
{
    side a, b;
    side_init(&a, make_adapter(threads, LORA_ROPE_NONE, 0), 4, 8192);
    side_init(&b, make_adapter(threads, LORA_ROPE_NONE, 0), 4, 8192);
    static int64_t lens[4] = {4096, 4096, 4096, 4096};
    a.args.q_lens = lens;
    side f;
    side_fixed(&f, &b, threads);
    compare("padding", &a, &b, &f, reps, 1.0, "half padding / none", 0.60);
    side_free(&a);
    side_free(&b);
    side_free(&f);
}

static void bench_packed(int threads, int reps)
{
    enum { SEQS = 16, SEQ_LEN = 512, L = SEQS * SEQ_LEN };
    side a, b;
    side_init(&a, make_adapter(threads, LORA_ROPE_NONE, 0), 1, L);
    side_init(&b, make_adapter(threads, LORA_ROPE_NONE, 0), 1, L);
    static int64_t pos[L];
    static int32_t seg[L];
    for (int i = 0; i < L; i++) {
        pos[i] = i % SEQ_LEN;
        seg[i] = i / SEQ_LEN;
    }
    a.args.q_pos = pos;
    a.args.q_seg = seg;
    side f;
    side_fixed(&f, &b, threads);
    compare("packed", &a, &b, &f, reps, 1.0, "16 x 512 packed / causal 8192", 0.10);
    side_free(&a);
    side_free(&b);
    side_free(&f);
}

static void bench_window(int threads, int reps)
{
    const int64_t L = 16384, W = 1024;
    side a, b;
    side_init(&a, make_adapter(threads, LORA_ROPE_NONE, W), 1, L);
    side_init(&b, make_adapter(threads, LORA_ROPE_NONE, 0), 1, L);
    /* visible pairs: query i sees min(i + 1, W) keys */
    const double window_pairs = (double)W * (double)(W + 1) / 2.0 + (double)(L - W) * (double)W;
    const double causal_pairs = (double)L * (double)(L + 1) / 2.0;
    char goal[64];
    snprintf(goal, sizeof goal, "(window / causal) / %.4f", window_pairs / causal_pairs);
    side f;
    side_fixed(&f, &b, threads);
    compare("window", &a, &b, &f, reps, window_pairs / causal_pairs, goal, 1.3);
    side_free(&a);
    side_free(&b);
    side_free(&f);
}

int main(int argc, char **argv)
{
    int threads = 2, reps = 5;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--only") && i + 1 < argc)
            only = argv[++i];
        else if (!strcmp(argv[i], "--cpu"))
            use_cpu_time = 1;
        else {
            fprintf(stderr, "usage: %s [--threads T] [--reps N] "
                            "[--only rope|padding|packed|window] [--cpu]\n",
                    argv[0]);
            return 2;
        }
    }
    if (threads < 1 || reps < 1 || reps > MAX_REPS) {
        fprintf(stderr, "threads >= 1, reps in 1..%d\n", MAX_REPS);
        return 2;
    }
    printf("exact backend, head_dim %d, rank %d, %d threads, median of %d fwd+bwd (%s)\n",
           HEAD_DIM, RANK, threads, reps, use_cpu_time ? "process CPU time" : "wall clock");
    if (!only || !strcmp(only, "rope"))
        bench_rope(threads, reps);
    if (!only || !strcmp(only, "padding"))
        bench_padding(threads, reps);
    if (!only || !strcmp(only, "packed"))
        bench_packed(threads, reps);
    if (!only || !strcmp(only, "window"))
        bench_window(threads, reps);
    return 0;
}
