/* demo.c: the whole liblora story on one attention layer.
 *
 *   1. Fine-tune: a teacher layer (random frozen W_Q, W_K, W_V plus a hidden, nonzero
 *      LoRA update on Q and V) turns random inputs into targets; a student with the same
 *      frozen base and a fresh LoRA adapter (B = 0: it starts as the bare base layer)
 *      learns the hidden update with AdamW (lora_optimizer). Every few steps a progress
 *      line shows the loss, the time per step and the attention backend that ran.
 *   2. Save the student as a Hugging Face PEFT directory (adapter_config.json +
 *      adapter_model.safetensors) in a temporary directory.
 *   3. Load it back into a fresh adapter on the same frozen base and check that it
 *      gives bitwise the student's output.
 *   4. Merge the LoRA update into copies of the base weights (W + s*B*A), build a plain
 *      layer on the merged weights and check it gives the student's output up to float
 *      rounding; lora_forward_merged does the same inside the student.
 *
 * Run: make demo, or make examples && lib/examples/demo [learning_rate [steps [threads]]].
 * Exits non-zero if any call fails, the loss does not fall at least tenfold, or a check
 * fails.
 */
#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <lora.h>

/* Layer and run sizes. */
#define D_MODEL 64
#define N_HEADS 4
#define RANK 8
#define BATCH 4
#define SEQ_LEN 128
#define STEPS 200
#define STEPS_MAX 100000
#define LEARNING_RATE 1e-2 /* AdamW; PyTorch's other defaults (betas, eps, decay 0.01) */
#define THREADS 1          /* the layer is small: one thread is fastest and steadiest */
#define TEACHER_B_STD 0.5  /* size of the hidden update's B entries */
/* Merged vs LoRA output: the merged layer rounds W + s*B*A to float once and does one
 * product per projection where the LoRA path does x*W^T + s*(x*A^T)*B^T, so the two
 * differ by float rounding of sums over D_MODEL terms (~1e-7 relative, see
 * docs/training.md). Accept up to 1e-5 of the largest output. */
#define MERGE_RTOL 1e-5

#define N_TOKENS (BATCH * SEQ_LEN)
#define N_ACT (N_TOKENS * D_MODEL) /* q_dim = D_MODEL here: no output projection */
#define N_W (D_MODEL * D_MODEL)

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

static const char *backend_name(int backend)
{
    return backend == LORA_BACKEND_EXACT ? "EXACT" : backend == LORA_BACKEND_POLY ? "POLY" : "?";
}

/* Largest |a - b| and largest |a|. */
static void compare(const float *a, const float *b, size_t n, double *max_diff, double *max_abs)
{
    *max_diff = 0.0;
    *max_abs = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)a[i] - (double)b[i]);
        if (d > *max_diff)
            *max_diff = d;
        if (fabs(a[i]) > *max_abs)
            *max_abs = fabs(a[i]);
    }
}

/* ---- error reporting: each returns nonzero when st is a failure ---- */
static int failed(int st, const char *what, const lora_adapter *ad)
{
    if (st == LORA_OK)
        return 0;
    fprintf(stderr, "demo: %s failed: %s (%s)\n", what, lora_status_string(st),
            lora_adapter_last_error(ad));
    return 1;
}

static int opt_failed(int st, const char *what, const lora_optimizer *opt)
{
    if (st == LORA_OK)
        return 0;
    fprintf(stderr, "demo: %s failed: %s (%s)\n", what, lora_status_string(st),
            lora_optimizer_last_error(opt));
    return 1;
}

/* ---- building layers ---- */

/* The config every adapter of the demo uses; init and seed pick the LoRA initialisation.
 * NULL (after a message) on failure. */
static lora_config *make_config(int init, uint64_t seed, int threads)
{
    lora_config *cfg = NULL;
    int st = lora_config_create(&cfg);
    if (st != LORA_OK) {
        fprintf(stderr, "demo: lora_config_create failed: %s\n", lora_status_string(st));
        return NULL;
    }
    if ((st = lora_config_set_int(cfg, LORA_CFG_D_MODEL, D_MODEL)) == LORA_OK &&
        (st = lora_config_set_int(cfg, LORA_CFG_N_HEADS, N_HEADS)) == LORA_OK &&
        (st = lora_config_set_int(cfg, LORA_CFG_RANK, RANK)) == LORA_OK &&
        (st = lora_config_set_int(cfg, LORA_CFG_TARGETS, LORA_TARGET_Q | LORA_TARGET_V)) ==
            LORA_OK &&
        (st = lora_config_set_int(cfg, LORA_CFG_INIT, init)) == LORA_OK &&
        (st = lora_config_set_int(cfg, LORA_CFG_SEED, (int64_t)seed)) == LORA_OK &&
        (st = lora_config_set_int(cfg, LORA_CFG_THREADS, threads)) == LORA_OK)
        return cfg;
    fprintf(stderr, "demo: configuration failed: %s (%s)\n", lora_status_string(st),
            lora_config_last_error(cfg));
    lora_config_destroy(cfg);
    return NULL;
}

/* Gives ad its frozen base projections (copied). Nonzero on failure. */
static int set_base(lora_adapter *ad, const float *wq, const float *wk, const float *wv)
{
    return failed(lora_adapter_set_base(ad, LORA_TARGET_Q, wq, NULL), "set_base Q", ad) ||
           failed(lora_adapter_set_base(ad, LORA_TARGET_K, wk, NULL), "set_base K", ad) ||
           failed(lora_adapter_set_base(ad, LORA_TARGET_V, wv, NULL), "set_base V", ad);
}

/* A new adapter on the base (wq, wk, wv); NULL (after a message) on failure. */
static lora_adapter *make_adapter(int init, uint64_t seed, int threads, const float *wq,
                                  const float *wk, const float *wv)
{
    lora_config *cfg = make_config(init, seed, threads);
    lora_adapter *ad = NULL;
    if (!cfg)
        return NULL;
    int st = lora_adapter_create(&ad, cfg);
    if (st != LORA_OK) {
        lora_config_validate(cfg); /* create does not write into cfg; this explains */
        fprintf(stderr, "demo: lora_adapter_create failed: %s (%s)\n",
                lora_status_string(st), lora_config_last_error(cfg));
    }
    lora_config_destroy(cfg);
    if (ad && set_base(ad, wq, wk, wv)) {
        lora_adapter_destroy(ad);
        ad = NULL;
    }
    return ad;
}

/* ---- the temporary directory ---- */

/* Removes the files in dir, then dir (no subdirectories expected). Quiet if dir is
 * already gone. */
static void remove_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    char path[4096];
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (unlink(path) != 0)
            perror(path);
    }
    closedir(d);
    if (rmdir(dir) != 0)
        perror(dir);
}

/* Prints the files in dir with their sizes. */
static void list_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) {
        perror(dir);
        return;
    }
    char path[4096];
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        struct stat sb;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (e->d_name[0] != '.' && stat(path, &sb) == 0)
            printf("  %-28s %7lld bytes\n", e->d_name, (long long)sb.st_size);
    }
    closedir(d);
}

int main(int argc, char **argv)
{
    static float wq[N_W], wk[N_W], wv[N_W], wq_merged[N_W], wv_merged[N_W];
    static float x[N_ACT], target[N_ACT], out[N_ACT], dout[N_ACT], out2[N_ACT];
    static float b_hidden[D_MODEL * RANK];
    const double t_start = now_ms();
    int rc = EXIT_FAILURE;
    uint64_t rng = 20241130;
    const double lr = argc > 1 ? atof(argv[1]) : LEARNING_RATE;
    const int steps = argc > 2 ? atoi(argv[2]) : STEPS;
    const int nthreads = argc > 3 ? atoi(argv[3]) : THREADS;
    if (!(lr > 0.0) || steps < 1 || steps > STEPS_MAX || nthreads < 0) {
        fprintf(stderr, "usage: %s [learning_rate > 0 [steps 1..%d [threads, 0 = all]]]\n",
                argv[0], STEPS_MAX);
        return EXIT_FAILURE;
    }
    const int print_every = steps <= 30 ? 1 : (steps + 19) / 20; /* about 20 lines */

    lora_adapter *teacher = NULL, *student = NULL, *loaded = NULL, *plain = NULL;
    lora_optimizer *opt = NULL;
    lora_config *load_cfg = NULL;
    char tmpdir[4096] = "", peftdir[4096] = "", ggufpath[4096] = "";

    /* Frozen base, entries ~ N(0, 1/d_model): unit-scale inputs give unit-scale Q, K, V. */
    fill_normal(&rng, wq, N_W, 1.0 / sqrt(D_MODEL));
    fill_normal(&rng, wk, N_W, 1.0 / sqrt(D_MODEL));
    fill_normal(&rng, wv, N_W, 1.0 / sqrt(D_MODEL));

    teacher = make_adapter(LORA_INIT_KAIMING_ZERO, 1, nthreads, wq, wk, wv);
    student = make_adapter(LORA_INIT_KAIMING_ZERO, 2, nthreads, wq, wk, wv);
    if (!teacher || !student)
        goto done;
    /* The teacher's hidden update: nonzero B on Q and V (A keeps its random init). */
    fill_normal(&rng, b_hidden, D_MODEL * RANK, TEACHER_B_STD);
    if (failed(lora_adapter_set_param(teacher, LORA_TARGET_Q, LORA_B, b_hidden,
                                      D_MODEL * RANK),
               "set_param (teacher Q B)", teacher))
        goto done;
    fill_normal(&rng, b_hidden, D_MODEL * RANK, TEACHER_B_STD);
    if (failed(lora_adapter_set_param(teacher, LORA_TARGET_V, LORA_B, b_hidden,
                                      D_MODEL * RANK),
               "set_param (teacher V B)", teacher))
        goto done;

    /* ---- header ---- */
    int64_t threads = 0, head_dim = 0;
    size_t n_params = 0;
    if (failed(lora_adapter_get_config_int(student, LORA_CFG_THREADS, &threads), "get_config",
               student) ||
        failed(lora_adapter_get_config_int(student, LORA_CFG_HEAD_DIM, &head_dim),
               "get_config", student) ||
        failed(lora_adapter_param_count(student, &n_params), "param_count", student))
        goto done;
    printf("liblora %s demo: fine-tune, save, load, merge\n", lora_version_string());
    if (lora_version_number() != LORA_VERSION_NUMBER)
        printf("note: built against lora.h %d.%d.%d but running liblora %s\n",
               LORA_VERSION_MAJOR, LORA_VERSION_MINOR, LORA_VERSION_PATCH,
               lora_version_string());
    printf("layer: d_model %d, %d heads x %lld, LoRA rank %d on Q and V (%zu trainable "
           "floats); batch %d x L %d; %lld thread%s\n",
           D_MODEL, N_HEADS, (long long)head_dim, RANK, n_params, BATCH, SEQ_LEN,
           (long long)threads, threads == 1 ? "" : "s");

    /* What the paper's threshold statistic says about inputs like these (own random
     * stream, so the training data below does not depend on it). */
    uint64_t probe_rng = 7;
    fill_normal(&probe_rng, x, N_ACT, 1.0);
    lora_threshold_report rep = {.struct_size = sizeof rep};
    if (failed(lora_threshold_estimate(student, x, BATCH, SEQ_LEN, &rep),
               "threshold_estimate", student))
        goto done;
    printf("threshold: Gamma/sqrt(ln L) %.2f, score bound R %.1f -> AUTO recommends %s\n",
           rep.gamma_ratio, rep.score_bound, backend_name(rep.recommended_backend));

    /* ---- 1. fine-tune with AdamW ---- */
    if (failed(lora_optimizer_create(&opt, student, LORA_OPTIMIZER_ADAMW), "optimizer_create",
               student) ||
        opt_failed(lora_optimizer_set_double(opt, LORA_OPT_LR, lr), "optimizer LR", opt))
        goto done;
    printf("\n1. fine-tune: AdamW lr %g, %d steps, fresh random inputs every step; "
           "loss = 1/2 sum (out - target)^2\n",
           lr, steps);
    printf("%6s %14s %10s  %s\n", "step", "loss", "ms/step", "backend");

    double first_loss = 0.0, loss = 0.0, total_ms = 0.0;
    int n_exact = 0, n_poly = 0;
    for (int step = 0; step <= steps; step++) {
        fill_normal(&rng, x, N_ACT, 1.0);
        if (failed(lora_forward(teacher, x, BATCH, SEQ_LEN, target), "teacher forward",
                   teacher))
            goto done;

        const double t0 = now_ms();
        if (failed(lora_adapter_zero_grad(student), "zero_grad", student) ||
            failed(lora_forward(student, x, BATCH, SEQ_LEN, out), "forward", student))
            goto done;
        int st = lora_mse_loss(out, target, N_ACT, &loss, dout);
        if (st != LORA_OK) {
            fprintf(stderr, "demo: lora_mse_loss failed: %s\n", lora_status_string(st));
            goto done;
        }
        if (step == steps) /* the last pass only measures the final loss */
            break;
        if (failed(lora_backward(student, dout, NULL), "backward", student) ||
            opt_failed(lora_optimizer_step(opt, student), "optimizer step", opt))
            goto done;
        const double ms = now_ms() - t0;
        total_ms += ms;

        lora_run_info info = {.struct_size = sizeof info};
        if (failed(lora_adapter_get_run_info(student, &info), "get_run_info", student))
            goto done;
        n_exact += info.backend == LORA_BACKEND_EXACT;
        n_poly += info.backend == LORA_BACKEND_POLY;
        if (step == 0)
            first_loss = loss;
        if (step % print_every == 0 || step == steps - 1) {
            printf("%6d %14.4f %10.2f  %s", step, loss, ms, backend_name(info.backend));
            if (info.backend == LORA_BACKEND_POLY)
                printf(" (degree %lld, eta %.1e)", (long long)info.poly_degree,
                       info.error_bound);
            printf("\n");
        }
    }
    printf("%6d %14.4f %10s  (final loss, no update)\n", steps, loss, "-");
    printf("loss %.4g -> %.4g (%.3gx lower); %.2f ms/step (forward + loss + backward + "
           "AdamW step); backends: EXACT %d, POLY %d steps\n",
           first_loss, loss, first_loss / loss, total_ms / steps, n_exact, n_poly);
    if (!(loss * 10.0 <= first_loss)) {
        fprintf(stderr, "demo: FAILED: the loss fell only %.3gx, not tenfold (try another "
                        "learning rate or more steps)\n",
                first_loss / loss);
        goto done;
    }

    /* A held-out input for the checks below, and the student's output on it. */
    fill_normal(&rng, x, N_ACT, 1.0);
    if (failed(lora_forward(student, x, BATCH, SEQ_LEN, out), "forward (held-out)",
               student))
        goto done;

    /* ---- 2. save as a PEFT directory and as a llama.cpp GGUF file ---- */
    const char *tmp = getenv("TMPDIR");
    if (!tmp || !*tmp)
        tmp = "/tmp";
    snprintf(tmpdir, sizeof tmpdir, "%s/liblora-demo-XXXXXX", tmp);
    if (!mkdtemp(tmpdir)) {
        perror("demo: mkdtemp");
        fprintf(stderr, "demo: cannot create a temporary directory in %s (set TMPDIR)\n",
                tmp);
        tmpdir[0] = '\0';
        goto done;
    }
    snprintf(peftdir, sizeof peftdir, "%s/adapter", tmpdir);
    snprintf(ggufpath, sizeof ggufpath, "%s/adapter.gguf", tmpdir);
    const int64_t layer = 0; /* a file holds a set of layers; this one has layer 0 only */
    if (failed(lora_save_peft(peftdir, &student, &layer, 1), "save_peft", student) ||
        failed(lora_save_gguf(ggufpath, &student, &layer, 1, "llama"), "save_gguf", student))
        goto done;
    printf("\n2. saved the student as a PEFT adapter (%s) and as a GGUF file:\n", peftdir);
    list_dir(peftdir);
    list_dir(tmpdir);

    /* ---- 3. load each back into a fresh adapter ---- */
    /* The files hold rank, alpha, targets and factors; the config supplies the rest
     * (d_model, heads, threads). The base weights belong to the base model: set them. */
    if (!(load_cfg = make_config(LORA_INIT_KAIMING_ZERO, 0, nthreads)))
        goto done;
    double diff, max_out;
    for (int gguf = 0; gguf < 2; gguf++) {
        const char *what = gguf ? "GGUF" : "PEFT", *path = gguf ? ggufpath : peftdir;
        size_t count = 0;
        int64_t loaded_layer = -1;
        lora_adapter_destroy(loaded);
        loaded = NULL;
        const int st = gguf ? lora_load_gguf(&loaded, &loaded_layer, 1, &count, path, load_cfg)
                            : lora_load_peft(&loaded, &loaded_layer, 1, &count, path, load_cfg);
        if (st != LORA_OK) {
            fprintf(stderr, "demo: loading %s %s failed: %s (%s)\n", what, path,
                    lora_status_string(st), lora_config_last_error(load_cfg));
            goto done;
        }
        if (count != 1 || loaded_layer != 0) {
            fprintf(stderr, "demo: %s file has %zu layers (first %lld), expected layer 0\n",
                    what, count, (long long)loaded_layer);
            goto done;
        }
        if (set_base(loaded, wq, wk, wv) ||
            failed(lora_forward(loaded, x, BATCH, SEQ_LEN, out2), "forward (loaded)", loaded))
            goto done;
        /* Factors are saved as F32 and alpha = r is exact in GGUF's F32, so they come back
         * exactly; same weights, inputs and thread count give bitwise the same output. */
        compare(out, out2, N_ACT, &diff, &max_out);
        const int same = memcmp(out, out2, sizeof out) == 0;
        printf("%s3. loaded the %s file into a fresh adapter: output on a held-out batch %s "
               "the student's (max |diff| %.3g)\n",
               gguf ? "" : "\n", what, same ? "is bitwise" : "DIFFERS from", diff);
        if (!same) {
            fprintf(stderr, "demo: FAILED: the adapter loaded from %s differs from the "
                            "student\n",
                    what);
            goto done;
        }
    }

    /* ---- 4. merge ---- */
    /* W + s*B*A into copies of the base weights; K is not adapted and stays as is. */
    memcpy(wq_merged, wq, sizeof wq);
    memcpy(wv_merged, wv, sizeof wv);
    if (failed(lora_adapter_merge(student, LORA_TARGET_Q, wq_merged, N_W), "merge Q",
               student) ||
        failed(lora_adapter_merge(student, LORA_TARGET_V, wv_merged, N_W), "merge V",
               student))
        goto done;
    /* A plain layer on the merged weights: every LoRA factor zero, so it adds nothing. */
    plain = make_adapter(LORA_INIT_ZERO, 0, nthreads, wq_merged, wk, wv_merged);
    if (!plain ||
        failed(lora_forward(plain, x, BATCH, SEQ_LEN, out2), "forward (merged)", plain))
        goto done;
    compare(out, out2, N_ACT, &diff, &max_out);
    const double tol = MERGE_RTOL * max_out;
    printf("\n4. merged W + s*B*A into the base weights; a plain layer on them gives the "
           "student's output\n"
           "   max |diff| %.3g (max |out| %.3g; tolerance %.0e * max |out| = %.3g, float "
           "rounding): %s\n",
           diff, max_out, MERGE_RTOL, tol, diff <= tol ? "ok" : "FAILED");
    if (!(diff <= tol)) {
        fprintf(stderr, "demo: FAILED: the merged layer's output differs from the "
                        "student's by more than the tolerance\n");
        goto done;
    }
    /* The same thing without leaving the student: lora_forward_merged keeps the merged
     * weights inside the adapter, for inference. */
    if (failed(lora_forward_merged(student, x, BATCH, SEQ_LEN, out2), "forward_merged",
               student))
        goto done;
    compare(out, out2, N_ACT, &diff, &max_out);
    printf("   lora_forward_merged on the student: max |diff| %.3g: %s\n", diff,
           diff <= tol ? "ok" : "FAILED");
    if (!(diff <= tol)) {
        fprintf(stderr, "demo: FAILED: lora_forward_merged differs from lora_forward by "
                        "more than the tolerance\n");
        goto done;
    }

    printf("\nall checks passed in %.1f s\n", (now_ms() - t_start) * 1e-3);
    rc = EXIT_SUCCESS;

done:
    if (tmpdir[0]) {
        remove_dir(peftdir);
        remove_dir(tmpdir);
    }
    lora_config_destroy(load_cfg);
    lora_optimizer_destroy(opt);
    lora_adapter_destroy(plain);
    lora_adapter_destroy(loaded);
    lora_adapter_destroy(student);
    lora_adapter_destroy(teacher);
    return rc;
}
