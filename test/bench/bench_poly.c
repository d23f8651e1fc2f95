/* The empirical phase transition of the polynomial method: EXACT and POLY forward +
 * backward timed side by side in one run over sequence length L, head_dim and the
 * score bound R, with POLY's measured error. One head, batch 1, W_Q = W_K = W_V = I
 * (so Q = K = V = x and R is set by the input scale), LoRA rank 8 on Q, K, V.
 *
 *   bench_poly [--full] [--csv FILE] [--reps N] [--dim D] [--degree G] [--threads T]
 *              [--estimator]
 * Default: L in {1k, 4k, 16k, 64k}, 2 threads. --full: every doubling from 1k to 256k
 * (EXACT is timed up to 64k only: beyond it one exact run takes minutes).
 * --estimator: only the estimator's cost against one exact backward.
 * Cases whose modelled time exceeds a budget are listed as skipped, not timed. */
#include <lora.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHECK(call)                                                                        \
    do {                                                                                   \
        int st_ = (call);                                                                  \
        if (st_ != LORA_OK) {                                                              \
            fprintf(stderr, "%s:%d: %s -> %s\n", __FILE__, __LINE__, #call,                \
                    lora_status_string(st_));                                              \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15u;
static double urand(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) * 0x1p-53;
}

static lora_adapter *make_adapter(int64_t d, int backend, int degree, int threads)
{
    lora_config *cfg;
    lora_adapter *ad;
    CHECK(lora_config_create(&cfg));
    CHECK(lora_config_set_int(cfg, LORA_CFG_D_MODEL, d));
    CHECK(lora_config_set_int(cfg, LORA_CFG_TARGETS, LORA_TARGET_Q | LORA_TARGET_K | LORA_TARGET_V));
    CHECK(lora_config_set_int(cfg, LORA_CFG_RANK, 8));
    CHECK(lora_config_set_int(cfg, LORA_CFG_BACKEND, backend));
    CHECK(lora_config_set_int(cfg, LORA_CFG_THREADS, threads));
    if (degree > 0)
        CHECK(lora_config_set_int(cfg, LORA_CFG_POLY_DEGREE, degree));
    CHECK(lora_config_set_int(cfg, LORA_CFG_MEASURE_ROWS, backend == LORA_BACKEND_POLY ? 16 : 0));
    CHECK(lora_adapter_create(&ad, cfg));
    lora_config_destroy(cfg);
    float *eye = calloc((size_t)(d * d), sizeof(float));
    for (int64_t i = 0; i < d; i++)
        eye[i * d + i] = 1.0f;
    CHECK(lora_adapter_set_base(ad, LORA_TARGET_Q, eye, NULL));
    CHECK(lora_adapter_set_base(ad, LORA_TARGET_K, eye, NULL));
    CHECK(lora_adapter_set_base(ad, LORA_TARGET_V, eye, NULL));
    free(eye);
    return ad;
}

/* x rows: random directions with radius spread in [0.5, 1], then scaled so the
 * estimator's R equals r_target (R grows as the square of the scale). */
static float *make_input(lora_adapter *ad, int64_t L, int64_t d, double r_target)
{
    float *x = malloc((size_t)(L * d) * sizeof(float));
    for (int64_t i = 0; i < L; i++) {
        double n2 = 0.0;
        for (int64_t c = 0; c < d; c++) {
            double g = sqrt(-2.0 * log(urand() + 1e-300)) * cos(6.283185307179586 * urand());
            x[i * d + c] = (float)g;
            n2 += g * g;
        }
        const double radius = 0.5 + 0.5 * urand();
        for (int64_t c = 0; c < d; c++)
            x[i * d + c] = (float)(x[i * d + c] * radius / sqrt(n2));
    }
    lora_threshold_report rep = {.struct_size = sizeof rep};
    CHECK(lora_threshold_estimate(ad, x, 1, L, &rep));
    const double s = sqrt(r_target / rep.score_bound);
    for (int64_t i = 0; i < L * d; i++)
        x[i] = (float)(x[i] * s);
    return x;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median seconds of forward+backward; fills run info of the last run. */
static double time_fwd_bwd(lora_adapter *ad, const float *x, int64_t L, int64_t d, int reps,
                           lora_run_info *info)
{
    float *out = malloc((size_t)(L * d) * sizeof(float));
    float *dout = malloc((size_t)(L * d) * sizeof(float));
    for (int64_t i = 0; i < L * d; i++)
        dout[i] = (float)(urand() - 0.5);
    double t[16];
    for (int r = 0; r < reps; r++) {
        const double t0 = now();
        CHECK(lora_forward(ad, x, 1, L, out));
        CHECK(lora_backward(ad, dout, NULL));
        t[r] = now() - t0;
    }
    info->struct_size = sizeof *info;
    CHECK(lora_adapter_get_run_info(ad, info));
    free(out);
    free(dout);
    qsort(t, (size_t)reps, sizeof t[0], cmp_double);
    return t[reps / 2];
}

int main(int argc, char **argv)
{
    int full = 0, reps = 3, threads = 2, estimator_only = 0;
    int64_t only_dim = 0;
    int only_degree = 0;
    const char *csv_path = "lib/bench/poly.csv";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--full"))
            full = 1;
        else if (!strcmp(argv[i], "--csv") && i + 1 < argc)
            csv_path = argv[++i];
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--dim") && i + 1 < argc)
            only_dim = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--degree") && i + 1 < argc)
            only_degree = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--estimator"))
            estimator_only = 1;
        else {
            fprintf(stderr,
                    "usage: %s [--full] [--csv FILE] [--reps N] [--dim D] [--degree G] "
                    "[--threads T] [--estimator]\n",
                    argv[0]);
            return 2;
        }
    }
    if (reps < 1 || reps > 15)
        reps = 3;
    FILE *csv = fopen(csv_path, "w");
    if (!csv) {
        perror(csv_path);
        return 1;
    }
    fprintf(csv, "head_dim,L,R,backend,degree,rank,seconds,speedup,eta,measured_out_err,"
                 "measured_dq_err\n");
    const int64_t lens_default[] = {1024, 4096, 16384, 65536};
    const int64_t lens_full[] = {1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144};
    const int64_t *lens = full ? lens_full : lens_default;
    const int nlens = full ? 9 : 4;
    const int64_t dims[] = {8, 16, 32, 64};
    const double rs[] = {0.25, 0.5, 1.0, 2.0, 4.0};
    const double budget = full ? 120.0 : 30.0; /* seconds a single timed run may take */
    printf("liblora %s, %d threads, median of %d (exact: 1 run above L = 16k)\n",
           lora_version_string(), threads, reps);
    printf("%5s %7s %5s %3s %8s %10s %10s %8s %10s %10s\n", "d", "L", "R", "g", "k",
           "exact_s", "poly_s", "speedup", "meas_out", "meas_dq");
    for (int di = 0; di < 4 && !estimator_only; di++) {
        const int64_t d = dims[di];
        if (only_dim && d != only_dim)
            continue;
        for (int li = 0; li < nlens; li++) {
            const int64_t L = lens[li];
            /* EXACT does not depend on R: time it once per (d, L). Model: ~100 GFLOP/s. */
            const double exact_model = 12.0 * (double)L * (double)L * (double)d / 100e9;
            double t_exact = NAN;
            if (L <= 65536 && exact_model < budget) {
                lora_adapter *ad = make_adapter(d, LORA_BACKEND_EXACT, 0, threads);
                float *x = make_input(ad, L, d, 1.0);
                lora_run_info info;
                t_exact = time_fwd_bwd(ad, x, L, d, L > 16384 ? 1 : reps, &info);
                free(x);
                lora_adapter_destroy(ad);
            }
            for (int g = 2; g <= 4; g += 2) {
                if (only_degree && g != only_degree)
                    continue;
                /* k = binom(g + d, d); POLY costs ~8·k·(d+1)² flops per row. */
                double k = 1.0;
                for (int i = 1; i <= g; i++)
                    k = k * (double)(d + i) / i;
                const double poly_model = 8.0 * k * (d + 1.0) * (d + 1.0) * (double)L / 50e9;
                const double poly_state = k * (d + 1.0) * (d + 1.0); /* floats */
                /* The library's limits (poly_model.h): k <= 2^16, state <= 2^25 floats. */
                const int beyond = k > 65536.0 || poly_state > 33554432.0;
                for (int ri = 0; ri < 5; ri++) {
                    const double R = rs[ri];
                    if (beyond || poly_model > budget) {
                        if (ri == 0)
                            printf("%5lld %7lld   all %3d %8.0f %10.3g %10s (skipped: %s, "
                                   "model %.0f s)\n",
                                   (long long)d, (long long)L, g, k, t_exact, "-",
                                   beyond ? "beyond POLY's limits" : "over budget",
                                   poly_model);
                        continue;
                    }
                    /* Timing does not depend on R either: time at every R only at the
                     * smallest L, and once (at R = 0.5) for larger L. */
                    if (li > 0 && R != 0.5)
                        continue;
                    lora_adapter *ad = make_adapter(d, LORA_BACKEND_POLY, g, threads);
                    float *x = make_input(ad, L, d, R);
                    lora_run_info info;
                    const double t_poly =
                        time_fwd_bwd(ad, x, L, d, poly_model > 5.0 ? 1 : reps, &info);
                    printf("%5lld %7lld %5.2f %3d %8lld %10.3g %10.3g %8.2f %10.2e %10.2e\n",
                           (long long)d, (long long)L, R, g, (long long)info.poly_rank,
                           t_exact, t_poly, t_exact / t_poly, info.measured_out_error,
                           info.measured_dq_error);
                    fprintf(csv, "%lld,%lld,%g,poly,%d,%lld,%.6g,%.6g,%.6g,%.6g,%.6g\n",
                            (long long)d, (long long)L, R, g, (long long)info.poly_rank,
                            t_poly, t_exact / t_poly, info.error_bound,
                            info.measured_out_error, info.measured_dq_error);
                    fflush(stdout);
                    free(x);
                    lora_adapter_destroy(ad);
                }
            }
            if (!isnan(t_exact))
                fprintf(csv, "%lld,%lld,,exact,0,0,%.6g,1,0,0,0\n", (long long)d,
                        (long long)L, t_exact);
        }
    }
    /* The estimator's cost against one exact backward (the API's "small fraction"). */
    {
        const int64_t d = 64, L = 4096;
        lora_adapter *ad = make_adapter(d, LORA_BACKEND_EXACT, 0, threads);
        float *x = make_input(ad, L, d, 1.0);
        float *out = malloc((size_t)(L * d) * sizeof(float));
        float *dout = malloc((size_t)(L * d) * sizeof(float));
        for (int64_t i = 0; i < L * d; i++)
            dout[i] = 0.01f;
        enum { EST_REPS = 9 };
        double te[EST_REPS], tb[EST_REPS];
        lora_threshold_report rep = {.struct_size = sizeof rep};
        CHECK(lora_forward(ad, x, 1, L, out));
        for (int r = 0; r < EST_REPS; r++) {
            double t0 = now();
            CHECK(lora_threshold_estimate(ad, x, 1, L, &rep));
            te[r] = now() - t0;
            t0 = now();
            CHECK(lora_backward(ad, dout, NULL));
            tb[r] = now() - t0;
        }
        qsort(te, EST_REPS, sizeof te[0], cmp_double);
        qsort(tb, EST_REPS, sizeof tb[0], cmp_double);
        printf("estimator at L = %lld, d_model %lld: %.3g ms vs exact backward %.3g ms "
               "(%.2f%%)\n",
               (long long)L, (long long)d, te[EST_REPS / 2] * 1e3, tb[EST_REPS / 2] * 1e3,
               100.0 * te[EST_REPS / 2] / tb[EST_REPS / 2]);
        free(out);
        free(dout);
        free(x);
        lora_adapter_destroy(ad);
    }
    fclose(csv);
    printf("wrote %s\n", csv_path);
    return 0;
}
