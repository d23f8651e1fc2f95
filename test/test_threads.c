/* threads_suite: for a given LORA_CFG_THREADS, results are bitwise reproducible (same
 * adapter twice, and a second adapter), with fewer and more (batch, kv head) tasks than
 * threads; and different thread counts agree with each other. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

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

Suite *threads_suite(void)
{
    Suite *s = suite_create("threads");
    TCase *tc = tcase_create("determinism");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_deterministic_per_thread_count, 0,
                        (int)(sizeof det_cases / sizeof det_cases[0]));
    tcase_add_test(tc, test_independent_adapters_in_parallel);
    suite_add_tcase(s, tc);
    return s;
}
