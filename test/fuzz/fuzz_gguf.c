/* libFuzzer target: lora_load_gguf on fuzz bytes written to a file (GGUF v2/v3 header,
 * metadata, tensor infos, data). A load either fails with a status and a message and
 * leaves no adapter, or yields adapters with finite factors that run a forward and a
 * backward. Seeds (files lora_save_gguf wrote): test/fuzz/corpus_gguf/. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char path[128];
    if (!path[0])
        snprintf(path, sizeof path, "%s/adapter.gguf", fz_tmpdir());
    fz_write(path, data, size);
    fz_load(1, path);
    return 0;
}
