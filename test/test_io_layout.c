/* io_layout_suite: what adapter files record about the model and the layer. Save
 * options (base_model_name_or_path in adapter_config.json and GGUF's general.base_model.*,
 * struct_size rules); the Q/K row order of each file convention (PEFT: Hugging Face's
 * rotate_half order; GGUF of a NORM-RoPE architecture such as llama: the interleaved
 * order convert_hf_to_gguf.py permutes into), checked against the reference's
 * ref_rope_permute_rows on the bytes written; the recorded geometry (liblora.* keys) and
 * the loads it refuses. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <check.h>
#include <lora.h>

#include "fixtures.h"
#include "helpers.h"
#include "reference.h"
#include "suites.h"
#include "test_io_util.h"

/* ---- helpers ---------------------------------------------------------------------- */

typedef struct layout_spec {
    int d_model, n_heads, n_kv_heads, rope, rope_dim; /* rope_dim 0: HEAD_DIM */
} layout_spec;

static fx_spec layout_fx(const layout_spec *s)
{
    return (fx_spec){.d_model = s->d_model, .n_heads = s->n_heads,
                     .n_kv_heads = s->n_kv_heads, .rank = 2, .targets = 15, .out_proj = 1,
                     .alpha = 4.0};
}

/* A config of s, rank 2, targets Q|K|V|O with OUT_PROJ. Asserts. */
static lora_config *layout_config(const layout_spec *s)
{
    fx_spec f = layout_fx(s);
    lora_config *cfg = fx_config(&f);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_ROPE, s->rope), LORA_OK);
    if (s->rope_dim)
        ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_ROPE_DIM, s->rope_dim), LORA_OK);
    return cfg;
}

/* An adapter of s with random factors (B nonzero), or NULL when lora_adapter_create
 * refuses its RoPE (a build that does not compute RoPE yet: LORA_ERR_UNSUPPORTED, the
 * only refusal accepted). */
static lora_adapter *layout_adapter(const layout_spec *s, uint64_t seed)
{
    lora_config *cfg = layout_config(s);
    lora_adapter *ad = NULL;
    const int st = lora_adapter_create(&ad, cfg);
    lora_config_destroy(cfg);
    if (st == LORA_ERR_UNSUPPORTED && s->rope != LORA_ROPE_NONE)
        return NULL;
    ck_assert_int_eq(st, LORA_OK);
    fx_randomize_factors(ad, seed, 0.5f);
    return ad;
}

static float *get_factor(const lora_adapter *ad, int target, int which, int64_t *rows,
                         int64_t *cols)
{
    ck_assert_int_eq(lora_adapter_param_shape(ad, target, which, rows, cols), LORA_OK);
    const size_t n = (size_t)(*rows * *cols);
    float *v = malloc(n * sizeof(float));
    ck_assert_int_eq(lora_adapter_get_param(ad, target, which, v, n), LORA_OK);
    return v;
}

/* src (rows, cols) with its rows permuted by ref_rope_permute_rows (inverse: back to
 * HALF); exact in double. */
static float *permuted(const float *src, int heads, int head_dim, int rope_dim, int64_t cols,
                       int inverse)
{
    const size_t n = (size_t)heads * (size_t)head_dim * (size_t)cols;
    double *a = malloc(n * sizeof(double)), *b = malloc(n * sizeof(double));
    float *out = malloc(n * sizeof(float));
    ck_assert(a && b && out);
    for (size_t k = 0; k < n; k++)
        a[k] = src[k];
    ref_rope_permute_rows(a, b, heads, head_dim, rope_dim, cols, inverse);
    for (size_t k = 0; k < n; k++)
        out[k] = (float)b[k];
    free(a);
    free(b);
    return out;
}

static void assert_floats_eq(const float *got, const float *want, size_t n, const char *what)
{
    for (size_t k = 0; k < n; k++)
        ck_assert_msg(got[k] == want[k], "%s[%zu] = %g, want %g", what, k, got[k], want[k]);
}

/* Loads one layer (path: GGUF when gguf, else a PEFT dir) with cfg; *ad NULL on failure. */
static int load_one(int gguf, const char *path, lora_config *cfg, lora_adapter **ad)
{
    int64_t layer;
    size_t n = 0;
    *ad = NULL;
    return gguf ? lora_load_gguf(ad, &layer, 1, &n, path, cfg)
                : lora_load_peft(ad, &layer, 1, &n, path, cfg);
}

static int save_one(int gguf, const char *path, lora_adapter *ad, const char *arch)
{
    lora_adapter *set[1] = {ad};
    const int64_t layer[1] = {3};
    return gguf ? lora_save_gguf(path, set, layer, 1, arch) : lora_save_peft(path, set, layer, 1);
}

static void assert_same_factors(const lora_adapter *a, const lora_adapter *b)
{
    size_t na, nb;
    float *pa = fx_params(a, &na), *pb = fx_params(b, &nb);
    ck_assert_uint_eq(na, nb);
    assert_floats_eq(pa, pb, na, "factor");
    free(pa);
    free(pb);
}

static const char *const gguf_names[4] = {"attn_q", "attn_k", "attn_v", "attn_output"};
static const char *const peft_names[4] = {"q_proj", "k_proj", "v_proj", "o_proj"};

/* The factor `which` of target t (index 0..3) as layer 3 of a saved file. */
static float *file_factor(int gguf, const char *path, int t, int which, int64_t rows,
                          int64_t cols)
{
    char name[160];
    if (gguf) {
        gw_file g;
        gw_read(path, &g);
        snprintf(name, sizeof name, "blk.3.%s.weight.lora_%c", gguf_names[t], which ? 'b' : 'a');
        int64_t r, c;
        float *v = gw_tensor_f32(&g, name, &r, &c);
        ck_assert(r == rows && c == cols);
        gw_free(&g);
        return v;
    }
    char *w = path_in(path, "adapter_model.safetensors");
    snprintf(name, sizeof name, "base_model.model.model.layers.3.self_attn.%s.lora_%c.weight",
             peft_names[t], which ? 'B' : 'A');
    float *v = st_tensor_f32(w, name, rows, cols);
    free(w);
    return v;
}

/* Every factor of ad in a saved file: Q/K lora_B rows permuted (to_interleaved: HALF ->
 * INTERLEAVED; else back), with rope_dim; everything else as the adapter holds it. */
static void assert_file_rows(int gguf, const char *path, const lora_adapter *ad,
                             const layout_spec *s, int permute, int to_interleaved)
{
    const int head_dim = s->d_model / s->n_heads;
    const int rope_dim = s->rope_dim ? s->rope_dim : head_dim;
    for (int t = 0; t < 4; t++)
        for (int w = 0; w < 2; w++) {
            int64_t r, c;
            float *mine = get_factor(ad, fx_tbits[t], w, &r, &c);
            float *in_file = file_factor(gguf, path, t, w, r, c);
            const int heads = t == 0 ? s->n_heads : s->n_kv_heads;
            float *want = permute && w == LORA_B && t < 2
                              ? permuted(mine, heads, head_dim, rope_dim, c, !to_interleaved)
                              : NULL;
            char what[64];
            snprintf(what, sizeof what, "%s %s.lora_%c", gguf ? "GGUF" : "PEFT", gguf_names[t],
                     w ? 'b' : 'a');
            assert_floats_eq(in_file, want ? want : mine, (size_t)(r * c), what);
            if (want) /* the permutation moved something: the check can fail */
                ck_assert(memcmp(want, mine, (size_t)(r * c) * sizeof(float)) != 0);
            free(want);
            free(in_file);
            free(mine);
        }
}

/* ---- save options -------------------------------------------------------------------- */

static int save_with(int gguf, const char *path, lora_adapter *ad, const lora_save_options *o)
{
    lora_adapter *set[1] = {ad};
    const int64_t layer[1] = {3};
    return gguf ? lora_save_gguf_ex(path, set, layer, 1, o) : lora_save_peft_ex(path, set, layer, 1, o);
}

/* base_model_name_or_path: adapter_config.json's key, GGUF's general.base_model.*. */
START_TEST(test_save_base_model)
{
    const int gguf = _i;
    const layout_spec s = {16, 4, 2, LORA_ROPE_NONE, 0};
    lora_adapter *ad = layout_adapter(&s, 1);
    char *dir = fx_tmpdir();
    char *path = path_in(dir, gguf ? "a.gguf" : "peft");
    static const struct {
        const char *base, *repo_url; /* NULL: no repo_url */
    } cases[] = {
        {"meta-llama/Llama-3.2-1B", "https://huggingface.co/meta-llama/Llama-3.2-1B"},
        {"/models/tiny-llama", NULL},
        {"https://example.org/models/m", "https://example.org/models/m"},
        {"caf\xc3\xa9/mod\xc3\xa8le-\xf0\x9f\xa6\x99", NULL}, /* UTF-8, not an id: no URL */
        {NULL, NULL},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const lora_save_options o = {sizeof o, cases[k].base, NULL};
        ck_assert_msg(save_with(gguf, path, ad, &o) == LORA_OK, "%s", lora_adapter_last_error(ad));
        if (gguf) {
            gw_file g;
            gw_read(path, &g);
            const gw_kv *count = gw_find(&g, "general.base_model.count");
            if (!cases[k].base) {
                ck_assert_ptr_null(count);
                ck_assert_ptr_null(gw_find(&g, "general.base_model.0.name"));
            } else {
                ck_assert(count && count->type == 4 && le32(g.b + count->at) == 1);
                char v[1100];
                gw_string(&g, "general.base_model.0.name", v, sizeof v);
                ck_assert_str_eq(v, cases[k].base);
                if (cases[k].repo_url) {
                    gw_string(&g, "general.base_model.0.repo_url", v, sizeof v);
                    ck_assert_str_eq(v, cases[k].repo_url);
                } else {
                    ck_assert_ptr_null(gw_find(&g, "general.base_model.0.repo_url"));
                }
            }
            gw_free(&g);
        } else {
            char *cpath = path_in(path, "adapter_config.json");
            size_t n;
            char *cj = (char *)fx_read_file(cpath, &n);
            const char *v = json_value(cj, "base_model_name_or_path");
            ck_assert_ptr_nonnull(v);
            if (!cases[k].base) {
                ck_assert(strncmp(v, "null", 4) == 0);
            } else {
                const size_t len = strlen(cases[k].base);
                ck_assert_msg(v[0] == '"' && strncmp(v + 1, cases[k].base, len) == 0 &&
                                  v[len + 1] == '"',
                              "base_model_name_or_path: %.60s", v);
            }
            free(cj);
            free(cpath);
        }
        lora_adapter *back = NULL;
        lora_config *cfg = layout_config(&s);
        ck_assert_int_eq(load_one(gguf, path, cfg, &back), LORA_OK);
        assert_same_factors(back, ad);
        lora_adapter_destroy(back);
        lora_config_destroy(cfg);
    }
    lora_adapter_destroy(ad);
    fx_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* Bad options fail naming the problem and write nothing; struct_size rules. */
START_TEST(test_save_options_refused)
{
    const int gguf = _i;
    const layout_spec s = {16, 4, 2, LORA_ROPE_NONE, 0};
    lora_adapter *ad = layout_adapter(&s, 2);
    char *dir = fx_tmpdir();
    char *path = path_in(dir, gguf ? "a.gguf" : "peft");
    char long_name[1026];
    memset(long_name, 'a', sizeof long_name - 1);
    long_name[1025] = '\0';
    static const char *const bad_names[] = {
        "", "a\x01z", "tab\tname", "del\x7f", "cut\xc3", "overlong\xc0\xaf", "surrogate\xed\xa0\x80",
        "c1\xc2\x85", "past\xf4\x90\x80\x80", "lone\x80"};
    for (size_t k = 0; k < sizeof bad_names / sizeof bad_names[0] + 1; k++) {
        const lora_save_options o = {sizeof o,
                                     k < sizeof bad_names / sizeof bad_names[0] ? bad_names[k]
                                                                                : long_name,
                                     NULL};
        ck_assert_msg(save_with(gguf, path, ad, &o) == LORA_ERR_INVALID_ARG, "name %zu", k);
        ck_assert(strstr(lora_adapter_last_error(ad), "base_model_name_or_path"));
        struct stat st;
        ck_assert_int_ne(stat(path, &st), 0); /* nothing written */
    }
    long_name[1024] = '\0'; /* 1024 bytes: the longest accepted */
    lora_save_options ok = {sizeof ok, long_name, NULL};
    ck_assert_int_eq(save_with(gguf, path, ad, &ok), LORA_OK);
    /* struct_size: below the first version, INVALID_ARG; above, the unknown bytes must be
     * zero (a newer caller's fields this library would ignore), else UNSUPPORTED. */
    for (uint32_t size = 0; size < sizeof(lora_save_options); size += 4) {
        ok.struct_size = size;
        ck_assert_int_eq(save_with(gguf, path, ad, &ok), LORA_ERR_INVALID_ARG);
        ck_assert(strstr(lora_adapter_last_error(ad), "struct_size"));
    }
    struct {
        lora_save_options o;
        uint64_t newer_field;
    } big = {{sizeof big, "org/name", NULL}, 0};
    ck_assert_int_eq(save_with(gguf, path, ad, &big.o), LORA_OK);
    big.newer_field = 1;
    ck_assert_int_eq(save_with(gguf, path, ad, &big.o), LORA_ERR_UNSUPPORTED);
    ck_assert(strstr(lora_adapter_last_error(ad), "does not know"));
    lora_adapter_destroy(ad);
    fx_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* The _ex calls with NULL options, or options repeating the plain call's arguments, write
 * the same bytes as lora_save_peft / lora_save_gguf. */
START_TEST(test_save_ex_equals_plain)
{
    const layout_spec s = {16, 4, 2, LORA_ROPE_NONE, 0};
    lora_adapter *ad = layout_adapter(&s, 3);
    lora_adapter *set[1] = {ad};
    const int64_t layer[1] = {3};
    char *dir = fx_tmpdir();
    char *p1 = path_in(dir, "1.gguf"), *p2 = path_in(dir, "2.gguf");
    const char *archs[3] = {NULL, "qwen2", "llama"};
    for (int k = 0; k < 3; k++) {
        const lora_save_options o = {sizeof o, NULL, archs[k]};
        ck_assert_int_eq(lora_save_gguf(p1, set, layer, 1, archs[k]), LORA_OK);
        ck_assert_int_eq(lora_save_gguf_ex(p2, set, layer, 1, k ? &o : NULL), LORA_OK);
        size_t n1, n2;
        unsigned char *b1 = fx_read_file(p1, &n1), *b2 = fx_read_file(p2, &n2);
        ck_assert(n1 == n2 && memcmp(b1, b2, n1) == 0);
        free(b1);
        free(b2);
    }
    char *d1 = path_in(dir, "peft1"), *d2 = path_in(dir, "peft2");
    ck_assert_int_eq(lora_save_peft(d1, set, layer, 1), LORA_OK);
    ck_assert_int_eq(lora_save_peft_ex(d2, set, layer, 1, NULL), LORA_OK);
    static const char *const files[2] = {"adapter_config.json", "adapter_model.safetensors"};
    for (int f = 0; f < 2; f++) {
        char *f1 = path_in(d1, files[f]), *f2 = path_in(d2, files[f]);
        size_t n1, n2;
        unsigned char *b1 = fx_read_file(f1, &n1), *b2 = fx_read_file(f2, &n2);
        ck_assert(n1 == n2 && memcmp(b1, b2, n1) == 0);
        free(b1);
        free(b2);
        free(f1);
        free(f2);
    }
    lora_adapter_destroy(ad);
    fx_rmtree(dir);
    free(d1);
    free(d2);
    free(p1);
    free(p2);
    free(dir);
}
END_TEST

/* ---- Q/K row order ---------------------------------------------------------------------- */

/* Adapters without RoPE hold Hugging Face's rows (their base weights come from HF/PEFT
 * checkpoints): a llama GGUF gets Q/K lora_B permuted as convert_hf_to_gguf.py permutes
 * W_Q/W_K (n_head for Q, n_head_kv for K), a qwen2 GGUF (NEOX RoPE) and PEFT do not;
 * loading undoes it exactly. _i: bit 0 GQA, bit 1 qwen2. */
START_TEST(test_gguf_qk_rows_without_rope)
{
    const int gqa = _i & 1, qwen = _i >> 1;
    const layout_spec s = {32, 4, gqa ? 2 : 4, LORA_ROPE_NONE, 0}; /* head_dim 8 */
    lora_adapter *ad = layout_adapter(&s, 10u + (uint64_t)_i);
    char *dir = fx_tmpdir();
    char *path = path_in(dir, "a.gguf");
    ck_assert_int_eq(save_one(1, path, ad, qwen ? "qwen2" : NULL), LORA_OK);
    assert_file_rows(1, path, ad, &s, !qwen, 1);
    gw_file g;
    gw_read(path, &g);
    char rows[32];
    gw_string(&g, "liblora.qk_rows", rows, sizeof rows);
    ck_assert_str_eq(rows, qwen ? "half" : "interleaved");
    gw_free(&g);
    lora_config *cfg = layout_config(&s);
    lora_adapter *back = NULL;
    ck_assert_int_eq(load_one(1, path, cfg, &back), LORA_OK);
    assert_same_factors(back, ad);
    lora_adapter_destroy(back);
    /* PEFT: Hugging Face's order, nothing permuted. */
    char *peft = path_in(dir, "peft");
    ck_assert_int_eq(save_one(0, peft, ad, NULL), LORA_OK);
    assert_file_rows(0, peft, ad, &s, 0, 0);
    ck_assert_int_eq(load_one(0, peft, cfg, &back), LORA_OK);
    assert_same_factors(back, ad);
    lora_adapter_destroy(back);
    lora_config_destroy(cfg);
    lora_adapter_destroy(ad);
    fx_rmtree(dir);
    free(peft);
    free(path);
    free(dir);
}
END_TEST

/* A third-party file (no liblora.qk_rows): general.architecture decides; with the key,
 * the key does (the order its writer used). */
START_TEST(test_gguf_qk_rows_key_or_architecture)
{
    const layout_spec s = {32, 4, 2, LORA_ROPE_NONE, 0};
    lora_adapter *ad = layout_adapter(&s, 20);
    char *dir = fx_tmpdir();
    char *path = path_in(dir, "a.gguf"), *other = path_in(dir, "b.gguf");
    ck_assert_int_eq(save_one(1, path, ad, "qwen2"), LORA_OK);
    /* Same-length rename qwen2 -> llama: the key still says "half", rows load as saved. */
    gw_file g;
    gw_read(path, &g);
    const gw_kv *arch = gw_find(&g, "general.architecture");
    ck_assert(arch && arch->len == 5);
    memcpy(g.b + arch->at, "llama", 5);
    fx_write_file(path, g.b, g.size);
    gw_free(&g);
    lora_config *cfg = layout_config(&s);
    lora_adapter *back = NULL;
    ck_assert_int_eq(load_one(1, path, cfg, &back), LORA_OK);
    assert_same_factors(back, ad);
    lora_adapter_destroy(back);
    /* Without liblora.* keys the file is llama's: its rows are read as interleaved. */
    gw_read(path, &g);
    gw_write_without(&g, "liblora.", other);
    gw_free(&g);
    gw_read(other, &g);
    ck_assert_ptr_null(gw_find(&g, "liblora.qk_rows"));
    gw_free(&g);
    ck_assert_int_eq(load_one(1, other, cfg, &back), LORA_OK);
    int64_t r, c;
    float *want_q = get_factor(ad, LORA_TARGET_Q, LORA_B, &r, &c);
    float *got_q = get_factor(back, LORA_TARGET_Q, LORA_B, &r, &c);
    float *undone = permuted(want_q, 4, 8, 8, c, 1); /* the HALF rows read as interleaved */
    assert_floats_eq(got_q, undone, (size_t)(r * c), "Q lora_b");
    free(undone);
    free(got_q);
    free(want_q);
    lora_adapter_destroy(back);
    lora_config_destroy(cfg);
    lora_adapter_destroy(ad);
    fx_rmtree(dir);
    free(other);
    free(path);
    free(dir);
}
END_TEST

/* RoPE adapters (_i: layout x MHA/GQA x full/partial rotary): a HALF adapter's Q/K rows
 * are permuted into a llama GGUF, an INTERLEAVED adapter's are not, and PEFT gets the
 * INTERLEAVED adapter's rows permuted back to HF order; each loads back exactly, and a
 * file of one layout loads into a config of the other with the rows converted. Until
 * lora_adapter_create computes RoPE it refuses such adapters (UNSUPPORTED), the only
 * refusal accepted here. */
START_TEST(test_rope_layout_files)
{
    const int interleaved = _i & 1, gqa = (_i >> 1) & 1, partial = _i >> 2;
    const int rope = interleaved ? LORA_ROPE_INTERLEAVED : LORA_ROPE_HALF;
    const layout_spec s = {32, 4, gqa ? 2 : 4, rope, partial ? 4 : 0};
    lora_adapter *ad = layout_adapter(&s, 30u + (uint64_t)_i);
    if (!ad) {
        lora_config *cfg = layout_config(&s);
        ck_assert_int_eq(lora_config_validate(cfg), LORA_ERR_UNSUPPORTED);
        ck_assert(strstr(lora_config_last_error(cfg), "ROPE"));
        lora_config_destroy(cfg);
        return;
    }
    char *dir = fx_tmpdir();
    char *path = path_in(dir, "a.gguf"), *peft = path_in(dir, "peft");
    ck_assert_int_eq(save_one(1, path, ad, "llama"), LORA_OK);
    assert_file_rows(1, path, ad, &s, !interleaved, 1);
    ck_assert_int_eq(save_one(0, peft, ad, NULL), LORA_OK);
    assert_file_rows(0, peft, ad, &s, interleaved, 0);
    lora_config *cfg = layout_config(&s);
    layout_spec o = s;
    o.rope = interleaved ? LORA_ROPE_HALF : LORA_ROPE_INTERLEAVED;
    lora_config *other = layout_config(&o);
    for (int gguf = 0; gguf < 2; gguf++) {
        lora_adapter *back = NULL;
        ck_assert_int_eq(load_one(gguf, gguf ? path : peft, cfg, &back), LORA_OK);
        assert_same_factors(back, ad);
        lora_adapter_destroy(back);
        /* The other layout: Q/K lora_B rows converted, the rest as saved. */
        ck_assert_int_eq(load_one(gguf, gguf ? path : peft, other, &back), LORA_OK);
        for (int t = 0; t < 2; t++) {
            int64_t r, c;
            float *mine = get_factor(ad, fx_tbits[t], LORA_B, &r, &c);
            float *got = get_factor(back, fx_tbits[t], LORA_B, &r, &c);
            float *want = permuted(mine, t ? s.n_kv_heads : s.n_heads, 8, partial ? 4 : 8, c,
                                   interleaved);
            assert_floats_eq(got, want, (size_t)(r * c), "converted lora_b");
            free(want);
            free(got);
            free(mine);
        }
        lora_adapter_destroy(back);
    }
    lora_config_destroy(other);
    lora_config_destroy(cfg);
    lora_adapter_destroy(ad);
    fx_rmtree(dir);
    free(peft);
    free(path);
    free(dir);
}
END_TEST

/* ---- recorded geometry --------------------------------------------------------------- */

/* The keys written: GGUF liblora.* typed, safetensors __metadata__ strings. */
START_TEST(test_geometry_written)
{
    const layout_spec s = {32, 4, 2, LORA_ROPE_NONE, 0};
    lora_adapter *ad = layout_adapter(&s, 40);
    char *dir = fx_tmpdir();
    char *path = path_in(dir, "a.gguf"), *peft = path_in(dir, "peft");
    ck_assert_int_eq(save_one(1, path, ad, NULL), LORA_OK);
    ck_assert_int_eq(save_one(0, peft, ad, NULL), LORA_OK);
    static const struct {
        const char *key, *text;
        uint32_t u32;
    } want[] = {{"liblora.d_model", "32", 32},   {"liblora.n_heads", "4", 4},
                {"liblora.n_kv_heads", "2", 2},  {"liblora.head_dim", "8", 8},
                {"liblora.rope", "none", 0},     {"liblora.causal", "false", 0},
                {"liblora.out_proj", "true", 1}, {"liblora.rope_theta", "", 0},
                {"liblora.rope_dim", "", 0}};
    gw_file g;
    gw_read(path, &g);
    char *w = path_in(peft, "adapter_model.safetensors");
    for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) {
        const gw_kv *kv = gw_find(&g, want[k].key);
        char text[64];
        st_metadata(w, want[k].key, text, sizeof text);
        ck_assert_msg(strcmp(text, want[k].text) == 0, "%s: '%s'", want[k].key, text);
        if (!want[k].text[0]) { /* RoPE's theta and width: only when it rotates */
            ck_assert_ptr_null(kv);
        } else if (kv->type == 8) {
            char v[32];
            gw_string(&g, want[k].key, v, sizeof v);
            ck_assert_str_eq(v, want[k].text);
        } else if (kv->type == 7) {
            ck_assert_uint_eq(g.b[kv->at], want[k].u32);
        } else {
            ck_assert_uint_eq(kv->type, 4);
            ck_assert_uint_eq(le32(g.b + kv->at), want[k].u32);
        }
    }
    gw_free(&g);
    free(w);
    lora_adapter_destroy(ad);
    fx_rmtree(dir);
    free(peft);
    free(path);
    free(dir);
}
END_TEST

/* A config that contradicts the recorded geometry is refused naming the field (SHAPE),
 * even where the factor shapes agree (n_heads 4 x head_dim 8 vs 2 x 16); the same file
 * without the keys loads as before. */
START_TEST(test_geometry_contradiction_refused)
{
    const int gguf = _i;
    const layout_spec s = {32, 4, 4, LORA_ROPE_NONE, 0};
    lora_adapter *ad = layout_adapter(&s, 50);
    char *dir = fx_tmpdir();
    char *path = path_in(dir, gguf ? "a.gguf" : "peft");
    ck_assert_int_eq(save_one(gguf, path, ad, NULL), LORA_OK);
    static const struct {
        int param;
        int64_t value;
        const char *field;
    } wrong[] = {{LORA_CFG_N_HEADS, 2, "liblora.n_heads"},
                 {LORA_CFG_N_KV_HEADS, 2, "liblora.n_kv_heads"},
                 {LORA_CFG_CAUSAL, 1, "liblora.causal"}};
    for (size_t k = 0; k < sizeof wrong / sizeof wrong[0]; k++) {
        lora_config *cfg = layout_config(&s);
        ck_assert_int_eq(lora_config_set_int(cfg, wrong[k].param, wrong[k].value), LORA_OK);
        if (wrong[k].param == LORA_CFG_N_HEADS) /* keep q_dim: 2 heads of 16 */
            ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, 2), LORA_OK);
        ck_assert_int_eq(lora_config_validate(cfg), LORA_OK);
        lora_adapter *back = NULL;
        size_t n = 7;
        ck_assert_int_eq(gguf ? lora_load_gguf(NULL, NULL, 0, &n, path, cfg)
                              : lora_load_peft(NULL, NULL, 0, &n, path, cfg),
                         LORA_ERR_SHAPE);
        ck_assert_uint_eq(n, 0);
        ck_assert_int_eq(load_one(gguf, path, cfg, &back), LORA_ERR_SHAPE);
        ck_assert_ptr_null(back);
        ck_assert_msg(strstr(lora_config_last_error(cfg), wrong[k].field), "%s",
                      lora_config_last_error(cfg));
        lora_config_destroy(cfg);
    }
    /* OUT_PROJ: a file of Q|K|V adapters from a layer with W_O, loaded without one. */
    fx_spec f = {.d_model = 32, .n_heads = 4, .n_kv_heads = 4, .rank = 2, .targets = 7,
                 .out_proj = 1, .alpha = 4.0};
    lora_adapter *qkv = fx_adapter_nobase(&f, 51);
    ck_assert_int_eq(save_one(gguf, path, qkv, NULL), LORA_OK);
    f.out_proj = 0;
    lora_config *no_o = fx_config(&f);
    lora_adapter *back = NULL;
    ck_assert_int_eq(load_one(gguf, path, no_o, &back), LORA_ERR_SHAPE);
    ck_assert(strstr(lora_config_last_error(no_o), "liblora.out_proj"));
    lora_config_destroy(no_o);
    lora_adapter_destroy(qkv);
    /* Without the keys (GGUF stripped; PEFT weights rewritten by an older writer would
     * lack them the same way) the wrong n_heads loads, as files always did. */
    if (gguf) {
        ck_assert_int_eq(save_one(1, path, ad, NULL), LORA_OK);
        gw_file g;
        gw_read(path, &g);
        gw_write_without(&g, "liblora.", path);
        gw_free(&g);
        lora_config *cfg = layout_config(&(layout_spec){32, 2, 2, LORA_ROPE_NONE, 0});
        ck_assert_int_eq(load_one(1, path, cfg, &back), LORA_OK);
        lora_adapter_destroy(back);
        lora_config_destroy(cfg);
    }
    lora_adapter_destroy(ad);
    fx_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* A rotating file loaded without RoPE (or the reverse), or with another theta or width,
 * is refused naming the key; HALF and INTERLEAVED load into each other (rows converted,
 * test_rope_layout_files). Needs RoPE adapters (see test_rope_layout_files). */
START_TEST(test_geometry_rope_contradiction_refused)
{
    const int gguf = _i;
    const layout_spec s = {32, 4, 2, LORA_ROPE_HALF, 0};
    lora_adapter *ad = layout_adapter(&s, 60);
    if (!ad) {
        lora_config *cfg = layout_config(&s);
        ck_assert_int_eq(lora_config_validate(cfg), LORA_ERR_UNSUPPORTED);
        lora_config_destroy(cfg);
        return;
    }
    char *dir = fx_tmpdir();
    char *path = path_in(dir, gguf ? "a.gguf" : "peft");
    ck_assert_int_eq(save_one(gguf, path, ad, NULL), LORA_OK);
    static const struct {
        int param, is_double;
        double value;
        const char *field;
    } wrong[] = {{LORA_CFG_ROPE, 0, LORA_ROPE_NONE, "liblora.rope"},
                 {LORA_CFG_ROPE_THETA, 1, 500000.0, "liblora.rope_theta"},
                 {LORA_CFG_ROPE_DIM, 0, 4, "liblora.rope_dim"}};
    for (size_t k = 0; k < sizeof wrong / sizeof wrong[0]; k++) {
        lora_config *cfg = layout_config(&s);
        ck_assert_int_eq(wrong[k].is_double
                             ? lora_config_set_double(cfg, wrong[k].param, wrong[k].value)
                             : lora_config_set_int(cfg, wrong[k].param, (int64_t)wrong[k].value),
                         LORA_OK);
        lora_adapter *back = NULL;
        ck_assert_int_eq(load_one(gguf, path, cfg, &back), LORA_ERR_SHAPE);
        ck_assert(strstr(lora_config_last_error(cfg), wrong[k].field));
        lora_config_destroy(cfg);
    }
    lora_adapter_destroy(ad);
    fx_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* Recorded values that are not what the keys hold are malformed files (FORMAT). */
START_TEST(test_geometry_malformed)
{
    const layout_spec s = {32, 4, 2, LORA_ROPE_NONE, 0};
    lora_adapter *ad = layout_adapter(&s, 70);
    char *dir = fx_tmpdir();
    char *path = path_in(dir, "a.gguf");
    ck_assert_int_eq(save_one(1, path, ad, NULL), LORA_OK);
    lora_config *cfg = layout_config(&s);
    static const struct {
        const char *key;
        uint32_t type;
        unsigned char byte; /* the value's first byte becomes this */
    } bad[] = {{"liblora.n_heads", 6, 0},   /* u32 4 retyped as f32: a denormal, not an int */
               {"liblora.causal", 7, 2},    /* bool 2 */
               {"liblora.rope", 8, 'X'},    /* "Xone" */
               {"liblora.qk_rows", 8, 'n'}, /* "nnterleaved" */
               {"general.architecture", 4, 0}};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        gw_file g;
        gw_read(path, &g);
        const gw_kv *kv = gw_find(&g, bad[k].key);
        ck_assert_ptr_nonnull(kv);
        if (kv->type != bad[k].type) /* retype: the value bytes stay */
            for (int b = 0; b < 4; b++)
                g.b[kv->at - 4 - (kv->type == 8 ? 8 : 0) + b] = (unsigned char)(bad[k].type >> (8 * b));
        else
            g.b[kv->at] = bad[k].byte;
        char *bpath = path_in(dir, "bad.gguf");
        fx_write_file(bpath, g.b, g.size);
        gw_free(&g);
        lora_adapter *back = NULL;
        ck_assert_msg(load_one(1, bpath, cfg, &back) == LORA_ERR_FORMAT, "%s", bad[k].key);
        ck_assert(strstr(lora_config_last_error(cfg), bad[k].key));
        free(bpath);
    }
    /* safetensors __metadata__: "liblora.n_heads": "4" -> "x". */
    char *peft = path_in(dir, "peft");
    ck_assert_int_eq(save_one(0, peft, ad, NULL), LORA_OK);
    char *w = path_in(peft, "adapter_model.safetensors");
    size_t n;
    unsigned char *b = fx_read_file(w, &n);
    static const char pat[] = "\"liblora.n_heads\":\"4\"";
    size_t at = 0;
    while (at + sizeof pat - 1 <= n && memcmp(b + at, pat, sizeof pat - 1) != 0)
        at++;
    ck_assert(at + sizeof pat - 1 <= n);
    b[at + sizeof pat - 3] = 'x';
    fx_write_file(w, b, n);
    lora_adapter *back = NULL;
    ck_assert_int_eq(load_one(0, peft, cfg, &back), LORA_ERR_FORMAT);
    ck_assert(strstr(lora_config_last_error(cfg), "liblora.n_heads"));
    free(b);
    free(w);
    free(peft);
    lora_config_destroy(cfg);
    lora_adapter_destroy(ad);
    fx_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* Members of one set must share the geometry a file records. */
START_TEST(test_set_geometry_must_agree)
{
    const layout_spec s = {32, 4, 4, LORA_ROPE_NONE, 0};
    lora_adapter *a = layout_adapter(&s, 80);
    lora_config *cfg = layout_config(&s);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_CAUSAL, 1), LORA_OK);
    lora_adapter *b = NULL;
    ck_assert_int_eq(lora_adapter_create(&b, cfg), LORA_OK);
    lora_config_destroy(cfg);
    lora_adapter *set[2] = {a, b};
    const int64_t layers[2] = {0, 1};
    char *dir = fx_tmpdir();
    char *path = path_in(dir, "a.gguf");
    ck_assert_int_eq(lora_save_gguf(path, set, layers, 2, NULL), LORA_ERR_INVALID_ARG);
    ck_assert(strstr(lora_adapter_last_error(a), "causal"));
    ck_assert_int_eq(lora_save_peft(dir, set, layers, 2), LORA_ERR_INVALID_ARG);
    lora_adapter_destroy(a);
    lora_adapter_destroy(b);
    fx_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* ---- a custom RoPE frequency table (lora_adapter_set_rope_freqs) ------------------ */

/* ad's self-attention output on a fixed input (L 6) with bases of seed 5: malloc'd. */
static float *layout_forward(lora_adapter *ad, const layout_spec *s)
{
    const fx_spec f = layout_fx(s);
    fx_base b;
    fx_base_make(&b, &f, 5);
    fx_base_apply(&b, ad, 1);
    fx_base_free(&b);
    const size_t nx = (size_t)(6 * s->d_model), nout = (size_t)(6 * fx_out_cols(&f));
    float *x = malloc(nx * sizeof *x), *out = malloc(nout * sizeof *out);
    fill_uniform(x, nx, 6, 1.0f);
    ck_assert_int_eq(lora_forward(ad, x, 1, 6, out), LORA_OK);
    free(x);
    return out;
}

static const double custom_freqs[2] = {0.75, 0.03125}; /* rope_dim 4 */

/* The table is recorded (GGUF liblora.rope_freqs float64 array, __metadata__ JSON text)
 * and restored on load: the loaded adapter computes what the saved one does, which the
 * default table would not. An adapter with THETA's table records none. */
START_TEST(test_rope_freqs_round_trip)
{
    const int gguf = _i & 1;
    const int rope = _i & 2 ? LORA_ROPE_INTERLEAVED : LORA_ROPE_HALF;
    const layout_spec s = {32, 4, 2, rope, 4};
    lora_adapter *ad = layout_adapter(&s, 90), *plain = layout_adapter(&s, 90);
    ck_assert_int_eq(lora_adapter_set_rope_freqs(ad, custom_freqs, 2), LORA_OK);
    char *dir = fx_tmpdir();
    char *path = path_in(dir, gguf ? "a.gguf" : "peft");
    char *plain_path = path_in(dir, gguf ? "p.gguf" : "plain");
    ck_assert_int_eq(save_one(gguf, path, ad, NULL), LORA_OK);
    ck_assert_int_eq(save_one(gguf, plain_path, plain, NULL), LORA_OK);
    for (int k = 0; k < 2; k++) { /* the key is there for the custom table only */
        const char *p = k ? plain_path : path;
        if (gguf) {
            gw_file g;
            gw_read(p, &g);
            const gw_kv *kv = gw_find(&g, "liblora.rope_freqs");
            ck_assert(k ? kv == NULL
                        : kv != NULL && kv->type == 9 && kv->elem_type == 12 && kv->len == 16);
            for (int i = 0; !k && i < 2; i++) {
                const uint64_t bits = le64(g.b + kv->at + 8 * i);
                double v;
                memcpy(&v, &bits, sizeof v);
                ck_assert(v == custom_freqs[i]);
            }
            gw_free(&g);
        } else {
            char *w = path_in(p, "adapter_model.safetensors"), text[128];
            st_metadata(w, "liblora.rope_freqs", text, sizeof text);
            ck_assert_str_eq(text, k ? "" : "[0.75,0.03125]");
            free(w);
        }
    }
    lora_config *cfg = layout_config(&s);
    lora_adapter *back = NULL, *back_plain = NULL;
    ck_assert_int_eq(load_one(gguf, path, cfg, &back), LORA_OK);
    ck_assert_int_eq(load_one(gguf, plain_path, cfg, &back_plain), LORA_OK);
    float *want = layout_forward(ad, &s), *got = layout_forward(back, &s);
    float *plain_out = layout_forward(back_plain, &s);
    const size_t n = (size_t)(6 * s.d_model);
    assert_floats_eq(got, want, n, "output with the restored table");
    ck_assert_msg(memcmp(plain_out, want, n * sizeof *want) != 0,
                  "the table changes nothing: the test proves nothing");
    free(want);
    free(got);
    free(plain_out);
    lora_adapter_destroy(back);
    lora_adapter_destroy(back_plain);
    lora_config_destroy(cfg);
    lora_adapter_destroy(ad);
    lora_adapter_destroy(plain);
    fx_rmtree(dir);
    free(path);
    free(plain_path);
    free(dir);
}
END_TEST

/* PEFT weights whose __metadata__ text `from` becomes `to` (same length). */
static void patch_metadata(const char *peft_dir, const char *from, const char *to)
{
    char *w = path_in(peft_dir, "adapter_model.safetensors");
    size_t n, len = strlen(from);
    unsigned char *b = fx_read_file(w, &n);
    ck_assert_uint_eq(strlen(to), len);
    size_t at = 0;
    while (at + len <= n && memcmp(b + at, from, len) != 0)
        at++;
    ck_assert_msg(at + len <= n, "%s not in the file", from);
    memcpy(b + at, to, len);
    fx_write_file(w, b, n);
    free(b);
    free(w);
}

/* A table that cannot fit the config is SHAPE naming liblora.rope_freqs (a config
 * without RoPE; a table of another length); a malformed one is FORMAT; a set whose
 * members' tables differ cannot be saved as one file. */
START_TEST(test_rope_freqs_refused)
{
    const layout_spec s = {32, 4, 2, LORA_ROPE_HALF, 4};
    lora_adapter *ad = layout_adapter(&s, 91);
    ck_assert_int_eq(lora_adapter_set_rope_freqs(ad, custom_freqs, 2), LORA_OK);
    char *dir = fx_tmpdir();
    char *peft = path_in(dir, "peft");
    lora_adapter *back = NULL;
    static const struct {
        const char *from, *to, *field;
        int rope, rope_dim, status;
    } cases[] = {
        {"\"liblora.rope\":\"half\"", "\"liblora.rope\":\"none\"", "liblora.rope_freqs",
         LORA_ROPE_NONE, 0, LORA_ERR_SHAPE},
        {"\"liblora.rope_dim\":\"4\"", "\"liblora.rope_dim\":\"6\"", "liblora.rope_freqs",
         LORA_ROPE_HALF, 6, LORA_ERR_SHAPE},
        {"[0.75,", "[-0.7,", "liblora.rope_freqs", LORA_ROPE_HALF, 4, LORA_ERR_FORMAT},
        {"[0.75,", "{0.75,", "liblora.rope_freqs", LORA_ROPE_HALF, 4, LORA_ERR_FORMAT}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        ck_assert_int_eq(save_one(0, peft, ad, NULL), LORA_OK);
        patch_metadata(peft, cases[k].from, cases[k].to);
        const layout_spec o = {32, 4, 2, cases[k].rope, cases[k].rope_dim};
        lora_config *cfg = layout_config(&o);
        ck_assert_int_eq(load_one(0, peft, cfg, &back), cases[k].status);
        ck_assert_msg(strstr(lora_config_last_error(cfg), cases[k].field), "%zu: %s", k,
                      lora_config_last_error(cfg));
        lora_config_destroy(cfg);
    }
    /* GGUF: the array's element type float64 (12) retyped as float32 (6). */
    char *path = path_in(dir, "a.gguf");
    ck_assert_int_eq(save_one(1, path, ad, NULL), LORA_OK);
    gw_file g;
    gw_read(path, &g);
    const gw_kv *kv = gw_find(&g, "liblora.rope_freqs");
    ck_assert_ptr_nonnull(kv);
    g.b[kv->start + 8 + strlen("liblora.rope_freqs") + 4] = 6;
    fx_write_file(path, g.b, g.size);
    gw_free(&g);
    lora_config *cfg = layout_config(&s);
    ck_assert_int_eq(load_one(1, path, cfg, &back), LORA_ERR_FORMAT);
    ck_assert(strstr(lora_config_last_error(cfg), "liblora.rope_freqs"));
    /* One file, one table. */
    lora_adapter *other = layout_adapter(&s, 92);
    lora_adapter *set[2] = {ad, other};
    const int64_t layers[2] = {0, 1};
    ck_assert_int_eq(lora_save_gguf(path, set, layers, 2, NULL), LORA_ERR_INVALID_ARG);
    ck_assert(strstr(lora_adapter_last_error(ad), "RoPE frequency table"));
    ck_assert_int_eq(lora_save_peft(peft, set, layers, 2), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_set_rope_freqs(other, custom_freqs, 2), LORA_OK);
    ck_assert_int_eq(lora_save_gguf(path, set, layers, 2, NULL), LORA_OK);
    lora_adapter_destroy(other);
    lora_config_destroy(cfg);
    lora_adapter_destroy(ad);
    fx_rmtree(dir);
    free(path);
    free(peft);
    free(dir);
}
END_TEST

Suite *io_layout_suite(void)
{
    Suite *s = suite_create("io_layout");
    TCase *tc = tcase_create("options");
    tcase_add_loop_test(tc, test_save_base_model, 0, 2);
    tcase_add_loop_test(tc, test_save_options_refused, 0, 2);
    tcase_add_test(tc, test_save_ex_equals_plain);
    suite_add_tcase(s, tc);
    tc = tcase_create("rows");
    tcase_add_loop_test(tc, test_gguf_qk_rows_without_rope, 0, 4);
    tcase_add_test(tc, test_gguf_qk_rows_key_or_architecture);
    tcase_add_loop_test(tc, test_rope_layout_files, 0, 8);
    suite_add_tcase(s, tc);
    tc = tcase_create("geometry");
    tcase_add_test(tc, test_geometry_written);
    tcase_add_loop_test(tc, test_geometry_contradiction_refused, 0, 2);
    tcase_add_loop_test(tc, test_geometry_rope_contradiction_refused, 0, 2);
    tcase_add_test(tc, test_geometry_malformed);
    tcase_add_test(tc, test_set_geometry_must_agree);
    suite_add_tcase(s, tc);
    tc = tcase_create("rope_freqs");
    tcase_add_loop_test(tc, test_rope_freqs_round_trip, 0, 4);
    tcase_add_test(tc, test_rope_freqs_refused);
    suite_add_tcase(s, tc);
    return s;
}
