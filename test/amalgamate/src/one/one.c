/* Names file two.c defines too, each with its own meaning. */
#define _GNU_SOURCE
#include <string.h>

#include "../../include/lora.h"
#include "one.h"

#define SCALE 10

typedef struct pair { int a; } pair;
enum { LIMIT = 3 };
static int counter = 1;

static int helper(void) { return counter + LIMIT; }

const int one_table[3] = {1, 2, 3};

int one_shared(int x) { return SCALE * x + one_table[2]; }

int lora_one(void)
{
    pair p = {helper()};
    return p.a + (int)strlen("ab"); /* 1 + 3 + 2 */
}
