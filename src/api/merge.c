/* Merging LoRA terms into weights (W + s·B·A, in double) and the merged-weight
 * inference forward, with its per-adapter cache of merged weights. */
#include <math.h>
#include <stdatomic.h>
#include <string.h>

#include "internal.h"

void lora_adapter_free_merged(lora_adapter *ad)
{
    for (int t = 0; t < PROJ_COUNT; t++) {
        lora_mem_free(&ad->mem, ad->merged[t]);
        ad->merged[t] = NULL;
    }
    ad->merged_valid = 0;
    lora_buf_free(&ad->mem, &ad->infer_buf);
}

/* The exact scale s in double (the layer keeps it rounded to float). */
static double lora_scale_double(const lora_adapter *ad)
{
    const double r = (double)ad->cfg.rank;
    return ad->cfg.rslora ? ad->cfg.alpha / sqrt(r) : ad->cfg.alpha / r;
}

#define MERGE_BLOCK 256

/* What a part of merge_rows reads; first_bad is the smallest bad index any part saw. */
typedef struct merge_job {
    const layer_proj *p;
    int64_t rank;
    double s, sign;
    const float *src;
    float *dst;
    _Atomic int64_t first_bad;
} merge_job;

/* A static share of the rows. */
static void merge_part(void *arg, int worker, int workers)
{
    merge_job *j = arg;
    const layer_proj *p = j->p;
    const int64_t out = p->out, in = p->in, rank = j->rank;
    const double s = j->s, sign = j->sign;
    const float *src = j->src;
    float *dst = j->dst;
    int64_t first_bad = INT64_MAX, lo, hi;
    pool_static_range(out, worker, workers, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) {
        double acc[MERGE_BLOCK];
        const float *brow = p->b + i * rank;
        for (int64_t j0 = 0; j0 < in; j0 += MERGE_BLOCK) {
            const int64_t nj = in - j0 < MERGE_BLOCK ? in - j0 : MERGE_BLOCK;
            for (int64_t jj = 0; jj < nj; jj++)
                acc[jj] = 0.0;
            for (int64_t k = 0; k < rank; k++) {
                const double bk = (double)brow[k];
                const float *arow = p->a + k * in + j0;
                for (int64_t jj = 0; jj < nj; jj++)
                    acc[jj] += bk * (double)arow[jj];
            }
            const float *srow = src + i * in + j0;
            for (int64_t jj = 0; jj < nj; jj++) {
                const float v = (float)((double)srow[jj] + sign * (s * acc[jj]));
                if (!isfinite(v)) {
                    if (i * in + j0 + jj < first_bad)
                        first_bad = i * in + j0 + jj;
                } else if (dst) {
                    dst[i * in + j0 + jj] = v;
                }
            }
        }
    }
    int64_t seen = atomic_load(&j->first_bad);
    while (first_bad < seen && !atomic_compare_exchange_weak(&j->first_bad, &seen, first_bad))
        ;
}

/* dst = fl32(src + sign·s·(B·A)), every entry's r-term sum and the addition in double.
 * dst NULL: only check. Returns the index of the first entry whose result is not
 * finite (NaN/Inf in src included), or -1. Rows run in parallel; the result does not
 * depend on the thread count. */
static int64_t merge_rows(const layer_proj *p, int64_t rank, double s, double sign,
                          const float *src, float *dst, const la_ctx *la)
{
    const double work = (double)p->out * (double)p->in * (double)rank;
    const int nt = work > 4e6 ? la->threads : 1;
    merge_job j = {p, rank, s, sign, src, dst, INT64_MAX};
    pool_run(la->pool, nt, merge_part, &j);
    const int64_t first_bad = atomic_load(&j.first_bad);
    return first_bad == INT64_MAX ? -1 : first_bad;
}

static int merge_common(const lora_adapter *ad, int target, float *weight, size_t count,
                        double sign)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    char *const err = NULL; /* ad is const: the messages below go nowhere */
    const int t = lora_target_index(target);
    if (t < 0)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "target %d is not one of LORA_TARGET_Q/K/V/O", target);
    const layer_proj *p = &ad->layer.proj[t];
    if (!p->adapted)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "target %s is not adapted (not in LORA_CFG_TARGETS)",
                              lora_proj_names[t]);
    if (!weight)
        return lora_set_error(err, LORA_ERR_INVALID_ARG, "weight is NULL");
    const size_t n = (size_t)(p->out * p->in);
    if (count != n)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "count %zu does not match W_%s's %lld x %lld = %zu elements",
                              count, lora_proj_names[t], (long long)p->out, (long long)p->in, n);
    const double s = lora_scale_double(ad);
    /* Check every result first (safe merge): the buffer is written only if all are
     * finite. The second pass recomputes rather than allocating. */
    const int64_t bad = merge_rows(p, ad->layer.rank, s, sign, weight, NULL, &ad->la);
    if (bad >= 0)
        return lora_set_error(err, LORA_ERR_NONFINITE,
                              "%s W_%s: entry (%lld, %lld) %s; the weight is unchanged",
                              sign > 0 ? "merging into" : "unmerging from", lora_proj_names[t],
                              (long long)(bad / p->in), (long long)(bad % p->in),
                              isfinite(weight[bad]) ? "would become NaN/Inf"
                                                    : "is NaN/Inf");
    merge_rows(p, ad->layer.rank, s, sign, weight, weight, &ad->la);
    return LORA_OK;
}

LORA_API int lora_adapter_merge(const lora_adapter *ad, int target, float *weight,
                                size_t count)
{
    return merge_common(ad, target, weight, count, 1.0);
}

LORA_API int lora_adapter_unmerge(const lora_adapter *ad, int target, float *weight,
                                  size_t count)
{
    return merge_common(ad, target, weight, count, -1.0);
}

/* Builds the merged weights of every adapted projection (base weights are set). */
static int build_merged(lora_adapter *ad)
{
    if (ad->merged_valid)
        return LORA_OK;
    const double s = lora_scale_double(ad);
    for (int t = 0; t < PROJ_COUNT; t++) {
        const layer_proj *p = &ad->layer.proj[t];
        if (!p->adapted || !p->weight.data)
            continue;
        const size_t n = (size_t)(p->out * p->in);
        if (!ad->merged[t]) {
            ad->merged[t] = lora_mem_alloc(&ad->mem, n * sizeof(float));
            if (!ad->merged[t])
                return lora_set_error(ad->err, LORA_ERR_NOMEM,
                                      "cannot allocate the merged weight W_%s (%zu floats)",
                                      lora_proj_names[t], n);
        }
        const float *base = la_wmat_f32(p->weight);
        if (!base) { /* a 16-bit base: merged in place over its float copy */
            la_wmat_rows(p->weight, p->in, 0, p->out, ad->merged[t]);
            base = ad->merged[t];
        }
        const int64_t bad =
            merge_rows(p, ad->layer.rank, s, 1.0, base, ad->merged[t], &ad->la);
        if (bad >= 0)
            return lora_set_error(ad->err, LORA_ERR_NONFINITE,
                                  "merged weight W_%s + s*B*A overflows at (%lld, %lld)",
                                  lora_proj_names[t], (long long)(bad / p->in),
                                  (long long)(bad % p->in));
    }
    ad->merged_valid = 1;
    return LORA_OK;
}

/* lora_forward_merged[_cross]: the forward core on a copy of the layer with merged
 * weights and no LoRA branch, in its own activations (the saved forward stays
 * intact). */
static int run_forward_merged(lora_adapter *ad, const lora_forward_args *a)
{
    if (!ad)
        return LORA_ERR_INVALID_ARG;
    attn_problem p;
    int st = lora_forward_begin(ad, a, &p);
    lora_adapter_sync_borrowed(ad); /* writes into borrowed factors invalidate merged[] */
    if (st == LORA_OK)
        st = build_merged(ad);
    if (st != LORA_OK)
        return st;
    layer lm = ad->layer;
    for (int t = 0; t < PROJ_COUNT; t++)
        if (lm.proj[t].adapted) {
            lm.proj[t].weight = la_wmat_of_f32(ad->merged[t]);
            lm.proj[t].adapted = 0;
        }
    layer_acts acts;
    lora_plan plan;
    st = lora_forward_layer(ad, &lm, a, &p, &ad->infer_buf, &acts, &plan);
    if (st == LORA_OK)
        ad->err[0] = '\0';
    return st;
}

LORA_API int lora_forward_merged(lora_adapter *ad, const float *x, int64_t batch,
                                 int64_t seq_len, float *out)
{
    const lora_forward_args a = {x, x, batch, seq_len, seq_len, out, 1, SAVED_NONE, NULL};
    return run_forward_merged(ad, &a);
}

LORA_API int lora_forward_merged_cross(lora_adapter *ad, const float *xq, const float *xkv,
                                       int64_t batch, int64_t len_q, int64_t len_kv,
                                       float *out)
{
    const lora_forward_args a = {xq, xkv, batch, len_q, len_kv, out, 0, SAVED_NONE, NULL};
    return run_forward_merged(ad, &a);
}
