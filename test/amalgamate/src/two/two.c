#include "../../include/lora.h"
#include "../one/one.h"

typedef struct pair { int a, b; } pair;
enum { LIMIT = 5 };
static int counter = 2;

static int helper(void) { return counter * LIMIT; }

#define COLOR(name, value) COLOR_##name = value,
enum color {
#include "colors.def"
};
#undef COLOR
#define COLOR(name, value) +value
static const int color_sum = 0
#include "colors.def"
    ;
#undef COLOR

int lora_two(void)
{
    pair p = {helper(), one_shared(COLOR_green)};
    return p.a + p.b + color_sum; /* 2·5 + (10·2 + 3) + 3 */
}
