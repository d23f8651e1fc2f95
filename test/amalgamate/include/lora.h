/* Stand-in public header for the amalgamation generator's test (tools/amalgamate.py). */
#ifndef LORA_H
#define LORA_H
#define LORA_VERSION_MAJOR 9
#define LORA_VERSION_MINOR 8
#define LORA_VERSION_PATCH 7
#define LORA_API
LORA_API int lora_one(void);
LORA_API int lora_two(void);
#endif
