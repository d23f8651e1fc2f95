/* Fixtures shared by the suites: a small fully featured layer (GQA, biases, output
 * projection, LoRA on Q, K, V and O) with its reference, an adapter holding the same
 * weights, and float copies of one problem's inputs. */
#ifndef LORA_TEST_HELPERS_H
#define LORA_TEST_HELPERS_H

#include <stddef.h>
#include <stdint.h>

#include <check.h>
#include <lora.h>

#include "reference.h"

/* The first parameter number lora.h does not define (update when params are appended). */
#define CFG_PARAM_UNKNOWN (LORA_CFG_COMPUTE + 1)

/* Library vs reference tolerance for float32 (max relative error, see reference.h). */
#define TOL_F32 1e-4

typedef struct tfx {
    ref_layer l;
    ref_problem p;
    lora_adapter *ad;
    float *xq, *xkv, *out, *dout, *dxq, *dxkv; /* xkv == xq when !p.cross */
    size_t nxq, nxkv, nout;
    size_t ngrads; /* floats of all gradients together (tfx_grads) */
} tfx;

/* d_model 8, 2 heads over 1 kv head, rank 2, targets Q|K|V|O, biases, out_proj,
 * THREADS 1; batch 2, len_q 5 (len_kv 7 when cross). Asserts on failure. */
void tfx_init(tfx *f, int cross, int causal);
/* The same with another layer configuration. */
void tfx_init_config(tfx *f, const ref_config *c, int cross);
void tfx_free(tfx *f);
/* One forward + backward (cross or self, dx wanted) on the fixture's inputs. */
int tfx_step(tfx *f);
/* Every gradient (dA, dB of Q, K, V, O) into dst (f->ngrads floats). */
void tfx_grads(const tfx *f, float *dst);
/* A fresh forward/backward still matches the reference (the adapter still works and
 * its parameters are the reference's). Zeroes the gradients. */
void tfx_assert_works(tfx *f);
/* Runs tfx_step (nonzero gradients), snapshots them into a malloc'd buffer. */
float *tfx_prime(tfx *f);
/* Gradients equal snap exactly; then tfx_assert_works; frees snap. */
void tfx_assert_unchanged_and_works(tfx *f, float *snap, const char *what);

/* A config with D_MODEL set and THREADS = 1 (asserts). */
lora_config *cfg_new(int d_model);
/* An adapter from cfg with random base weights (no biases) set; asserts. */
lora_adapter *adapter_new(const lora_config *cfg, uint64_t seed);
/* n floats ending exactly at a PROT_NONE guard page, so reading or writing past the
 * end faults (the test then dies with SIGSEGV). Contents poisoned with NaN. */
float *guarded_alloc(size_t n);
void guarded_free(float *p, size_t n);

/* One library forward + backward of a reference problem, captured: out, dx (dxq and,
 * for cross-attention, dxkv), every gradient (dA then dB of each adapted target in
 * Q, K, V, O order) and the run info after the forward and after the backward. */
typedef struct lib_result {
    int status;       /* first failing status, LORA_OK if none */
    const char *call; /* name of the failing call */
    float *out, *dxq, *dxkv, *grads; /* dxkv NULL for self-attention */
    size_t nout, nxq, nxkv, ngrads;
    lora_run_info fwd_info, info;
} lib_result;
/* zero_grad, forward(_cross), backward(_cross), get_grad on ad with p's inputs (rounded
 * to float). Returns r->status; r must be freed with lib_result_free either way. */
int lib_run(lora_adapter *ad, const ref_layer *l, const ref_problem *p, lib_result *r);
/* lib_run through lora_forward_ex / lora_backward_ex with args (NULL: lib_run). */
int lib_run_ex(lora_adapter *ad, const ref_layer *l, const ref_problem *p,
               const lora_attn_args *args, lib_result *r);
void lib_result_free(lib_result *r);
/* Bitwise equality of two results' out, dx and gradients. */
int lib_result_same(const lib_result *a, const lib_result *b);

/* R of the reference layer on problem p (ref_score_bound of its q, k); *vmax (if not
 * NULL) = max |V|. Asserts. */
double problem_score_bound(const ref_layer *l, const ref_problem *p, double *vmax);
/* Sets l's softmax scale (float-representable, in l->cfg too, so adapters made from l
 * get it) so that R on p is r; returns the R actually reached (r up to rounding), 0
 * (scale unchanged) when R is 0 whatever the scale. */
double problem_set_score_bound(ref_layer *l, const ref_problem *p, double r);

/* keep (rows, in): 1 where element (row, col) of target t's LoRA input is kept in the
 * training forward numbered count of an adapter seeded seed with dropout p. */
void lib_keep_mask(uint64_t seed, uint64_t count, int t, int64_t rows, int64_t in, double p,
                   uint8_t *keep);

/* Fills n floats with U(-1,1)*gain. */
void fill_uniform(float *x, size_t n, uint64_t seed, float gain);

#endif
