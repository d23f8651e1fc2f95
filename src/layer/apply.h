/* The multi-tenant LoRA delta (lora_apply): y[r] += s_t·(x[r]·A_tᵀ)·B_tᵀ for rows
 * grouped by tenant, the CPU counterpart of Punica's SGMV. The API layer validates,
 * sorts the rows by tenant and cuts them into tasks; this file runs the tasks.
 *
 * A task is one tenant's block of at most `block_rows` rows (consecutive in the sorted
 * order). Each task reads its tenant's factors once and writes only its own rows of y,
 * so tasks run in any order on any number of threads with bitwise the same y: a row's
 * sums never depend on which part or thread ran its task. apply_part has pool_fn's
 * shape (ctx, part, parts): it runs a static share of the tasks in the part's own
 * scratch. */
#ifndef LORA_APPLY_H
#define LORA_APPLY_H

#include <stddef.h>
#include <stdint.h>

#include "../linalg/linalg.h"

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
} apply_job;

/* Rows per task for this shape (at most; shape-dependent only, never thread-dependent). */
int64_t apply_block_rows(int64_t in, int64_t out, int64_t max_rank);
/* Scratch floats one part needs for tasks of up to `rows` rows (a multiple of 16); 0
 * when it overflows. */
size_t apply_part_floats(int64_t rows, int64_t in, int64_t out, int64_t max_rank);
/* Runs tasks [lo, hi) of part `part` of `parts` (static split) in the part's scratch. */
void apply_part(void *job, int part, int parts);

#endif
