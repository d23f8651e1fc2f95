/* serving_suite: many adapters borrowing one frozen base (same results as copies, the
 * borrowed buffers never written or freed, replacing a borrowed base, concurrent
 * forwards) and hot-swapping factors with lora_adapter_copy_params. */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <check.h>
#include <lora.h>

#include "fixtures.h"
#include "helpers.h"
#include "suites.h"

#define N_TENANTS 4

typedef struct run_out {
    float *y, *dx, *grads;
    size_t ny, nx, ng;
} run_out;

/* forward + backward (dx and every gradient) of ad on fixed inputs. */
static void run_once(lora_adapter *ad, const fx_spec *s, uint64_t seed, run_out *r)
{
    const int64_t batch = 2, len = 5;
    r->nx = (size_t)(batch * len * s->d_model);
    r->ny = (size_t)(batch * len * fx_out_cols(s));
    float *x = malloc(r->nx * sizeof(float)), *dout = malloc(r->ny * sizeof(float));
    r->y = malloc(r->ny * sizeof(float));
    r->dx = malloc(r->nx * sizeof(float));
    fill_uniform(x, r->nx, seed, 1.0f);
    fill_uniform(dout, r->ny, seed + 1, 1.0f);
    ck_assert_int_eq(lora_adapter_zero_grad(ad), LORA_OK);
    ck_assert_msg(lora_forward(ad, x, batch, len, r->y) == LORA_OK, "%s",
                  lora_adapter_last_error(ad));
    ck_assert_int_eq(lora_backward(ad, dout, r->dx), LORA_OK);
    ck_assert_int_eq(lora_adapter_param_count(ad, &r->ng), LORA_OK);
    r->grads = malloc(r->ng * sizeof(float));
    ck_assert_int_eq(lora_adapter_get_grads_flat(ad, r->grads, r->ng), LORA_OK);
    free(x);
    free(dout);
}

static void run_free(run_out *r)
{
    free(r->y);
    free(r->dx);
    free(r->grads);
}

static void assert_same_run(const run_out *a, const run_out *b, const char *what)
{
    ck_assert_msg(a->ny == b->ny && memcmp(a->y, b->y, a->ny * sizeof(float)) == 0,
                  "%s: outputs differ", what);
    ck_assert_msg(memcmp(a->dx, b->dx, a->nx * sizeof(float)) == 0, "%s: dx differs", what);
    ck_assert_msg(a->ng == b->ng && memcmp(a->grads, b->grads, a->ng * sizeof(float)) == 0,
                  "%s: gradients differ", what);
}

/* Read-only copies of a base: writing to them faults. */
static void protect_base(fx_base *b, int prot)
{
    for (int t = 0; t < 4; t++)
        for (int k = 0; k < 2; k++) {
            float *p = k ? b->bias[t] : b->w[t];
            const size_t n = k ? b->nb[t] : b->nw[t];
            if (p)
                ck_assert_int_eq(mprotect(p, n * sizeof(float), prot), 0);
        }
}

/* A base whose buffers are whole mmap'd pages (so they can be made read-only). */
static void mapped_base(fx_base *out, const fx_spec *s, uint64_t seed)
{
    fx_base heap;
    fx_base_make(&heap, s, seed);
    memset(out, 0, sizeof *out);
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    for (int t = 0; t < 4; t++)
        for (int k = 0; k < 2; k++) {
            const float *src = k ? heap.bias[t] : heap.w[t];
            const size_t n = k ? heap.nb[t] : heap.nw[t];
            if (!src)
                continue;
            const size_t bytes = (n * sizeof(float) + page - 1) / page * page;
            float *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                            -1, 0);
            ck_assert(p != MAP_FAILED);
            memcpy(p, src, n * sizeof(float));
            if (k) {
                out->bias[t] = p;
                out->nb[t] = n;
            } else {
                out->w[t] = p;
                out->nw[t] = n;
            }
        }
    fx_base_free(&heap);
}

static void unmap_base(fx_base *b)
{
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    for (int t = 0; t < 4; t++)
        for (int k = 0; k < 2; k++) {
            float *p = k ? b->bias[t] : b->w[t];
            const size_t n = k ? b->nb[t] : b->nw[t];
            if (p)
                munmap(p, (n * sizeof(float) + page - 1) / page * page);
        }
    memset(b, 0, sizeof *b);
}

/* N tenants borrowing one read-only base give bitwise the results of N adapters with
 * private copies; merged inference and merge into a caller buffer work too. */
START_TEST(test_borrowed_base_equals_copies)
{
    fx_spec s = fx_default();
    s.bias = _i; /* with and without biases */
    fx_base base;
    mapped_base(&base, &s, 5);
    protect_base(&base, PROT_READ);
    lora_adapter *borrow[N_TENANTS], *copy[N_TENANTS];
    for (int i = 0; i < N_TENANTS; i++) {
        borrow[i] = fx_adapter_nobase(&s, 30u + (uint64_t)i);
        copy[i] = fx_adapter_nobase(&s, 30u + (uint64_t)i);
        fx_base_apply(&base, borrow[i], 0);
        fx_base_apply(&base, copy[i], 1);
    }
    for (int i = 0; i < N_TENANTS; i++) {
        run_out a, b;
        run_once(borrow[i], &s, 7, &a);
        run_once(copy[i], &s, 7, &b);
        assert_same_run(&a, &b, "borrowed vs copied base");
        /* different tenants really differ */
        if (i > 0) {
            run_out c;
            run_once(borrow[0], &s, 7, &c);
            ck_assert(memcmp(a.y, c.y, a.ny * sizeof(float)) != 0);
            run_free(&c);
        }
        float *ym1 = malloc(a.ny * sizeof(float)), *ym2 = malloc(a.ny * sizeof(float));
        float *x = malloc(a.nx * sizeof(float));
        fill_uniform(x, a.nx, 7, 1.0f);
        ck_assert_int_eq(lora_forward_merged(borrow[i], x, 2, 5, ym1), LORA_OK);
        ck_assert_int_eq(lora_forward_merged(copy[i], x, 2, 5, ym2), LORA_OK);
        ck_assert(memcmp(ym1, ym2, a.ny * sizeof(float)) == 0);
        free(ym1);
        free(ym2);
        free(x);
        run_free(&a);
        run_free(&b);
    }
    /* Replacing a borrowed base by a copy must not write into the borrowed buffer (it is
     * read-only: a write would fault) and the old buffer may then go away. */
    fx_base fresh;
    fx_base_make(&fresh, &s, 6);
    for (int i = 0; i < N_TENANTS; i++)
        fx_base_apply(&fresh, borrow[i], 1);
    protect_base(&base, PROT_READ | PROT_WRITE);
    unmap_base(&base);
    run_out a, b;
    lora_adapter *ref = fx_adapter_nobase(&s, 30);
    fx_base_apply(&fresh, ref, 1);
    run_once(borrow[0], &s, 8, &a);
    run_once(ref, &s, 8, &b);
    assert_same_run(&a, &b, "after replacing the borrowed base");
    run_free(&a);
    run_free(&b);
    /* Borrow again, then destroy: the library must not free the caller's buffers. */
    fx_base_apply(&fresh, borrow[1], 0);
    for (int i = 0; i < N_TENANTS; i++) {
        lora_adapter_destroy(borrow[i]);
        lora_adapter_destroy(copy[i]);
    }
    lora_adapter_destroy(ref);
    for (size_t k = 0; k < fresh.nw[0]; k++) /* still ours and intact */
        ck_assert(isfinite(fresh.w[0][k]));
    fx_base_free(&fresh);
}
END_TEST

START_TEST(test_borrow_errors)
{
    fx_spec s = fx_default();
    s.out_proj = 0;
    s.targets = LORA_TARGET_Q;
    lora_adapter *ad = fx_adapter_nobase(&s, 1);
    fx_base b;
    fx_base_make(&b, &s, 2);
    ck_assert_int_eq(lora_adapter_set_base_borrowed(NULL, LORA_TARGET_Q, b.w[0], NULL),
                     LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_set_base_borrowed(ad, 5, b.w[0], NULL), LORA_ERR_INVALID_ARG);
    ck_assert(lora_adapter_last_error(ad)[0] != '\0');
    ck_assert_int_eq(lora_adapter_set_base_borrowed(ad, LORA_TARGET_O, b.w[0], NULL),
                     LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_set_base_borrowed(ad, LORA_TARGET_Q, NULL, NULL),
                     LORA_ERR_INVALID_ARG);
    /* A NaN keeps the previous (copied) base. */
    fx_base_apply(&b, ad, 1);
    float *bad = malloc(b.nw[0] * sizeof(float));
    memcpy(bad, b.w[0], b.nw[0] * sizeof(float));
    bad[3] = NAN;
    ck_assert_int_eq(lora_adapter_set_base_borrowed(ad, LORA_TARGET_Q, bad, NULL),
                     LORA_ERR_NONFINITE);
    float *badb = malloc(b.nb[0] * sizeof(float));
    memcpy(badb, b.bias[0], b.nb[0] * sizeof(float));
    badb[0] = INFINITY;
    ck_assert_int_eq(lora_adapter_set_base_borrowed(ad, LORA_TARGET_Q, b.w[0], badb),
                     LORA_ERR_NONFINITE);
    free(bad);
    free(badb);
    lora_adapter *ref = fx_adapter_nobase(&s, 1);
    fx_base_apply(&b, ref, 1);
    run_out r1, r2;
    run_once(ad, &s, 3, &r1);
    run_once(ref, &s, 3, &r2);
    assert_same_run(&r1, &r2, "after a refused borrow");
    run_free(&r1);
    run_free(&r2);
    /* Borrowing drops the saved forward, as set_base does. */
    float y[16 * 16], x[16 * 16];
    fill_uniform(x, 2 * 16, 1, 1.0f);
    ck_assert_int_eq(lora_forward(ad, x, 1, 2, y), LORA_OK);
    ck_assert_int_eq(lora_adapter_set_base_borrowed(ad, LORA_TARGET_Q, b.w[0], b.bias[0]),
                     LORA_OK);
    ck_assert_int_eq(lora_backward(ad, y, NULL), LORA_ERR_STATE);
    lora_adapter_destroy(ad);
    lora_adapter_destroy(ref);
    fx_base_free(&b);
}
END_TEST

/* Hot swap: one working adapter borrowing the base takes each tenant's factors (and
 * alpha/rsLoRA) in turn and then computes exactly what the tenant computes. */
START_TEST(test_copy_params_hot_swap)
{
    fx_spec s = fx_default();
    fx_base base;
    fx_base_make(&base, &s, 9);
    lora_adapter *worker = fx_adapter_nobase(&s, 1);
    fx_base_apply(&base, worker, 0);
    lora_adapter *tenant[3];
    for (int i = 0; i < 3; i++) {
        fx_spec ts = s;
        ts.alpha = 4.0 * (i + 1);
        ts.rslora = i == 2;
        tenant[i] = fx_adapter_nobase(&ts, 50u + (uint64_t)i);
        fx_base_apply(&base, tenant[i], 0);
    }
    for (int round = 0; round < 2; round++)
        for (int i = 0; i < 3; i++) {
            ck_assert_int_eq(lora_adapter_copy_params(worker, tenant[i]), LORA_OK);
            double a1, a2;
            int64_t r1, r2;
            ck_assert_int_eq(lora_adapter_get_config_double(worker, LORA_CFG_ALPHA, &a1), LORA_OK);
            ck_assert_int_eq(lora_adapter_get_config_double(tenant[i], LORA_CFG_ALPHA, &a2),
                             LORA_OK);
            ck_assert(a1 == a2);
            ck_assert_int_eq(lora_adapter_get_config_int(worker, LORA_CFG_RSLORA, &r1), LORA_OK);
            ck_assert_int_eq(lora_adapter_get_config_int(tenant[i], LORA_CFG_RSLORA, &r2),
                             LORA_OK);
            ck_assert_int_eq(r1, r2);
            run_out a, b;
            run_once(worker, &s, 11u + (uint64_t)round, &a);
            run_once(tenant[i], &s, 11u + (uint64_t)round, &b);
            assert_same_run(&a, &b, "hot-swapped worker vs tenant");
            run_free(&a);
            run_free(&b);
            /* the merged cache follows the swap */
            float *x = malloc(2 * 5 * 16 * sizeof(float));
            float *y1 = malloc(2 * 5 * 16 * sizeof(float)), *y2 = malloc(2 * 5 * 16 * sizeof(float));
            fill_uniform(x, 2 * 5 * 16, 4, 1.0f);
            ck_assert_int_eq(lora_forward_merged(worker, x, 2, 5, y1), LORA_OK);
            ck_assert_int_eq(lora_forward_merged(tenant[i], x, 2, 5, y2), LORA_OK);
            ck_assert(memcmp(y1, y2, 2 * 5 * 16 * sizeof(float)) == 0);
            free(x);
            free(y1);
            free(y2);
        }
    /* Copy drops the worker's saved forward; copy from itself is a no-op. */
    float x[2 * 16], y[2 * 16];
    fill_uniform(x, 2 * 16, 1, 1.0f);
    ck_assert_int_eq(lora_forward(worker, x, 1, 2, y), LORA_OK);
    ck_assert_int_eq(lora_adapter_copy_params(worker, tenant[0]), LORA_OK);
    ck_assert_int_eq(lora_backward(worker, y, NULL), LORA_ERR_STATE);
    ck_assert_int_eq(lora_adapter_copy_params(worker, worker), LORA_OK);
    /* Incompatible shapes. */
    ck_assert_int_eq(lora_adapter_copy_params(NULL, tenant[0]), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_copy_params(worker, NULL), LORA_ERR_INVALID_ARG);
    fx_spec bad = s;
    bad.rank = 2;
    lora_adapter *other = fx_adapter_nobase(&bad, 1);
    ck_assert_int_eq(lora_adapter_copy_params(worker, other), LORA_ERR_INVALID_ARG);
    ck_assert(strstr(lora_adapter_last_error(worker), "rank") != NULL);
    lora_adapter_destroy(other);
    bad = s;
    bad.targets = LORA_TARGET_Q;
    other = fx_adapter_nobase(&bad, 1);
    ck_assert_int_eq(lora_adapter_copy_params(worker, other), LORA_ERR_INVALID_ARG);
    lora_adapter_destroy(other);
    bad = s;
    bad.n_kv_heads = 4;
    other = fx_adapter_nobase(&bad, 1);
    ck_assert_int_eq(lora_adapter_copy_params(worker, other), LORA_ERR_INVALID_ARG);
    lora_adapter_destroy(other);
    for (int i = 0; i < 3; i++)
        lora_adapter_destroy(tenant[i]);
    lora_adapter_destroy(worker);
    fx_base_free(&base);
}
END_TEST

typedef struct thread_job {
    lora_adapter *ad;
    const fx_spec *s;
    float *y;
    int status;
} thread_job;

static void *thread_forward(void *arg)
{
    thread_job *j = arg;
    const size_t nx = 3 * 9 * 16;
    float *x = malloc(nx * sizeof(float));
    fill_uniform(x, nx, 77, 1.0f);
    j->status = LORA_OK;
    for (int it = 0; it < 20 && j->status == LORA_OK; it++)
        j->status = it % 2 ? lora_forward_merged(j->ad, x, 3, 9, j->y)
                           : lora_forward(j->ad, x, 3, 9, j->y);
    free(x);
    return NULL;
}

/* Threads run forwards of different adapters sharing one borrowed base at once. */
START_TEST(test_borrowed_base_concurrent)
{
    fx_spec s = fx_default();
    fx_base base;
    fx_base_make(&base, &s, 13);
    lora_adapter *ad[N_TENANTS];
    thread_job jobs[N_TENANTS];
    pthread_t th[N_TENANTS];
    const size_t ny = 3 * 9 * 16;
    for (int i = 0; i < N_TENANTS; i++) {
        ad[i] = fx_adapter_nobase(&s, 60u + (uint64_t)i);
        fx_base_apply(&base, ad[i], 0);
        jobs[i] = (thread_job){ad[i], &s, malloc(ny * sizeof(float)), -1};
    }
    for (int i = 0; i < N_TENANTS; i++)
        ck_assert_int_eq(pthread_create(&th[i], NULL, thread_forward, &jobs[i]), 0);
    for (int i = 0; i < N_TENANTS; i++)
        ck_assert_int_eq(pthread_join(th[i], NULL), 0);
    for (int i = 0; i < N_TENANTS; i++) {
        ck_assert_int_eq(jobs[i].status, LORA_OK);
        /* the same adapter alone, with a private copy of the base */
        lora_adapter *solo = fx_adapter_nobase(&s, 60u + (uint64_t)i);
        fx_base_apply(&base, solo, 1);
        float *y = malloc(ny * sizeof(float)), *x = malloc(ny * sizeof(float));
        fill_uniform(x, ny, 77, 1.0f);
        ck_assert_int_eq(lora_forward_merged(solo, x, 3, 9, y), LORA_OK);
        ck_assert(memcmp(y, jobs[i].y, ny * sizeof(float)) == 0);
        free(y);
        free(x);
        free(jobs[i].y);
        lora_adapter_destroy(solo);
        lora_adapter_destroy(ad[i]);
    }
    fx_base_free(&base);
}
END_TEST

Suite *serving_suite(void)
{
    Suite *s = suite_create("serving");
    TCase *tc = tcase_create("serving");
    tcase_set_timeout(tc, 30);
    tcase_add_loop_test(tc, test_borrowed_base_equals_copies, 0, 2);
    tcase_add_test(tc, test_borrow_errors);
    tcase_add_test(tc, test_copy_params_hot_swap);
    tcase_add_test(tc, test_borrowed_base_concurrent);
    suite_add_tcase(s, tc);
    suite_add_tcase(s, serving_apply_tcase());
    suite_add_tcase(s, serving_typed_tcase());
    suite_add_tcase(s, serving_const_threads_tcase());
    return s;
}
