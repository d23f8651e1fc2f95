/* demo.c: a student LoRA adapter learns a teacher's hidden LoRA update.
 *
 * Teacher: an attention layer with random frozen W_Q, W_K, W_V (fixed seed) plus a
 * hidden, nonzero LoRA update on Q and V (its B factors are set nonzero). It turns
 * random inputs into targets.
 * Student: the same frozen base and a default-initialised LoRA adapter (B = 0, so it
 * starts as the bare base layer). Plain SGD through liblora: forward, lora_mse_loss,
 * backward, read parameters and gradients, update, set_param, zero_grad.
 *
 * Run: make demo, or make examples && lib/examples/demo [learning_rate [steps [threads]]].
 * Exits non-zero unless the loss falls at least tenfold.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <lora.h>

/* Layer and run sizes. */
#define D_MODEL 64
#define N_HEADS 4
#define RANK 8
#define BATCH 4
#define SEQ_LEN 128
#define STEPS 150
#define STEPS_MAX 100000
#define PRINT_EVERY 10
#define LEARNING_RATE 1.0f /* per token: the update is lr/(batch*L) * grad */
#define TEACHER_B_STD 0.5 /* size of the hidden update's B entries */

#define N_TOKENS (BATCH * SEQ_LEN)
#define N_ACT (N_TOKENS * D_MODEL) /* q_dim = D_MODEL here: no output projection */

static const int targets[2] = {LORA_TARGET_Q, LORA_TARGET_V};

/* ---- a small deterministic random source (splitmix64 + Box-Muller) ---- */
static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static double rng_uniform(uint64_t *s) { return ((double)(rng_next(s) >> 11) + 0.5) * 0x1p-53; }

static void fill_normal(uint64_t *s, float *x, size_t n, double std)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(std * sqrt(-2.0 * log(rng_uniform(s))) *
                       cos(6.283185307179586 * rng_uniform(s)));
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Reports a failed call with the adapter's detail; returns nonzero on failure. */
static int failed(int st, const char *what, const lora_adapter *ad)
{
    if (st == LORA_OK)
        return 0;
    fprintf(stderr, "demo: %s failed: %s (%s)\n", what, lora_status_string(st),
            lora_adapter_last_error(ad));
    return 1;
}

/* An adapter with the shared frozen base; seed picks its LoRA A initialisation. */
static lora_adapter *make_adapter(uint64_t seed, int threads, const float *wq,
                                  const float *wk, const float *wv)
{
    lora_config *cfg = NULL;
    lora_adapter *ad = NULL;
    int st = lora_config_create(&cfg);
    if (st == LORA_OK)
        st = lora_config_set_int(cfg, LORA_CFG_D_MODEL, D_MODEL);
    if (st == LORA_OK)
        st = lora_config_set_int(cfg, LORA_CFG_N_HEADS, N_HEADS);
    if (st == LORA_OK)
        st = lora_config_set_int(cfg, LORA_CFG_RANK, RANK);
    if (st == LORA_OK)
        st = lora_config_set_int(cfg, LORA_CFG_TARGETS, LORA_TARGET_Q | LORA_TARGET_V);
    if (st == LORA_OK)
        st = lora_config_set_int(cfg, LORA_CFG_SEED, (int64_t)seed);
    if (st == LORA_OK) /* 0: the library's default, one thread per CPU */
        st = lora_config_set_int(cfg, LORA_CFG_THREADS, threads);
    if (st == LORA_OK && (st = lora_adapter_create(&ad, cfg)) != LORA_OK)
        lora_config_validate(cfg); /* create does not write into cfg; this explains */
    if (st != LORA_OK)
        fprintf(stderr, "demo: configuration failed: %s (%s)\n", lora_status_string(st),
                lora_config_last_error(cfg));
    lora_config_destroy(cfg);
    if (!ad)
        return NULL;
    if (failed(lora_adapter_set_base(ad, LORA_TARGET_Q, wq, NULL), "set_base Q", ad) ||
        failed(lora_adapter_set_base(ad, LORA_TARGET_K, wk, NULL), "set_base K", ad) ||
        failed(lora_adapter_set_base(ad, LORA_TARGET_V, wv, NULL), "set_base V", ad)) {
        lora_adapter_destroy(ad);
        return NULL;
    }
    return ad;
}

/* One SGD step on every factor: p -= lr * grad, then clear the gradients. */
static int sgd_update(lora_adapter *ad, float lr, float *param, float *grad)
{
    for (int t = 0; t < 2; t++)
        for (int which = LORA_A; which <= LORA_B; which++) {
            int64_t rows, cols;
            if (failed(lora_adapter_param_shape(ad, targets[t], which, &rows, &cols),
                       "param_shape", ad))
                return 1;
            const size_t n = (size_t)(rows * cols);
            if (failed(lora_adapter_get_param(ad, targets[t], which, param, n), "get_param",
                       ad) ||
                failed(lora_adapter_get_grad(ad, targets[t], which, grad, n), "get_grad", ad))
                return 1;
            for (size_t i = 0; i < n; i++)
                param[i] -= lr * grad[i];
            if (failed(lora_adapter_set_param(ad, targets[t], which, param, n), "set_param",
                       ad))
                return 1;
        }
    return failed(lora_adapter_zero_grad(ad), "zero_grad", ad);
}

int main(int argc, char **argv)
{
    static float wq[D_MODEL * D_MODEL], wk[D_MODEL * D_MODEL], wv[D_MODEL * D_MODEL];
    static float x[N_ACT], target[N_ACT], out[N_ACT], dout[N_ACT];
    static float param[D_MODEL * RANK], grad[D_MODEL * RANK]; /* largest factor */
    int rc = EXIT_FAILURE;
    uint64_t rng = 20241130;
    const float lr = argc > 1 ? (float)atof(argv[1]) : LEARNING_RATE;
    const int steps = argc > 2 ? atoi(argv[2]) : STEPS;
    const int nthreads = argc > 3 ? atoi(argv[3]) : 0;
    if (!(lr > 0.0f) || steps < 1 || steps > STEPS_MAX || nthreads < 0) {
        fprintf(stderr, "usage: %s [learning_rate > 0 [steps 1..%d [threads, 0 = all]]]\n",
                argv[0], STEPS_MAX);
        return EXIT_FAILURE;
    }

    /* Frozen base, entries ~ N(0, 1/d_model): unit-scale inputs give unit-scale Q, K, V. */
    fill_normal(&rng, wq, D_MODEL * D_MODEL, 1.0 / sqrt(D_MODEL));
    fill_normal(&rng, wk, D_MODEL * D_MODEL, 1.0 / sqrt(D_MODEL));
    fill_normal(&rng, wv, D_MODEL * D_MODEL, 1.0 / sqrt(D_MODEL));

    lora_adapter *teacher = make_adapter(1, nthreads, wq, wk, wv);
    lora_adapter *student = make_adapter(2, nthreads, wq, wk, wv);
    if (!teacher || !student)
        goto done;

    /* The teacher's hidden update: nonzero B on Q and V (A keeps its random init). */
    for (int t = 0; t < 2; t++) {
        fill_normal(&rng, param, D_MODEL * RANK, TEACHER_B_STD);
        if (failed(lora_adapter_set_param(teacher, targets[t], LORA_B, param,
                                          D_MODEL * RANK),
                   "set_param (teacher B)", teacher))
            goto done;
    }

    int64_t threads = 0, head_dim = 0;
    if (failed(lora_adapter_get_config_int(student, LORA_CFG_THREADS, &threads), "get_config",
               student) ||
        failed(lora_adapter_get_config_int(student, LORA_CFG_HEAD_DIM, &head_dim),
               "get_config", student))
        goto done;
    printf("liblora %s demo: student LoRA learns a teacher's hidden LoRA update\n",
           lora_version_string());
    printf("layer: d_model %d, %d heads x %lld, LoRA rank %d on Q and V; batch %d x L %d; "
           "threads %lld\n",
           D_MODEL, N_HEADS, (long long)head_dim, RANK, BATCH, SEQ_LEN, (long long)threads);
    /* What the paper's threshold says about inputs like these (own random stream, so
     * the training data below does not depend on it). */
    uint64_t probe_rng = 7;
    fill_normal(&probe_rng, x, N_ACT, 1.0);
    lora_threshold_report rep = {.struct_size = sizeof rep};
    if (failed(lora_threshold_estimate(student, x, BATCH, SEQ_LEN, &rep), "threshold_estimate",
               student))
        goto done;
    printf("threshold: gamma/sqrt(ln L) %.2f, score bound R %.1f -> AUTO runs %s\n",
           rep.gamma_ratio, rep.score_bound,
           rep.recommended_backend == LORA_BACKEND_POLY ? "poly" : "exact");
    printf("SGD lr %g, %d steps, fresh random inputs every step; loss = 1/2 sum (out - "
           "target)^2\n",
           (double)lr, steps);
    printf("%6s %14s %10s\n", "step", "loss", "ms/step");

    static double step_ms[STEPS_MAX];
    double first_loss = 0.0, loss = 0.0, total_ms = 0.0;
    for (int step = 0; step <= steps; step++) {
        fill_normal(&rng, x, N_ACT, 1.0);
        if (failed(lora_forward(teacher, x, BATCH, SEQ_LEN, target), "teacher forward",
                   teacher))
            goto done;

        const double t0 = now_ms();
        if (failed(lora_forward(student, x, BATCH, SEQ_LEN, out), "forward", student))
            goto done;
        int st = lora_mse_loss(out, target, N_ACT, &loss, dout);
        if (st != LORA_OK) {
            fprintf(stderr, "demo: lora_mse_loss failed: %s\n", lora_status_string(st));
            goto done;
        }
        if (step == steps) /* the last step only measures */
            break;
        if (failed(lora_backward(student, dout, NULL), "backward", student) ||
            sgd_update(student, lr / N_TOKENS, param, grad))
            goto done;
        const double ms = now_ms() - t0;
        total_ms += ms;
        step_ms[step] = ms;

        if (step == 0)
            first_loss = loss;
        if (step % PRINT_EVERY == 0)
            printf("%6d %14.4f %10.2f\n", step, loss, ms);
    }
    printf("%6d %14.4f %10s\n", steps, loss, "-");

    qsort(step_ms, (size_t)steps, sizeof step_ms[0], cmp_double);
    printf("summary: loss %.4g -> %.4g (%.3gx lower) in %d steps; %.2f ms/step mean, "
           "%.2f median (forward + loss + backward + SGD update)\n",
           first_loss, loss, first_loss / loss, steps, total_ms / steps, step_ms[steps / 2]);
    if (!(loss * 10.0 < first_loss)) {
        fprintf(stderr, "demo: FAILED: the loss did not fall tenfold\n");
        goto done;
    }
    rc = EXIT_SUCCESS;

done:
    lora_adapter_destroy(student);
    lora_adapter_destroy(teacher);
    return rc;
}
