/* pool_suite: the library's worker pool (src/linalg/pool.c) tested directly. The file
 * is compiled into this test with a pthread_create substitute that fails on demand, so
 * thread-creation failure is injected without touching the library. Checked: every
 * part runs exactly once (many calls, any part count), the static partition, fewer
 * threads when creation fails (and a retry later), a nested call and concurrent
 * callers fall back to the calling thread, a forked child starts its own threads,
 * idle workers sleep instead of spinning, destroy joins them, and the caller does not
 * wait for workers that took no part. */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <check.h>

#include "suites.h"

/* Thread creations allowed before the substitute fails with EAGAIN (< 0: no limit). */
static atomic_int create_budget = -1;

/* While set, a worker that wakes up for a job waits before taking parts (a worker slow
 * to wake: descheduled, or its core busy). */
static atomic_int hold_woken_workers;

static void hold_woken_worker(void)
{
    while (atomic_load(&hold_woken_workers))
        nanosleep(&(struct timespec){0, 1000000}, NULL);
}

static int limited_create(pthread_t *t, const pthread_attr_t *attr, void *(*fn)(void *),
                          void *arg)
{
    if (atomic_load(&create_budget) >= 0 && atomic_fetch_sub(&create_budget, 1) <= 0)
        return EAGAIN;
    return pthread_create(t, attr, fn, arg);
}

#define POOL_THREAD_CREATE limited_create
#define POOL_WAKE_HOOK hold_woken_worker
#include "../src/linalg/pool.c"

#define MAX_PARTS 16

/* Counts the calls of each part; records which thread ran part 0 and the last part. */
typedef struct tally {
    atomic_int calls[MAX_PARTS];
    atomic_int bad_parts; /* fn saw a parts value other than the call's */
    int expect_parts;
    pthread_t ran[MAX_PARTS];
} tally;

static void count_part(void *arg, int part, int parts)
{
    tally *t = arg;
    if (parts != t->expect_parts || part < 0 || part >= parts)
        atomic_fetch_add(&t->bad_parts, 1);
    else {
        atomic_fetch_add(&t->calls[part], 1);
        t->ran[part] = pthread_self();
    }
}

/* pool_run(p, parts) on a fresh tally; asserts every part ran exactly once. */
static void run_and_check(pool *p, int parts, tally *t)
{
    memset(t, 0, sizeof *t);
    t->expect_parts = parts;
    pool_run(p, parts, count_part, t);
    ck_assert_int_eq(atomic_load(&t->bad_parts), 0);
    for (int i = 0; i < parts; i++)
        ck_assert_msg(atomic_load(&t->calls[i]) == 1, "part %d of %d ran %d times", i, parts,
                      atomic_load(&t->calls[i]));
}

static pool *pool_new(int threads)
{
    void *mem = aligned_alloc(64, (pool_bytes(threads) + 63) & ~(size_t)63);
    ck_assert_ptr_nonnull(mem);
    pool *p = pool_init(mem, threads);
    ck_assert_ptr_nonnull(p);
    return p;
}

static void pool_free(pool *p)
{
    pool_destroy(p);
    free(p);
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

START_TEST(test_every_part_once)
{
    pool *p = pool_new(4);
    tally t;
    for (int rep = 0; rep < 300; rep++)
        run_and_check(p, 1 + rep % 9, &t); /* more parts than threads too */
    ck_assert_int_eq(pool_threads_started(p), 3);
    run_and_check(NULL, 5, &t); /* no pool: the caller runs them all */
    for (int i = 0; i < 5; i++)
        ck_assert(pthread_equal(t.ran[i], pthread_self()));
    pool_free(p);
}
END_TEST

START_TEST(test_static_range)
{
    for (int64_t n = 0; n <= 40; n++)
        for (int parts = 1; parts <= 7; parts++) {
            int64_t next = 0, first_len = -1;
            for (int part = 0; part < parts; part++) {
                int64_t lo, hi;
                pool_static_range(n, part, parts, &lo, &hi);
                ck_assert_int_eq(lo, next); /* contiguous, in order */
                ck_assert_int_ge(hi, lo);
                if (first_len < 0)
                    first_len = hi - lo;
                /* balanced, the longer ones first */
                ck_assert(hi - lo == first_len || hi - lo == first_len - 1);
                ck_assert_int_eq(hi - lo, n / parts + (part < n % parts));
                next = hi;
            }
            ck_assert_int_eq(next, n);
        }
}
END_TEST

START_TEST(test_creation_failure_degrades)
{
    tally t;
    atomic_store(&create_budget, 0); /* no thread at all: the caller runs every part */
    pool *p = pool_new(4);
    run_and_check(p, 4, &t);
    ck_assert_int_eq(pool_threads_started(p), 0);
    for (int i = 0; i < 4; i++)
        ck_assert(pthread_equal(t.ran[i], pthread_self()));
    atomic_store(&create_budget, 1); /* one of three: runs on two threads */
    run_and_check(p, 4, &t);
    ck_assert_int_eq(pool_threads_started(p), 1);
    atomic_store(&create_budget, -1); /* the next call tries again */
    run_and_check(p, 4, &t);
    ck_assert_int_eq(pool_threads_started(p), 3);
    pool_free(p);
}
END_TEST

/* A part that calls pool_run on its own pool (a busy pool): the inner call runs on
 * the calling thread and completes. */
typedef struct nest {
    pool *p;
    tally inner[MAX_PARTS];
} nest;

static void nested_part(void *arg, int part, int parts)
{
    (void)parts;
    nest *n = arg;
    n->inner[part].expect_parts = 3;
    pool_run(n->p, 3, count_part, &n->inner[part]);
}

START_TEST(test_nested_call_runs_inline)
{
    static nest n;
    memset(&n, 0, sizeof n);
    n.p = pool_new(3);
    pool_run(n.p, 3, nested_part, &n);
    for (int part = 0; part < 3; part++)
        for (int i = 0; i < 3; i++) {
            ck_assert_int_eq(atomic_load(&n.inner[part].calls[i]), 1);
            ck_assert(pthread_equal(n.inner[part].ran[i], n.inner[part].ran[0]));
        }
    pool_free(n.p);
}
END_TEST

/* Two user threads share one pool (a const-handle path): every call completes with
 * every part once; one of them may run alone while the other holds the pool. */
typedef struct caller {
    pool *p;
    int failures;
} caller;

static void *caller_main(void *arg)
{
    caller *c = arg;
    tally t;
    for (int rep = 0; rep < 500; rep++) {
        memset(&t, 0, sizeof t);
        t.expect_parts = 2 + rep % 4;
        pool_run(c->p, t.expect_parts, count_part, &t);
        for (int i = 0; i < t.expect_parts; i++)
            c->failures += atomic_load(&t.calls[i]) != 1;
        c->failures += atomic_load(&t.bad_parts);
    }
    return NULL;
}

START_TEST(test_concurrent_callers)
{
    pool *p = pool_new(4);
    caller c[3] = {{p, 0}, {p, 0}, {p, 0}};
    pthread_t th[3];
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(pthread_create(&th[i], NULL, caller_main, &c[i]), 0);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(pthread_join(th[i], NULL), 0);
        ck_assert_int_eq(c[i].failures, 0);
    }
    pool_free(p);
}
END_TEST

/* Waits up to `seconds` for pid; returns its wait status, or -1 after killing it. */
static int wait_with_timeout(pid_t pid, int seconds)
{
    int status;
    for (int i = 0; i < seconds * 100; i++) {
        const pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            return status;
        nanosleep(&(struct timespec){0, 10000000}, NULL);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -1;
}

START_TEST(test_forked_child_starts_its_own_threads)
{
    pool *p = pool_new(3);
    tally t;
    run_and_check(p, 3, &t);
    ck_assert_int_eq(pool_threads_started(p), 2);
    const pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        signal(SIGALRM, SIG_DFL); /* not the test runner's handler */
        alarm(30);
        int code = pool_threads_started(p) == 0 ? 0 : 2; /* the parent's are not ours */
        for (int rep = 0; rep < 50 && code == 0; rep++) {
            memset(&t, 0, sizeof t);
            t.expect_parts = 3;
            pool_run(p, 3, count_part, &t);
            for (int i = 0; i < 3; i++)
                code |= atomic_load(&t.calls[i]) != 1 ? 4 : 0;
        }
        if (code == 0 && pool_threads_started(p) != 2)
            code = 8;
        pool_free(p);
        _exit(code);
    }
    const int status = wait_with_timeout(pid, 60);
    ck_assert_msg(status != -1, "the forked child hung");
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status 0x%x", status);
    run_and_check(p, 3, &t); /* the parent's pool is untouched */
    pool_free(p);
}
END_TEST

/* Releases the held threads after 3 s unless told to before. */
static atomic_int release_now, released_by_timeout;

static void *release_later(void *arg)
{
    (void)arg;
    for (int i = 0; i < 300 && !atomic_load(&release_now); i++)
        nanosleep(&(struct timespec){0, 10000000}, NULL);
    if (!atomic_load(&release_now))
        atomic_store(&released_by_timeout, 1);
    atomic_store(&hold_woken_workers, 0);
    return NULL;
}

/* The caller waits only for parts being run: when its workers are slow to wake, it runs
 * every part itself and returns (it used to wait for each invited worker to wake up,
 * which on a short job costs more than the job). Workers that wake late, holding jobs
 * that are over, take no part of later ones. */
START_TEST(test_caller_does_not_wait_for_idle_workers)
{
    pool *p = pool_new(3);
    atomic_store(&hold_woken_workers, 1);
    pthread_t releaser;
    ck_assert_int_eq(pthread_create(&releaser, NULL, release_later, NULL), 0);
    tally t;
    for (int rep = 0; rep < 20; rep++) {
        run_and_check(p, 3, &t);
        for (int i = 0; i < 3; i++)
            ck_assert(pthread_equal(t.ran[i], pthread_self()));
    }
    ck_assert_msg(!atomic_load(&released_by_timeout),
                  "pool_run waited for workers that took no part");
    atomic_store(&release_now, 1);
    ck_assert_int_eq(pthread_join(releaser, NULL), 0);
    for (int rep = 0; rep < 300; rep++)
        run_and_check(p, 1 + rep % 5, &t);
    ck_assert_int_eq(pool_threads_started(p), 2);
    pool_free(p);
}
END_TEST

/* Threads of this process in state R (running or runnable), from /proc/self/task. */
static int running_threads(void)
{
    DIR *d = opendir("/proc/self/task");
    ck_assert_ptr_nonnull(d);
    int running = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char path[300], buf[512];
        snprintf(path, sizeof path, "/proc/self/task/%s/stat", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        const size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = '\0';
        const char *close_paren = strrchr(buf, ')');
        if (close_paren && close_paren[1] == ' ' && close_paren[2] == 'R')
            running++;
    }
    closedir(d);
    return running;
}

/* Seconds since an unspecified start (CLOCK_MONOTONIC). */
static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Polls count() until it returns want or `seconds` have passed; returns its last value.
 * A deadline, not a fixed wait: on a loaded machine a thread may wait long for a CPU
 * before it can go to sleep or finish exiting, but a spinning one never satisfies it. */
static int wait_for_count(int (*count)(void), int want, double seconds)
{
    const double deadline = now_seconds() + seconds;
    int n;
    while ((n = count()) != want && now_seconds() < deadline)
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    return n;
}

START_TEST(test_idle_workers_sleep_and_destroy_joins)
{
    const int before = process_threads();
    pool *p = pool_new(4);
    ck_assert_int_eq(process_threads(), before); /* created on first need */
    tally t;
    run_and_check(p, 4, &t);
    ck_assert_int_eq(process_threads(), before + 3);
    /* Only this thread should be running once the workers have gone to sleep: a worker
     * that spins stays runnable (state R) and keeps the count above 1 until the
     * deadline. */
    const int running = wait_for_count(running_threads, 1, 45.0);
    ck_assert_msg(running == 1, "%d threads still running 45 s after the call", running);
    pool_free(p);
    /* pool_free joined the workers; the kernel drops a joined thread's task entry a
     * moment after the join returns, so the count is awaited (a worker left running
     * would keep it above `before`). */
    const int after = wait_for_count(process_threads, before, 45.0);
    ck_assert_msg(after == before, "%d threads after destroy, %d before", after, before);
}
END_TEST

Suite *pool_suite(void)
{
    Suite *s = suite_create("pool");
    TCase *tc = tcase_create("pool");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_every_part_once);
    tcase_add_test(tc, test_static_range);
    tcase_add_test(tc, test_creation_failure_degrades);
    tcase_add_test(tc, test_nested_call_runs_inline);
    tcase_add_test(tc, test_concurrent_callers);
    tcase_add_test(tc, test_forked_child_starts_its_own_threads);
    tcase_add_test(tc, test_idle_workers_sleep_and_destroy_joins);
    tcase_add_test(tc, test_caller_does_not_wait_for_idle_workers);
    suite_add_tcase(s, tc);
    return s;
}
