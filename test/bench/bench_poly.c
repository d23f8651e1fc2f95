/* The empirical phase transition of the polynomial method: EXACT and POLY forward +
 * backward timed side by side in one run over sequence length L, head_dim and the
 * score bound R, with POLY's measured error. One head, batch 1, W_Q = W_K = W_V = I
 * (so Q = K = V = x and R is set by the input scale), LoRA rank 8 on Q, K, V.
 *
 *   bench_poly [--full] [--csv FILE] [--reps N] [--dim D] [--degree G] [--threads T]
 *              [--estimator] [--calibrate HEADER] [--len L] [--bwd-only]
 * Default: L in {1k, 4k, 16k, 64k}, 2 threads. --full: every doubling from 1k to 256k
 * (EXACT is timed up to 64k only: beyond it one exact run takes minutes).
 * --estimator: only the estimator's cost against one exact backward.
 * Cases whose modelled time exceeds a budget are listed as skipped, not timed.
 *
 * Every timed (d, L, g) at L >= 4k gives one sample of the rate ratio EXACT/POLY
 * (seconds per modelled flop of POLY over EXACT's, flops from the threshold report);
 * the geometric mean per head_dim class is the table AUTO uses
 * (src/backend/poly_calibration.h). The run prints that fit, and for every timed pair
 * what AUTO picks (tolerance 1, so the degree is certified) and whether the pick is
 * within 20% of the faster backend. --calibrate HEADER: only the calibration grid
 * (L = 4k and 16k, R = 0.5), then writes the fitted table to HEADER (`make calibrate`).
 * --len L (with --bwd-only): only that L. --bwd-only: POLY alone, forward and backward timed apart (median
 * of each), for A/B runs of the backward's kernels (also under callgrind, --reps 1). */
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

/* tol > 0: LORA_CFG_TOLERANCE, else the default. */
static lora_adapter *make_adapter(int64_t d, int backend, int degree, int threads, double tol)
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
    if (tol > 0.0)
        CHECK(lora_config_set_double(cfg, LORA_CFG_TOLERANCE, tol));
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

/* The report AUTO makes for x at degree g (tolerance 1: certified at the bench's R). */
static lora_threshold_report auto_report(int64_t d, int g, int threads, const float *x,
                                         int64_t L)
{
    lora_adapter *ad = make_adapter(d, LORA_BACKEND_AUTO, g, threads, 1.0);
    lora_threshold_report rep = {.struct_size = sizeof rep};
    CHECK(lora_threshold_estimate(ad, x, 1, L, &rep));
    lora_adapter_destroy(ad);
    return rep;
}

/* Rate-ratio samples per head_dim class (8, 16, 32, larger). */
#define CLASSES 4
static const int64_t class_bound[CLASSES] = {8, 16, 32, INT64_MAX};
typedef struct fit {
    double log_sum[CLASSES];
    int n[CLASSES];
    int auto_ok, auto_total;
} fit;

static int class_of(int64_t d)
{
    int c = 0;
    while (c + 1 < CLASSES && d > class_bound[c])
        c++;
    return c;
}

static double fitted(const fit *f, int c)
{
    /* a class without samples takes the nearest one below it, or 2 */
    for (int i = c; i >= 0; i--)
        if (f->n[i] > 0)
            return exp(f->log_sum[i] / f->n[i]);
    return 2.0;
}

static void write_header(const fit *f, const char *path, int threads)
{
    FILE *h = fopen(path, "w");
    if (!h) {
        perror(path);
        exit(1);
    }
    time_t now_t = time(NULL);
    char date[32];
    strftime(date, sizeof date, "%Y-%m-%d", gmtime(&now_t));
    fprintf(h, "/* POLY's speed relative to EXACT's per head_dim class: AUTO offers POLY at cost\n"
               " * flops_poly·ratio (src/backend/poly_model.c), ratio = EXACT's flop rate / POLY's, fitted\n"
               " * from forward+backward timings of both backends. Generated by `make calibrate`\n"
               " * (test/bench/bench_poly.c --calibrate); regenerate on a quiet machine (docs/backends.md).\n"
               " * This file is only data: no code but the lookup below. */\n"
               "#ifndef LORA_POLY_CALIBRATION_H\n#define LORA_POLY_CALIBRATION_H\n\n"
               "#include <stdint.h>\n\n");
    fprintf(h, "/* generated: %s, liblora %s, %d threads, samples per class:", date,
            lora_version_string(), threads);
    for (int c = 0; c < CLASSES; c++)
        fprintf(h, " %d", f->n[c]);
    fprintf(h, " */\n#define POLY_CALIBRATION_CLASSES %d\n", CLASSES);
    fprintf(h, "static const int64_t poly_calibration_head_dim[POLY_CALIBRATION_CLASSES] = {");
    for (int c = 0; c < CLASSES; c++)
        if (class_bound[c] == INT64_MAX)
            fprintf(h, "%sINT64_MAX", c ? ", " : "");
        else
            fprintf(h, "%s%lld", c ? ", " : "", (long long)class_bound[c]);
    fprintf(h, "};\nstatic const double poly_calibration_ratio[POLY_CALIBRATION_CLASSES] = {");
    for (int c = 0; c < CLASSES; c++)
        fprintf(h, "%s%.3g", c ? ", " : "", fitted(f, c));
    fprintf(h, "};\n\n"
               "/* The ratio of the first class whose head_dim bound is at least head_dim. */\n"
               "static inline double poly_calibrated_ratio(int64_t head_dim)\n{\n"
               "    int i = 0;\n"
               "    while (i + 1 < POLY_CALIBRATION_CLASSES && head_dim > poly_calibration_head_dim[i])\n"
               "        i++;\n"
               "    return poly_calibration_ratio[i];\n}\n\n#endif\n");
    fclose(h);
    printf("wrote %s\n", path);
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

/* --bwd-only: one POLY forward (timed), then the backward timed reps times on it. */
static void time_phases(int64_t d, int64_t L, int g, int threads, int reps)
{
    lora_adapter *ad = make_adapter(d, LORA_BACKEND_POLY, g, threads, 0.0);
    float *x = make_input(ad, L, d, 0.5);
    float *out = malloc((size_t)(L * d) * sizeof(float));
    float *dout = malloc((size_t)(L * d) * sizeof(float));
    for (int64_t i = 0; i < L * d; i++)
        dout[i] = (float)(urand() - 0.5);
    double tf[16], tb[16];
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        CHECK(lora_forward(ad, x, 1, L, out));
        tf[r] = now() - t0;
        t0 = now();
        CHECK(lora_backward(ad, dout, NULL));
        tb[r] = now() - t0;
    }
    qsort(tf, (size_t)reps, sizeof tf[0], cmp_double);
    qsort(tb, (size_t)reps, sizeof tb[0], cmp_double);
    printf("%5lld %7lld %3d %10.4g %10.4g\n", (long long)d, (long long)L, g, tf[reps / 2],
           tb[reps / 2]);
    free(out);
    free(dout);
    free(x);
    lora_adapter_destroy(ad);
}

int main(int argc, char **argv)
{
    int full = 0, reps = 3, threads = 2, estimator_only = 0, bwd_only = 0;
    int64_t only_dim = 0, only_len = 0;
    int only_degree = 0;
    const char *csv_path = "lib/bench/poly.csv", *calibrate = NULL;
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
        else if (!strcmp(argv[i], "--calibrate") && i + 1 < argc)
            calibrate = argv[++i];
        else if (!strcmp(argv[i], "--len") && i + 1 < argc)
            only_len = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--bwd-only"))
            bwd_only = 1;
        else {
            fprintf(stderr,
                    "usage: %s [--full] [--csv FILE] [--reps N] [--dim D] [--degree G] "
                    "[--threads T] [--estimator] [--calibrate HEADER] [--len L] "
                    "[--bwd-only]\n",
                    argv[0]);
            return 2;
        }
    }
    if (reps < 1 || reps > 15)
        reps = 3;
    if (bwd_only) {
        const int64_t dims[] = {8, 16, 32, 64}, lens[] = {4096, 16384};
        printf("POLY, %d threads, median of %d\n%5s %7s %3s %10s %10s\n", threads, reps, "d",
               "L", "g", "fwd_s", "bwd_s");
        for (int di = 0; di < 4; di++)
            for (int li = 0; li < (only_len ? 1 : 2); li++)
                for (int g = 2; g <= 4; g += 2)
                    if ((!only_dim || dims[di] == only_dim) && (!only_degree || g == only_degree))
                        time_phases(dims[di], only_len ? only_len : lens[li], g, threads, reps);
        return 0;
    }
    FILE *csv = fopen(csv_path, "w");
    if (!csv) {
        perror(csv_path);
        return 1;
    }
    fprintf(csv, "head_dim,L,R,backend,degree,rank,seconds,speedup,eta,measured_out_err,"
                 "measured_dq_err\n");
    const int64_t lens_default[] = {1024, 4096, 16384, 65536};
    const int64_t lens_full[] = {1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144};
    const int64_t lens_calibrate[] = {4096, 16384};
    const int64_t *lens = calibrate ? lens_calibrate : full ? lens_full : lens_default;
    const int nlens = calibrate ? 2 : full ? 9 : 4;
    fit fit_ = {0};
    const int64_t dims[] = {8, 16, 32, 64};
    const double rs[] = {0.25, 0.5, 1.0, 2.0, 4.0};
    const double budget = full ? 120.0 : 30.0; /* seconds a single timed run may take */
    printf("liblora %s, %d threads, median of %d (exact: 1 run above L = 16k)\n",
           lora_version_string(), threads, reps);
    printf("%5s %7s %5s %3s %8s %10s %10s %8s %10s %10s %6s %5s\n", "d", "L", "R", "g", "k",
           "exact_s", "poly_s", "speedup", "meas_out", "meas_dq", "ratio", "auto");
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
                lora_adapter *ad = make_adapter(d, LORA_BACKEND_EXACT, 0, threads, 0.0);
                float *x = make_input(ad, L, d, 1.0);
                lora_run_info info;
                t_exact = time_fwd_bwd(ad, x, L, d, L > 16384 ? 1 : reps, &info);
                free(x);
                lora_adapter_destroy(ad);
            }
            for (int g = 2; g <= 4; g += 2) {
                if (only_degree && g != only_degree)
                    continue;
                /* k = binom(g + d, d), k1 = binom(g + 1 + d, d); POLY costs ~8·k1·(d+1)
                 * flops per row. */
                double k = 1.0;
                for (int i = 1; i <= g; i++)
                    k = k * (double)(d + i) / i;
                const double k1 = k * (double)(d + g + 1) / (g + 1);
                const double poly_model = 8.0 * k1 * (d + 1.0) * (double)L / 50e9;
                /* The library's limits (poly_model.h): k <= 2^16, k1 <= 2^17. */
                const int beyond = k > 65536.0 || k1 > 131072.0;
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
                    if ((li > 0 || calibrate) && R != 0.5)
                        continue;
                    lora_adapter *ad = make_adapter(d, LORA_BACKEND_POLY, g, threads, 0.0);
                    float *x = make_input(ad, L, d, R);
                    lora_run_info info;
                    const double t_poly =
                        time_fwd_bwd(ad, x, L, d, poly_model > 5.0 ? 1 : reps, &info);
                    /* rate ratio sample and AUTO's pick, when both were timed */
                    double ratio = NAN;
                    const char *pick = "-";
                    if (!isnan(t_exact)) {
                        const lora_threshold_report rep = auto_report(d, g, threads, x, L);
                        ratio = (t_poly / rep.flops_poly) / (t_exact / rep.flops_exact);
                        if (L >= 4096) {
                            fit_.log_sum[class_of(d)] += log(ratio);
                            fit_.n[class_of(d)]++;
                        }
                        const double chosen =
                            rep.recommended_backend == LORA_BACKEND_POLY ? t_poly : t_exact;
                        const int ok = chosen <= 1.2 * fmin(t_poly, t_exact);
                        pick = rep.recommended_backend == LORA_BACKEND_POLY ? (ok ? "P" : "P!")
                                                                           : (ok ? "E" : "E!");
                        fit_.auto_ok += ok;
                        fit_.auto_total++;
                    }
                    printf("%5lld %7lld %5.2f %3d %8lld %10.3g %10.3g %8.2f %10.2e %10.2e %6.2f "
                           "%5s\n",
                           (long long)d, (long long)L, R, g, (long long)info.poly_rank,
                           t_exact, t_poly, t_exact / t_poly, info.measured_out_error,
                           info.measured_dq_error, ratio, pick);
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
    if (!estimator_only) {
        printf("rate ratio EXACT/POLY per head_dim class (geometric mean over L >= 4k):");
        for (int c = 0; c < CLASSES; c++)
            if (class_bound[c] == INT64_MAX)
                printf(" larger: %.3g (%d samples)", fitted(&fit_, c), fit_.n[c]);
            else
                printf(" <= %lld: %.3g (%d),", (long long)class_bound[c], fitted(&fit_, c),
                       fit_.n[c]);
        printf("\nAUTO within 20%% of the faster backend: %d of %d timed pairs (! marks a miss)\n",
               fit_.auto_ok, fit_.auto_total);
    }
    if (calibrate) {
        write_header(&fit_, calibrate, threads);
        fclose(csv);
        return 0;
    }
    /* The estimator's cost against one exact backward (the API's "small fraction"). */
    {
        const int64_t d = 64, L = 4096;
        lora_adapter *ad = make_adapter(d, LORA_BACKEND_EXACT, 0, threads, 0.0);
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
