/* libFuzzer target: lora_load_peft with fuzz bytes as adapter_config.json (the JSON
 * parser and the PEFT options: r, lora_alpha, use_rslora, target_modules,
 * layers_to_transform, unsupported features) beside a valid adapter_model.safetensors
 * (rank 2, q/k/v/o of layer 0, written once with lora_save_peft). A load either fails
 * with a status and a message and leaves no adapter, or yields adapters that run.
 * Seeds: test/fuzz/corpus_peft_json/. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void write_valid_set(const char *dir)
{
    fz_mem m = {.budget = (size_t)64 << 20};
    lora_config *cfg = fz_layer_config(&m);
    lora_adapter *ad = NULL;
    if (!cfg || lora_config_set_int(cfg, LORA_CFG_RANK, 2) != LORA_OK ||
        lora_config_set_int(cfg, LORA_CFG_TARGETS, 15) != LORA_OK ||
        lora_config_set_int(cfg, LORA_CFG_INIT, LORA_INIT_GAUSSIAN) != LORA_OK ||
        lora_adapter_create(&ad, cfg) != LORA_OK)
        abort();
    lora_adapter *const set[1] = {ad};
    const int64_t layer[1] = {0};
    if (lora_save_peft(dir, set, layer, 1) != LORA_OK)
        abort();
    lora_adapter_destroy(ad);
    lora_config_destroy(cfg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char dir[128], file[160];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "%s/peft_json", fz_tmpdir());
        write_valid_set(dir);
        snprintf(file, sizeof file, "%s/adapter_config.json", dir);
    }
    fz_write(file, data, size);
    fz_load(0, dir);
    return 0;
}
