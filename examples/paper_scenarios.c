/* The paper's two scenarios (arXiv 2406.03136, §3): LoRA on W_Q and W_V ("partial")
 * and on W_Q, W_K and W_V ("full") of one attention head under the MSE loss, with the
 * exact and the polynomial-method backends side by side, for input scales that cross
 * the threshold. For each: the paper's Γ and Γ/√ln L, the score bound R, the Taylor
 * degree meeting the tolerance, its certified η, the measured gradient error of POLY
 * against EXACT, both times, and what AUTO chooses.
 *
 *   paper_scenarios [L] [head_dim]      (defaults 16384 and 16) */
#include <lora.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TRY(call)                                                                          \
    do {                                                                                   \
        int st_ = (call);                                                                  \
        if (st_ != LORA_OK) {                                                              \
            fprintf(stderr, "%s failed: %s\n", #call, lora_status_string(st_));             \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t seed = 42;
static float uniform(void) /* [-1, 1) */
{
    seed = seed * 6364136223846793005u + 1442695040888963407u;
    return (float)((double)(seed >> 11) * 0x1p-52 - 1.0);
}

typedef struct layer_weights {
    int64_t d;
    float *wq, *wk, *wv, *b_init[3];
} layer_weights;

static const int target_bits[3] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V};

/* One adapter with the shared frozen weights; B starts nonzero (a model mid-training)
 * so that dA is informative. */
static lora_adapter *make(const layer_weights *w, int targets, int backend, int threads)
{
    lora_config *cfg;
    lora_adapter *ad;
    TRY(lora_config_create(&cfg));
    TRY(lora_config_set_int(cfg, LORA_CFG_D_MODEL, w->d));
    TRY(lora_config_set_int(cfg, LORA_CFG_TARGETS, targets));
    TRY(lora_config_set_int(cfg, LORA_CFG_RANK, 4));
    TRY(lora_config_set_int(cfg, LORA_CFG_BACKEND, backend));
    TRY(lora_config_set_int(cfg, LORA_CFG_THREADS, threads));
    TRY(lora_config_set_int(cfg, LORA_CFG_SEED, 7));
    TRY(lora_adapter_create(&ad, cfg));
    lora_config_destroy(cfg);
    TRY(lora_adapter_set_base(ad, LORA_TARGET_Q, w->wq, NULL));
    TRY(lora_adapter_set_base(ad, LORA_TARGET_K, w->wk, NULL));
    TRY(lora_adapter_set_base(ad, LORA_TARGET_V, w->wv, NULL));
    for (int t = 0; t < 3; t++)
        if (targets & target_bits[t])
            TRY(lora_adapter_set_param(ad, target_bits[t], LORA_B, w->b_init[t],
                                       (size_t)(w->d * 4)));
    return ad;
}

/* Forward, MSE loss against y, backward; returns seconds, fills every dA, dB. */
static double step(lora_adapter *ad, const float *x, const float *y, int64_t L, int64_t d,
                   int targets, float **grads)
{
    float *out = malloc((size_t)(L * d) * sizeof(float));
    float *dout = malloc((size_t)(L * d) * sizeof(float));
    double loss;
    const double t0 = now();
    int st = lora_forward(ad, x, 1, L, out);
    if (st != LORA_OK) {
        free(out);
        free(dout);
        return -st; /* caller reports the status */
    }
    TRY(lora_mse_loss(out, y, (size_t)(L * d), &loss, dout));
    TRY(lora_backward(ad, dout, NULL));
    const double t = now() - t0;
    for (int t3 = 0, n = 0; t3 < 3; t3++)
        if (targets & target_bits[t3]) {
            TRY(lora_adapter_get_grad(ad, target_bits[t3], LORA_A, grads[n++], (size_t)(4 * d)));
            TRY(lora_adapter_get_grad(ad, target_bits[t3], LORA_B, grads[n++], (size_t)(4 * d)));
        }
    free(out);
    free(dout);
    return t;
}

int main(int argc, char **argv)
{
    const int64_t L = argc > 1 ? atoll(argv[1]) : 16384;
    const int64_t d = argc > 2 ? atoll(argv[2]) : 16;
    const int threads = 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (L < 2 || d < 1) {
        fprintf(stderr, "usage: %s [L >= 2] [head_dim >= 1]\n", argv[0]);
        return 2;
    }
    layer_weights w = {.d = d};
    w.wq = malloc((size_t)(d * d) * sizeof(float));
    w.wk = malloc((size_t)(d * d) * sizeof(float));
    w.wv = malloc((size_t)(d * d) * sizeof(float));
    for (int64_t i = 0; i < d * d; i++) {
        w.wq[i] = uniform() / sqrtf((float)d);
        w.wk[i] = uniform() / sqrtf((float)d);
        w.wv[i] = uniform() / sqrtf((float)d);
    }
    for (int t = 0; t < 3; t++) {
        w.b_init[t] = malloc((size_t)(d * 4) * sizeof(float));
        for (int64_t i = 0; i < d * 4; i++)
            w.b_init[t][i] = 0.1f * uniform();
    }
    float *x0 = malloc((size_t)(L * d) * sizeof(float));
    float *x = malloc((size_t)(L * d) * sizeof(float));
    float *y = malloc((size_t)(L * d) * sizeof(float));
    for (int64_t i = 0; i < L * d; i++) {
        x0[i] = uniform();
        y[i] = 0.1f * uniform();
    }
    float *g_exact[6], *g_poly[6];
    for (int i = 0; i < 6; i++) {
        g_exact[i] = malloc((size_t)(4 * d) * sizeof(float));
        g_poly[i] = malloc((size_t)(4 * d) * sizeof(float));
    }
    const double scales[] = {0.05, 0.1, 0.2, 0.4, 0.8, 1.6};
    printf("One head, d_model = head_dim = %lld, L = %lld, rank 4, %d threads, tolerance "
           "1e-3 (default)\n",
           (long long)d, (long long)L, threads);
    for (int scenario = 0; scenario < 2; scenario++) {
        const int targets = scenario == 0 ? (LORA_TARGET_Q | LORA_TARGET_V)
                                          : (LORA_TARGET_Q | LORA_TARGET_K | LORA_TARGET_V);
        printf("\n%s adaptation (%s):\n", scenario == 0 ? "Partial" : "Full",
               scenario == 0 ? "W_Q, W_V" : "W_Q, W_K, W_V");
        printf("%6s %8s %8s %7s %3s %9s %10s %9s %9s %8s %6s\n", "scale", "Gamma", "G/sqrtlnL",
               "R", "g", "eta", "grad_err", "exact_ms", "poly_ms", "speedup", "AUTO");
        const int ngrads = scenario == 0 ? 4 : 6;
        for (size_t si = 0; si < sizeof scales / sizeof scales[0]; si++) {
            for (int64_t i = 0; i < L * d; i++)
                x[i] = x0[i] * (float)scales[si];
            lora_adapter *exact = make(&w, targets, LORA_BACKEND_EXACT, threads);
            lora_adapter *poly = make(&w, targets, LORA_BACKEND_POLY, threads);
            lora_threshold_report rep = {.struct_size = sizeof rep};
            TRY(lora_threshold_estimate(exact, x, 1, L, &rep));
            const double t_exact = step(exact, x, y, L, d, targets, g_exact);
            double t_poly = step(poly, x, y, L, d, targets, g_poly);
            const double gamma = fmax(rep.gamma_q, rep.gamma_k);
            printf("%6.2f %8.3f %8.3f %7.3f ", scales[si], gamma, rep.gamma_ratio,
                   rep.score_bound);
            if (t_poly < 0) { /* LORA_ERR_TOLERANCE: no degree certifies the tolerance */
                printf("%3s %9s %10s %9.1f %9s %8s %6s\n", "-", "-", "-", t_exact * 1e3,
                       "refused", "-", rep.recommended_backend == LORA_BACKEND_POLY ? "POLY" : "EXACT");
            } else {
                double diff = 0.0, ref = 0.0;
                for (int gi = 0; gi < ngrads; gi++)
                    for (int64_t i = 0; i < 4 * d; i++) {
                        diff = fmax(diff, fabs(g_poly[gi][i] - g_exact[gi][i]));
                        ref = fmax(ref, fabs(g_exact[gi][i]));
                    }
                lora_run_info info = {.struct_size = sizeof info};
                TRY(lora_adapter_get_run_info(poly, &info));
                printf("%3lld %9.2e %10.2e %9.1f %9.1f %8.2f %6s\n", (long long)info.poly_degree,
                       info.error_bound, diff / ref, t_exact * 1e3, t_poly * 1e3,
                       t_exact / t_poly,
                       rep.recommended_backend == LORA_BACKEND_POLY ? "POLY" : "EXACT");
            }
            lora_adapter_destroy(exact);
            lora_adapter_destroy(poly);
        }
    }
    printf("\nReading: Gamma = max|entry| of X*W_Q^T, X*W_K^T (the paper's statistic); R bounds\n"
           "the centred scores and decides the degree. Below the threshold POLY meets the\n"
           "tolerance with a low degree and runs in time linear in L; above it the degree\n"
           "(and k = binom(g + d, d)) explodes, POLY is refused, and AUTO runs EXACT.\n");
    free(x0);
    free(x);
    free(y);
    for (int i = 0; i < 6; i++) {
        free(g_exact[i]);
        free(g_poly[i]);
    }
    free(w.wq);
    free(w.wk);
    free(w.wv);
    for (int t = 0; t < 3; t++)
        free(w.b_init[t]);
    return 0;
}
