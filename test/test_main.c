/* lora_tests: runs every suite in fork mode (a crash fails one test, not the run) and
 * exits non-zero when any test fails. */
#include <stdlib.h>
#include <string.h>

#include <check.h>

#include "suites.h"

int main(void)
{
    SRunner *sr = srunner_create(version_suite());
    srunner_add_suite(sr, config_suite());
    srunner_add_suite(sr, adapter_suite());
    srunner_add_suite(sr, reference_suite());
    srunner_add_suite(sr, exact_suite());
    srunner_add_suite(sr, attention_suite());
    srunner_add_suite(sr, backward_suite());
    srunner_add_suite(sr, threads_suite());
    srunner_add_suite(sr, pool_suite());
    srunner_add_suite(sr, errors_suite());
    srunner_add_suite(sr, poly_suite());
    srunner_add_suite(sr, threshold_suite());
    srunner_add_suite(sr, alloc_suite());
    srunner_add_suite(sr, numerics_suite());
    srunner_add_suite(sr, stress_suite());
    srunner_add_suite(sr, optimizer_suite());
    srunner_add_suite(sr, merge_suite());
    srunner_add_suite(sr, serving_suite());
    srunner_add_suite(sr, io_suite());
    srunner_add_suite(sr, nonfinite_suite());
    srunner_add_suite(sr, io_files_suite());
    srunner_add_suite(sr, split_suite());
    srunner_add_suite(sr, bounds_suite());
    srunner_add_suite(sr, names_suite());
    srunner_add_suite(sr, corners_suite());
    srunner_add_suite(sr, tapes_suite());
    srunner_add_suite(sr, borrow_suite());
    srunner_add_suite(sr, io_layout_suite());
    srunner_add_suite(sr, decode_suite());
    srunner_add_suite(sr, bf16_suite());
    srunner_add_suite(sr, poly_kernels_suite());
    /* Fork mode, unless CK_FORK=no (valgrind, TSan, debuggers: docs/reliability.md). */
    const char *fork_env = getenv("CK_FORK");
    srunner_set_fork_status(sr, fork_env && strcmp(fork_env, "no") == 0 ? CK_NOFORK : CK_FORK);
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
