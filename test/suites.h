/* The Check suites of lora_tests, one per area; test_main.c runs them all. */
#ifndef LORA_TEST_SUITES_H
#define LORA_TEST_SUITES_H

#include <check.h>

Suite *version_suite(void);   /* version, status strings, lora_mse_loss */
Suite *config_suite(void);    /* defaults, derived defaults, bounds, validate */
Suite *adapter_suite(void);   /* shapes, get_config, init, set/get param, run info */
Suite *reference_suite(void); /* the double reference vs central finite differences */
Suite *exact_suite(void);     /* LORA_BACKEND_EXACT vs the reference */
Suite *backward_suite(void);  /* accumulation, zero_grad, call order */
Suite *threads_suite(void);   /* determinism per thread count */
Suite *errors_suite(void);    /* every bad input: status, message, adapter survives */

#endif
