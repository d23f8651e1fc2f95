/* The library's worker threads: one pool per adapter (docs/threading.md).
 *
 * pool_run(pool, parts, fn, ctx) calls fn(ctx, part, parts) exactly once for every part
 * in [0, parts) and returns when all have returned. The parts are logical: they run on
 * the calling thread and up to parts - 1 of the pool's threads, whichever is free takes
 * the next part. A part's work must depend only on its number (never on which thread
 * runs it), and a part must never wait for another part (no barriers inside fn): then
 * the result is the same whether the parts ran on parts threads or on the caller alone,
 * which is what happens when
 * - the pool is NULL or parts <= 1;
 * - threads cannot be created (pthread_create fails: the call runs on the threads the
 *   pool has, down to the caller alone; the next call tries again);
 * - the pool is busy: a call from inside a part, or a second caller on another thread
 *   (const-handle paths); the pool is never shared unsynchronised;
 * - the process forked since the pool's threads started: the child's pool forgets the
 *   parent's threads and starts its own.
 * Threads are created on first need and wait on a condition variable between calls
 * (after a short spin); they block every signal. pool_destroy joins them.
 *
 * It sits under src/linalg because la_gemm is its first user; nothing here knows BLIS. */
#ifndef LORA_POOL_H
#define LORA_POOL_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

typedef struct pool pool;
typedef void (*pool_fn)(void *ctx, int part, int parts);

/* Bytes pool_init needs for a pool of up to `threads` threads in all (the caller
 * counts as one, so it starts at most threads - 1). */
size_t pool_bytes(int threads);
/* Initialises a pool in mem (pool_bytes(threads) bytes, aligned for any type). Starts
 * no thread. Returns the pool, or NULL when a mutex or condition variable cannot be
 * initialised. */
pool *pool_init(void *mem, int threads);
/* Stops and joins the pool's threads; mem may be freed afterwards. NULL is a no-op.
 * No pool_run may be running. */
void pool_destroy(pool *p);
/* See above. p may be NULL. */
void pool_run(pool *p, int parts, pool_fn fn, void *ctx);
/* Threads the pool has started and that are alive in this process (for tests). */
int pool_threads_started(const pool *p);

/* Items [*lo, *hi) of n that part `part` of `parts` takes under OpenMP's
 * schedule(static): contiguous ranges, the first n % parts parts one item longer. */
void pool_static_range(int64_t n, int part, int parts, int64_t *lo, int64_t *hi);

/* Items taken one at a time by whichever part asks next (schedule(dynamic, 1)). Start
 * it at 0 before pool_run; pool_queue_take returns the next item (>= n when none is
 * left). */
typedef struct pool_queue {
    _Atomic int64_t next;
} pool_queue;

static inline void pool_queue_start(pool_queue *q)
{
    atomic_init(&q->next, 0);
}

static inline int64_t pool_queue_take(pool_queue *q)
{
    return atomic_fetch_add_explicit(&q->next, 1, memory_order_relaxed);
}

#endif
