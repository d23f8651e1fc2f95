/* Attention of a decode step over a KV cache (lora_decode): the new queries of each
 * sequence against its cached keys and its new keys, causal, with WINDOW and SOFTCAP.
 * Pure computation; the API layer (src/api/decode.c) owns the cache and the buffers.
 *
 * Cache layout, per (sequence b, kv head g) unit u = b·n_kv_heads + g, slots16 slots
 * (slots rounded up to 16): keys in tiles of 16 slots, tile t holding (head_dim, 16)
 * floats (dim-major, so one vector load gives one dim of 16 keys: scores need no
 * horizontal sums), values as rows (slot, head_dim). Position p lives in slot p mod
 * slots: a plain array while p < slots, a ring (only the last `slots` tokens kept)
 * when the sequence is longer, which lora_decode allows only when slots = WINDOW.
 *
 * One unit is one task: it streams its tiles once per chunk of query rows (a decode
 * step has one chunk: n_heads/n_kv_heads rows per new token), with an online softmax
 * per row, so the work of a unit never depends on which part ran it: bitwise the same
 * result for any number of threads. */
#ifndef LORA_DECODE_ATTN_H
#define LORA_DECODE_ATTN_H

#include <stddef.h>
#include <stdint.h>

#include "../linalg/linalg.h"

/* One sequence of the step: len tokens cached before it, n new ones at rows row0 ..
 * row0 + n - 1 of q, k, v and c. */
typedef struct dattn_seq {
    int64_t len, n, row0;
} dattn_seq;

typedef struct dattn_job {
    const la_ctx *la;
    int64_t n_heads, n_kv_heads, head_dim, q_dim, kv_dim;
    float scale, softcap; /* softmax scale β; softcap (0 = none) */
    int64_t window;       /* 0 = none */
    const float *ck, *cv; /* the cache (layout above) */
    int64_t slots, slots16;
    const dattn_seq *seqs;
    int64_t batch;
    const float *q, *k, *v; /* new rows: (rows, q_dim), (rows, kv_dim) ×2, RoPE applied */
    float *c;               /* attention output (rows, q_dim) */
    float *scratch;         /* parts · part_floats floats, 64-byte aligned */
    size_t part_floats;
    pool_queue units;       /* next unit to take (start at 0) */
} dattn_job;

/* Scratch floats one part needs for sequences of up to max_new new tokens (a multiple
 * of 16); 0 when it overflows. */
size_t dattn_part_floats(int64_t head_dim, int64_t max_new);
/* pool_fn: takes units from job->units until none is left. */
void dattn_part(void *job, int part, int parts);
/* Stores sequence s's new keys and values (rows of job->k, job->v) into the cache at
 * their positions (only the last `slots` of them when more arrive). */
void dattn_store(const dattn_job *job, const dattn_seq *s, int64_t b, float *ck, float *cv);

#endif
