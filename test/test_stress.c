/* stress_suite: N threads, each driving its own adapters through many training and
 * serving steps at once, all borrowing one shared read-only base
 * (lora_adapter_set_base_borrowed) and allocating through one shared, atomically
 * counting allocator. Every thread's results (losses, outputs, estimates, final
 * parameters) must be bitwise equal to the same work run serially, and nothing may stay
 * allocated. `make check-tsan` runs this suite under ThreadSanitizer.
 *
 * Jobs with an odd id use LORA_CFG_THREADS = 2, the others 1: the caller's threads over
 * distinct handles (lora.h's threading contract) and, inside them, the adapters' own
 * worker pools (pthreads, so ThreadSanitizer follows them too).
 * STRESS_THREADS and STRESS_STEPS (environment) scale the run; defaults 4 and 24. */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "suites.h"

#define D_MODEL 16
#define N_HEADS 4
#define N_KV 2
#define HEAD_DIM 4
#define Q_DIM (N_HEADS * HEAD_DIM)
#define KV_DIM (N_KV * HEAD_DIM)
#define BATCH 2
#define LEN_Q 6
#define LEN_KV 9
#define MAX_PARAMS 4096

/* ---- the shared allocator --------------------------------------------------------- */

typedef struct shared_alloc {
    atomic_long calls, live;
} shared_alloc;

static void *s_alloc(void *user, size_t size)
{
    shared_alloc *s = user;
    atomic_fetch_add(&s->calls, 1);
    void *p = malloc(size ? size : 1);
    if (p)
        atomic_fetch_add(&s->live, 1);
    return p;
}

static void s_free(void *user, void *ptr)
{
    shared_alloc *s = user;
    atomic_fetch_sub(&s->live, 1);
    free(ptr);
}

/* ---- the shared base --------------------------------------------------------------- */

typedef struct shared_base {
    float *w[4], *bias[4];
    size_t nw[4], nb[4];
} shared_base;

static const int tbits[4] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V, LORA_TARGET_O};

static void base_init(shared_base *b)
{
    const int outs[4] = {Q_DIM, KV_DIM, KV_DIM, D_MODEL};
    const int ins[4] = {D_MODEL, D_MODEL, D_MODEL, Q_DIM};
    for (int t = 0; t < 4; t++) {
        b->nw[t] = (size_t)(outs[t] * ins[t]);
        b->nb[t] = (size_t)outs[t];
        b->w[t] = malloc(b->nw[t] * sizeof(float));
        b->bias[t] = malloc(b->nb[t] * sizeof(float));
        ck_assert(b->w[t] && b->bias[t]);
        fill_uniform(b->w[t], b->nw[t], 100 + (uint64_t)t, 1.0f / sqrtf((float)ins[t]));
        fill_uniform(b->bias[t], b->nb[t], 200 + (uint64_t)t, 0.1f);
    }
}

static void base_free(shared_base *b)
{
    for (int t = 0; t < 4; t++) {
        free(b->w[t]);
        free(b->bias[t]);
    }
}

/* ---- one worker's job -------------------------------------------------------------- */

typedef struct job {
    int id, steps;
    const shared_base *base;
    shared_alloc *alloc;
    /* results */
    int status;          /* first failing status (LORA_OK if none) */
    char where[96];
    double loss_sum;     /* summed in order, compared bitwise */
    float out[BATCH * LEN_Q * D_MODEL];
    float served[BATCH * LEN_Q * D_MODEL];
    lora_threshold_report report;
    float params[MAX_PARAMS];
    size_t nparams;
} job;

#define TRY(j, call)                                                                    \
    do {                                                                                \
        const int st_ = (call);                                                         \
        if (st_ != LORA_OK) {                                                           \
            (j)->status = st_;                                                          \
            snprintf((j)->where, sizeof (j)->where, "%s", #call);                       \
            goto done;                                                                  \
        }                                                                               \
    } while (0)

static lora_adapter *make_adapter(job *j, int causal, int rank, int backend, int *st)
{
    const lora_allocator a = {s_alloc, s_free, j->alloc};
    lora_config *cfg = NULL;
    lora_adapter *ad = NULL;
    *st = lora_config_create_with_allocator(&cfg, &a);
    const int64_t iv[][2] = {{LORA_CFG_D_MODEL, D_MODEL}, {LORA_CFG_N_HEADS, N_HEADS},
                             {LORA_CFG_N_KV_HEADS, N_KV}, {LORA_CFG_RANK, rank},
                             {LORA_CFG_TARGETS, 15},      {LORA_CFG_OUT_PROJ, 1},
                             {LORA_CFG_CAUSAL, causal},   {LORA_CFG_THREADS, 1 + j->id % 2},
                             {LORA_CFG_BACKEND, backend}, {LORA_CFG_SEED, j->id * 7 + rank},
                             {LORA_CFG_INIT, LORA_INIT_GAUSSIAN}};
    for (size_t i = 0; *st == LORA_OK && i < sizeof iv / sizeof iv[0]; i++)
        *st = lora_config_set_int(cfg, (int)iv[i][0], iv[i][1]);
    if (*st == LORA_OK)
        *st = lora_adapter_create(&ad, cfg);
    lora_config_destroy(cfg);
    for (int t = 0; *st == LORA_OK && t < 4; t++)
        *st = lora_adapter_set_base_borrowed(ad, tbits[t], j->base->w[t], j->base->bias[t]);
    if (*st != LORA_OK) {
        lora_adapter_destroy(ad);
        return NULL;
    }
    /* B = 0 at init: give it values so every gradient is live. */
    size_t n = 0;
    float *p = NULL;
    *st = lora_adapter_param_count(ad, &n);
    if (*st == LORA_OK && (p = malloc(n * sizeof(float))) != NULL) {
        fill_uniform(p, n, 300 + (uint64_t)j->id, 0.2f);
        *st = lora_adapter_set_params_flat(ad, p, n);
    }
    free(p);
    return ad;
}

static void *run_job(void *arg)
{
    job *j = arg;
    j->status = LORA_OK;
    int st;
    lora_adapter *self = NULL, *cross = NULL, *serve = NULL;
    lora_optimizer *opt_self = NULL, *opt_cross = NULL;
    float x[BATCH * LEN_KV * D_MODEL], xq[BATCH * LEN_Q * D_MODEL], target[BATCH * LEN_Q * D_MODEL];
    float dout[BATCH * LEN_Q * D_MODEL], dx[BATCH * LEN_KV * D_MODEL];
    const int rank = 2 + j->id % 3;
    self = make_adapter(j, 1, rank, LORA_BACKEND_AUTO, &st);
    TRY(j, st);
    cross = make_adapter(j, 0, rank, LORA_BACKEND_EXACT, &st);
    TRY(j, st);
    serve = make_adapter(j, 1, rank, LORA_BACKEND_EXACT, &st);
    TRY(j, st);
    TRY(j, lora_optimizer_create(&opt_self, self, LORA_OPTIMIZER_ADAMW));
    TRY(j, lora_optimizer_create(&opt_cross, cross, LORA_OPTIMIZER_SGD));
    TRY(j, lora_optimizer_set_double(opt_cross, LORA_OPT_MOMENTUM, 0.9));
    TRY(j, lora_optimizer_set_double(opt_self, LORA_OPT_LR, 1e-2));
    j->loss_sum = 0.0;
    for (int s = 0; s < j->steps; s++) {
        const uint64_t seed = (uint64_t)j->id * 100003u + (uint64_t)s * 7u;
        fill_uniform(x, sizeof x / sizeof x[0], seed, 1.0f);
        fill_uniform(xq, sizeof xq / sizeof xq[0], seed + 1, 1.0f);
        fill_uniform(target, sizeof target / sizeof target[0], seed + 2, 0.5f);
        const size_t nout = (size_t)(BATCH * LEN_Q * D_MODEL);
        double loss;
        /* Self-attention training step. */
        TRY(j, lora_adapter_zero_grad(self));
        TRY(j, lora_forward(self, xq, BATCH, LEN_Q, j->out));
        TRY(j, lora_mse_loss(j->out, target, nout, &loss, dout));
        j->loss_sum += loss;
        TRY(j, lora_backward(self, dout, dx));
        TRY(j, lora_optimizer_step(opt_self, self));
        /* Cross-attention training step. */
        TRY(j, lora_adapter_zero_grad(cross));
        TRY(j, lora_forward_cross(cross, xq, x, BATCH, LEN_Q, LEN_KV, j->out));
        TRY(j, lora_mse_loss(j->out, target, nout, &loss, dout));
        j->loss_sum += loss;
        TRY(j, lora_backward_cross(cross, dout, NULL, dx));
        TRY(j, lora_optimizer_step(opt_cross, cross));
        /* Serving: hot-swap the trained factors in, merged and unmerged forwards. */
        if (s % 4 == 3) {
            TRY(j, lora_adapter_copy_params(serve, self));
            TRY(j, lora_forward_merged(serve, xq, BATCH, LEN_Q, j->served));
            TRY(j, lora_forward(serve, xq, BATCH, LEN_Q, j->out));
            j->report.struct_size = sizeof j->report;
            TRY(j, lora_threshold_estimate(self, x, BATCH, LEN_KV, &j->report));
        }
    }
    TRY(j, lora_adapter_param_count(self, &j->nparams));
    if (j->nparams > MAX_PARAMS) {
        j->status = LORA_ERR_SHAPE;
        goto done;
    }
    TRY(j, lora_adapter_get_params_flat(self, j->params, j->nparams));
done:
    lora_optimizer_destroy(opt_self);
    lora_optimizer_destroy(opt_cross);
    lora_adapter_destroy(self);
    lora_adapter_destroy(cross);
    lora_adapter_destroy(serve);
    return NULL;
}

static int env_int(const char *name, int dflt, int lo, int hi)
{
    const char *v = getenv(name);
    if (!v || !*v)
        return dflt;
    const long n = strtol(v, NULL, 10);
    return n < lo ? lo : (n > hi ? hi : (int)n);
}

START_TEST(test_threads_match_serial)
{
    const int nthreads = env_int("STRESS_THREADS", 4, 1, 64);
    const int steps = env_int("STRESS_STEPS", 24, 1, 100000);
    shared_base base;
    base_init(&base);
    shared_alloc alloc;
    atomic_init(&alloc.calls, 0);
    atomic_init(&alloc.live, 0);
    job *serial = calloc((size_t)nthreads, sizeof *serial);
    job *par = calloc((size_t)nthreads, sizeof *par);
    pthread_t *tid = calloc((size_t)nthreads, sizeof *tid);
    ck_assert(serial && par && tid);
    for (int i = 0; i < nthreads; i++) {
        serial[i] = (job){.id = i, .steps = steps, .base = &base, .alloc = &alloc};
        par[i] = serial[i];
        run_job(&serial[i]);
        ck_assert_msg(serial[i].status == LORA_OK, "serial job %d: %s gave %d", i,
                      serial[i].where, serial[i].status);
    }
    ck_assert_int_eq(atomic_load(&alloc.live), 0);
    for (int i = 0; i < nthreads; i++)
        ck_assert_int_eq(pthread_create(&tid[i], NULL, run_job, &par[i]), 0);
    for (int i = 0; i < nthreads; i++)
        ck_assert_int_eq(pthread_join(tid[i], NULL), 0);
    for (int i = 0; i < nthreads; i++) {
        const job *a = &serial[i], *b = &par[i];
        ck_assert_msg(b->status == LORA_OK, "thread %d: %s gave %d", i, b->where, b->status);
        ck_assert_msg(memcmp(&a->loss_sum, &b->loss_sum, sizeof a->loss_sum) == 0,
                      "thread %d: loss sum %.17g, serial %.17g", i, b->loss_sum, a->loss_sum);
        ck_assert_msg(memcmp(a->out, b->out, sizeof a->out) == 0, "thread %d: out differs", i);
        ck_assert_msg(memcmp(a->served, b->served, sizeof a->served) == 0,
                      "thread %d: merged serving output differs", i);
        ck_assert_msg(memcmp(&a->report, &b->report, sizeof a->report) == 0,
                      "thread %d: threshold report differs", i);
        ck_assert_msg(a->nparams == b->nparams &&
                          memcmp(a->params, b->params, a->nparams * sizeof(float)) == 0,
                      "thread %d: trained parameters differ", i);
        /* Different threads did different work. */
        if (i > 0)
            ck_assert(memcmp(&par[0].loss_sum, &b->loss_sum, sizeof b->loss_sum) != 0);
    }
    ck_assert_msg(atomic_load(&alloc.live) == 0, "%ld blocks still allocated",
                  (long)atomic_load(&alloc.live));
    free(serial);
    free(par);
    free(tid);
    base_free(&base);
}
END_TEST

Suite *stress_suite(void)
{
    Suite *s = suite_create("stress");
    TCase *tc = tcase_create("stress");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_threads_match_serial);
    suite_add_tcase(s, tc);
    return s;
}
