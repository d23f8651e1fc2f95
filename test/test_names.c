#include <check.h>
#include "suites.h"
Suite *names_suite(void)
{
    return suite_create("names");
}
