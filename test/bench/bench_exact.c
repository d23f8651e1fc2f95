/* Speed of the exact backend against plain sgemm, measured in the same run.
 *
 * One attention layer through the public API: batch 1, one head, head_dim = d_model =
 * 64, LoRA rank 8 on Q, K, V, LORA_CFG_THREADS = T (default 2). For each L: forward and
 * backward times (medians), achieved GFLOP/s counting 4·L²·d_h flops forward and
 * 8·L²·d_h backward (halved when causal; projections and LoRA terms are timed but not
 * counted), the same run's plain sgemm GFLOP/s, their ratio, the peak resident
 * memory of the process after its first forward+backward, and busy: the process's CPU
 * time over wall time × T during forward+backward (100% = every thread always working;
 * less shows threads waiting or a loaded machine).
 *
 * The reference sgemm: a square m = n = k = 2048 product (17 GFLOP) with T threads,
 * called on BLIS linked into this program with the Makefile's BLIS flags and, for the
 * static BLIS build, the kernel context the library picks (skx on AVX-512 CPUs), so the
 * ratio compares the attention with the best BLIS does on this machine. Its timings are
 * interleaved with the attention's so that both see the same machine load.
 *
 * Each L runs in a child process of its own, so that its peak memory (VmHWM, read
 * before the sgemm buffers are allocated) is its own.
 *
 *   bench_exact [--lens 1024,4096,...] [--threads T] [--reps N] [--causal] [--no-exp]
 *               [--exp-full] [--compute f32|bf16]
 * --compute bf16 runs the layer with LORA_COMPUTE_BF16 (bf16 operands, fp32 sums).
 * LORA_BENCH_LENS overrides the default sweep {1024, 4096, 16384, 65536} the same way.
 * Also prints the accuracy of the vector expf the softmax blocks use (glibc libmvec),
 * which the public API does not reach, over the inputs the backend gives it: every 13th
 * float of the range by default, every float with --exp-full. */
#define _GNU_SOURCE
#include <lora.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <blis.h>

#include "bench_common.h"

#define HEAD_DIM 64
#define RANK 8
#define SGEMM_N 2048
#define MAX_REPS 31

static int64_t compute_mode = LORA_COMPUTE_F32; /* --compute */

/* Peak resident set of this process in MB, from /proc/self/status. */
static double peak_rss_mb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kb = -1.0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6))
            kb = atof(line + 6);
    if (f)
        fclose(f);
    return kb / 1024.0;
}

/* ---- the reference sgemm ---------------------------------------------------------- */

static cntx_t *sgemm_cntx(const char **arch)
{
    bli_init();
    *arch = bli_arch_string(bli_arch_query_id());
#if defined(LORA_BLIS_STATIC) && defined(__x86_64__)
    /* The library's choice (src/linalg/blis_linalg.c). */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
        cntx_t *skx = bli_gks_lookup_nat_cntx(BLIS_ARCH_SKX);
        if (skx) {
            *arch = "skx";
            return skx;
        }
    }
#endif
    return NULL;
}

typedef struct sgemm_bench {
    cntx_t *cntx;
    int threads;
    float *a, *b, *c;
} sgemm_bench;

static double sgemm_seconds(const sgemm_bench *s)
{
    rntm_t rntm;
    bli_rntm_init(&rntm);
    bli_rntm_set_num_threads(s->threads, &rntm);
    float one = 1.0f, zero = 0.0f;
    const double t0 = now();
    bli_sgemm_ex(BLIS_NO_TRANSPOSE, BLIS_NO_TRANSPOSE, SGEMM_N, SGEMM_N, SGEMM_N, &one, s->a,
                 SGEMM_N, 1, s->b, SGEMM_N, 1, &zero, s->c, SGEMM_N, 1, s->cntx, &rntm);
    return now() - t0;
}

/* After the reference sgemm, BLIS's OpenMP threads spin (libgomp's default wait policy:
 * 5 to 9 ms of CPU measured here) before they sleep. The library's own worker threads
 * would share the cores with them, so the library is timed only after they sleep. */
static void let_openmp_threads_sleep(void)
{
    nanosleep(&(struct timespec){0, 100000000}, NULL);
}

/* CPU seconds of the whole process (every thread). */
static double process_cpu(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- one case ----------------------------------------------------------------------- */

typedef struct case_result {
    double fwd_s, bwd_s, sgemm_gflops, peak_mb;
    double busy; /* process CPU time over wall time × threads, fwd+bwd */
    int reps;
    char arch[32];
} case_result;

static lora_adapter *make_adapter(int threads, int causal)
{
    lora_config *cfg;
    lora_adapter *ad;
    CHECK(lora_config_create(&cfg));
    CHECK(lora_config_set_int(cfg, LORA_CFG_D_MODEL, HEAD_DIM));
    CHECK(lora_config_set_int(cfg, LORA_CFG_N_HEADS, 1));
    CHECK(lora_config_set_int(cfg, LORA_CFG_TARGETS,
                              LORA_TARGET_Q | LORA_TARGET_K | LORA_TARGET_V));
    CHECK(lora_config_set_int(cfg, LORA_CFG_RANK, RANK));
    CHECK(lora_config_set_int(cfg, LORA_CFG_BACKEND, LORA_BACKEND_EXACT));
    CHECK(lora_config_set_int(cfg, LORA_CFG_THREADS, threads));
    CHECK(lora_config_set_int(cfg, LORA_CFG_CAUSAL, causal));
    CHECK(lora_config_set_int(cfg, LORA_CFG_INIT, LORA_INIT_GAUSSIAN));
    CHECK(lora_config_set_int(cfg, LORA_CFG_COMPUTE, compute_mode));
    CHECK(lora_adapter_create(&ad, cfg));
    lora_config_destroy(cfg);
    float w[HEAD_DIM * HEAD_DIM];
    const int targets[3] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V};
    for (int t = 0; t < 3; t++) {
        for (int i = 0; i < HEAD_DIM * HEAD_DIM; i++)
            w[i] = urand() * 0.2f;
        CHECK(lora_adapter_set_base(ad, targets[t], w, NULL));
        float b[HEAD_DIM * RANK];
        for (int i = 0; i < HEAD_DIM * RANK; i++)
            b[i] = urand() * 0.1f;
        CHECK(lora_adapter_set_param(ad, targets[t], LORA_B, b, HEAD_DIM * RANK));
    }
    return ad;
}

static void run_case(int64_t L, int threads, int reps, int causal, case_result *res)
{
    const size_t n = (size_t)L * HEAD_DIM;
    lora_adapter *ad = make_adapter(threads, causal);
    float *x = malloc(n * sizeof(float)), *out = malloc(n * sizeof(float));
    float *dout = malloc(n * sizeof(float)), *dx = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        x[i] = urand();
        dout[i] = urand();
    }
    /* First forward+backward: warms up, and gives the peak memory of a whole one. */
    CHECK(lora_forward(ad, x, 1, L, out));
    CHECK(lora_backward(ad, dout, dx));
    res->peak_mb = peak_rss_mb();

    sgemm_bench s = {.threads = threads};
    const char *arch;
    s.cntx = sgemm_cntx(&arch);
    snprintf(res->arch, sizeof res->arch, "%s", arch);
    const size_t nn = (size_t)SGEMM_N * SGEMM_N;
    s.a = malloc(nn * sizeof(float));
    s.b = malloc(nn * sizeof(float));
    s.c = malloc(nn * sizeof(float));
    for (size_t i = 0; i < nn; i++) {
        s.a[i] = urand();
        s.b[i] = urand();
        s.c[i] = 0.0f;
    }
    sgemm_seconds(&s); /* warm-up */
    double tf[MAX_REPS], tb[MAX_REPS], ts[MAX_REPS], busy[MAX_REPS];
    for (int r = 0; r < reps; r++) {
        ts[r] = sgemm_seconds(&s);
        let_openmp_threads_sleep();
        const double c0 = process_cpu();
        double t0 = now();
        CHECK(lora_forward(ad, x, 1, L, out));
        tf[r] = now() - t0;
        t0 = now();
        CHECK(lora_backward(ad, dout, dx));
        tb[r] = now() - t0;
        busy[r] = (process_cpu() - c0) / ((tf[r] + tb[r]) * threads);
    }
    res->fwd_s = median(tf, reps);
    res->bwd_s = median(tb, reps);
    res->busy = median(busy, reps);
    res->sgemm_gflops = 2.0 * SGEMM_N * SGEMM_N * (double)SGEMM_N / median(ts, reps) / 1e9;
    res->reps = reps;
    free(s.a);
    free(s.b);
    free(s.c);
    free(x);
    free(out);
    free(dout);
    free(dx);
    lora_adapter_destroy(ad);
}

/* Runs one case in a child process; 0 on success. */
static int run_case_child(int64_t L, int threads, int reps, int causal, case_result *res)
{
    int fd[2];
    if (pipe(fd) != 0)
        return -1;
    fflush(stdout);
    const pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        close(fd[0]);
        case_result r;
        memset(&r, 0, sizeof r);
        run_case(L, threads, reps, causal, &r);
        const ssize_t w = write(fd[1], &r, sizeof r);
        _exit(w == (ssize_t)sizeof r ? 0 : 1);
    }
    close(fd[1]);
    const ssize_t got = read(fd[0], res, sizeof *res);
    close(fd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    return got == (ssize_t)sizeof *res && WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0
                                                                                         : -1;
}

/* ---- accuracy of the vector expf -------------------------------------------------- */

#if defined(LORA_HAVE_LIBMVEC) && defined(_OPENMP) && defined(__x86_64__)
/* The declaration the library uses (src/backend/exact.c). */
#pragma omp declare simd notinbranch
extern float expf(float);
#define VEXP_NAME "glibc libmvec expf (_ZGVeN16v_expf on AVX-512)"
#else
#define VEXP_NAME "scalar expf (no libmvec in this build)"
#endif

#if defined(__x86_64__) && defined(__GNUC__) && defined(__gnu_linux__)
__attribute__((target_clones("avx512f", "default")))
#endif
static void vexp(float *restrict x, int64_t n)
{
#pragma omp simd
    for (int64_t j = 0; j < n; j++)
        x[j] = expf(x[j]);
}

/* Distance in float ulps between y and the exact value e (double). */
static double ulp_error(float y, double e)
{
    int ex;
    frexp(e, &ex);
    const double ulp = ldexp(1.0, (ex - 24) < -149 ? -149 : ex - 24);
    return fabs((double)y - e) / ulp;
}

/* Every float in [lo, 0] (or every `stride`-th one). */
static void exp_accuracy(float lo, int stride, double *max_ulp, double *max_rel,
                         double *ns_per_exp)
{
    enum { CHUNK = 4096 };
    float in[CHUNK], y[CHUNK];
    *max_ulp = 0.0;
    *max_rel = 0.0;
    double t = 0.0;
    uint32_t bits;
    memcpy(&bits, &lo, sizeof bits);
    const uint32_t last = 0x80000000u; /* -0.0f */
    uint32_t u = bits;
    while (u > last) {
        int m = 0;
        for (; m < CHUNK && u > last; m++, u = u > last + (uint32_t)stride ? u - (uint32_t)stride : last) {
            float f;
            memcpy(&f, &u, sizeof f);
            in[m] = f;
        }
        memcpy(y, in, (size_t)m * sizeof(float));
        const double t0 = now();
        vexp(y, m);
        t += now() - t0;
        for (int i = 0; i < m; i++) {
            const double e = exp((double)in[i]);
            const double ue = ulp_error(y[i], e), re = fabs((double)y[i] - e) / e;
            *max_ulp = ue > *max_ulp ? ue : *max_ulp;
            *max_rel = re > *max_rel ? re : *max_rel;
        }
    }
    const double count = (double)(bits - last) / stride;
    *ns_per_exp = t / count * 1e9;
}

/* ---- main --------------------------------------------------------------------------- */

static int parse_lens(const char *s, int64_t *lens, int max)
{
    int n = 0;
    while (s && *s && n < max) {
        char *end;
        const long long v = strtoll(s, &end, 10);
        if (end == s || v < 1)
            return -1;
        lens[n++] = (int64_t)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return -1;
    }
    return n;
}

int main(int argc, char **argv)
{
    int64_t lens[16] = {1024, 4096, 16384, 65536};
    int nlens = 4, threads = 2, reps = 0, causal = 0, do_exp = 1, exp_stride = 13;
    if (getenv("LORA_BENCH_LENS"))
        nlens = parse_lens(getenv("LORA_BENCH_LENS"), lens, 16);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--lens") && i + 1 < argc)
            nlens = parse_lens(argv[++i], lens, 16);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--causal"))
            causal = 1;
        else if (!strcmp(argv[i], "--no-exp"))
            do_exp = 0;
        else if (!strcmp(argv[i], "--exp-full"))
            exp_stride = 1;
        else if (!strcmp(argv[i], "--compute") && i + 1 < argc && !strcmp(argv[i + 1], "bf16"))
            compute_mode = LORA_COMPUTE_BF16, i++;
        else if (!strcmp(argv[i], "--compute") && i + 1 < argc && !strcmp(argv[i + 1], "f32"))
            compute_mode = LORA_COMPUTE_F32, i++;
        else
            nlens = -1;
        if (nlens < 1 || threads < 1 || reps < 0 || reps > MAX_REPS) {
            fprintf(stderr,
                    "usage: %s [--lens L1,L2,..] [--threads T] [--reps N (1..%d)] "
                    "[--causal] [--no-exp] [--exp-full] [--compute f32|bf16]\n",
                    argv[0], MAX_REPS);
            return 2;
        }
    }
    printf("liblora %s exact backend: batch 1, 1 head, head_dim %d, LoRA rank %d on Q,K,V, "
           "%d threads%s%s\n",
           lora_version_string(), HEAD_DIM, RANK, threads, causal ? ", causal" : "",
           compute_mode == LORA_COMPUTE_BF16 ? ", LORA_COMPUTE_BF16" : "");
    printf("GFLOP/s count 4*L^2*d forward, 8*L^2*d backward%s; sgemm: m=n=k=%d; "
           "mem: peak RSS of the case's process\n",
           causal ? ", halved (causal)" : "", SGEMM_N);
    printf("%6s %5s %9s %9s %8s %8s %8s %8s %7s %8s %5s %5s\n", "L", "reps", "fwd_ms", "bwd_ms",
           "fwd_GF", "bwd_GF", "fb_GF", "sgemm_GF", "ratio", "mem_MB", "blis", "busy");
    int failed = 0;
    for (int li = 0; li < nlens; li++) {
        const int64_t L = lens[li];
        /* Medians over several runs; fewer where one run takes seconds. */
        const int r = reps ? reps : (L <= 4096 ? 9 : L <= 16384 ? 5 : 3);
        case_result res;
        if (run_case_child(L, threads, r, causal, &res) != 0) {
            printf("%6lld  failed\n", (long long)L);
            failed = 1;
            continue;
        }
        const double f = (causal ? 0.5 : 1.0) * (double)L * (double)L * HEAD_DIM;
        const double gf = 4.0 * f / res.fwd_s / 1e9, gb = 8.0 * f / res.bwd_s / 1e9;
        const double gfb = 12.0 * f / (res.fwd_s + res.bwd_s) / 1e9;
        printf("%6lld %5d %9.2f %9.2f %8.1f %8.1f %8.1f %8.1f %6.0f%% %8.1f %5s %4.0f%%\n",
               (long long)L, res.reps, res.fwd_s * 1e3, res.bwd_s * 1e3, gf, gb, gfb,
               res.sgemm_gflops, 100.0 * gfb / res.sgemm_gflops, res.peak_mb, res.arch,
               100.0 * res.busy);
    }
    if (do_exp) {
        double ulp, rel, ns;
        /* The backend evaluates exp on [-87, 0] (inputs are clamped at -87) and keeps
         * results from [-44.4, 0] (probabilities below 2^-64 are flushed to 0). */
        const char *which = exp_stride == 1 ? "every float" : "every 13th float";
        exp_accuracy(-44.3614f, exp_stride, &ulp, &rel, &ns);
        printf("vector exp: %s\n  on [-44.36, 0] (%s): max %.2f ulp, max rel err %.2e vs "
               "double exp, %.3f ns/value\n",
               VEXP_NAME, which, ulp, rel, ns);
        exp_accuracy(-87.0f, exp_stride, &ulp, &rel, &ns);
        printf("  on [-87, 0] (%s): max %.2f ulp, max rel err %.2e\n", which, ulp, rel);
    }
    return failed;
}
