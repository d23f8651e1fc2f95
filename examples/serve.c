/* A small continuous-batching server loop over one attention layer (docs/serving.md).
 *
 * Four tenants (LoRA adapters of ranks 4, 8, 8 and 16) share one borrowed base. Requests
 * of random tenants arrive over time with prompts of different lengths. Every step
 * admits the requests that have arrived into free cache slots and runs ONE
 * lora_decode_ex call for the whole batch: new requests prefill their prompt
 * (n_tokens = prompt length), running ones decode one token, free slots take none.
 * The base projections run once per step; each tenant's LoRA terms are added for its
 * rows. The layer stands in for a model: a sequence's next input is tanh of its last
 * output row.
 *
 * At the end every request is run again alone (its own adapter, a cache of one
 * sequence) and its outputs compared with the batched ones: the program exits 1 on a
 * mismatch. It prints tokens per second of the batched loop.
 *
 *     serve [requests [d_model]]      (defaults 12 and 128) */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lora.h>

#define TENANTS 4
#define SLOTS 6     /* sequences decoded together at most */
#define MAX_PROMPT 40
#define MAX_GEN 24

#define CHECK(call)                                                                        \
    do {                                                                                   \
        const int st_ = (call);                                                            \
        if (st_ != LORA_OK) {                                                              \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                  \
                    lora_status_string(st_));                                              \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

typedef struct request {
    int tenant, arrival, prompt, gen; /* arrival: the step it arrives at */
    float *x;                         /* (prompt, d) prompt inputs */
    float *out;                       /* (prompt + gen, d) outputs, batched run */
    int done;                         /* tokens processed so far */
} request;

static uint64_t rng_state = 0x9e3779b97f4a7c15u;
static double uniform(void) /* [0, 1) */
{
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) * 0x1p-53;
}
static void fill(float *x, size_t n, float gain)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(2.0 * uniform() - 1.0) * gain;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* An adapter of the layer with random factors of `rank`, borrowing the base. */
static lora_adapter *make_adapter(int d, int rank, float *const *w, uint64_t seed)
{
    lora_config *cfg = NULL;
    CHECK(lora_config_create(&cfg));
    const int params[][2] = {{LORA_CFG_D_MODEL, d},        {LORA_CFG_N_HEADS, d / 32},
                             {LORA_CFG_N_KV_HEADS, d / 64}, {LORA_CFG_RANK, rank},
                             {LORA_CFG_OUT_PROJ, 1},       {LORA_CFG_CAUSAL, 1},
                             {LORA_CFG_ROPE, LORA_ROPE_HALF}, {LORA_CFG_THREADS, 2},
                             {LORA_CFG_TARGETS, LORA_TARGET_Q | LORA_TARGET_K | LORA_TARGET_V | LORA_TARGET_O}};
    for (size_t i = 0; i < sizeof params / sizeof params[0]; i++)
        CHECK(lora_config_set_int(cfg, params[i][0], params[i][1]));
    lora_adapter *ad = NULL;
    CHECK(lora_adapter_create(&ad, cfg));
    lora_config_destroy(cfg);
    const int targets[4] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V, LORA_TARGET_O};
    rng_state ^= seed * 0x2545f4914f6cdd1du;
    for (int t = 0; t < 4; t++) {
        CHECK(lora_adapter_set_base_borrowed(ad, targets[t], w[t], NULL));
        for (int which = 0; which < 2; which++) {
            int64_t r, c;
            CHECK(lora_adapter_param_shape(ad, targets[t], which, &r, &c));
            float *f = malloc(sizeof(float) * (size_t)(r * c));
            fill(f, (size_t)(r * c), which == 0 ? 1.0f / sqrtf((float)c) : 0.3f);
            CHECK(lora_adapter_set_param(ad, targets[t], which, f, (size_t)(r * c)));
            free(f);
        }
    }
    return ad;
}

/* The next input of a sequence from its last output row. */
static void next_input(const float *out_row, int d, float *x)
{
    for (int j = 0; j < d; j++)
        x[j] = tanhf(out_row[j]);
}

/* The batched loop; returns the tokens processed. */
static long serve(lora_adapter *holder, lora_adapter *const *tenants, request *req, int n_req,
                  int d)
{
    lora_kv_cache *cache = NULL;
    CHECK(lora_kv_cache_create(&cache, holder, SLOTS, MAX_PROMPT + MAX_GEN));
    int slot_req[SLOTS];
    for (int s = 0; s < SLOTS; s++)
        slot_req[s] = -1;
    float *x = malloc(sizeof(float) * SLOTS * MAX_PROMPT * (size_t)d);
    float *out = malloc(sizeof(float) * SLOTS * MAX_PROMPT * (size_t)d);
    long tokens = 0;
    int next = 0, finished = 0;
    for (int step = 0; finished < n_req; step++) {
        int64_t n_tokens[SLOTS] = {0}, n_new = 1;
        int32_t tenant_of_seq[SLOTS];
        for (int s = 0; s < SLOTS; s++) { /* admit arrived requests into free slots */
            if (slot_req[s] < 0 && next < n_req && req[next].arrival <= step) {
                slot_req[s] = next++;
                CHECK(lora_kv_cache_reset(cache, s));
            }
            const request *r = slot_req[s] >= 0 ? &req[slot_req[s]] : NULL;
            n_tokens[s] = !r ? 0 : r->done == 0 ? r->prompt : 1;
            tenant_of_seq[s] = r ? r->tenant : -1;
            n_new = n_tokens[s] > n_new ? n_tokens[s] : n_new;
        }
        for (int s = 0; s < SLOTS; s++) {
            const request *r = slot_req[s] >= 0 ? &req[slot_req[s]] : NULL;
            float *xs = x + (size_t)s * (size_t)(n_new * d);
            if (r && r->done == 0)
                memcpy(xs, r->x, sizeof(float) * (size_t)(r->prompt * d));
            else if (r)
                next_input(r->out + (size_t)(r->done - 1) * (size_t)d, d, xs);
        }
        lora_decode_args args = {.struct_size = sizeof args, .n_tokens = n_tokens,
                                 .tenants = (const lora_adapter *const *)tenants,
                                 .n_tenants = TENANTS, .tenant_of_seq = tenant_of_seq};
        CHECK(lora_decode_ex(holder, &args, cache, x, n_new, out));
        for (int s = 0; s < SLOTS; s++) {
            if (slot_req[s] < 0)
                continue;
            request *r = &req[slot_req[s]];
            memcpy(r->out + (size_t)r->done * (size_t)d, out + (size_t)s * (size_t)(n_new * d),
                   sizeof(float) * (size_t)(n_tokens[s] * d));
            r->done += (int)n_tokens[s];
            tokens += n_tokens[s];
            if (r->done == r->prompt + r->gen) {
                slot_req[s] = -1;
                finished++;
            }
        }
    }
    free(x);
    free(out);
    lora_kv_cache_destroy(cache);
    return tokens;
}

/* Request r alone with its own adapter; returns the largest relative difference. */
static double run_alone(lora_adapter *ad, const request *r, int d)
{
    lora_kv_cache *cache = NULL;
    CHECK(lora_kv_cache_create(&cache, ad, 1, MAX_PROMPT + MAX_GEN));
    const int total = r->prompt + r->gen;
    float *out = malloc(sizeof(float) * (size_t)(total * d)), *x = malloc(sizeof(float) * (size_t)d);
    CHECK(lora_decode(ad, cache, r->x, r->prompt, out));
    for (int i = r->prompt; i < total; i++) {
        next_input(out + (size_t)(i - 1) * (size_t)d, d, x);
        CHECK(lora_decode(ad, cache, x, 1, out + (size_t)i * (size_t)d));
    }
    double err = 0.0, mag = 1e-30;
    for (size_t i = 0; i < (size_t)(total * d); i++) {
        err = fmax(err, fabs((double)out[i] - (double)r->out[i]));
        mag = fmax(mag, fabs((double)out[i]));
    }
    free(out);
    free(x);
    lora_kv_cache_destroy(cache);
    return err / mag;
}

int main(int argc, char **argv)
{
    const int n_req = argc > 1 ? atoi(argv[1]) : 12, d = argc > 2 ? atoi(argv[2]) : 128;
    if (n_req < 1 || d < 64 || d % 64 != 0) {
        fprintf(stderr, "usage: serve [requests >= 1 [d_model, a multiple of 64]]\n");
        return 2;
    }
    float *w[4];
    for (int t = 0; t < 4; t++) { /* Q, O: (d, d); K, V: (d/2, d) with d/64 kv heads of 32 */
        const size_t n = (size_t)d * (size_t)(t == 1 || t == 2 ? d / 2 : d);
        w[t] = malloc(sizeof(float) * n);
        fill(w[t], n, 1.0f / sqrtf((float)d));
    }
    const int ranks[TENANTS] = {4, 8, 8, 16};
    lora_adapter *tenants[TENANTS];
    for (int i = 0; i < TENANTS; i++)
        tenants[i] = make_adapter(d, ranks[i], w, 100 + (uint64_t)i);
    lora_adapter *holder = make_adapter(d, 1, w, 99); /* base and working memory */
    request *req = calloc((size_t)n_req, sizeof *req);
    for (int i = 0, t = 0; i < n_req; i++) {
        t += (int)(uniform() * 4.0); /* arrivals 0-3 steps apart */
        req[i] = (request){.tenant = (int)(uniform() * TENANTS), .arrival = t,
                           .prompt = 1 + (int)(uniform() * MAX_PROMPT),
                           .gen = 1 + (int)(uniform() * MAX_GEN)};
        req[i].x = malloc(sizeof(float) * (size_t)(req[i].prompt * d));
        req[i].out = malloc(sizeof(float) * (size_t)((req[i].prompt + req[i].gen) * d));
        fill(req[i].x, (size_t)(req[i].prompt * d), 1.0f);
    }
    const double t0 = now();
    const long tokens = serve(holder, tenants, req, n_req, d);
    const double secs = now() - t0;
    double worst = 0.0;
    for (int i = 0; i < n_req; i++)
        worst = fmax(worst, run_alone(tenants[req[i].tenant], &req[i], d));
    printf("serve: %d requests over %d tenants, d_model %d: %ld tokens in %.3f s = %.0f "
           "tokens/s; batched vs alone: max relative difference %.2e\n",
           n_req, TENANTS, d, tokens, secs, (double)tokens / secs, worst);
    for (int i = 0; i < n_req; i++)
        free(req[i].x), free(req[i].out);
    free(req);
    for (int i = 0; i < TENANTS; i++)
        lora_adapter_destroy(tenants[i]);
    lora_adapter_destroy(holder);
    for (int t = 0; t < 4; t++)
        free(w[t]);
    if (!(worst <= 1e-4)) {
        fprintf(stderr, "serve: a request's batched outputs differ from running it alone\n");
        return 1;
    }
    return 0;
}
