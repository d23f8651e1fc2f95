/* names_suite: the exact language of tensor names the loaders accept, through the public
 * API only (lora_load_peft / lora_load_gguf on files written here):
 *   PEFT: base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
 *   GGUF: blk.{i}.attn_{q,k,v,output}.weight.lora_{a,b}
 * with i a decimal layer index in [0, 2^31) without leading zeros. Every name pattern
 * loads into the right factor; any extra, missing or changed character, an index out of
 * range or with a sign, spaces or leading zeros makes the load fail with nothing
 * created. The same writers then vary the layout: overlapping tensors, spans longer
 * than their tensor, BF16 and F16 data, truncated GGUF files, a key given twice, a
 * __metadata__ that contradicts the config. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "fixtures.h"
#include "suites.h"
#include "test_io_util.h"

#define NT 8 /* tensors: A and B of q, k, v, o */
#define D_MODEL 8
#define RANK 2
#define NAME_MAX_LEN 200

static const char *const peft_mod[4] = {"q_proj", "k_proj", "v_proj", "o_proj"};
static const char *const gguf_mod[4] = {"attn_q", "attn_k", "attn_v", "attn_output"};
static const char *const dtype_names[3] = {"F32", "BF16", "F16"};
static const uint32_t ggml_types[3] = {0, 30, 1};
static const int target_bit[4] = {LORA_TARGET_Q, LORA_TARGET_K, LORA_TARGET_V, LORA_TARGET_O};

/* Tensor i: target i / 2, factor A (i even: RANK × D_MODEL) or B (D_MODEL × RANK). Both
 * are RANK·D_MODEL floats; values tell tensors and entries apart and are exact in BF16
 * (integers below 256). */
static float value_of(int i, int j) { return (float)(16 * (i + 1) + j); }

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

/* F16 tensors: entries j < 8 are subnormal (m·2^-24, m < 1024), the others normal
 * (2^(e−15)·(1 + m/1024)); the sign alternates with the tensor. */
static uint16_t half_bits(int i, int j)
{
    const unsigned sign = i % 2 ? 0x8000u : 0u;
    if (j < 8)
        return (uint16_t)(sign | (unsigned)(97 * i + 13 * j + 1));
    return (uint16_t)(sign | (unsigned)(j + 3) << 10 | (unsigned)((37 * i + 5 * j) % 1024));
}

static double half_value(int i, int j)
{
    const uint16_t h = half_bits(i, j);
    const int e = (h >> 10) & 31, m = h & 1023;
    const double v = e == 0 ? ldexp(m, -24) : ldexp(1.0 + m / 1024.0, e - 15);
    return h & 0x8000u ? -v : v;
}

#define TENSOR_ELEMS (RANK * D_MODEL)

typedef struct name_set {
    char name[NT][NAME_MAX_LEN + 8];
    size_t len[NT]; /* GGUF names may hold a NUL */
    /* Layout (name_set_layout fills the default: F32, one tensor after another). */
    int dtype;                /* DT_*, every tensor */
    uint64_t begin[NT];       /* data offset of each tensor */
    uint64_t data_bytes;      /* size of the data section */
    float gguf_alpha;         /* adapter.lora.alpha of GGUF files */
    int gguf_repeat_kv;       /* GGUF: key-value 1..4 written a second time (0: none) */
    const char *st_metadata;  /* PEFT: the safetensors __metadata__ object, or NULL */
} name_set;

static size_t tensor_bytes(const name_set *s)
{
    return (size_t)TENSOR_ELEMS * (s->dtype == DT_F32 ? 4 : 2);
}

static double expected_value(const name_set *s, int i, int j)
{
    return s->dtype == DT_F16 ? half_value(i, j) : value_of(i, j);
}

static void name_set_layout(name_set *s, int dtype)
{
    s->dtype = dtype;
    s->gguf_alpha = 4.0f;
    s->gguf_repeat_kv = 0;
    s->st_metadata = NULL;
    for (int i = 0; i < NT; i++)
        s->begin[i] = (uint64_t)i * tensor_bytes(s);
    s->data_bytes = (uint64_t)NT * tensor_bytes(s);
}

static void peft_names(name_set *s, const char *layer)
{
    for (int i = 0; i < NT; i++) {
        snprintf(s->name[i], sizeof s->name[i],
                 "base_model.model.model.layers.%s.self_attn.%s.lora_%c.weight", layer,
                 peft_mod[i / 2], i % 2 ? 'B' : 'A');
        s->len[i] = strlen(s->name[i]);
    }
    name_set_layout(s, 0);
}

static void gguf_names(name_set *s, const char *layer)
{
    for (int i = 0; i < NT; i++) {
        snprintf(s->name[i], sizeof s->name[i], "blk.%s.%s.weight.lora_%c", layer,
                 gguf_mod[i / 2], i % 2 ? 'b' : 'a');
        s->len[i] = strlen(s->name[i]);
    }
    name_set_layout(s, 0);
}

/* ---- writers ---------------------------------------------------------------------- */

/* The data section: each tensor's values at its offset (F32, BF16 = the high half of
 * the F32 bits, or F16 half_bits), zeros elsewhere; a later tensor overwrites an earlier
 * one where they overlap. */
static void put_data(tw_buf *b, const name_set *s)
{
    unsigned char *d = calloc(1, (size_t)s->data_bytes + 1);
    ck_assert_ptr_nonnull(d);
    for (int i = 0; i < NT; i++)
        for (int j = 0; j < TENSOR_ELEMS; j++) {
            const float f = value_of(i, j);
            uint32_t u;
            memcpy(&u, &f, 4);
            const int bytes = s->dtype == DT_F32 ? 4 : 2;
            const uint32_t bits = s->dtype == DT_F16 ? half_bits(i, j)
                                  : s->dtype == DT_BF16 ? u >> 16
                                                        : u;
            const uint64_t at = s->begin[i] + (uint64_t)j * (uint64_t)bytes;
            ck_assert(at + (uint64_t)bytes <= s->data_bytes);
            for (int k = 0; k < bytes; k++)
                d[at + (uint64_t)k] = (unsigned char)(bits >> (8 * k));
        }
    tw_put(b, d, (size_t)s->data_bytes);
    free(d);
}

/* adapter_config.json + adapter_model.safetensors (F32) in a fresh directory. */
static char *write_peft(const name_set *s)
{
    char *dir = fx_tmpdir();
    static const char config[] =
        "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4, \"target_modules\": "
        "[\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]}";
    tw_buf h = {0}, file = {0};
    tw_put(&h, "{", 1);
    if (s->st_metadata) {
        tw_put(&h, "\"__metadata__\":", 15);
        tw_put(&h, s->st_metadata, strlen(s->st_metadata));
        tw_put(&h, ",", 1);
    }
    for (int i = 0; i < NT; i++) {
        char item[NAME_MAX_LEN + 128];
        const int rows = i % 2 ? D_MODEL : RANK, cols = i % 2 ? RANK : D_MODEL;
        const int n = snprintf(item, sizeof item,
                               "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[%d,%d],"
                               "\"data_offsets\":[%llu,%llu]}",
                               i ? "," : "", s->name[i], dtype_names[s->dtype], rows, cols,
                               (unsigned long long)s->begin[i],
                               (unsigned long long)(s->begin[i] + tensor_bytes(s)));
        tw_put(&h, item, (size_t)n);
    }
    tw_put(&h, "}", 2); /* with the NUL: the header as a C string */
    tw_st_header(&file, (const char *)h.b, 0, -1);
    put_data(&file, s);
    tw_write_peft(dir, config, &file);
    tw_free(&h);
    tw_free(&file);
    return dir;
}

/* The bytes of a GGUF v3 LoRA adapter (alignment 32); *header_end: where the tensor
 * infos end. */
static tw_buf gguf_bytes(const name_set *s, size_t *header_end)
{
    tw_buf b = {0};
    tw_gguf_header(&b, 3, NT, s->gguf_repeat_kv ? 5 : 4);
    /* qwen2 rotates with NEOX RoPE, so its GGUF keeps Q/K rows in Hugging Face's order
     * and the values load unpermuted (llama's would be permuted: test_io_layout.c). */
    static const char *const kv[3][2] = {
        {"general.type", "adapter"}, {"adapter.type", "lora"}, {"general.architecture", "qwen2"}};
    for (int pass = 0; pass < 2; pass++) { /* the second pass: the repeated key only */
        for (int i = 0; i < 3; i++)
            if (!pass || s->gguf_repeat_kv == i + 1)
                tw_gguf_kv_str(&b, kv[i][0], kv[i][1]);
        if (!pass || s->gguf_repeat_kv == 4)
            tw_gguf_kv_f32(&b, "adapter.lora.alpha", pass ? 2.0f * s->gguf_alpha : s->gguf_alpha);
    }
    for (int i = 0; i < NT; i++) /* ne = [columns, rows] */
        tw_gguf_info(&b, s->name[i], s->len[i], i % 2 ? RANK : D_MODEL, i % 2 ? D_MODEL : RANK,
                     ggml_types[s->dtype], s->begin[i]);
    *header_end = b.n;
    tw_align(&b, 32);
    put_data(&b, s);
    return b;
}

/* The file of gguf_bytes, cut to its first `size` bytes when size < its length. */
static char *write_gguf_cut(const name_set *s, size_t size, char **dir_out)
{
    char *dir = fx_tmpdir(), *path = malloc(strlen(dir) + 16);
    ck_assert_ptr_nonnull(path);
    sprintf(path, "%s/a.gguf", dir);
    size_t header_end;
    tw_buf b = gguf_bytes(s, &header_end);
    fx_write_file(path, b.b, size < b.n ? size : b.n);
    tw_free(&b);
    *dir_out = dir;
    return path;
}

static char *write_gguf(const name_set *s, char **dir_out)
{
    return write_gguf_cut(s, SIZE_MAX, dir_out);
}

/* ---- loading ---------------------------------------------------------------------- */

static lora_config *names_config(void)
{
    lora_config *cfg = NULL;
    ck_assert_int_eq(lora_config_create(&cfg), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_D_MODEL, D_MODEL), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, 2), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_OUT_PROJ, 1), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_THREADS, 1), LORA_OK);
    return cfg;
}

/* Loads s in the given format. With want_layer >= 0 the load must succeed with one
 * adapter at that layer whose every factor holds what was written for its name; with
 * want_layer < 0 it must fail (FORMAT or UNSUPPORTED) creating nothing. */
static void expect_load(int gguf, const name_set *s, int64_t want_layer, const char *what)
{
    char *dir = NULL, *path = NULL;
    if (gguf)
        path = write_gguf(s, &dir);
    else
        dir = write_peft(s);
    lora_config *cfg = names_config();
    lora_adapter *ad[2] = {NULL, NULL};
    int64_t layers[2] = {-7, -7};
    size_t count = 99;
    const int st = gguf ? lora_load_gguf(ad, layers, 2, &count, path, cfg)
                        : lora_load_peft(ad, layers, 2, &count, dir, cfg);
    if (want_layer < 0) {
        ck_assert_msg(st == LORA_ERR_UNSUPPORTED || st == LORA_ERR_FORMAT,
                      "%s: %s loaded (status %d, layer %lld), should be refused", what,
                      gguf ? "GGUF" : "PEFT", st, (long long)layers[0]);
        ck_assert_ptr_null(ad[0]);
    } else {
        ck_assert_msg(st == LORA_OK, "%s: %s load failed (%d): %s", what,
                      gguf ? "GGUF" : "PEFT", st, lora_config_last_error(cfg));
        ck_assert_uint_eq(count, 1);
        ck_assert_msg(layers[0] == want_layer, "%s: layer %lld, want %lld", what,
                      (long long)layers[0], (long long)want_layer);
        for (int i = 0; i < NT; i++) {
            float got[RANK * D_MODEL];
            ck_assert_int_eq(lora_adapter_get_param(ad[0], target_bit[i / 2],
                                                    i % 2 ? LORA_B : LORA_A, got,
                                                    RANK * D_MODEL),
                             LORA_OK);
            for (int j = 0; j < RANK * D_MODEL; j++)
                ck_assert_msg(got[j] == expected_value(s, i, j),
                              "%s: factor of tensor %d entry %d is %g, want %g", what, i, j,
                              got[j], expected_value(s, i, j));
        }
        lora_adapter_destroy(ad[0]);
    }
    lora_config_destroy(cfg);
    fx_rmtree(dir);
    free(dir);
    free(path);
}

static void names_for(int gguf, name_set *s, const char *layer)
{
    if (gguf)
        gguf_names(s, layer);
    else
        peft_names(s, layer);
}

/* _i: 0 PEFT, 1 GGUF. */
START_TEST(test_layer_index_limits)
{
    const int gguf = _i;
    static const struct {
        const char *text;
        int64_t layer; /* -1: refused */
    } cases[] = {
        {"0", 0},           {"7", 7},           {"10", 10},
        {"1000000000", 1000000000},             {"2147483647", 2147483647},
        {"2147483648", -1}, {"4294967295", -1}, {"4294967296", -1},
        {"9999999999", -1}, {"10000000000", -1}, {"02147483647", -1},
        {"00", -1},         {"01", -1},         {"007", -1},
        {"", -1},           {"-1", -1},         {"+1", -1},
        {" 1", -1},         {"1 ", -1},         {"1a", -1},
        {"0x1", -1},        {"1e3", -1},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        name_set s;
        names_for(gguf, &s, cases[c].text);
        char what[64];
        snprintf(what, sizeof what, "layer index '%s'", cases[c].text);
        expect_load(gguf, &s, cases[c].layer, what);
    }
}
END_TEST

/* One name of a valid set changed: every tensor in turn gets a trailing character, loses
 * its last one, or (PEFT) has its factor letter's case flipped. */
START_TEST(test_every_name_trailing_and_truncated)
{
    const int gguf = _i;
    name_set ok;
    names_for(gguf, &ok, "3");
    expect_load(gguf, &ok, 3, "valid set");
    static const char *const tails[] = {"X", ".", "s", " ", "_", "0"};
    for (int i = 0; i < NT; i++) {
        for (size_t t = 0; t < sizeof tails / sizeof tails[0]; t++) {
            name_set s = ok;
            strcat(s.name[i], tails[t]);
            s.len[i] = strlen(s.name[i]);
            char what[NAME_MAX_LEN + 32];
            snprintf(what, sizeof what, "tensor '%s'", s.name[i]);
            expect_load(gguf, &s, -1, what);
        }
        name_set s = ok;
        s.name[i][--s.len[i]] = '\0';
        expect_load(gguf, &s, -1, s.name[i]);
    }
}
END_TEST

/* Changes inside a name: the module and factor parts, the prefix, separators. */
START_TEST(test_name_parts)
{
    const int gguf = _i;
    static const char *const peft_bad[] = {
        "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weightX",
        "base_model.model.model.layers.3.self_attn.q_proj.lora_a.weight",
        "base_model.model.model.layers.3.self_attn.q_proj.lora_A.Weight",
        "base_model.model.model.layers.3.self_attn.q_proj.lora_C.weight",
        "base_model.model.model.layers.3.self_attn.q_proj.lora_A_weight",
        "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight.lora_A.weight",
        "base_model.model.model.layers.3.self_attn.q_projX.lora_A.weight",
        "base_model.model.model.layers.3.self_attn.q_pro.lora_A.weight",
        "base_model.model.model.layers.3.self_attn.x_proj.lora_A.weight",
        "base_model.model.model.layers.3.self_attnX.q_proj.lora_A.weight",
        "base_model.model.model.layers.3.mlp.q_proj.lora_A.weight",
        "base_model.model.model.layers.3..self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.3self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layer.3.self_attn.q_proj.lora_A.weight",
        "Xbase_model.model.model.layers.3.self_attn.q_proj.lora_A.weight",
        "base_model.model.layers.3.self_attn.q_proj.lora_A.weight",
        "model.layers.3.self_attn.q_proj.lora_A.weight",
    };
    static const char *const gguf_bad[] = {
        "blk.3.attn_q.weight.lora_aX",   "blk.3.attn_q.weight.lora_A",
        "blk.3.attn_q.weight.lora_c",    "blk.3.attn_q.weight.lora_",
        "blk.3.attn_q.weightlora_a",     "blk.3.attn_q.bias.lora_a",
        "blk.3.attn_qX.weight.lora_a",   "blk.3.attn_.weight.lora_a",
        "blk.3.attn_o.weight.lora_a",    "blk.3.attn_outputX.weight.lora_a",
        "blk.3.ffn_q.weight.lora_a",     "blk.3..attn_q.weight.lora_a",
        "blk.3attn_q.weight.lora_a",     "blk3.attn_q.weight.lora_a",
        "Xblk.3.attn_q.weight.lora_a",   "block.3.attn_q.weight.lora_a",
        "blk.3.attn_q.weight.lora_a.weight.lora_a",
    };
    const char *const *bad = gguf ? gguf_bad : peft_bad;
    const size_t n = gguf ? sizeof gguf_bad / sizeof gguf_bad[0]
                          : sizeof peft_bad / sizeof peft_bad[0];
    for (size_t c = 0; c < n; c++) {
        name_set s;
        names_for(gguf, &s, "3");
        snprintf(s.name[0], sizeof s.name[0], "%s", bad[c]);
        s.len[0] = strlen(s.name[0]);
        expect_load(gguf, &s, -1, bad[c]);
    }
    if (gguf) { /* a NUL inside the name: the bytes after it count */
        name_set s;
        names_for(gguf, &s, "3");
        s.name[0][s.len[0]] = '\0';
        s.name[0][s.len[0] + 1] = 'X';
        s.len[0] += 2;
        expect_load(gguf, &s, -1, "blk.3.attn_q.weight.lora_a\\0X");
    }
}
END_TEST

/* ---- layout: where the name tests' files may differ from the writers' ------------- */

/* _i: 0 PEFT, 1 GGUF. Tensors stored in reverse order with gaps load; tensors that
 * overlap only in the last pair of the sorted order (partly, or one aliasing another)
 * are refused. Offsets are multiples of 32 (GGUF's alignment). */
START_TEST(test_overlap_in_last_pair)
{
    const int gguf = _i;
    name_set s;
    names_for(gguf, &s, "5");
    const uint64_t stride = 96; /* 64-byte F32 tensors with 32-byte gaps */
    for (int i = 0; i < NT; i++)
        s.begin[i] = (uint64_t)(NT - 1 - i) * stride;
    s.data_bytes = (uint64_t)(NT - 1) * stride + 64; /* no bytes after the last tensor */
    expect_load(gguf, &s, 5, "reversed tensors with gaps");
    /* Sorted by offset, tensor 0 comes last: make it start inside tensor 1, the data
       ending with it (so no check of trailing bytes can refuse the file instead). */
    s.begin[0] = s.begin[1] + 32;
    s.data_bytes = s.begin[0] + 64;
    expect_load(gguf, &s, -1, "last pair overlapping by 32 bytes");
    s.begin[0] = s.begin[1];
    s.data_bytes = s.begin[0] + 64;
    expect_load(gguf, &s, -1, "last tensor aliasing the one before");
}
END_TEST

/* _i: 0 PEFT, 1 GGUF. BF16 tensors (two bytes each, the high half of F32) and F16
 * tensors (subnormal and normal halves) load to the exact values, every entry in place. */
START_TEST(test_half_entries_in_place)
{
    const int gguf = _i;
    name_set s;
    names_for(gguf, &s, "2");
    name_set_layout(&s, DT_BF16);
    expect_load(gguf, &s, 2, "BF16 tensors");
    name_set_layout(&s, DT_F16);
    expect_load(gguf, &s, 2, "F16 tensors");
}
END_TEST

/* safetensors data_offsets must span exactly the tensor's bytes: one element more (the
 * span still inside the data, overlapping nothing) is refused. */
START_TEST(test_peft_span_longer_than_tensor)
{
    name_set s;
    peft_names(&s, "4");
    const uint64_t stride = 96;
    for (int i = 0; i < NT; i++)
        s.begin[i] = (uint64_t)i * stride;
    s.data_bytes = (uint64_t)(NT - 1) * stride + 64; /* no bytes after the last tensor */
    expect_load(0, &s, 4, "tensors with gaps");
    char *dir = write_peft(&s), path[512];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    size_t n;
    unsigned char *file = fx_read_file(path, &n);
    /* The first tensor's end offset 64 becomes 68. */
    char *at = strstr((char *)file + 8, "\"data_offsets\":[0,64]");
    ck_assert_ptr_nonnull(at);
    memcpy(at + strlen("\"data_offsets\":[0,"), "68", 2);
    fx_write_file(path, file, n);
    free(file);
    lora_config *cfg = names_config();
    lora_adapter *ad[2] = {NULL, NULL};
    int64_t layers[2];
    size_t count = 99;
    ck_assert_int_eq(lora_load_peft(ad, layers, 2, &count, dir, cfg), LORA_ERR_FORMAT);
    ck_assert_ptr_null(ad[0]);
    lora_config_destroy(cfg);
    fx_rmtree(dir);
    free(dir);
}
END_TEST

/* Every proper prefix of a valid GGUF file is refused (FORMAT), never read past its
 * end; the whole file loads. */
START_TEST(test_gguf_every_truncation)
{
    name_set s;
    gguf_names(&s, "1");
    size_t header_end;
    tw_buf b = gguf_bytes(&s, &header_end);
    const size_t full = b.n;
    tw_free(&b);
    lora_config *cfg = names_config();
    for (size_t cut = 0; cut < full; cut++) {
        char *dir = NULL, *path = write_gguf_cut(&s, cut, &dir);
        lora_adapter *ad[2] = {NULL, NULL};
        int64_t layers[2];
        size_t count = 99;
        const int st = lora_load_gguf(ad, layers, 2, &count, path, cfg);
        ck_assert_msg(st == LORA_ERR_FORMAT, "GGUF cut to %zu of %zu bytes (infos end at %zu): "
                      "status %d", cut, full, header_end, st);
        ck_assert_ptr_null(ad[0]);
        fx_rmtree(dir);
        free(dir);
        free(path);
    }
    lora_config_destroy(cfg);
    expect_load(1, &s, 1, "the whole file");
}
END_TEST

/* The cursor stops exactly at the end of the file: "GGUF" and a version 1 in exactly 8
 * bytes is read whole (UNSUPPORTED: v1), with its last byte missing it is truncated
 * (FORMAT), however the buffer continues in memory. */
START_TEST(test_gguf_read_ending_at_eof)
{
    static const unsigned char v1[8] = {'G', 'G', 'U', 'F', 1, 0, 0, 0};
    char *dir = fx_tmpdir(), path[512];
    snprintf(path, sizeof path, "%s/v1.gguf", dir);
    lora_config *cfg = names_config();
    for (size_t n = 8; n >= 7; n--) {
        fx_write_file(path, v1, n);
        size_t count = 99;
        const int st = lora_load_gguf(NULL, NULL, 0, &count, path, cfg);
        ck_assert_msg(st == (n == 8 ? LORA_ERR_UNSUPPORTED : LORA_ERR_FORMAT),
                      "GGUF v1 header of %zu bytes: status %d (%s)", n, st,
                      lora_config_last_error(cfg));
        ck_assert_uint_eq(count, 0);
    }
    lora_config_destroy(cfg);
    fx_rmtree(dir);
    free(dir);
}
END_TEST

/* GGUF alpha 0 means llama.cpp's scale 1: the adapter loads with alpha = rank. */
START_TEST(test_gguf_alpha_zero_is_rank)
{
    name_set s;
    gguf_names(&s, "0");
    for (int pass = 0; pass < 2; pass++) {
        s.gguf_alpha = pass ? 0.0f : 3.0f;
        char *dir = NULL, *path = write_gguf(&s, &dir);
        lora_config *cfg = names_config();
        lora_adapter *ad = NULL;
        int64_t layer;
        size_t count;
        ck_assert_int_eq(lora_load_gguf(&ad, &layer, 1, &count, path, cfg), LORA_OK);
        double alpha;
        ck_assert_int_eq(lora_adapter_get_config_double(ad, LORA_CFG_ALPHA, &alpha), LORA_OK);
        ck_assert_msg(alpha == (pass ? (double)RANK : 3.0), "file alpha %g: loaded alpha %g",
                      (double)s.gguf_alpha, alpha);
        lora_adapter_destroy(ad);
        lora_config_destroy(cfg);
        fx_rmtree(dir);
        free(dir);
        free(path);
    }
}
END_TEST

/* A GGUF key-value given twice is FORMAT, whichever it is (readers disagree on which
 * copy counts): general.type, adapter.type, general.architecture is skipped by liblora
 * but still fine twice, adapter.lora.alpha (the second copy twice the first). */
START_TEST(test_gguf_repeated_key)
{
    name_set s;
    gguf_names(&s, "3");
    expect_load(1, &s, 3, "every key once");
    static const char *const keys[5] = {"", "general.type", "adapter.type",
                                         "general.architecture", "adapter.lora.alpha"};
    for (int k = 1; k <= 4; k++) {
        s.gguf_repeat_kv = k; /* every one is read (general.architecture: the Q/K row order) */
        char *dir = NULL, *path = write_gguf(&s, &dir);
        lora_config *cfg = names_config();
        lora_adapter *ad[2] = {NULL, NULL};
        int64_t layers[2];
        size_t count = 99;
        const int st = lora_load_gguf(ad, layers, 2, &count, path, cfg);
        ck_assert_msg(st == LORA_ERR_FORMAT, "%s twice: status %d (%s)", keys[k], st,
                      lora_config_last_error(cfg));
        ck_assert_ptr_nonnull(strstr(lora_config_last_error(cfg), keys[k]));
        ck_assert_ptr_null(ad[0]);
        lora_config_destroy(cfg);
        fx_rmtree(dir);
        free(dir);
        free(path);
    }
}
END_TEST

/* The weights' __metadata__ (liblora writes r, lora_alpha and use_rslora there) must
 * agree with adapter_config.json (r 2, lora_alpha 4): each field that contradicts it,
 * or is not a string, is FORMAT naming the field, even when the tensors' shapes agree
 * with the config; agreeing strings, absent fields and other keys load. */
START_TEST(test_peft_metadata_agrees_with_config)
{
    static const struct {
        const char *metadata, *field; /* field NULL: loads */
    } rows[] = {
        {"{\"format\":\"pt\"}", NULL},
        {"{\"r\":\"2\",\"lora_alpha\":\"4\",\"use_rslora\":\"false\"}", NULL},
        {"{\"lora_alpha\":\"4.0\"}", NULL},
        {"{\"r\":\"4\"}", "r"},
        {"{\"r\":\"2\",\"lora_alpha\":\"8\"}", "lora_alpha"},
        {"{\"use_rslora\":\"true\"}", "use_rslora"},
        {"{\"r\":\"two\"}", "r"},
        {"{\"use_rslora\":\"yes\"}", "use_rslora"},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        name_set s;
        peft_names(&s, "6");
        s.st_metadata = rows[i].metadata;
        if (!rows[i].field) {
            expect_load(0, &s, 6, rows[i].metadata);
            continue;
        }
        char *dir = write_peft(&s);
        lora_config *cfg = names_config();
        lora_adapter *ad[2] = {NULL, NULL};
        int64_t layers[2];
        size_t count = 99;
        const int st = lora_load_peft(ad, layers, 2, &count, dir, cfg);
        ck_assert_msg(st == LORA_ERR_FORMAT, "__metadata__ %s: status %d (%s)",
                      rows[i].metadata, st, lora_config_last_error(cfg));
        ck_assert_msg(strstr(lora_config_last_error(cfg), rows[i].field) != NULL,
                      "__metadata__ %s: the message does not name %s: %s", rows[i].metadata,
                      rows[i].field, lora_config_last_error(cfg));
        ck_assert_ptr_null(ad[0]);
        lora_config_destroy(cfg);
        fx_rmtree(dir);
        free(dir);
    }
}
END_TEST

Suite *names_suite(void)
{
    Suite *s = suite_create("names");
    TCase *tc = tcase_create("patterns");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_layer_index_limits, 0, 2);
    tcase_add_loop_test(tc, test_every_name_trailing_and_truncated, 0, 2);
    tcase_add_loop_test(tc, test_name_parts, 0, 2);
    suite_add_tcase(s, tc);
    TCase *tl = tcase_create("layout");
    tcase_set_timeout(tl, 60);
    tcase_add_loop_test(tl, test_overlap_in_last_pair, 0, 2);
    tcase_add_loop_test(tl, test_half_entries_in_place, 0, 2);
    tcase_add_test(tl, test_peft_span_longer_than_tensor);
    tcase_add_test(tl, test_gguf_every_truncation);
    tcase_add_test(tl, test_gguf_alpha_zero_is_rank);
    tcase_add_test(tl, test_gguf_read_ending_at_eof);
    tcase_add_test(tl, test_gguf_repeated_key);
    tcase_add_test(tl, test_peft_metadata_agrees_with_config);
    suite_add_tcase(s, tl);
    return s;
}
