/* The Check suites of lora_tests, one per area; test_main.c runs them all. */
#ifndef LORA_TEST_SUITES_H
#define LORA_TEST_SUITES_H

#include <check.h>

Suite *version_suite(void);   /* version, status strings, lora_mse_loss */
Suite *config_suite(void);    /* defaults, derived defaults, bounds, validate */
Suite *adapter_suite(void);   /* shapes, get_config, init, set/get param, run info */
Suite *reference_suite(void); /* the double reference vs central finite differences */
Suite *exact_suite(void);     /* LORA_BACKEND_EXACT vs the reference */
Suite *attention_suite(void); /* RoPE, masks, window, softcap, dropout vs the reference */
Suite *backward_suite(void);  /* accumulation, zero_grad, call order */
Suite *threads_suite(void);   /* determinism per thread count, fork, thread failure */
Suite *pool_suite(void);      /* the worker pool itself: parts, failure, nesting, fork */
Suite *errors_suite(void);    /* every bad input: status, message, adapter survives */
Suite *poly_suite(void);      /* LORA_BACKEND_POLY vs the reference, MEASURE_ROWS */
Suite *threshold_suite(void); /* estimator known answers, AUTO, TOLERANCE, limits */
Suite *alloc_suite(void);     /* allocator hooks; failing the k-th allocation of a cycle */
Suite *numerics_suite(void);  /* huge logits, tiny/huge scales, L = 1, denormals, rank > width */
Suite *stress_suite(void);    /* threads over distinct adapters (shared borrowed base) = serial */
Suite *optimizer_suite(void); /* AdamW/SGD vs PyTorch's rules, clipping, flat views */
Suite *merge_suite(void);     /* merge/unmerge bound, safe merge, merged forward */
Suite *serving_suite(void);   /* borrowed bases, hot swap, concurrent tenants */
TCase *serving_apply_tcase(void); /* serving: lora_apply (test_apply.c) */
TCase *serving_typed_tcase(void); /* serving: bf16/f16 base weights (test_typed.c) */
TCase *serving_const_threads_tcase(void); /* serving: const handles shared by threads */
Suite *io_suite(void);        /* PEFT and GGUF round trips, independent readers, fuzz */
Suite *nonfinite_suite(void); /* overflowing results: NONFINITE, nothing changed */
Suite *io_files_suite(void);  /* special paths, sparse files, torn saves, PEFT parity */
Suite *split_suite(void);     /* threaded products at real sizes: THREADS 1 = 2 = reference */
Suite *bounds_suite(void);    /* error_bound and grad_bound known answers (MATH §3-4) */
Suite *names_suite(void);     /* limits and trailing characters of tensor names, both formats */
Suite *corners_suite(void);   /* second angles on single-test corners (optimizer, io, ...) */
Suite *tapes_suite(void);     /* lora_forward_ex / lora_backward_ex, tapes, LORA_FWD_INFER */
Suite *borrow_suite(void);    /* caller-owned factor and gradient storage */
Suite *io_layout_suite(void); /* save options, Q/K row order per format, recorded geometry */
Suite *decode_suite(void);    /* KV cache and lora_decode vs the full forward, many tenants */
Suite *bf16_suite(void);      /* LORA_COMPUTE_BF16 vs reference, CPU refusal, fp32 unchanged */
Suite *poly_kernels_suite(void); /* POLY's kernel schedule: split backward = one thread */

#endif
