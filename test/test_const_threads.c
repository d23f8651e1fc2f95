/* serving suite, const_threads: lora.h's thread contract for const handles. Eight
 * threads share one config and three tenants made from it: some call every const
 * getter (succeeding and failing) on the config and on tenants[0], some create and
 * destroy adapters from the config, some run lora_apply over the tenants. Every call
 * gives the serial answer and the handles' messages stay as seeded. `make check-tsan`
 * runs this case under ThreadSanitizer, which fails on any unsynchronised write. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "helpers.h"
#include "suites.h"

enum { CT_TENANTS = 3, CT_ROWS = 24, CT_D = 40, CT_RANK = 4, CT_ITERS = 20 };

typedef struct ct_shared {
    const lora_config *cfg;
    const lora_adapter *const *tenants;
    const char *cfg_msg, *ad_msg; /* the seeded messages */
    const int32_t *tid;
    const float *x, *expect_y, *expect_a;
    const float *weight, *expect_merged; /* W_Q and W_Q + s·B·A of tenants[0] */
} ct_shared;

typedef struct ct_thread {
    const ct_shared *sh;
    int role; /* 0 getters, 1 creators, 2 lora_apply */
    int failures;
    char what[96];
} ct_thread;

static void ct_fail(ct_thread *t, const char *what)
{
    if (!t->failures++)
        snprintf(t->what, sizeof t->what, "%s", what);
}

static void ct_getters(ct_thread *t)
{
    const ct_shared *sh = t->sh;
    const lora_adapter *ad = sh->tenants[0];
    int64_t iv, rows, cols;
    double dv;
    size_t n;
    float a[CT_RANK * CT_D], w[CT_D * CT_D];
    if (lora_config_get_int(sh->cfg, LORA_CFG_RANK, &iv) != LORA_OK || iv != CT_RANK)
        ct_fail(t, "config_get_int(RANK)");
    if (lora_config_get_int(sh->cfg, 1000, &iv) != LORA_ERR_INVALID_ARG ||
        lora_config_get_double(sh->cfg, LORA_CFG_RANK, &dv) != LORA_ERR_INVALID_ARG ||
        lora_config_get_int(sh->cfg, LORA_CFG_RANK, NULL) != LORA_ERR_INVALID_ARG)
        ct_fail(t, "a failing config getter");
    if (lora_adapter_get_config_int(ad, LORA_CFG_D_MODEL, &iv) != LORA_OK || iv != CT_D ||
        lora_adapter_get_config_double(ad, LORA_CFG_ALPHA, &dv) != LORA_OK)
        ct_fail(t, "adapter config getters");
    if (lora_adapter_get_config_int(ad, LORA_CFG_ALPHA, &iv) != LORA_ERR_INVALID_ARG ||
        lora_adapter_param_shape(ad, 1000, LORA_A, &rows, &cols) != LORA_ERR_INVALID_ARG ||
        lora_adapter_get_param(ad, LORA_TARGET_Q, LORA_A, a, 1) != LORA_ERR_INVALID_ARG ||
        lora_adapter_get_run_info(ad, NULL) != LORA_ERR_INVALID_ARG ||
        lora_adapter_merge(ad, LORA_TARGET_O, w, 1) != LORA_ERR_INVALID_ARG ||
        lora_tape_create(NULL, ad) != LORA_ERR_INVALID_ARG)
        ct_fail(t, "a failing adapter getter");
    if (lora_adapter_param_shape(ad, LORA_TARGET_Q, LORA_A, &rows, &cols) != LORA_OK ||
        rows != CT_RANK || cols != CT_D || lora_adapter_param_count(ad, &n) != LORA_OK ||
        lora_adapter_get_param(ad, LORA_TARGET_Q, LORA_A, a, sizeof a / sizeof *a) != LORA_OK ||
        memcmp(a, sh->expect_a, sizeof a) != 0)
        ct_fail(t, "param_shape / get_param");
    memcpy(w, sh->weight, sizeof w);
    if (lora_adapter_merge(ad, LORA_TARGET_Q, w, sizeof w / sizeof *w) != LORA_OK ||
        memcmp(w, sh->expect_merged, sizeof w) != 0)
        ct_fail(t, "merge");
    lora_tape *tape = NULL;
    lora_optimizer *opt = NULL;
    if (lora_tape_create(&tape, ad) != LORA_OK ||
        lora_optimizer_create(&opt, ad, LORA_OPTIMIZER_SGD) != LORA_OK)
        ct_fail(t, "tape_create / optimizer_create");
    lora_tape_destroy(tape);
    lora_optimizer_destroy(opt);
    if (strcmp(lora_config_last_error(sh->cfg), sh->cfg_msg) != 0 ||
        strcmp(lora_adapter_last_error(ad), sh->ad_msg) != 0)
        ct_fail(t, "a message changed");
}

static void ct_create(ct_thread *t)
{
    lora_adapter *ad = NULL;
    int64_t iv;
    if (lora_adapter_create(&ad, t->sh->cfg) != LORA_OK ||
        lora_adapter_get_config_int(ad, LORA_CFG_RANK, &iv) != LORA_OK || iv != CT_RANK)
        ct_fail(t, "adapter_create from the shared config");
    lora_adapter_destroy(ad);
}

static void ct_apply(ct_thread *t)
{
    const ct_shared *sh = t->sh;
    float y[CT_ROWS * CT_D] = {0};
    if (lora_apply(sh->tenants, CT_TENANTS, LORA_TARGET_Q, sh->tid, sh->x, CT_ROWS, y) !=
            LORA_OK ||
        memcmp(y, sh->expect_y, sizeof y) != 0)
        ct_fail(t, "lora_apply differs from the serial result");
}

static void *ct_run(void *arg)
{
    ct_thread *t = arg;
    for (int it = 0; it < CT_ITERS && !t->failures; it++) {
        if (t->role == 0)
            ct_getters(t);
        else if (t->role == 1)
            ct_create(t);
        else
            ct_apply(t);
    }
    return NULL;
}

START_TEST(test_const_handles_shared_by_threads)
{
    enum { THREADS = 8 };
    lora_config *cfg = cfg_new(CT_D);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, 5), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RANK, CT_RANK), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_THREADS, 2), LORA_OK);
    lora_adapter *tenants[CT_TENANTS];
    float a[CT_RANK * CT_D], b[CT_D * CT_RANK];
    for (int i = 0; i < CT_TENANTS; i++) {
        tenants[i] = adapter_new(cfg, 7u + (uint64_t)i);
        fill_uniform(b, sizeof b / sizeof *b, 40u + (uint64_t)i, 0.5f); /* B is 0 at init */
        ck_assert_int_eq(lora_adapter_set_param(tenants[i], LORA_TARGET_Q, LORA_B, b,
                                                sizeof b / sizeof *b),
                         LORA_OK);
    }
    int32_t tid[CT_ROWS];
    float x[CT_ROWS * CT_D], y[CT_ROWS * CT_D] = {0};
    static float w[CT_D * CT_D], merged[CT_D * CT_D];
    for (int r = 0; r < CT_ROWS; r++)
        tid[r] = r % 5 == 4 ? -1 : (int32_t)((r * 7) % CT_TENANTS);
    fill_uniform(x, sizeof x / sizeof *x, 3u, 1.0f);
    fill_uniform(w, sizeof w / sizeof *w, 5u, 1.0f);
    memcpy(merged, w, sizeof w);
    const lora_adapter *const *ct = (const lora_adapter *const *)tenants;
    ck_assert_int_eq(lora_apply(ct, CT_TENANTS, LORA_TARGET_Q, tid, x, CT_ROWS, y), LORA_OK);
    ck_assert_int_eq(lora_adapter_merge(tenants[0], LORA_TARGET_Q, merged, CT_D * CT_D),
                     LORA_OK);
    ck_assert_int_eq(lora_adapter_get_param(tenants[0], LORA_TARGET_Q, LORA_A, a,
                                            sizeof a / sizeof *a),
                     LORA_OK);
    /* Seeded messages (failed setters): a const call must leave them as they are. */
    ck_assert_int_eq(lora_config_set_int(cfg, 1000, 0), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_set_param(tenants[0], 1000, LORA_A, a, 1),
                     LORA_ERR_INVALID_ARG);
    char cfg_msg[512], ad_msg[512];
    snprintf(cfg_msg, sizeof cfg_msg, "%s", lora_config_last_error(cfg));
    snprintf(ad_msg, sizeof ad_msg, "%s", lora_adapter_last_error(tenants[0]));
    ck_assert(cfg_msg[0] && ad_msg[0]);
    const ct_shared sh = {cfg, ct, cfg_msg, ad_msg, tid, x, y, a, w, merged};
    ct_thread jobs[THREADS];
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++) {
        jobs[i] = (ct_thread){&sh, i % 3, 0, ""};
        ck_assert_int_eq(pthread_create(&th[i], NULL, ct_run, &jobs[i]), 0);
    }
    for (int i = 0; i < THREADS; i++)
        ck_assert_int_eq(pthread_join(th[i], NULL), 0);
    for (int i = 0; i < THREADS; i++)
        ck_assert_msg(jobs[i].failures == 0, "thread %d (role %d): %s", i, jobs[i].role,
                      jobs[i].what);
    ck_assert_str_eq(lora_config_last_error(cfg), cfg_msg);
    ck_assert_str_eq(lora_adapter_last_error(tenants[0]), ad_msg);
    for (int i = 0; i < CT_TENANTS; i++)
        lora_adapter_destroy(tenants[i]);
    lora_config_destroy(cfg);
}
END_TEST

TCase *serving_const_threads_tcase(void)
{
    TCase *tc = tcase_create("const_threads");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_const_handles_shared_by_threads);
    return tc;
}
