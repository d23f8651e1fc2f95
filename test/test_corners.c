#include <check.h>
#include "suites.h"
Suite *corners_suite(void)
{
    return suite_create("corners");
}
