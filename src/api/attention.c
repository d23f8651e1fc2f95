/* The 0.2 attention options that are not configuration values: RoPE's frequency
 * table (from ROPE_THETA, or the caller's through lora_adapter_set_rope_freqs). */
#include <math.h>
#include <string.h>

#include "internal.h"

/* THETA's inverse frequency i: THETA^(-2i/ROPE_DIM), in double. */
static double rope_default_freq(double theta, int64_t i, int64_t rope_dim)
{
    return pow(theta, -2.0 * (double)i / (double)rope_dim);
}

const double *lora_rope_custom_freqs(const lora_adapter *ad, size_t *n)
{
    const layer *l = &ad->layer;
    *n = 0;
    if (l->rope == LORA_ROPE_NONE)
        return NULL;
    const int64_t half = l->rope_dim / 2;
    for (int64_t i = 0; i < half; i++)
        if (ad->rope_freqs[i] != rope_default_freq(ad->cfg.rope_theta, i, l->rope_dim)) {
            *n = (size_t)half;
            return ad->rope_freqs;
        }
    return NULL;
}

int lora_rope_init(lora_adapter *ad)
{
    layer *l = &ad->layer;
    if (l->rope == LORA_ROPE_NONE)
        return LORA_OK;
    const int64_t half = l->rope_dim / 2;
    ad->rope_freqs = lora_mem_alloc(&ad->mem, (size_t)half * sizeof(double));
    if (!ad->rope_freqs)
        return LORA_ERR_NOMEM;
    for (int64_t i = 0; i < half; i++)
        ad->rope_freqs[i] = rope_default_freq(ad->cfg.rope_theta, i, l->rope_dim);
    l->rope_freqs = ad->rope_freqs;
    return LORA_OK;
}

LORA_API int lora_adapter_set_rope_freqs(lora_adapter *ad, const double *inv_freq, size_t n)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    const layer *l = &ad->layer;
    if (l->rope == LORA_ROPE_NONE)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "the adapter has no RoPE (LORA_CFG_ROPE = LORA_ROPE_NONE)");
    if (!inv_freq)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG, "inv_freq is NULL");
    const size_t half = (size_t)(l->rope_dim / 2);
    if (n != half)
        return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                              "n = %zu: the table needs LORA_CFG_ROPE_DIM/2 = %zu frequencies",
                              n, half);
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(inv_freq[i]))
            return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                                  "inv_freq[%zu] is not finite", i);
        if (inv_freq[i] < 0.0)
            return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                                  "inv_freq[%zu] = %g is negative", i, inv_freq[i]);
    }
    memcpy(ad->rope_freqs, inv_freq, n * sizeof(double));
    lora_adapter_params_changed(ad); /* a saved forward rotated by the old table */
    ad->err[0] = '\0';
    return LORA_OK;
}

/* ---- per-call arguments ---------------------------------------------------------------- */

int lora_mask_resolve(const lora_attn_args *args, int self, attn_mask *m)
{
    memset(m, 0, sizeof *m);
    m->q_len = args->q_lens;
    m->kv_len = args->kv_lens ? args->kv_lens : self ? args->q_lens : NULL;
    m->q_pos = args->q_pos;
    m->kv_pos = args->kv_pos ? args->kv_pos : self ? args->q_pos : NULL;
    m->q_seg = args->q_seg;
    m->kv_seg = args->kv_seg ? args->kv_seg : self ? args->q_seg : NULL;
    return m->q_len || m->kv_len || m->q_pos || m->kv_pos || m->q_seg || m->kv_seg;
}

/* Positions beyond this could overflow a difference of two of them. */
#define LORA_MAX_POSITION (INT64_C(1) << 52)

static int check_lens(lora_adapter *ad, const int64_t *lens, int64_t batch, int64_t len,
                      const char *name)
{
    for (int64_t b = 0; lens && b < batch; b++)
        if (lens[b] < 0 || lens[b] > len)
            return lora_set_error(ad->err, LORA_ERR_SHAPE,
                                  "args->%s[%lld] = %lld is outside 0 .. %lld", name,
                                  (long long)b, (long long)lens[b], (long long)len);
    return LORA_OK;
}

static int check_pos(lora_adapter *ad, const int64_t *pos, int64_t n, const char *name)
{
    for (int64_t i = 0; pos && i < n; i++)
        if (pos[i] > LORA_MAX_POSITION || pos[i] < -LORA_MAX_POSITION)
            return lora_set_error(ad->err, LORA_ERR_INVALID_ARG,
                                  "args->%s[%lld] = %lld: positions must be within +-2^52",
                                  name, (long long)i, (long long)pos[i]);
    return LORA_OK;
}

int lora_mask_check(lora_adapter *ad, const attn_problem *p, const attn_mask *m, int self)
{
    int st = check_lens(ad, m->q_len, p->batch, p->len_q, "q_lens");
    if (st == LORA_OK)
        st = check_lens(ad, m->kv_len, p->batch, p->len_kv, "kv_lens");
    /* In self-attention a padded query row is also a key: a valid key that is a padded
     * query would receive dx through K and V. */
    for (int64_t b = 0; st == LORA_OK && self && m->kv_len != m->q_len && b < p->batch; b++)
        if ((m->q_len ? m->q_len[b] : p->len_q) != (m->kv_len ? m->kv_len[b] : p->len_kv))
            st = lora_set_error(ad->err, LORA_ERR_SHAPE,
                                "args->kv_lens[%lld] differs from q_lens in self-attention "
                                "(the keys are the query rows)",
                                (long long)b);
    if (st == LORA_OK)
        st = check_pos(ad, m->q_pos, p->batch * p->len_q, "q_pos");
    if (st == LORA_OK && m->kv_pos != m->q_pos)
        st = check_pos(ad, m->kv_pos, p->batch * p->len_kv, "kv_pos");
    return st;
}

/* Floats of n values of `bytes` each, rounded up to whole 8-byte pairs. */
static size_t floats_of(int64_t n, size_t bytes)
{
    return ((size_t)n * bytes + 7u) / 8u * 2u;
}

size_t lora_mask_floats(const attn_problem *p, const attn_mask *m)
{
    const int64_t nq = p->batch * p->len_q, nk = p->batch * p->len_kv;
    size_t n = 2; /* to align the first array to 8 bytes */
    n += m->q_len ? floats_of(p->batch, 8) : 0;
    n += m->kv_len && m->kv_len != m->q_len ? floats_of(p->batch, 8) : 0;
    n += m->q_pos ? floats_of(nq, 8) : 0;
    n += m->kv_pos && m->kv_pos != m->q_pos ? floats_of(nk, 8) : 0;
    n += m->q_seg ? floats_of(nq, 4) : 0;
    n += m->kv_seg && m->kv_seg != m->q_seg ? floats_of(nk, 4) : 0;
    return n;
}

/* Copies n values of `bytes` each from src to *at, advancing it; returns the copy. */
static void *copy_to(float **at, const void *src, int64_t n, size_t bytes)
{
    void *dst = *at;
    memcpy(dst, src, (size_t)n * bytes);
    *at += floats_of(n, bytes);
    return dst;
}

void lora_mask_copy(const attn_problem *p, const attn_mask *src, float *buf, attn_mask *dst)
{
    const int64_t nq = p->batch * p->len_q, nk = p->batch * p->len_kv;
    float *at = (float *)(((uintptr_t)buf + 7u) & ~(uintptr_t)7u);
    memset(dst, 0, sizeof *dst);
    if (src->q_len)
        dst->q_len = copy_to(&at, src->q_len, p->batch, 8);
    if (src->kv_len)
        dst->kv_len = src->kv_len == src->q_len ? dst->q_len
                                                : copy_to(&at, src->kv_len, p->batch, 8);
    if (src->q_pos)
        dst->q_pos = copy_to(&at, src->q_pos, nq, 8);
    if (src->kv_pos)
        dst->kv_pos = src->kv_pos == src->q_pos ? dst->q_pos
                                                : copy_to(&at, src->kv_pos, nk, 8);
    if (src->q_seg)
        dst->q_seg = copy_to(&at, src->q_seg, nq, 4);
    if (src->kv_seg)
        dst->kv_seg = src->kv_seg == src->q_seg ? dst->q_seg
                                                : copy_to(&at, src->kv_seg, nk, 4);
}
