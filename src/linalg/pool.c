/* The per-adapter worker pool (pool.h). One job at a time: the caller publishes it
 * under the lock and advances the job counter; the workers it invites (the first
 * `helpers` of them) and the caller take parts from a shared counter, and the caller
 * then waits until every part has completed. It never waits for a worker that took no
 * part: a worker still waking up when the parts are gone (short jobs) costs nothing.
 * The part counter carries the job's tag, so a worker that wakes late, holding the
 * view of a job that is over, takes no part of the next one. */
#include "pool.h"

#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

/* A test may build this file with a failing substitute. */
#ifndef POOL_THREAD_CREATE
#define POOL_THREAD_CREATE pthread_create
#endif
/* Polls of the job counter before an idle worker sleeps on the condition variable,
 * and before the caller sleeps waiting for the workers. */
/* A test may slow a worker down between waking and taking parts. */
#ifndef POOL_WAKE_HOOK
#define POOL_WAKE_HOOK() ((void)0)
#endif
#ifndef POOL_SPIN_POLLS
#define POOL_SPIN_POLLS 256
#endif

/* The part counter: (job tag << PART_BITS) | next part. parts < 2^PART_BITS. */
#define PART_BITS 24
#define PART_MASK ((UINT64_C(1) << PART_BITS) - 1)

typedef struct pool_worker {
    pool *owner;
    int index;          /* invited to a job when index < its helpers */
    uint64_t start_job; /* the job counter when the thread was created */
    pthread_t thread;
} pool_worker;

struct pool {
    pthread_mutex_t lock;
    pthread_cond_t wake; /* workers: a new job or stop */
    pthread_cond_t done; /* caller: a worker completed the last part */
    _Atomic pid_t owner; /* the process the threads belong to; 0 while being reset */
    atomic_int busy;     /* a pool_run holds the pool */
    int capacity;        /* threads it may start */
    int started;         /* threads alive in the owner process (changed by the holder) */
    atomic_int ready;    /* of them, those that have entered worker_main */
    /* The current job: written under the lock, with job advanced last. */
    _Atomic uint64_t job;
    int stop, helpers, parts;
    pool_fn fn;
    void *ctx;
    _Atomic uint64_t next_part; /* tagged, see PART_BITS */
    atomic_int completed;       /* parts of the job that have returned */
    pool_worker workers[];
};

typedef struct job_view {
    uint64_t id;
    int stop, helpers, parts;
    pool_fn fn;
    void *ctx;
} job_view;

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

size_t pool_bytes(int threads)
{
    const size_t helpers = threads > 1 ? (size_t)threads - 1 : 0;
    return sizeof(pool) + helpers * sizeof(pool_worker);
}

static int init_sync(pool *p)
{
    if (pthread_mutex_init(&p->lock, NULL) != 0)
        return -1;
    if (pthread_cond_init(&p->wake, NULL) != 0) {
        pthread_mutex_destroy(&p->lock);
        return -1;
    }
    if (pthread_cond_init(&p->done, NULL) != 0) {
        pthread_cond_destroy(&p->wake);
        pthread_mutex_destroy(&p->lock);
        return -1;
    }
    return 0;
}

pool *pool_init(void *mem, int threads)
{
    if (!mem)
        return NULL;
    pool *p = mem;
    memset(p, 0, pool_bytes(threads));
    p->capacity = threads > 1 ? threads - 1 : 0;
    atomic_init(&p->owner, getpid());
    atomic_init(&p->busy, 0);
    atomic_init(&p->job, 0);
    atomic_init(&p->next_part, 0);
    atomic_init(&p->completed, 0);
    atomic_init(&p->ready, 0);
    return init_sync(p) == 0 ? p : NULL;
}

static uint64_t part_tag(uint64_t job) { return job << PART_BITS; }

/* Takes parts of job `job` until none is left (or the job is over); counts each one
 * completed. Returns 1 when this thread completed the job's last part. */
static int take_parts(pool *p, uint64_t job, pool_fn fn, void *ctx, int parts)
{
    const uint64_t tag = part_tag(job);
    int last = 0;
    uint64_t v = atomic_load_explicit(&p->next_part, memory_order_relaxed);
    while ((v & ~PART_MASK) == tag && (int)(v & PART_MASK) < parts) {
        if (!atomic_compare_exchange_weak_explicit(&p->next_part, &v, v + 1,
                                                   memory_order_relaxed, memory_order_relaxed))
            continue;
        fn(ctx, (int)(v & PART_MASK), parts);
        last = atomic_fetch_add_explicit(&p->completed, 1, memory_order_acq_rel) + 1 == parts;
        v = atomic_load_explicit(&p->next_part, memory_order_relaxed);
    }
    return last;
}

static job_view next_job(pool *p, uint64_t seen)
{
    for (int i = 0;
         i < POOL_SPIN_POLLS && atomic_load_explicit(&p->job, memory_order_relaxed) == seen; i++)
        cpu_relax();
    pthread_mutex_lock(&p->lock);
    while (atomic_load_explicit(&p->job, memory_order_relaxed) == seen)
        pthread_cond_wait(&p->wake, &p->lock);
    const job_view v = {atomic_load_explicit(&p->job, memory_order_relaxed), p->stop,
                        p->helpers, p->parts, p->fn, p->ctx};
    pthread_mutex_unlock(&p->lock);
    return v;
}

static void *worker_main(void *arg)
{
    const pool_worker *w = arg;
    pool *p = w->owner;
    uint64_t seen = w->start_job;
    pthread_mutex_lock(&p->lock); /* started: start_threads may return */
    atomic_fetch_add(&p->ready, 1);
    pthread_cond_signal(&p->done);
    pthread_mutex_unlock(&p->lock);
    for (;;) {
        const job_view j = next_job(p, seen);
        POOL_WAKE_HOOK();
        seen = j.id;
        if (j.stop)
            return NULL;
        if (w->index >= j.helpers)
            continue;
        if (take_parts(p, j.id, j.fn, j.ctx, j.parts)) {
            pthread_mutex_lock(&p->lock);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->lock);
        }
    }
}

/* In a child of fork() only the forking thread exists: the parent's workers are gone
 * (their stacks stay mapped, a bounded leak per fork) and the lock may have been copied
 * held. Start over with no thread. */
static void forget_parent_threads(pool *p)
{
    p->started = 0;
    atomic_store(&p->ready, 0);
    atomic_store(&p->busy, 0);
    if (init_sync(p) != 0)
        p->capacity = 0; /* no lock to publish jobs with: every call runs serially */
}

/* Takes the pool for one call: 1, or 0 when the caller must run alone (busy, or a
 * concurrent call is resetting it after fork). */
static int claim(pool *p)
{
    const pid_t me = getpid();
    pid_t owner = atomic_load(&p->owner);
    if (owner != me) {
        if (owner == 0 || !atomic_compare_exchange_strong(&p->owner, &owner, 0))
            return 0;
        forget_parent_threads(p);
        atomic_store(&p->owner, me);
    }
    int idle = 0;
    return atomic_compare_exchange_strong(&p->busy, &idle, 1);
}

/* Starts threads until `want` exist (at most capacity); returns how many there are, up
 * to want. A failed pthread_create stops here and the caller runs with fewer. */
static int start_threads(pool *p, int want)
{
    if (want > p->capacity)
        want = p->capacity;
    if (p->started < want) {
        /* Workers block every signal: the host's handlers run on its own threads. */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        const uint64_t job = atomic_load(&p->job);
        while (p->started < want) {
            pool_worker *w = &p->workers[p->started];
            w->owner = p;
            w->index = p->started;
            w->start_job = job;
            if (POOL_THREAD_CREATE(&w->thread, NULL, worker_main, w) != 0)
                break;
            p->started++;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        /* Wait until the new threads run their own code: pool_run never waits for a
         * worker that takes no part, so without this a thread could still be starting
         * (inside the C library or a sanitizer's runtime, holding its locks) when the
         * call returns and the host forks. Paid once per thread. */
        pthread_mutex_lock(&p->lock);
        while (atomic_load(&p->ready) < p->started)
            pthread_cond_wait(&p->done, &p->lock);
        pthread_mutex_unlock(&p->lock);
    }
    return p->started < want ? p->started : want;
}

static void run_alone(int parts, pool_fn fn, void *ctx)
{
    for (int part = 0; part < parts; part++)
        fn(ctx, part, parts);
}

void pool_run(pool *p, int parts, pool_fn fn, void *ctx)
{
    if (!p || parts <= 1 || (uint64_t)parts > PART_MASK || !claim(p)) {
        run_alone(parts, fn, ctx);
        return;
    }
    const int helpers = start_threads(p, parts - 1);
    if (helpers == 0) {
        atomic_store(&p->busy, 0);
        run_alone(parts, fn, ctx);
        return;
    }
    pthread_mutex_lock(&p->lock);
    p->fn = fn;
    p->ctx = ctx;
    p->parts = parts;
    p->helpers = helpers;
    const uint64_t job = atomic_load(&p->job) + 1;
    atomic_store(&p->completed, 0);
    atomic_store(&p->next_part, part_tag(job));
    atomic_store(&p->job, job);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);

    take_parts(p, job, fn, ctx, parts);
    for (int i = 0; i < POOL_SPIN_POLLS &&
                    atomic_load_explicit(&p->completed, memory_order_acquire) < parts;
         i++)
        cpu_relax();
    pthread_mutex_lock(&p->lock);
    while (atomic_load_explicit(&p->completed, memory_order_acquire) < parts)
        pthread_cond_wait(&p->done, &p->lock);
    pthread_mutex_unlock(&p->lock);
    atomic_store(&p->busy, 0);
}

void pool_destroy(pool *p)
{
    /* In a child that never ran the pool, the threads are the parent's: nothing to
     * join, and the copied lock must not be touched. */
    if (!p || atomic_load(&p->owner) != getpid())
        return;
    pthread_mutex_lock(&p->lock);
    p->stop = 1;
    atomic_fetch_add(&p->job, 1);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; i < p->started; i++)
        pthread_join(p->workers[i].thread, NULL);
    p->started = 0;
    pthread_cond_destroy(&p->done);
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->lock);
}

int pool_threads_started(const pool *p)
{
    return p && atomic_load(&p->owner) == getpid() ? p->started : 0;
}

void pool_static_range(int64_t n, int part, int parts, int64_t *lo, int64_t *hi)
{
    const int64_t q = n / parts, extra = n % parts;
    *lo = part * q + (part < extra ? part : extra);
    *hi = *lo + q + (part < extra ? 1 : 0);
}
