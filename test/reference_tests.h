/* Test cases of the double reference kept in test_reference_*.c; reference_suite
 * (test_reference.c) adds them to its suite. */
#ifndef LORA_TEST_REFERENCE_TESTS_H
#define LORA_TEST_REFERENCE_TESTS_H

#include <check.h>

/* RoPE, masks, window, softcap, dropout: finite differences and identities. */
void reference_attn_tests(Suite *s);
/* Each model's attention transcribed from its reference code vs the configured reference. */
void reference_models_tests(Suite *s);

#endif
