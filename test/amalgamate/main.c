/* Links the generated test/amalgamate amalgamation: each file kept its own names. */
#include <stdio.h>

#include "lora.h"

int main(void)
{
    int one = lora_one(), two = lora_two();
    printf("amalgamate test: lora_one %d (want 6), lora_two %d (want 36)\n", one, two);
    return one == 6 && two == 36 ? 0 : 1;
}
