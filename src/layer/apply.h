/* The multi-tenant LoRA delta (lora_apply): y[r] += s_t·(x[r]·A_tᵀ)·B_tᵀ for rows
 * grouped by tenant, the CPU counterpart of Punica's SGMV. The API layer validates,
 * sorts the rows by tenant and cuts them into tasks; this file runs the tasks.
 *
 * A task is one tenant's block of at most `block_rows` rows (consecutive in the sorted
 * order). Each task reads its tenant's factors once and writes only its own rows of y,
 * so tasks run in any order on any number of threads with bitwise the same y: a row's
 * sums never depend on which part or thread ran its task. apply_part has pool_fn's
 * shape (ctx, part, parts): it takes tasks from the job's queue one at a time (tenants'
 * tasks differ in rank and rows) and runs them in the part's own scratch. */
#ifndef LORA_APPLY_H
#define LORA_APPLY_H

#include <stddef.h>
#include <stdint.h>

#include "../linalg/linalg.h"
#include "../linalg/pool.h"

/* What lora_apply reads of one tenant. */
typedef struct apply_tenant {
    const float *a, *b; /* (rank, in), (out, rank): library buffers (padded) */
    int64_t rank;
    float scale;
} apply_tenant;

typedef struct apply_task {
    int32_t tenant;
    int64_t start, rows; /* rows order[start .. start+rows) */
} apply_task;

typedef struct apply_job {
    const la_ctx *la;
    const apply_tenant *tenants;
    int64_t in, out;
    int64_t panel_rows; /* most rows of a task: min(rows, apply_block_rows) */
    const float *x; /* (rows, in) */
    float *y;       /* (rows, out) */
    const int64_t *order; /* row indices sorted by tenant (stable) */
    const apply_task *tasks;
    int64_t n_tasks;
    float *scratch; /* parts · apply_part_floats floats, 64-byte aligned */
    size_t part_floats;
    pool_queue queue; /* the next task (pool_queue_start before the run) */
} apply_job;

/* Rows per task for this shape (at most; shape-dependent only, never thread-dependent). */
int64_t apply_block_rows(int64_t in, int64_t out, int64_t max_rank);
/* Scratch floats one part needs for tasks of up to `rows` rows (a multiple of 16); 0
 * when it overflows. */
size_t apply_part_floats(int64_t rows, int64_t in, int64_t out, int64_t max_rank);
/* Parts worth running for this job on up to `threads` threads: 1 when a part would
 * stream fewer than about 64 KiB of factors, x and y (waking a thread costs more). */
int apply_parts(const apply_job *job, int threads);
/* Part `part` of `parts`: takes tasks from the queue until none is left, in the part's
 * scratch (parts <= the parts the scratch was sized for). */
void apply_part(void *job, int part, int parts);

#endif
