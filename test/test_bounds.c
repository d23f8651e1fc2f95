#include <check.h>
#include "suites.h"
Suite *bounds_suite(void)
{
    return suite_create("bounds");
}
