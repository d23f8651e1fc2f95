/* libFuzzer target: lora_load_peft with fuzz bytes as adapter_model.safetensors (8-byte
 * header length, JSON header, tensor data) beside a valid adapter_config.json (r 2,
 * q/k/v/o). A load either fails with a status and a message and leaves no adapter, or
 * yields adapters with finite factors that run. Seeds: test/fuzz/corpus_safetensors/. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char config_json[] =
    "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, \"use_rslora\": false,\n"
    " \"target_modules\": [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]}\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char dir[128], file[160];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "%s/peft", fz_tmpdir());
        mkdir(dir, 0700);
        snprintf(file, sizeof file, "%s/adapter_config.json", dir);
        fz_write(file, (const uint8_t *)config_json, sizeof config_json - 1);
        snprintf(file, sizeof file, "%s/adapter_model.safetensors", dir);
    }
    fz_write(file, data, size);
    fz_load(0, dir);
    return 0;
}
