/* threads_suite: for a given LORA_CFG_THREADS, results are bitwise reproducible (same
 * adapter twice, and a second adapter), with fewer and more (batch, kv head) tasks than
 * threads; and different thread counts agree with each other. The worker pool seen
 * from outside: threads start on first use, are reused and joined by destroy (BLIS
 * starts none); training goes on in a forked child and grandchild; a process that
 * cannot create threads gets the same results; adapters work inside a caller's OpenMP
 * team. */
#define _GNU_SOURCE /* setresuid, setresgid */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <check.h>
#include <lora.h>
#include <omp.h>

#include "fixtures.h"
#include "helpers.h"
#include "suites.h"

typedef struct run {
    float *out, *dx, *dxkv, *grads;
} run;

typedef struct det_case {
    ref_config c;
    int cross, batch, len_q, len_kv;
} det_case;

/* tasks = batch * n_kv_heads: 1 (< 2 threads) and 6 (> 2 threads). */
static const det_case det_cases[] = {
    {{.d_model = 16, .n_heads = 2, .n_kv_heads = 1, .rank = 4, .targets = 15, .causal = 1,
      .out_proj = 1, .bias = 1},
     0, 1, 150, 0},
    {{.d_model = 16, .n_heads = 4, .n_kv_heads = 2, .rank = 4, .targets = 15, .causal = 1,
      .out_proj = 1, .bias = 1},
     0, 3, 70, 0},
    {{.d_model = 16, .n_heads = 2, .rank = 4, .targets = 7, .causal = 1}, 1, 1, 66, 130},
    {{.d_model = 16, .n_heads = 4, .n_kv_heads = 2, .rank = 4, .targets = 7}, 1, 3, 40, 70},
};

static size_t grads_count(const ref_layer *l)
{
    size_t n = 0;
    for (int t = 0; t < REF_NPROJ; t++)
        if (ref_is_adapted(l, t))
            n += (size_t)(l->rank * (l->in[t] + l->out[t]));
    return n;
}

static void do_run(lora_adapter *ad, const ref_layer *l, const ref_problem *p, const float *xq,
                   const float *xkv, const float *dout, run *r)
{
    const int tb[4] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V, LORA_TARGET_O};
    ck_assert_int_eq(lora_adapter_zero_grad(ad), LORA_OK);
    if (p->cross) {
        ck_assert_int_eq(lora_forward_cross(ad, xq, xkv, p->batch, p->len_q, p->len_kv, r->out),
                         LORA_OK);
        ck_assert_int_eq(lora_backward_cross(ad, dout, r->dx, r->dxkv), LORA_OK);
    } else {
        ck_assert_int_eq(lora_forward(ad, xq, p->batch, p->len_q, r->out), LORA_OK);
        ck_assert_int_eq(lora_backward(ad, dout, r->dx), LORA_OK);
    }
    float *g = r->grads;
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_is_adapted(l, t))
            continue;
        const size_t na = (size_t)(l->rank * l->in[t]), nb = (size_t)(l->out[t] * l->rank);
        ck_assert_int_eq(lora_adapter_get_grad(ad, tb[t], LORA_A, g, na), LORA_OK);
        g += na;
        ck_assert_int_eq(lora_adapter_get_grad(ad, tb[t], LORA_B, g, nb), LORA_OK);
        g += nb;
    }
}

static void run_alloc(run *r, size_t nout, size_t nx, size_t nxkv, size_t ng)
{
    r->out = malloc(nout * sizeof(float));
    r->dx = malloc(nx * sizeof(float));
    r->dxkv = malloc(nxkv * sizeof(float));
    r->grads = malloc(ng * sizeof(float));
    ck_assert(r->out && r->dx && r->dxkv && r->grads);
}

static void run_free(run *r)
{
    free(r->out);
    free(r->dx);
    free(r->dxkv);
    free(r->grads);
}

static void assert_bitwise(const run *a, const run *b, size_t nout, size_t nx, size_t nxkv,
                           size_t ng, int cross, const char *what, int threads, int ci)
{
    ck_assert_msg(memcmp(a->out, b->out, nout * sizeof(float)) == 0,
                  "%s: out differs (threads %d, case %d)", what, threads, ci);
    ck_assert_msg(memcmp(a->dx, b->dx, nx * sizeof(float)) == 0,
                  "%s: dx differs (threads %d, case %d)", what, threads, ci);
    if (cross)
        ck_assert_msg(memcmp(a->dxkv, b->dxkv, nxkv * sizeof(float)) == 0,
                      "%s: dxkv differs (threads %d, case %d)", what, threads, ci);
    ck_assert_msg(memcmp(a->grads, b->grads, ng * sizeof(float)) == 0,
                  "%s: gradients differ (threads %d, case %d)", what, threads, ci);
}

/* _i: case index. Threads 1 and 2 each: bitwise equal on repeat and across adapters;
 * the two thread counts agree to float rounding. */
START_TEST(test_deterministic_per_thread_count)
{
    const det_case *k = &det_cases[_i];
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &k->c), 0);
    ref_layer_randomize(&l, 500 + (uint64_t)_i, 1.5, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, k->cross, k->batch, k->len_q, k->len_kv, 9), 0);
    const size_t d = (size_t)l.cfg.d_model;
    const size_t nx = (size_t)(p.batch * p.len_q) * d, nxkv = (size_t)(p.batch * p.len_kv) * d;
    const size_t nout = (size_t)(p.batch * p.len_q * ref_out_cols(&l)), ng = grads_count(&l);
    float *xq = malloc(nx * sizeof(float)), *xkv = malloc(nxkv * sizeof(float));
    float *dout = malloc(nout * sizeof(float));
    ck_assert(xq && xkv && dout);
    ref_to_float(p.xq, xq, nx);
    ref_to_float(p.xkv, xkv, nxkv);
    ref_to_float(p.dout, dout, nout);
    run first[2];
    for (int threads = 1; threads <= 2; threads++) {
        run a, b, c;
        run_alloc(&a, nout, nx, nxkv, ng);
        run_alloc(&b, nout, nx, nxkv, ng);
        run_alloc(&c, nout, nx, nxkv, ng);
        lora_adapter *ad1 = NULL, *ad2 = NULL;
        ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_EXACT, threads, &ad1), LORA_OK);
        ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_EXACT, threads, &ad2), LORA_OK);
        int64_t got = 0;
        ck_assert_int_eq(lora_adapter_get_config_int(ad1, LORA_CFG_THREADS, &got), LORA_OK);
        ck_assert_int_eq(got, threads);
        do_run(ad1, &l, &p, xq, xkv, dout, &a);
        do_run(ad1, &l, &p, xq, xkv, dout, &b);
        do_run(ad2, &l, &p, xq, xkv, dout, &c);
        assert_bitwise(&a, &b, nout, nx, nxkv, ng, p.cross, "same adapter twice", threads, _i);
        assert_bitwise(&a, &c, nout, nx, nxkv, ng, p.cross, "second adapter", threads, _i);
        lora_adapter_destroy(ad1);
        lora_adapter_destroy(ad2);
        run_free(&b);
        run_free(&c);
        first[threads - 1] = a;
    }
    /* Thread counts agree to rounding (not necessarily bitwise). */
    double md = 0.0, m = 0.0;
    for (size_t i = 0; i < ng; i++) {
        md = fmax(md, fabs((double)first[0].grads[i] - first[1].grads[i]));
        m = fmax(m, fabs((double)first[0].grads[i]));
    }
    ck_assert_msg(md <= 1e-5 * m, "threads 1 vs 2: grads differ by %g (scale %g)", md, m);
    md = m = 0.0;
    for (size_t i = 0; i < nout; i++) {
        md = fmax(md, fabs((double)first[0].out[i] - first[1].out[i]));
        m = fmax(m, fabs((double)first[0].out[i]));
    }
    ck_assert_msg(md <= 1e-5 * m, "threads 1 vs 2: out differs by %g (scale %g)", md, m);
    run_free(&first[0]);
    run_free(&first[1]);
    free(xq);
    free(xkv);
    free(dout);
    ref_problem_free(&p);
    ref_layer_free(&l);
}
END_TEST

/* Distinct adapters used from two threads at once are independent (lora.h: no
 * process-global mutable state): both match the reference. */
typedef struct par_job {
    tfx f;
    ref_errors e;
} par_job;

static void *par_worker(void *arg)
{
    par_job *j = arg;
    for (int rep = 0; rep < 5; rep++) {
        ref_compare_adapter(j->f.ad, &j->f.l, &j->f.p, &j->e);
        if (j->e.status != LORA_OK || !(j->e.max <= TOL_F32))
            break;
    }
    return NULL;
}

START_TEST(test_independent_adapters_in_parallel)
{
    par_job jobs[2];
    tfx_init(&jobs[0].f, 0, 1);
    tfx_init(&jobs[1].f, 1, 0);
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(pthread_create(&th[i], NULL, par_worker, &jobs[i]), 0);
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(pthread_join(th[i], NULL), 0);
    for (int i = 0; i < 2; i++) {
        char err[512];
        ck_assert_msg(jobs[i].e.status == LORA_OK && jobs[i].e.max <= TOL_F32,
                      "adapter %d run in parallel: %s", i,
                      ref_errors_format(&jobs[i].e, err, sizeof err));
        tfx_free(&jobs[i].f);
    }
}
END_TEST

/* ---- the worker pool from outside ------------------------------------------------- */

#define TR_BATCH 2
#define TR_LEN 24
#define TR_SEED 77

/* An adapter of fx_default's layer with `threads` threads, an AdamW optimizer and one
 * fixed batch. Everything after tr_init avoids ck_assert: forked children use it. */
typedef struct trainer {
    lora_adapter *ad;
    lora_optimizer *opt;
    float *x, *target, *out, *dout, *dx;
    size_t nx, nout;
} trainer;

static lora_adapter *threaded_adapter(int threads, uint64_t seed)
{
    const fx_spec s = fx_default();
    lora_config *cfg = fx_config(&s);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_THREADS, threads), LORA_OK);
    lora_adapter *ad = NULL;
    ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
    lora_config_destroy(cfg);
    fx_randomize_factors(ad, seed, 0.5f);
    fx_base b;
    fx_base_make(&b, &s, seed);
    fx_base_apply(&b, ad, 1);
    fx_base_free(&b);
    return ad;
}

static void fill_wave(float *x, size_t n, float phase)
{
    for (size_t i = 0; i < n; i++)
        x[i] = sinf(0.37f * (float)i + phase);
}

static void tr_init(trainer *t, int threads)
{
    const fx_spec s = fx_default();
    memset(t, 0, sizeof *t);
    t->ad = threaded_adapter(threads, TR_SEED);
    ck_assert_int_eq(lora_optimizer_create(&t->opt, t->ad, LORA_OPTIMIZER_ADAMW), LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_double(t->opt, LORA_OPT_LR, 1e-2), LORA_OK);
    t->nx = (size_t)(TR_BATCH * TR_LEN * s.d_model);
    t->nout = (size_t)(TR_BATCH * TR_LEN * fx_out_cols(&s));
    t->x = malloc(t->nx * sizeof(float));
    t->dx = malloc(t->nx * sizeof(float));
    t->target = malloc(t->nout * sizeof(float));
    t->out = malloc(t->nout * sizeof(float));
    t->dout = malloc(t->nout * sizeof(float));
    ck_assert(t->x && t->dx && t->target && t->out && t->dout);
    fill_wave(t->x, t->nx, 0.0f);
    fill_wave(t->target, t->nout, 1.0f);
}

static void tr_free(trainer *t)
{
    lora_optimizer_destroy(t->opt);
    lora_adapter_destroy(t->ad);
    free(t->x);
    free(t->dx);
    free(t->target);
    free(t->out);
    free(t->dout);
}

/* Forward, MSE loss, backward, optimizer step. Returns the first failing status. */
static int tr_step(trainer *t)
{
    double loss;
    int st = lora_adapter_zero_grad(t->ad);
    if (st == LORA_OK)
        st = lora_forward(t->ad, t->x, TR_BATCH, TR_LEN, t->out);
    if (st == LORA_OK)
        st = lora_mse_loss(t->out, t->target, t->nout, &loss, t->dout);
    if (st == LORA_OK)
        st = lora_backward(t->ad, t->dout, t->dx);
    if (st == LORA_OK)
        st = lora_optimizer_step(t->opt, t->ad);
    return st;
}

/* n parameters of ad into dst (malloc'd by the caller); 0 on success. */
static int params_of(const lora_adapter *ad, float *dst, size_t n)
{
    size_t have;
    if (lora_adapter_param_count(ad, &have) != LORA_OK || have != n)
        return -1;
    return lora_adapter_get_params_flat(ad, dst, n) == LORA_OK ? 0 : -1;
}

/* Waits up to `seconds` for pid; returns its wait status, or -1 after killing it. */
static int wait_or_kill(pid_t pid, int seconds)
{
    int status;
    for (int i = 0; i < seconds * 100; i++) {
        if (waitpid(pid, &status, WNOHANG) == pid)
            return status;
        nanosleep(&(struct timespec){0, 10000000}, NULL);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -1;
}

/* Threads of this process (/proc/self/status). */
static int process_threads(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    ck_assert_ptr_nonnull(f);
    char line[256];
    int n = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "Threads: %d", &n) == 1)
            break;
    fclose(f);
    ck_assert_int_gt(n, 0);
    return n;
}

/* The thread count once joined threads are gone: pthread_join returns when a thread
 * has finished, but the kernel may list it in /proc for a moment longer. Polls up to
 * 2 s for the count to fall to `want`. */
static int threads_after_join(int want)
{
    int n = process_threads();
    for (int i = 0; i < 200 && n != want; i++) {
        nanosleep(&(struct timespec){0, 10 * 1000 * 1000}, NULL);
        n = process_threads();
    }
    return n;
}

/* Threads start on the first call that needs them, stay for the next calls (results
 * bitwise equal every time) and are joined by destroy. A one-thread adapter starts
 * none, whatever the products' size: BLIS (OpenMP flavour) runs each product on the
 * calling thread. */
START_TEST(test_pool_lazy_reused_joined)
{
    const int base = process_threads();
    trainer t;
    tr_init(&t, 3);
    ck_assert_int_eq(process_threads(), base);
    ck_assert_int_eq(lora_forward(t.ad, t.x, TR_BATCH, TR_LEN, t.out), LORA_OK);
    ck_assert_int_eq(process_threads(), base + 2);
    float *first = malloc(t.nout * sizeof(float));
    ck_assert_ptr_nonnull(first);
    memcpy(first, t.out, t.nout * sizeof(float));
    for (int rep = 0; rep < 200; rep++) {
        ck_assert_int_eq(lora_forward(t.ad, t.x, TR_BATCH, TR_LEN, t.out), LORA_OK);
        ck_assert_int_eq(lora_backward(t.ad, t.out, t.dx), LORA_OK);
        ck_assert_msg(memcmp(first, t.out, t.nout * sizeof(float)) == 0, "call %d differs", rep);
    }
    ck_assert_int_eq(process_threads(), base + 2);
    tr_free(&t);
    ck_assert_int_eq(threads_after_join(base), base);
    free(first);

    /* One thread, products of 2·256·512·512 flops (far above la_gemm's split size). */
    lora_config *cfg = cfg_new(512);
    lora_adapter *big = adapter_new(cfg, 5);
    lora_config_destroy(cfg);
    const size_t n = 256 * 512;
    float *x = malloc(n * sizeof(float)), *out = malloc(n * sizeof(float));
    ck_assert(x && out);
    fill_wave(x, n, 0.5f);
    ck_assert_int_eq(lora_forward(big, x, 1, 256, out), LORA_OK);
    ck_assert_int_eq(lora_backward(big, out, x), LORA_OK);
    ck_assert_int_eq(process_threads(), base);
    lora_adapter_destroy(big);
    free(x);
    free(out);
}
END_TEST

/* Child and grandchild of a process that trained with two threads: each goes on
 * training the inherited adapter, loads the PEFT file the parent saved and trains a
 * new adapter, within a deadline. Each sends its parameters after two more steps
 * through a pipe; the parent, doing the same steps, must get the same bits. */
#define FORK_STEPS 2
#define FORK_DEADLINE 60

/* The child's (or grandchild's) work; returns its exit code (0 = all well). */
static int forked_training(trainer *t, const float *saved, size_t np, const char *dir,
                           int pipe_out)
{
    /* A hang ends the process, which the parent sees as SIGALRM (the handler inherited
     * from the test runner would end the whole process group). */
    signal(SIGALRM, SIG_DFL);
    alarm(FORK_DEADLINE);
    for (int i = 0; i < FORK_STEPS; i++)
        if (tr_step(t) != LORA_OK)
            return 10;
    float *p = malloc(np * sizeof(float));
    if (!p || params_of(t->ad, p, np) != 0)
        return 11;
    if (write(pipe_out, p, np * sizeof(float)) != (ssize_t)(np * sizeof(float)))
        return 12;
    /* Load what the parent saved (a new adapter, two threads) and run it. */
    const fx_spec s = fx_default();
    lora_config *cfg = NULL;
    if (lora_config_create(&cfg) != LORA_OK)
        return 13;
    lora_config_set_int(cfg, LORA_CFG_D_MODEL, s.d_model);
    lora_config_set_int(cfg, LORA_CFG_N_HEADS, s.n_heads);
    lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, s.n_kv_heads);
    lora_config_set_int(cfg, LORA_CFG_OUT_PROJ, s.out_proj);
    lora_config_set_int(cfg, LORA_CFG_THREADS, 2);
    lora_adapter *loaded = NULL;
    int64_t layer = -1;
    size_t count = 0;
    int code = 0;
    if (lora_load_peft(&loaded, &layer, 1, &count, dir, cfg) != LORA_OK || count != 1)
        code = 14;
    else if (params_of(loaded, p, np) != 0 || memcmp(p, saved, np * sizeof(float)) != 0)
        code = 15;
    lora_adapter_destroy(loaded);
    lora_config_destroy(cfg);
    free(p);
    /* A fresh adapter with its own pool. */
    if (code == 0) {
        lora_adapter *fresh = threaded_adapter(2, TR_SEED + 1);
        if (lora_forward(fresh, t->x, TR_BATCH, TR_LEN, t->out) != LORA_OK ||
            lora_backward(fresh, t->out, t->dx) != LORA_OK)
            code = 16;
        lora_adapter_destroy(fresh);
    }
    return code;
}

START_TEST(test_fork_child_and_grandchild_train)
{
    trainer t;
    tr_init(&t, 2);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(tr_step(&t), LORA_OK);
    char dir[] = "/tmp/lora_fork_XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char peft[sizeof dir + 8];
    snprintf(peft, sizeof peft, "%s/peft", dir);
    const int64_t layer = 0;
    ck_assert_int_eq(lora_save_peft(peft, &t.ad, &layer, 1), LORA_OK);
    size_t np;
    ck_assert_int_eq(lora_adapter_param_count(t.ad, &np), LORA_OK);
    float *saved = malloc(np * sizeof(float)), *got = malloc(2 * np * sizeof(float));
    float *mine = malloc(np * sizeof(float));
    ck_assert(saved && got && mine);
    ck_assert_int_eq(params_of(t.ad, saved, np), 0);
    ck_assert_msg(2 * np * sizeof(float) < 65536, "the pipe must hold both messages");
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);

    const pid_t child = fork();
    ck_assert_int_ge(child, 0);
    if (child == 0) {
        close(fds[0]);
        int code = forked_training(&t, saved, np, peft, fds[1]);
        const pid_t grandchild = code == 0 ? fork() : -1;
        if (grandchild == 0)
            code = forked_training(&t, saved, np, peft, fds[1]);
        else if (code == 0) {
            int status = -1;
            if (grandchild < 0 || waitpid(grandchild, &status, 0) != grandchild)
                code = 20;
            else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
                code = WIFEXITED(status) ? 100 + WEXITSTATUS(status) : 30 + WTERMSIG(status);
        }
        tr_free(&t); /* joins this process's workers (memcheck checks children too) */
        free(saved);
        free(got);
        free(mine);
        _exit(code);
    }
    close(fds[1]);
    const int status = wait_or_kill(child, 2 * FORK_DEADLINE + 10);
    ck_assert_msg(status != -1, "the forked child hung");
    ck_assert_msg(!WIFSIGNALED(status), "the child died of signal %d (SIGALRM %d: a hang)",
                  WTERMSIG(status), SIGALRM);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "child exit code %d (>= 100: the grandchild's + 100, >= 30: its signal)",
                  WEXITSTATUS(status));
    size_t have = 0;
    ssize_t r;
    while (have < 2 * np * sizeof(float) &&
           (r = read(fds[0], (char *)got + have, 2 * np * sizeof(float) - have)) > 0)
        have += (size_t)r;
    close(fds[0]);
    ck_assert_int_eq(have, 2 * np * sizeof(float));
    /* The same steps here, with the parent's own (living) threads. */
    for (int gen = 0; gen < 2; gen++) {
        for (int i = 0; i < FORK_STEPS; i++)
            ck_assert_int_eq(tr_step(&t), LORA_OK);
        ck_assert_int_eq(params_of(t.ad, mine, np), 0);
        ck_assert_msg(memcmp(mine, got + gen * np, np * sizeof(float)) == 0,
                      "%s's parameters differ from the parent's",
                      gen == 0 ? "the child" : "the grandchild");
    }
    free(saved);
    free(got);
    free(mine);
    tr_free(&t);
    char cmd[sizeof dir + 16];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    ck_assert_int_eq(system(cmd), 0);
}
END_TEST

/* Creates no thread from now on: RLIMIT_NPROC 0, and (as root, which the limit does
 * not bind) the identity of nobody. 0 when a test thread can no longer start. */
static void *idle_thread(void *arg) { return arg; }

static int forbid_threads(void)
{
    const struct rlimit none = {0, 0};
    if (setrlimit(RLIMIT_NPROC, &none) != 0)
        return -1;
    if (geteuid() == 0 && (setresgid(65534, 65534, 65534) != 0 ||
                           setresuid(65534, 65534, 65534) != 0))
        return -2;
    pthread_t th;
    if (pthread_create(&th, NULL, idle_thread, NULL) == 0) {
        pthread_join(th, NULL);
        return -3;
    }
    return 0;
}

/* A process that cannot create threads: training steps still succeed, on the calling
 * thread, with the same bits as with threads (the parts are the same; only who runs
 * them changes), and nothing ends the process. The child is forked before this process
 * used any thread, so only the creation failure is tested here. */
START_TEST(test_thread_creation_failure_same_results)
{
    trainer t;
    tr_init(&t, 4);
    size_t np;
    ck_assert_int_eq(lora_adapter_param_count(t.ad, &np), LORA_OK);
    const size_t floats = t.nout + t.nx + np;
    float *got = malloc(floats * sizeof(float)), *params = malloc(np * sizeof(float));
    ck_assert(got && params);
    ck_assert_msg(floats * sizeof(float) < 65536, "the pipe must hold the message");
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    const pid_t child = fork();
    ck_assert_int_ge(child, 0);
    if (child == 0) {
        close(fds[0]);
        signal(SIGALRM, SIG_DFL);
        alarm(FORK_DEADLINE);
        const int f = forbid_threads();
        if (f != 0)
            _exit(40 - f);
        for (int i = 0; i < 2; i++)
            if (tr_step(&t) != LORA_OK)
                _exit(10);
        if (lora_forward(t.ad, t.x, TR_BATCH, TR_LEN, t.out) != LORA_OK ||
            lora_backward(t.ad, t.out, t.dx) != LORA_OK || params_of(t.ad, params, np) != 0)
            _exit(11);
        if (write(fds[1], t.out, t.nout * sizeof(float)) < 0 ||
            write(fds[1], t.dx, t.nx * sizeof(float)) < 0 ||
            write(fds[1], params, np * sizeof(float)) < 0)
            _exit(12);
        const int code = process_threads() == 1 ? 0 : 13;
        tr_free(&t);
        free(got);
        free(params);
        _exit(code);
    }
    close(fds[1]);
    const int status = wait_or_kill(child, FORK_DEADLINE + 10);
    ck_assert_msg(status != -1, "the child hung");
    ck_assert_msg(WIFEXITED(status), "the child died of signal %d", WTERMSIG(status));
    ck_assert_msg(WEXITSTATUS(status) == 0,
                  "child exit code %d (41-43: could not forbid threads; 10-13: the calls)",
                  WEXITSTATUS(status));
    size_t have = 0;
    ssize_t r;
    while (have < floats * sizeof(float) &&
           (r = read(fds[0], (char *)got + have, floats * sizeof(float) - have)) > 0)
        have += (size_t)r;
    close(fds[0]);
    ck_assert_int_eq(have, floats * sizeof(float));
    /* The same here, with three worker threads. */
    const int base = process_threads();
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(tr_step(&t), LORA_OK);
    ck_assert_int_eq(lora_forward(t.ad, t.x, TR_BATCH, TR_LEN, t.out), LORA_OK);
    ck_assert_int_eq(lora_backward(t.ad, t.out, t.dx), LORA_OK);
    ck_assert_int_eq(process_threads(), base + 3);
    ck_assert_int_eq(params_of(t.ad, params, np), 0);
    ck_assert_msg(memcmp(got, t.out, t.nout * sizeof(float)) == 0, "out differs");
    ck_assert_msg(memcmp(got + t.nout, t.dx, t.nx * sizeof(float)) == 0, "dx differs");
    ck_assert_msg(memcmp(got + t.nout + t.nx, params, np * sizeof(float)) == 0,
                  "parameters differ");
    free(got);
    free(params);
    tr_free(&t);
}
END_TEST

/* Each thread of a caller's OpenMP team drives its own two-thread adapter: the
 * results equal the same work done serially. */
START_TEST(test_inside_callers_openmp_team)
{
    enum { TEAM = 2 };
    trainer t[TEAM];
    float *serial[TEAM];
    for (int i = 0; i < TEAM; i++) {
        tr_init(&t[i], 2);
        fill_wave(t[i].x, t[i].nx, (float)i);
        for (int s = 0; s < 3; s++)
            ck_assert_int_eq(tr_step(&t[i]), LORA_OK);
        serial[i] = malloc(t[i].nout * sizeof(float));
        ck_assert_ptr_nonnull(serial[i]);
        memcpy(serial[i], t[i].out, t[i].nout * sizeof(float));
        tr_free(&t[i]);
        tr_init(&t[i], 2);
        fill_wave(t[i].x, t[i].nx, (float)i);
    }
    int failed[TEAM] = {0}, team = 0;
#pragma omp parallel num_threads(TEAM)
    {
        const int i = omp_get_thread_num();
        if (i == 0)
            team = omp_get_num_threads();
        for (int s = 0; s < 3; s++)
            failed[i] |= tr_step(&t[i]) != LORA_OK;
    }
    ck_assert_int_eq(team, TEAM);
    for (int i = 0; i < TEAM; i++) {
        ck_assert_int_eq(failed[i], 0);
        ck_assert_msg(memcmp(serial[i], t[i].out, t[i].nout * sizeof(float)) == 0,
                      "team thread %d differs from the serial run", i);
        free(serial[i]);
        tr_free(&t[i]);
    }
}
END_TEST

Suite *threads_suite(void)
{
    Suite *s = suite_create("threads");
    TCase *tc = tcase_create("determinism");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_deterministic_per_thread_count, 0,
                        (int)(sizeof det_cases / sizeof det_cases[0]));
    tcase_add_test(tc, test_independent_adapters_in_parallel);
    suite_add_tcase(s, tc);
    tc = tcase_create("pool");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_pool_lazy_reused_joined);
    tcase_add_test(tc, test_fork_child_and_grandchild_train);
    tcase_add_test(tc, test_thread_creation_failure_same_results);
    tcase_add_test(tc, test_inside_callers_openmp_team);
    suite_add_tcase(s, tc);
    return s;
}
