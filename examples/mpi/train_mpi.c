/* train_mpi.c: data-parallel LoRA fine-tuning over MPI, checked against one process.
 *
 * Every rank builds the same adapter (same config and seed, so the same initial LoRA
 * factors) and the same data; rank r takes its contiguous shard of the global batch.
 * One step:
 *   forward + lora_mse_loss on the shard; dout scaled by 1/N (N = global batch), so the
 *   loss is the mean over the batch of 1/2*|out - target|^2;
 *   backward: the shard's gradient; MPI_Allreduce(SUM) of the flat gradient vector
 *   (lora_adapter_get_grads_flat) gives every rank the gradient of the whole batch
 *   (the average of the per-sample gradients), written back with
 *   lora_adapter_set_grads_flat;
 *   the same AdamW step (lora_optimizer_step) on every rank, so the ranks stay in
 *   lockstep: their parameters are bitwise equal after every step.
 * Rank 0 then repeats the training in a single adapter on the whole batch and compares
 * the final parameters. They agree up to float rounding: the library sums the batch's
 * contributions in one order, the ranks' partial sums are added in another.
 *
 * Build: make check-mpi (mpicc; see docs/mpi.md). Run:
 *   mpirun -np 2 --oversubscribe lib/examples/mpi/train_mpi [steps]
 * (lora_adapter_param_count/_get_grads_flat/_set_grads_flat and lora_optimizer_* need
 * liblora after 0.1.0.)
 * Exit status 0 when the data-parallel and single-process parameters agree within
 * TOLERANCE (relative to the largest parameter), 1 otherwise.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include <lora.h>

#define D_MODEL 16
#define N_HEADS 2
#define RANK 4
#define GLOBAL_BATCH 8
#define SEQ_LEN 12
#define LR 0.05
#define DEFAULT_STEPS 20
/* max |p_parallel - p_single| / max(1, max |p_single|). Measured here: 2.8e-7 after the
 * default 20 AdamW steps, 4.9e-7 after 300 (docs/mpi.md). */
#define TOLERANCE 1e-5

static const int targets[] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V};
#define N_TARGETS 3

/* Reports a failed call with the library's message and aborts every rank. */
static void check(int st, const char *what, const lora_adapter *ad)
{
    if (st != LORA_OK) {
        fprintf(stderr, "%s failed: %s (%s)\n", what, lora_status_string(st),
                ad ? lora_adapter_last_error(ad) : "");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
}

/* Deterministic values in [-scale, scale]: the same on every rank. */
static void fill(float *v, size_t n, uint64_t seed, float scale)
{
    uint64_t s = seed * 0x9E3779B97F4A7C15u + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v[i] = scale * (float)((double)(s >> 11) * 0x1p-52 - 1.0);
    }
}

/* A layer with the shared frozen base; LoRA factors from the seed (B = 0). */
static lora_adapter *make_adapter(const float *w, int adapt_targets)
{
    lora_config *cfg = NULL;
    lora_adapter *ad = NULL;
    check(lora_config_create(&cfg), "lora_config_create", NULL);
    check(lora_config_set_int(cfg, LORA_CFG_D_MODEL, D_MODEL), "set D_MODEL", NULL);
    check(lora_config_set_int(cfg, LORA_CFG_N_HEADS, N_HEADS), "set N_HEADS", NULL);
    check(lora_config_set_int(cfg, LORA_CFG_RANK, RANK), "set RANK", NULL);
    check(lora_config_set_int(cfg, LORA_CFG_TARGETS, adapt_targets), "set TARGETS", NULL);
    check(lora_config_set_int(cfg, LORA_CFG_BACKEND, LORA_BACKEND_EXACT), "set BACKEND",
          NULL);
    check(lora_config_set_int(cfg, LORA_CFG_THREADS, 1), "set THREADS", NULL);
    check(lora_config_set_int(cfg, LORA_CFG_SEED, 2024), "set SEED", NULL);
    check(lora_adapter_create(&ad, cfg), "lora_adapter_create", NULL);
    lora_config_destroy(cfg);
    for (int t = 0; t < N_TARGETS; t++)
        check(lora_adapter_set_base(ad, targets[t], w + (size_t)t * D_MODEL * D_MODEL, NULL),
              "lora_adapter_set_base", ad);
    return ad;
}

/* AdamW as torch.optim.AdamW (weight decay 0.01), state in the handle. */
static lora_optimizer *make_optimizer(const lora_adapter *ad)
{
    lora_optimizer *opt = NULL;
    check(lora_optimizer_create(&opt, ad, LORA_OPTIMIZER_ADAMW), "lora_optimizer_create",
          ad);
    if (lora_optimizer_set_double(opt, LORA_OPT_LR, LR) != LORA_OK ||
        lora_optimizer_set_double(opt, LORA_OPT_WEIGHT_DECAY, 0.01) != LORA_OK) {
        fprintf(stderr, "optimizer: %s\n", lora_optimizer_last_error(opt));
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    return opt;
}

static void adamw_step(lora_optimizer *opt, lora_adapter *ad)
{
    if (lora_optimizer_step(opt, ad) != LORA_OK) {
        fprintf(stderr, "lora_optimizer_step: %s\n", lora_optimizer_last_error(opt));
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
}

/* One forward/backward on `batch` samples of x; returns the shard's loss term
 * sum_b 1/2|out_b - target_b|^2 / N and leaves the gradient of that in ad. */
static double local_step(lora_adapter *ad, const float *x, const float *target,
                         int64_t batch, float *out, float *dout)
{
    const size_t n = (size_t)batch * SEQ_LEN * D_MODEL;
    double loss = 0;
    check(lora_adapter_zero_grad(ad), "zero_grad", ad);
    if (batch == 0)
        return 0.0; /* more ranks than samples: this rank contributes nothing */
    check(lora_forward(ad, x, batch, SEQ_LEN, out), "lora_forward", ad);
    check(lora_mse_loss(out, target, n, &loss, dout), "lora_mse_loss", ad);
    for (size_t i = 0; i < n; i++)
        dout[i] /= (float)GLOBAL_BATCH;
    check(lora_backward(ad, dout, NULL), "lora_backward", ad);
    return loss / GLOBAL_BATCH;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const int steps = argc > 1 ? atoi(argv[1]) : DEFAULT_STEPS;

    /* The same data everywhere: base weights, inputs, and a teacher's outputs (the
     * same base with a hidden LoRA update on Q and V) as targets. */
    const size_t per_sample = (size_t)SEQ_LEN * D_MODEL;
    const size_t n_all = GLOBAL_BATCH * per_sample;
    float *w = malloc(N_TARGETS * D_MODEL * D_MODEL * sizeof *w);
    float *x = malloc(n_all * sizeof *x), *target = malloc(n_all * sizeof *target);
    float *out = malloc(n_all * sizeof *out), *dout = malloc(n_all * sizeof *dout);
    fill(w, N_TARGETS * D_MODEL * D_MODEL, 1, 0.3f);
    fill(x, n_all, 2, 1.0f);
    lora_adapter *teacher = make_adapter(w, LORA_TARGET_Q | LORA_TARGET_V);
    {
        float a[RANK * D_MODEL], b[D_MODEL * RANK];
        fill(a, RANK * D_MODEL, 3, 0.5f);
        fill(b, D_MODEL * RANK, 4, 0.5f);
        check(lora_adapter_set_param(teacher, LORA_TARGET_Q, LORA_B, b, D_MODEL * RANK),
              "teacher B", teacher);
        check(lora_adapter_set_param(teacher, LORA_TARGET_V, LORA_A, a, RANK * D_MODEL),
              "teacher A", teacher);
        check(lora_adapter_set_param(teacher, LORA_TARGET_V, LORA_B, b, D_MODEL * RANK),
              "teacher B", teacher);
        check(lora_forward(teacher, x, GLOBAL_BATCH, SEQ_LEN, target), "teacher forward",
              teacher);
    }
    lora_adapter_destroy(teacher);

    /* This rank's shard: samples [lo, hi). */
    const int lo = (int)((long)GLOBAL_BATCH * rank / size);
    const int hi = (int)((long)GLOBAL_BATCH * (rank + 1) / size);
    lora_adapter *ad = make_adapter(w, LORA_TARGET_Q | LORA_TARGET_K | LORA_TARGET_V);
    lora_optimizer *opt = make_optimizer(ad);
    size_t np = 0;
    check(lora_adapter_param_count(ad, &np), "lora_adapter_param_count", ad);
    float *g = malloc(np * sizeof *g), *p = malloc(np * sizeof *p);
    if (rank == 0)
        printf("train_mpi: %d ranks, global batch %d (rank 0: samples %d..%d), "
               "%zu LoRA parameters, %d AdamW steps\n", size, GLOBAL_BATCH, lo, hi - 1, np,
               steps);

    for (int step = 0; step < steps; step++) {
        double loss = local_step(ad, x + (size_t)lo * per_sample,
                                 target + (size_t)lo * per_sample, hi - lo, out, dout);
        check(lora_adapter_get_grads_flat(ad, g, np), "get_grads_flat", ad);
        MPI_Allreduce(MPI_IN_PLACE, g, (int)np, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        MPI_Allreduce(MPI_IN_PLACE, &loss, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        check(lora_adapter_set_grads_flat(ad, g, np), "set_grads_flat", ad);
        adamw_step(opt, ad);
        if (rank == 0 && (step % 5 == 0 || step == steps - 1))
            printf("step %3d  loss %.6f\n", step, loss);
    }
    check(lora_adapter_get_params_flat(ad, p, np), "get_params_flat", ad);

    /* Every rank must hold the same parameters (lockstep). */
    float *p0 = malloc(np * sizeof *p0);
    memcpy(p0, p, np * sizeof *p);
    MPI_Bcast(p0, (int)np, MPI_FLOAT, 0, MPI_COMM_WORLD);
    int same = memcmp(p0, p, np * sizeof *p) == 0, all_same = 0;
    MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);

    int ok = 0;
    if (rank == 0) {
        /* The single-process reference: the whole batch in one adapter. */
        lora_adapter *ref = make_adapter(w, LORA_TARGET_Q | LORA_TARGET_K | LORA_TARGET_V);
        lora_optimizer *ref_opt = make_optimizer(ref);
        float *pr = malloc(np * sizeof *pr);
        double loss = 0;
        for (int i = 0; i < steps; i++) {
            loss = local_step(ref, x, target, GLOBAL_BATCH, out, dout);
            adamw_step(ref_opt, ref);
        }
        check(lora_adapter_get_params_flat(ref, pr, np), "get_params_flat", ref);
        double max_diff = 0, max_abs = 0;
        for (size_t i = 0; i < np; i++) {
            max_diff = fmax(max_diff, fabs((double)p[i] - (double)pr[i]));
            max_abs = fmax(max_abs, fabs((double)pr[i]));
        }
        const double rel = max_diff / fmax(1.0, max_abs);
        printf("final parameters (first 6 of %zu):\n  data-parallel:", np);
        for (size_t i = 0; i < 6; i++)
            printf(" %+.7f", p[i]);
        printf("\n  single      :");
        for (size_t i = 0; i < 6; i++)
            printf(" %+.7f", pr[i]);
        printf("\nlast single-process loss %.6f\n", loss);
        printf("ranks in lockstep: %s\n", all_same ? "yes (bitwise equal)" : "NO");
        printf("max |data-parallel - single| = %.3g (max |p| = %.3g, relative %.3g, "
               "tolerance %.0e)\n", max_diff, max_abs, rel, TOLERANCE);
        ok = all_same && rel <= TOLERANCE && steps > 0;
        printf("train_mpi: %s\n", ok ? "PASS" : "FAIL");
        free(pr);
        lora_optimizer_destroy(ref_opt);
        lora_adapter_destroy(ref);
    }
    MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);

    lora_optimizer_destroy(opt);
    lora_adapter_destroy(ad);
    free(w); free(x); free(target); free(out); free(dout); free(g); free(p); free(p0);
    MPI_Finalize();
    return ok ? 0 : 1;
}
