/* io_suite: PEFT and GGUF adapter files. Round trips (bitwise for F32), the files read
 * back by independent byte-level readers written here (safetensors: 8-byte LE header
 * length, JSON header, raw data; GGUF: header, key-values, tensor infos, aligned data),
 * F16/BF16 loading, config mismatches, and hostile input: every truncation of a small
 * file, every single-byte corruption, and crafted headers with lying lengths, offsets,
 * shapes, types and nesting. None may crash or read out of bounds. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <check.h>
#include <lora.h>

#include "fixtures.h"
#include "helpers.h"
#include "suites.h"
#include "test_io_util.h"

static const char *const peft_modules[4] = {"q_proj", "k_proj", "v_proj", "o_proj"};
static const char *const gguf_modules[4] = {"attn_q", "attn_k", "attn_v", "attn_output"};

/* ---- helpers ---------------------------------------------------------------------- */

static lora_config *cfg_for(const fx_spec *s)
{
    return fx_config(s); /* RANK/ALPHA/RSLORA/TARGETS are replaced by the file's */
}

typedef struct loaded {
    lora_adapter *ad[16];
    int64_t layer[16];
    size_t n;
} loaded;

/* Query, then load. Returns the status of the load (or of the query if it failed). */
static int load_all(int gguf, const char *path, lora_config *cfg, loaded *L)
{
    memset(L, 0, sizeof *L);
    size_t n = 99;
    int st = gguf ? lora_load_gguf(NULL, NULL, 0, &n, path, cfg)
                  : lora_load_peft(NULL, NULL, 0, &n, path, cfg);
    if (st != LORA_OK) {
        ck_assert_uint_eq(n, 0);
        return st;
    }
    ck_assert(n >= 1 && n <= 16);
    st = gguf ? lora_load_gguf(L->ad, L->layer, 16, &L->n, path, cfg)
              : lora_load_peft(L->ad, L->layer, 16, &L->n, path, cfg);
    if (st == LORA_OK)
        ck_assert_uint_eq(L->n, n);
    return st;
}

static void loaded_free(loaded *L)
{
    for (size_t i = 0; i < L->n; i++)
        lora_adapter_destroy(L->ad[i]);
    memset(L, 0, sizeof *L);
}

static void assert_same_params(const lora_adapter *a, const lora_adapter *b, const char *what)
{
    size_t na, nb;
    float *pa = fx_params(a, &na), *pb = fx_params(b, &nb);
    ck_assert_msg(na == nb, "%s: %zu vs %zu parameters", what, na, nb);
    ck_assert_msg(memcmp(pa, pb, na * sizeof(float)) == 0, "%s: parameters differ", what);
    int64_t t1, t2;
    ck_assert_int_eq(lora_adapter_get_config_int(a, LORA_CFG_TARGETS, &t1), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_config_int(b, LORA_CFG_TARGETS, &t2), LORA_OK);
    ck_assert_int_eq(t1, t2);
    free(pa);
    free(pb);
}

/* An adapter set: layers {5, 0, 2} (unsorted on purpose). */
static void make_set(const fx_spec *s, lora_adapter **ad, int64_t *layers, size_t n)
{
    static const int64_t order[4] = {5, 0, 2, 9};
    for (size_t i = 0; i < n; i++) {
        ad[i] = fx_adapter_nobase(s, 300u + (uint64_t)i);
        layers[i] = order[i];
    }
}

/* ---- PEFT ------------------------------------------------------------------------- */

START_TEST(test_peft_roundtrip)
{
    fx_spec s = fx_default();
    s.targets = LORA_TARGET_Q | LORA_TARGET_V | LORA_TARGET_O;
    s.rslora = _i;
    s.alpha = 1.0 / 3.0; /* not a short decimal: JSON must keep all digits */
    lora_adapter *ad[3];
    int64_t layers[3];
    make_set(&s, ad, layers, 3);
    char *dir = fx_tmpdir();
    char *sub = path_in(dir, "adapter"); /* created by save */
    ck_assert_msg(lora_save_peft(sub, ad, layers, 3) == LORA_OK, "%s",
                  lora_adapter_last_error(ad[0]));
    ck_assert_str_eq(lora_adapter_last_error(ad[0]), "");
    lora_config *cfg = cfg_for(&(fx_spec){.d_model = 16, .n_heads = 4, .n_kv_heads = 2,
                                          .rank = 1, .targets = 1, .out_proj = 1});
    loaded L;
    ck_assert_msg(load_all(0, sub, cfg, &L) == LORA_OK, "%s", lora_config_last_error(cfg));
    ck_assert_uint_eq(L.n, 3);
    const int64_t want_layers[3] = {0, 2, 5};
    const int src_of[3] = {1, 2, 0};
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(L.layer[i], want_layers[i]);
        assert_same_params(L.ad[i], ad[src_of[i]], "PEFT round trip");
        double alpha;
        int64_t rank, rs;
        ck_assert_int_eq(lora_adapter_get_config_double(L.ad[i], LORA_CFG_ALPHA, &alpha), LORA_OK);
        ck_assert_int_eq(lora_adapter_get_config_int(L.ad[i], LORA_CFG_RANK, &rank), LORA_OK);
        ck_assert_int_eq(lora_adapter_get_config_int(L.ad[i], LORA_CFG_RSLORA, &rs), LORA_OK);
        ck_assert(alpha == 1.0 / 3.0);
        ck_assert_int_eq(rank, 4);
        ck_assert_int_eq(rs, _i);
    }
    /* Saving again over the same directory works (files are replaced). */
    ck_assert_int_eq(lora_save_peft(sub, ad, layers, 3), LORA_OK);
    loaded_free(&L);
    lora_config_destroy(cfg);
    for (int i = 0; i < 3; i++)
        lora_adapter_destroy(ad[i]);
    fx_rmtree(dir);
    free(sub);
    free(dir);
}
END_TEST

/* adapter_model.safetensors parsed byte by byte, adapter_config.json scanned as text. */
START_TEST(test_peft_independent_reader)
{
    fx_spec s = fx_default();
    s.targets = LORA_TARGET_K | LORA_TARGET_O;
    lora_adapter *ad[2];
    int64_t layers[2];
    make_set(&s, ad, layers, 2); /* layers 5, 0 */
    char *dir = fx_tmpdir();
    ck_assert_int_eq(lora_save_peft(dir, ad, layers, 2), LORA_OK);
    char *wpath = path_in(dir, "adapter_model.safetensors");
    size_t size;
    unsigned char *buf = fx_read_file(wpath, &size);
    ck_assert(size >= 8);
    const uint64_t hlen = le64(buf);
    ck_assert(hlen <= size - 8);
    ck_assert_msg((8 + hlen) % 8 == 0, "data not 8-byte aligned");
    char *hdr = malloc(hlen + 1);
    memcpy(hdr, buf + 8, hlen);
    hdr[hlen] = 0;
    ck_assert(hdr[0] == '{');
    const unsigned char *data = buf + 8 + hlen;
    const size_t data_len = size - 8 - hlen;
    const char *meta = json_value(hdr, "__metadata__");
    ck_assert(meta && strncmp(meta, "{", 1) == 0);
    ck_assert_str_eq(json_value(meta, "format") ? "found" : "missing", "found");
    size_t covered = 0;
    int n_tensors = 0;
    for (int i = 0; i < 2; i++)
        for (int t = 0; t < 4; t++) {
            if (!((s.targets >> t) & 1))
                continue;
            for (int w = 0; w < 2; w++) {
                char name[128];
                snprintf(name, sizeof name,
                         "base_model.model.model.layers.%lld.self_attn.%s.lora_%c.weight",
                         (long long)layers[i], peft_modules[t], w ? 'B' : 'A');
                const char *entry = json_value(hdr, name);
                ck_assert_msg(entry && *entry == '{', "tensor %s not in the header", name);
                char quoted[140];
                snprintf(quoted, sizeof quoted, "\"%s\"", name);
                ck_assert_msg(strstr(strstr(hdr, quoted) + 1, quoted) == NULL, "%s twice", name);
                const char *dt = json_value(entry, "dtype");
                ck_assert(dt && strncmp(dt, "\"F32\"", 5) == 0);
                long long shape[4], off[4];
                ck_assert_int_eq(json_ints(json_value(entry, "shape"), shape, 4), 2);
                ck_assert_int_eq(json_ints(json_value(entry, "data_offsets"), off, 4), 2);
                int64_t r, c;
                ck_assert_int_eq(lora_adapter_param_shape(ad[i], fx_tbits[t], w, &r, &c), LORA_OK);
                ck_assert_msg(shape[0] == r && shape[1] == c, "%s: shape [%lld, %lld]", name,
                              shape[0], shape[1]);
                ck_assert(off[0] >= 0 && off[1] - off[0] == r * c * 4 &&
                          (size_t)off[1] <= data_len);
                float *want = malloc((size_t)(r * c) * sizeof(float));
                ck_assert_int_eq(lora_adapter_get_param(ad[i], fx_tbits[t], w, want,
                                                        (size_t)(r * c)),
                                 LORA_OK);
                for (int64_t k = 0; k < r * c; k++)
                    ck_assert_msg(lef(data + off[0] + 4 * k) == want[k], "%s[%lld]", name,
                                  (long long)k);
                free(want);
                covered += (size_t)(off[1] - off[0]);
                n_tensors++;
            }
        }
    ck_assert_uint_eq(covered, data_len); /* no gaps, no extra bytes */
    ck_assert_int_eq(n_tensors, 8);
    /* adapter_config.json */
    char *cpath = path_in(dir, "adapter_config.json");
    size_t csize;
    char *cj = (char *)fx_read_file(cpath, &csize);
    ck_assert(strtod(json_value(cj, "r"), NULL) == 4.0);
    ck_assert(strtod(json_value(cj, "lora_alpha"), NULL) == 8.0);
    ck_assert(strncmp(json_value(cj, "use_rslora"), "false", 5) == 0);
    ck_assert(strncmp(json_value(cj, "peft_type"), "\"LORA\"", 6) == 0);
    const char *tm = json_value(cj, "target_modules");
    ck_assert(tm && *tm == '[');
    const char *tm_end = strchr(tm, ']');
    ck_assert(strstr(tm, "\"k_proj\"") && strstr(tm, "\"k_proj\"") < tm_end);
    ck_assert(strstr(tm, "\"o_proj\"") && strstr(tm, "\"o_proj\"") < tm_end);
    ck_assert(!strstr(tm, "\"q_proj\"") || strstr(tm, "\"q_proj\"") > tm_end);
    long long lt[4];
    ck_assert_int_eq(json_ints(json_value(cj, "layers_to_transform"), lt, 4), 2);
    ck_assert(lt[0] == 0 && lt[1] == 5);
    free(cj);
    free(cpath);
    free(hdr);
    free(buf);
    free(wpath);
    for (int i = 0; i < 2; i++)
        lora_adapter_destroy(ad[i]);
    fx_rmtree(dir);
    free(dir);
}
END_TEST

/* ---- GGUF ------------------------------------------------------------------------- */

START_TEST(test_gguf_roundtrip)
{
    fx_spec s = fx_default();
    s.rslora = _i;
    lora_adapter *ad[3];
    int64_t layers[3];
    make_set(&s, ad, layers, 3);
    char *dir = fx_tmpdir();
    char *path = path_in(dir, "adapter.gguf");
    ck_assert_msg(lora_save_gguf(path, ad, layers, 3, NULL) == LORA_OK, "%s",
                  lora_adapter_last_error(ad[0]));
    lora_config *cfg = cfg_for(&s);
    loaded L;
    ck_assert_msg(load_all(1, path, cfg, &L) == LORA_OK, "%s", lora_config_last_error(cfg));
    ck_assert_uint_eq(L.n, 3);
    const int src_of[3] = {1, 2, 0};
    for (int i = 0; i < 3; i++) {
        assert_same_params(L.ad[i], ad[src_of[i]], "GGUF round trip");
        double alpha;
        int64_t rs;
        ck_assert_int_eq(lora_adapter_get_config_double(L.ad[i], LORA_CFG_ALPHA, &alpha), LORA_OK);
        ck_assert_int_eq(lora_adapter_get_config_int(L.ad[i], LORA_CFG_RSLORA, &rs), LORA_OK);
        ck_assert_int_eq(rs, 0); /* GGUF has no rsLoRA flag: alpha*sqrt(r) instead */
        const double want = _i ? (double)(float)(8.0 * 2.0) : 8.0; /* sqrt(4) = 2 */
        ck_assert_msg(alpha == want, "alpha %g, want %g", alpha, want);
    }
    /* Same outputs on a shared base (bitwise: same factors, same scale 2). */
    fx_base base;
    fx_base_make(&base, &s, 4);
    for (int i = 0; i < 3; i++) {
        fx_base_apply(&base, L.ad[i], 0);
        fx_base_apply(&base, ad[src_of[i]], 0);
        float x[2 * 3 * 16], y1[2 * 3 * 16], y2[2 * 3 * 16];
        fill_uniform(x, 2 * 3 * 16, 5, 1.0f);
        ck_assert_int_eq(lora_forward(L.ad[i], x, 2, 3, y1), LORA_OK);
        ck_assert_int_eq(lora_forward(ad[src_of[i]], x, 2, 3, y2), LORA_OK);
        ck_assert(memcmp(y1, y2, sizeof y1) == 0);
    }
    fx_base_free(&base);
    loaded_free(&L);
    lora_config_destroy(cfg);
    for (int i = 0; i < 3; i++)
        lora_adapter_destroy(ad[i]);
    fx_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* The GGUF file walked byte by byte: header, key-values, tensor infos, data. */
START_TEST(test_gguf_independent_reader)
{
    fx_spec s = fx_default();
    s.targets = LORA_TARGET_Q | LORA_TARGET_O;
    lora_adapter *ad[2];
    int64_t layers[2];
    make_set(&s, ad, layers, 2);
    char *dir = fx_tmpdir();
    char *path = path_in(dir, "a.gguf");
    ck_assert_int_eq(lora_save_gguf(path, ad, layers, 2, "qwen2"), LORA_OK);
    size_t size;
    unsigned char *b = fx_read_file(path, &size);
    size_t pos = 0;
#define NEED(n) ck_assert_msg(pos + (n) <= size, "file ends at %zu, need %zu", size, pos + (n))
    NEED(24);
    ck_assert(memcmp(b, "GGUF", 4) == 0);
    ck_assert_uint_eq(le32(b + 4), 3);
    const uint64_t nt = le64(b + 8), nkv = le64(b + 16);
    pos = 24;
    ck_assert_uint_eq(nt, 8);
    int seen = 0;
    for (uint64_t i = 0; i < nkv; i++) {
        NEED(8);
        const uint64_t kl = le64(b + pos);
        pos += 8;
        NEED(kl + 4);
        char key[64] = {0};
        ck_assert(kl < sizeof key);
        memcpy(key, b + pos, kl);
        pos += kl;
        const uint32_t type = le32(b + pos);
        pos += 4;
        if (type == 8) { /* string */
            NEED(8);
            const uint64_t vl = le64(b + pos);
            pos += 8;
            NEED(vl);
            char v[64] = {0};
            ck_assert(vl < sizeof v);
            memcpy(v, b + pos, vl);
            pos += vl;
            if (strcmp(key, "general.type") == 0)
                {
                seen |= 1;
                ck_assert_str_eq(v, "adapter");
            }
            else if (strcmp(key, "adapter.type") == 0)
                {
                seen |= 2;
                ck_assert_str_eq(v, "lora");
            }
            else if (strcmp(key, "general.architecture") == 0)
                {
                seen |= 4;
                ck_assert_str_eq(v, "qwen2");
            } else if (strcmp(key, "liblora.rope") == 0) {
                seen |= 16;
                ck_assert_str_eq(v, "none");
            } else if (strcmp(key, "liblora.qk_rows") == 0) {
                seen |= 32; /* qwen2: llama.cpp's NEOX RoPE, Hugging Face's row order */
                ck_assert_str_eq(v, "half");
            }
        } else if (type == 4) { /* u32: the geometry (fx_default) */
            static const char *const keys[4] = {"liblora.d_model", "liblora.n_heads",
                                                "liblora.n_kv_heads", "liblora.head_dim"};
            static const uint32_t want[4] = {16, 4, 2, 4};
            NEED(4);
            int k = 0;
            while (k < 4 && strcmp(key, keys[k]) != 0)
                k++;
            ck_assert_msg(k < 4 && le32(b + pos) == want[k], "key %s = %u", key, le32(b + pos));
            seen |= 64 << k;
            pos += 4;
        } else if (type == 7) { /* bool */
            NEED(1);
            const int is_out = strcmp(key, "liblora.out_proj") == 0;
            ck_assert_msg(is_out || strcmp(key, "liblora.causal") == 0, "key %s", key);
            ck_assert_uint_eq(b[pos], is_out ? 1 : 0);
            seen |= is_out ? 1024 : 2048;
            pos += 1;
        } else {
            ck_assert_msg(type == 6 && strcmp(key, "adapter.lora.alpha") == 0, "key %s type %u",
                          key, type);
            NEED(4);
            ck_assert(lef(b + pos) == 8.0f);
            pos += 4;
            seen |= 8;
        }
    }
    ck_assert_int_eq(seen, 4095); /* no rope_theta, rope_dim without RoPE */
    typedef struct {
        char name[64];
        uint64_t ne0, ne1, off;
    } info;
    info infos[8];
    for (uint64_t i = 0; i < nt; i++) {
        NEED(8);
        const uint64_t nl = le64(b + pos);
        pos += 8;
        NEED(nl + 4);
        ck_assert(nl < 64);
        memset(infos[i].name, 0, 64);
        memcpy(infos[i].name, b + pos, nl);
        pos += nl;
        ck_assert_uint_eq(le32(b + pos), 2); /* n_dims */
        pos += 4;
        NEED(16 + 4 + 8);
        infos[i].ne0 = le64(b + pos);
        infos[i].ne1 = le64(b + pos + 8);
        pos += 16;
        ck_assert_uint_eq(le32(b + pos), 0); /* GGML_TYPE_F32 */
        pos += 4;
        infos[i].off = le64(b + pos);
        pos += 8;
        ck_assert_uint_eq(infos[i].off % 32, 0);
    }
    const size_t data_start = (pos + 31) / 32 * 32;
    for (size_t k = pos; k < data_start; k++)
        ck_assert_uint_eq(b[k], 0); /* zero padding */
    int found = 0;
    for (int i = 0; i < 2; i++)
        for (int t = 0; t < 4; t++) {
            if (!((s.targets >> t) & 1))
                continue;
            for (int w = 0; w < 2; w++) {
                char name[64];
                snprintf(name, sizeof name, "blk.%lld.%s.weight.lora_%c", (long long)layers[i],
                         gguf_modules[t], w ? 'b' : 'a');
                const info *in = NULL;
                for (int k = 0; k < 8; k++)
                    if (strcmp(infos[k].name, name) == 0)
                        in = &infos[k];
                ck_assert_msg(in != NULL, "no tensor %s", name);
                int64_t r, c;
                ck_assert_int_eq(lora_adapter_param_shape(ad[i], fx_tbits[t], w, &r, &c), LORA_OK);
                /* ggml order: ne[0] is the row length (columns). lora_a: [in, r]. */
                ck_assert_msg(in->ne0 == (uint64_t)c && in->ne1 == (uint64_t)r,
                              "%s: ne = [%llu, %llu]", name, (unsigned long long)in->ne0,
                              (unsigned long long)in->ne1);
                ck_assert(data_start + in->off + (uint64_t)(r * c) * 4 <= size);
                float *want = malloc((size_t)(r * c) * sizeof(float));
                ck_assert_int_eq(lora_adapter_get_param(ad[i], fx_tbits[t], w, want,
                                                        (size_t)(r * c)),
                                 LORA_OK);
                for (int64_t k = 0; k < r * c; k++)
                    ck_assert(lef(b + data_start + in->off + 4 * k) == want[k]);
                free(want);
                found++;
            }
        }
    ck_assert_int_eq(found, 8);
#undef NEED
    free(b);
    for (int i = 0; i < 2; i++)
        lora_adapter_destroy(ad[i]);
    fx_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* ---- hostile files ------------------------------------------------------------------ */

/* The small geometry used by the hostile tests: d_model 8, 2 heads, rank 2, target Q:
 * A (2, 8), B (8, 2). */
static fx_spec small_spec(void)
{
    return (fx_spec){.d_model = 8, .n_heads = 2, .n_kv_heads = 2, .rank = 2,
                     .targets = LORA_TARGET_Q, .alpha = 4.0};
}

static int load_status(int gguf, const char *path, const fx_spec *s)
{
    lora_config *cfg = cfg_for(s);
    loaded L;
    const int st = load_all(gguf, path, cfg, &L);
    if (st == LORA_OK)
        loaded_free(&L);
    else
        ck_assert_msg(lora_config_last_error(cfg)[0] != '\0', "status %d without a message", st);
    lora_config_destroy(cfg);
    return st;
}

static int acceptable(int st)
{
    return st == LORA_OK || st == LORA_ERR_FORMAT || st == LORA_ERR_UNSUPPORTED ||
           st == LORA_ERR_SHAPE || st == LORA_ERR_NONFINITE;
}

/* Every truncation of a small file (safetensors, adapter_config.json, GGUF) is FORMAT;
 * every single-byte corruption gives a status (never a crash). */
START_TEST(test_truncated_and_corrupted)
{
    const int kind = _i; /* 0: safetensors, 1: adapter_config.json, 2: GGUF */
    fx_spec s = small_spec();
    lora_adapter *ad[2];
    int64_t layers[2];
    make_set(&s, ad, layers, 2);
    char *dir = fx_tmpdir();
    char *gpath = path_in(dir, "a.gguf");
    const char *file = kind == 0 ? "adapter_model.safetensors" : "adapter_config.json";
    char *fpath = kind == 2 ? gpath : path_in(dir, file);
    if (kind == 2)
        ck_assert_int_eq(lora_save_gguf(gpath, ad, layers, 2, NULL), LORA_OK);
    else
        ck_assert_int_eq(lora_save_peft(dir, ad, layers, 2), LORA_OK);
    const char *target = kind == 2 ? gpath : dir;
    size_t size;
    unsigned char *orig = fx_read_file(fpath, &size);
    ck_assert_int_eq(load_status(kind == 2, target, &s), LORA_OK);
    for (size_t cut = 0; cut < size; cut++) {
        fx_write_file(fpath, orig, cut);
        const int st = load_status(kind == 2, target, &s);
        ck_assert_msg(st == LORA_ERR_FORMAT, "%s truncated to %zu of %zu bytes: status %d",
                      file, cut, size, st);
    }
    unsigned char *mod = malloc(size);
    int formats = 0;
    for (size_t at = 0; at < size; at++) {
        memcpy(mod, orig, size);
        mod[at] ^= 0xFF;
        fx_write_file(fpath, mod, size);
        const int st = load_status(kind == 2, target, &s);
        ck_assert_msg(acceptable(st), "%s with byte %zu flipped: status %d", file, at, st);
        formats += st != LORA_OK;
        if (at < 8 && kind != 1)
            ck_assert_msg(st == LORA_ERR_FORMAT, "byte %zu of the header flipped: %d", at, st);
    }
    ck_assert(formats > 0);
    /* Random multi-byte corruption. */
    uint64_t rng = 1234;
    for (int trial = 0; trial < 200; trial++) {
        memcpy(mod, orig, size);
        for (int k = 0; k < 4; k++)
            mod[ref_rng_next(&rng) % size] = (unsigned char)ref_rng_next(&rng);
        fx_write_file(fpath, mod, size);
        ck_assert(acceptable(load_status(kind == 2, target, &s)));
    }
    free(mod);
    free(orig);
    for (int i = 0; i < 2; i++)
        lora_adapter_destroy(ad[i]);
    fx_rmtree(dir);
    if (fpath != gpath)
        free(fpath);
    free(gpath);
    free(dir);
}
END_TEST

/* Writes a PEFT directory from a config text and a safetensors header + data. */
static void write_peft(const char *dir, const char *config, const char *header,
                       const void *data, size_t data_len, int64_t header_len_override)
{
    tw_buf w = {0};
    tw_st_header(&w, header, 0, header_len_override);
    tw_put(&w, data, data_len);
    tw_write_peft(dir, config, &w);
    tw_free(&w);
}

#define GOOD_CONFIG "{\"r\": 2, \"lora_alpha\": 4, \"target_modules\": [\"q_proj\"]}"
#define NAME_A "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
#define NAME_B "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

START_TEST(test_peft_hostile_headers)
{
    fx_spec s = small_spec();
    char *dir = fx_tmpdir();
    float data[64];
    for (int i = 0; i < 64; i++)
        data[i] = (float)(i % 7) * 0.25f - 0.5f;
    const char *good = "{\"" NAME_A "\":{\"dtype\":\"F32\",\"shape\":[2,8],\"data_offsets\":[0,64]},"
                       "\"" NAME_B "\":{\"dtype\":\"F32\",\"shape\":[8,2],\"data_offsets\":[64,128]}}";
    write_peft(dir, GOOD_CONFIG, good, data, 128, -1);
    ck_assert_int_eq(load_status(0, dir, &s), LORA_OK);
    /* A deeply nested __metadata__ value (cJSON's nesting limit, no stack overflow). */
    char *deep = malloc(20000);
    strcpy(deep, "{\"__metadata__\":{\"x\":");
    for (int i = 0; i < 5000; i++)
        strcat(deep, "[");
    for (int i = 0; i < 5000; i++)
        strcat(deep, "]");
    strcat(deep, "}}");
    const struct {
        const char *header;
        size_t data_len;
        int64_t len_override;
        int want;
    } cases[] = {
        {good, 128, INT64_MAX, LORA_ERR_FORMAT},                 /* length 2^63 - 1 */
        {good, 128, (int64_t)strlen(good) + 129, LORA_ERR_FORMAT}, /* length past the end */
        {good, 128, 1, LORA_ERR_FORMAT},
        {good, 127, -1, LORA_ERR_FORMAT},                         /* data one byte short */
        {"{\"" NAME_A "\":{\"dtype\":\"F32\",\"shape\":[2,8],\"data_offsets\":[0,64]}", 128, -1,
         LORA_ERR_FORMAT}, /* not JSON */
        {"[1,2]", 128, -1, LORA_ERR_FORMAT},
        {"{}", 0, -1, LORA_ERR_FORMAT},                           /* no tensors */
        {"{\"" NAME_A "\":{\"dtype\":\"F32\",\"shape\":[2,8],\"data_offsets\":[0,64]},"
         "\"" NAME_B "\":{\"dtype\":\"F32\",\"shape\":[8,2],\"data_offsets\":[64,4000000000]}}",
         128, -1, LORA_ERR_FORMAT}, /* past the data */
        {"{\"" NAME_A "\":{\"dtype\":\"F32\",\"shape\":[2,8],\"data_offsets\":[0,64]},"
         "\"" NAME_B "\":{\"dtype\":\"F32\",\"shape\":[8,2],\"data_offsets\":[32,96]}}",
         128, -1, LORA_ERR_FORMAT}, /* overlap */
        {"{\"" NAME_A "\":{\"dtype\":\"F32\",\"shape\":[2,8],\"data_offsets\":[0,60]},"
         "\"" NAME_B "\":{\"dtype\":\"F32\",\"shape\":[8,2],\"data_offsets\":[64,128]}}",
         128, -1, LORA_ERR_FORMAT}, /* size mismatch */
        {"{\"" NAME_A "\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,4],"
         "\"data_offsets\":[0,64]}}", 128, -1, LORA_ERR_FORMAT}, /* numel overflow */
        {"{\"" NAME_A "\":{\"dtype\":\"F32\",\"shape\":[-2,8],\"data_offsets\":[0,64]}}", 128, -1,
         LORA_ERR_FORMAT},
        {"{\"" NAME_A "\":{\"dtype\":\"F32\",\"shape\":[2,8],\"data_offsets\":[0.5,64]}}", 128, -1,
         LORA_ERR_FORMAT},
        {"{\"" NAME_A "\":{\"dtype\":\"F33\",\"shape\":[2,8],\"data_offsets\":[0,64]}}", 128, -1,
         LORA_ERR_FORMAT},
        {"{\"" NAME_A "\":{\"dtype\":\"F32\",\"shape\":[2,8]}}", 128, -1, LORA_ERR_FORMAT},
        {"{\"" NAME_A "\":{\"dtype\":\"F32\",\"shape\":[2,8],\"data_offsets\":[0,64]},"
         "\"" NAME_A "\":{\"dtype\":\"F32\",\"shape\":[2,8],\"data_offsets\":[64,128]}}",
         128, -1, LORA_ERR_FORMAT}, /* duplicate name */
        {"{\"" NAME_A "\":{\"dtype\":\"F32\",\"shape\":[2,8],\"data_offsets\":[0,64]}}", 128, -1,
         LORA_ERR_FORMAT}, /* A without B */
        {"{\"" NAME_A "\":{\"dtype\":\"F32\",\"shape\":[2,2,4],\"data_offsets\":[0,64]},"
         "\"" NAME_B "\":{\"dtype\":\"F32\",\"shape\":[8,2],\"data_offsets\":[64,128]}}",
         128, -1, LORA_ERR_FORMAT}, /* 3-D */
        {"{\"" NAME_A "\":{\"dtype\":\"F32\",\"shape\":[4,4],\"data_offsets\":[0,64]},"
         "\"" NAME_B "\":{\"dtype\":\"F32\",\"shape\":[4,4],\"data_offsets\":[64,128]}}",
         128, -1, LORA_ERR_FORMAT}, /* rank 4 while r = 2 */
        {"{\"" NAME_A "\":{\"dtype\":\"I32\",\"shape\":[2,8],\"data_offsets\":[0,64]},"
         "\"" NAME_B "\":{\"dtype\":\"F32\",\"shape\":[8,2],\"data_offsets\":[64,128]}}",
         128, -1, LORA_ERR_UNSUPPORTED},
        {"{\"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight\":{\"dtype\":\"F32\","
         "\"shape\":[2,8],\"data_offsets\":[0,64]}}", 64, -1, LORA_ERR_UNSUPPORTED},
        {"{\"base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight\":{\"dtype\":"
         "\"F32\",\"shape\":[2,8],\"data_offsets\":[0,64]}}", 64, -1, LORA_ERR_UNSUPPORTED},
        {"{\"" NAME_A "\":{\"dtype\":\"F32\",\"shape\":[2,8],\"data_offsets\":[0,64]},"
         "\"" NAME_B "\":{\"dtype\":\"F32\",\"shape\":[8,2],\"data_offsets\":[64,128]},"
         "\"__metadata__\":5}", 128, -1, LORA_ERR_FORMAT},
        {deep, 0, -1, LORA_ERR_FORMAT},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_peft(dir, GOOD_CONFIG, cases[i].header, data, cases[i].data_len,
                   cases[i].len_override);
        const int st = load_status(0, dir, &s);
        ck_assert_msg(st == cases[i].want, "case %zu: status %d, want %d", i, st, cases[i].want);
    }
    /* A NUL inside the header. */
    {
        char nul_header[64] = "{\"a\":1}";
        nul_header[3] = '\0';
        char *wp = path_in(dir, "adapter_model.safetensors");
        unsigned char buf[8 + 7] = {7, 0, 0, 0, 0, 0, 0, 0};
        memcpy(buf + 8, nul_header, 7);
        fx_write_file(wp, buf, sizeof buf);
        ck_assert_int_eq(load_status(0, dir, &s), LORA_ERR_FORMAT);
        free(wp);
    }
    /* Hostile or unsupported adapter_config.json with good tensors. */
    const struct {
        const char *config;
        int want;
    } configs[] = {
        {"{\"r\": 2, \"lora_alpha\": 4", LORA_ERR_FORMAT},
        {"", LORA_ERR_FORMAT},
        {"[]", LORA_ERR_FORMAT},
        {"{\"r\": \"2\"}", LORA_ERR_FORMAT},
        {"{\"r\": 0}", LORA_ERR_FORMAT},
        {"{\"r\": 2.5}", LORA_ERR_FORMAT},
        {"{\"r\": 2, \"lora_alpha\": 1e999}", LORA_ERR_FORMAT},
        {"{\"r\": 2, \"lora_alpha\": true}", LORA_ERR_FORMAT},
        {"{\"r\": 2, \"use_rslora\": 1}", LORA_ERR_FORMAT},
        {"{\"r\": 2, \"target_modules\": 5}", LORA_ERR_FORMAT},
        {"{\"r\": 2, \"target_modules\": [\"k_proj\"]}", LORA_ERR_FORMAT},
        {"{\"r\": 2, \"target_modules\": [\"gate_proj\"]}", LORA_ERR_FORMAT},
        {"{\"r\": 2, \"target_modules\": [1]}", LORA_ERR_FORMAT},
        {"{\"r\": 2, \"use_dora\": true}", LORA_ERR_UNSUPPORTED},
        {"{\"r\": 2, \"fan_in_fan_out\": true}", LORA_ERR_UNSUPPORTED},
        {"{\"r\": 2, \"rank_pattern\": {\"q_proj\": 4}}", LORA_ERR_UNSUPPORTED},
        {"{\"r\": 2, \"peft_type\": \"IA3\"}", LORA_ERR_UNSUPPORTED},
        {"{\"r\": 2}", LORA_OK},                                  /* alpha defaults to 8 */
        /* a regex (re.fullmatch over the module name, as PEFT) */
        {"{\"r\": 2, \"target_modules\": \".*\\\\.(q_proj|v_proj)\"}", LORA_OK},
        {"{\"r\": 2, \"rank_pattern\": {}, \"alpha_pattern\": null}", LORA_OK},
    };
    for (size_t i = 0; i < sizeof configs / sizeof configs[0]; i++) {
        write_peft(dir, configs[i].config, good, data, 128, -1);
        const int st = load_status(0, dir, &s);
        ck_assert_msg(st == configs[i].want, "config %zu: status %d, want %d", i, st,
                      configs[i].want);
    }
    /* Missing files, a directory instead of a file. */
    char *cp = path_in(dir, "adapter_config.json");
    remove(cp);
    ck_assert_int_eq(load_status(0, dir, &s), LORA_ERR_IO);
    ck_assert_int_eq(mkdir(cp, 0700), 0);
    ck_assert_int_eq(load_status(0, dir, &s), LORA_ERR_IO);
    free(cp);
    free(deep);
    fx_rmtree(dir);
    free(dir);
}
END_TEST

/* F16, BF16 and F64 tensors are converted on load. */
START_TEST(test_peft_half_precision)
{
    fx_spec s = small_spec();
    char *dir = fx_tmpdir();
    /* A in F16: value k*0.25 - 1 (exact in F16); B in BF16: (k - 8) * 0.5. */
    unsigned char data[32 + 32];
    float want_a[16], want_b[16];
    for (int k = 0; k < 16; k++) {
        want_a[k] = k * 0.25f - 1.0f;
        /* F16 of want_a: build from sign/exponent/mantissa. */
        const float v = want_a[k];
        uint16_t h = 0;
        if (v != 0.0f) {
            int e;
            const float m = frexpf(fabsf(v), &e); /* v = m*2^e, m in [0.5, 1) */
            const uint16_t mant = (uint16_t)((m * 2.0f - 1.0f) * 1024.0f);
            h = (uint16_t)((v < 0 ? 0x8000 : 0) | (uint16_t)((e - 1 + 15) << 10) | mant);
        }
        data[2 * k] = (unsigned char)h;
        data[2 * k + 1] = (unsigned char)(h >> 8);
        want_b[k] = (k - 8) * 0.5f;
        uint32_t u;
        memcpy(&u, &want_b[k], 4);
        data[32 + 2 * k] = (unsigned char)(u >> 16);
        data[32 + 2 * k + 1] = (unsigned char)(u >> 24);
    }
    const char *hdr = "{\"" NAME_A "\":{\"dtype\":\"F16\",\"shape\":[2,8],\"data_offsets\":[0,32]},"
                      "\"" NAME_B "\":{\"dtype\":\"BF16\",\"shape\":[8,2],\"data_offsets\":[32,64]}}";
    write_peft(dir, GOOD_CONFIG, hdr, data, 64, -1);
    lora_config *cfg = cfg_for(&s);
    loaded L;
    ck_assert_msg(load_all(0, dir, cfg, &L) == LORA_OK, "%s", lora_config_last_error(cfg));
    float a[16], b[16];
    ck_assert_int_eq(lora_adapter_get_param(L.ad[0], LORA_TARGET_Q, LORA_A, a, 16), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_param(L.ad[0], LORA_TARGET_Q, LORA_B, b, 16), LORA_OK);
    for (int k = 0; k < 16; k++) {
        ck_assert_msg(a[k] == want_a[k], "A[%d] = %g, want %g", k, a[k], want_a[k]);
        ck_assert_msg(b[k] == want_b[k], "B[%d] = %g, want %g", k, b[k], want_b[k]);
    }
    loaded_free(&L);
    /* F16 infinity (0x7c00) in a factor: NONFINITE. */
    data[0] = 0x00;
    data[1] = 0x7c;
    write_peft(dir, GOOD_CONFIG, hdr, data, 64, -1);
    ck_assert_int_eq(load_all(0, dir, cfg, &L), LORA_ERR_NONFINITE);
    lora_config_destroy(cfg);
    fx_rmtree(dir);
    free(dir);
}
END_TEST

/* ---- crafted GGUF ------------------------------------------------------------------- */

/* The standard good adapter: the 2 type KVs (and alpha 4 unless no_alpha), then the Q
 * pair of layer 0: lora_a (F32 or F16, 0.125*k) at data offset 0, lora_b (F32) at 64. */
static void g_good(tw_buf *g, uint32_t type_a, int no_alpha)
{
    tw_gguf_header(g, 3, 2, no_alpha ? 2 : 3);
    tw_gguf_kv_str(g, "general.type", "adapter");
    tw_gguf_kv_str(g, "adapter.type", "lora");
    uint32_t u;
    if (!no_alpha)
        tw_gguf_kv_f32(g, "adapter.lora.alpha", 4.0f);
    tw_gguf_info(g, "blk.0.attn_q.weight.lora_a", strlen("blk.0.attn_q.weight.lora_a"), 8, 2, type_a, 0);
    tw_gguf_info(g, "blk.0.attn_q.weight.lora_b", strlen("blk.0.attn_q.weight.lora_b"), 2, 8, 0, 64);
    tw_align(g, 32);
    const size_t data_start = g->n;
    for (int k = 0; k < 16; k++) {
        const float v = 0.125f * k;
        if (type_a == 0) {
            memcpy(&u, &v, 4);
            tw_u32(g, u);
        } else { /* F16, exact for these values */
            uint16_t h = 0;
            if (k) {
                int e;
                const float m = frexpf(v, &e);
                h = (uint16_t)(((e - 1 + 15) << 10) | (uint16_t)((m * 2.0f - 1.0f) * 1024.0f));
            }
            tw_u8(g, (unsigned char)h);
            tw_u8(g, (unsigned char)(h >> 8));
        }
    }
    while (g->n < data_start + 64)
        tw_u8(g, 0);
    for (int k = 0; k < 16; k++) {
        const float v = -0.5f + 0.0625f * k;
        memcpy(&u, &v, 4);
        tw_u32(g, u);
    }
}

static int gguf_status(const char *path, const tw_buf *g, const fx_spec *s)
{
    fx_write_file(path, g->b, g->n);
    return load_status(1, path, s);
}

START_TEST(test_gguf_hostile)
{
    fx_spec s = small_spec();
    char *dir = fx_tmpdir();
    char *path = path_in(dir, "h.gguf");
    tw_buf tb = {0}, *g = &tb;
    g_good(g, 0, 0);
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_OK);
    /* Values; alpha as stored, and missing alpha = rank (llama.cpp: scale 1). */
    for (int no_alpha = 0; no_alpha < 2; no_alpha++) {
        g_good(g, 0, no_alpha);
        fx_write_file(path, g->b, g->n);
        lora_config *cfg = cfg_for(&s);
        loaded L;
        ck_assert_int_eq(load_all(1, path, cfg, &L), LORA_OK);
        float a[16];
        ck_assert_int_eq(lora_adapter_get_param(L.ad[0], LORA_TARGET_Q, LORA_A, a, 16), LORA_OK);
        for (int k = 0; k < 16; k++)
            ck_assert(a[k] == 0.125f * k);
        double alpha;
        ck_assert_int_eq(lora_adapter_get_config_double(L.ad[0], LORA_CFG_ALPHA, &alpha), LORA_OK);
        ck_assert(alpha == (no_alpha ? 2.0 : 4.0));
        loaded_free(&L);
        lora_config_destroy(cfg);
    }
    /* F16 lora_a. */
    g_good(g, 1, 0);
    {
        lora_config *cfg = cfg_for(&s);
        loaded L;
        fx_write_file(path, g->b, g->n);
        ck_assert_msg(load_all(1, path, cfg, &L) == LORA_OK, "%s", lora_config_last_error(cfg));
        float a[16];
        ck_assert_int_eq(lora_adapter_get_param(L.ad[0], LORA_TARGET_Q, LORA_A, a, 16), LORA_OK);
        for (int k = 0; k < 16; k++)
            ck_assert_msg(a[k] == 0.125f * k, "F16 A[%d] = %g", k, a[k]);
        loaded_free(&L);
        lora_config_destroy(cfg);
    }
    /* Crafted headers. */
    tw_gguf_header(g, 3, 0, 0);
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT); /* no general.type */
    g_good(g, 0, 0);
    memcpy(g->b, "GGUG", 4);
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT);
    g_good(g, 0, 0);
    g->b[4] = 1;
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_UNSUPPORTED); /* v1 */
    g->b[4] = 4;
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT);
    g->b[4] = 0;
    g->b[7] = 3; /* big-endian version 3 */
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT);
    g_good(g, 0, 0);
    g->b[4] = 2; /* v2 has the same layout */
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_OK);
    tw_gguf_header(g, 3, UINT64_C(1) << 62, 0);
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT);
    tw_gguf_header(g, 3, 0, UINT64_MAX);
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT);
    /* key length 2^63 */
    tw_gguf_header(g, 3, 0, 1);
    tw_u64(g, UINT64_C(1) << 63);
    tw_u32(g, 8);
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT);
    /* string value longer than the file */
    tw_gguf_header(g, 3, 0, 1);
    tw_gguf_str(g, "general.type", strlen("general.type"));
    tw_u32(g, 8);
    tw_u64(g, 1000);
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT);
    /* arrays: u32 array with 2^62 elements; nested 20 deep; bools of value 2 */
    tw_gguf_header(g, 3, 0, 1);
    tw_gguf_str(g, "x.arr", strlen("x.arr"));
    tw_u32(g, 9);
    tw_u32(g, 4);
    tw_u64(g, UINT64_C(1) << 62);
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT);
    tw_gguf_header(g, 3, 0, 1);
    tw_gguf_str(g, "x.arr", strlen("x.arr"));
    tw_u32(g, 9);
    for (int d = 0; d < 20; d++) {
        tw_u32(g, 9);
        tw_u64(g, 1);
    }
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT);
    tw_gguf_header(g, 3, 0, 1);
    tw_gguf_str(g, "x.b", strlen("x.b"));
    tw_u32(g, 7);
    tw_u8(g, 2);
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT);
    tw_gguf_header(g, 3, 0, 1);
    tw_gguf_str(g, "x.t", strlen("x.t"));
    tw_u32(g, 13); /* unknown value type */
    tw_u32(g, 0);
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT);
    /* general.type "model", adapter.type "ia3", duplicate key, bad alignments. */
    const char *kv_cases[][2] = {{"general.type", "model"}, {"adapter.type", "ia3"}};
    for (int i = 0; i < 2; i++) {
        tw_gguf_header(g, 3, 0, 2);
        tw_gguf_kv_str(g, "general.type", i == 0 ? kv_cases[0][1] : "adapter");
        tw_gguf_kv_str(g, "adapter.type", i == 1 ? kv_cases[1][1] : "lora");
        ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_UNSUPPORTED);
    }
    tw_gguf_header(g, 3, 0, 3);
    tw_gguf_kv_str(g, "general.type", "adapter");
    tw_gguf_kv_str(g, "adapter.type", "lora");
    tw_gguf_kv_str(g, "general.type", "adapter");
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT);
    const uint32_t aligns[] = {0, 3, 48};
    for (int i = 0; i < 3; i++) {
        tw_gguf_header(g, 3, 0, 3);
        tw_gguf_kv_str(g, "general.type", "adapter");
        tw_gguf_kv_str(g, "adapter.type", "lora");
        tw_gguf_str(g, "general.alignment", strlen("general.alignment"));
        tw_u32(g, 4);
        tw_u32(g, aligns[i]);
        ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT);
    }
    tw_gguf_header(g, 3, 0, 3); /* alignment as a u64 */
    tw_gguf_kv_str(g, "general.type", "adapter");
    tw_gguf_kv_str(g, "adapter.type", "lora");
    tw_gguf_str(g, "general.alignment", strlen("general.alignment"));
    tw_u32(g, 10);
    tw_u64(g, 32);
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT);
    tw_gguf_header(g, 3, 0, 2); /* no tensors */
    tw_gguf_kv_str(g, "general.type", "adapter");
    tw_gguf_kv_str(g, "adapter.type", "lora");
    ck_assert_int_eq(gguf_status(path, g, &s), LORA_ERR_FORMAT);
    /* Tensor infos: each with the two good KVs first. */
    const struct {
        const char *name;
        uint32_t n_dims;
        uint64_t ne0, ne1;
        uint32_t type;
        uint64_t off;
        int want;
    } tcases[] = {
        {"blk.0.attn_q.weight.lora_a", 5, 8, 2, 0, 0, LORA_ERR_FORMAT},   /* 5 dims */
        {"blk.0.attn_q.weight.lora_a", 2, UINT64_C(1) << 62, 8, 0, 0, LORA_ERR_FORMAT},
        {"blk.0.attn_q.weight.lora_a", 2, 8, 2, 99, 0, LORA_ERR_FORMAT}, /* ggml type */
        {"blk.0.attn_q.weight.lora_a", 2, 8, 2, 2, 0, LORA_ERR_UNSUPPORTED}, /* Q4_0 */
        {"blk.0.attn_q.weight.lora_a", 2, 8, 2, 0, 4, LORA_ERR_FORMAT},  /* misaligned */
        {"blk.0.attn_q.weight.lora_a", 2, 8, 2, 0, 1 << 20, LORA_ERR_FORMAT}, /* past end */
        {"blk.0.attn_q.weight.lora_a", 2, 8, 2, 0, UINT64_MAX - 31, LORA_ERR_FORMAT},
        {"blk.0.ffn_up.weight.lora_a", 2, 8, 2, 0, 0, LORA_ERR_UNSUPPORTED},
        {"blk.x.attn_q.weight.lora_a", 2, 8, 2, 0, 0, LORA_ERR_UNSUPPORTED},
        {"blk.0.attn_q.weight.lora_a", 2, 8, 2, 0, 0, LORA_ERR_FORMAT}, /* A without B */
    };
    for (size_t i = 0; i < sizeof tcases / sizeof tcases[0]; i++) {
        tw_gguf_header(g, 3, 1, 2);
        tw_gguf_kv_str(g, "general.type", "adapter");
        tw_gguf_kv_str(g, "adapter.type", "lora");
        tw_gguf_str(g, tcases[i].name, strlen(tcases[i].name));
        tw_u32(g, tcases[i].n_dims);
        for (uint32_t d = 0; d < tcases[i].n_dims && d < 6; d++)
            tw_u64(g, d == 0 ? tcases[i].ne0 : d == 1 ? tcases[i].ne1 : 1);
        tw_u32(g, tcases[i].type);
        tw_u64(g, tcases[i].off);
        tw_align(g, 32);
        for (int k = 0; k < 64; k++)
            tw_u8(g, 0);
        const int st = gguf_status(path, g, &s);
        ck_assert_msg(st == tcases[i].want, "tensor case %zu: status %d, want %d", i, st,
                      tcases[i].want);
    }
    /* Overlapping pair; the pair with the wrong shape for the config (SHAPE); the pair
     * transposed (lora_a stored as [r, in]: rank mismatch, FORMAT). */
    const struct {
        uint64_t a0, a1, b0, b1, boff;
        int want;
    } pairs[] = {
        {8, 2, 2, 8, 32, LORA_ERR_FORMAT},
        {16, 2, 2, 8, 128, LORA_ERR_SHAPE},
        {2, 8, 8, 2, 64, LORA_ERR_SHAPE}, /* read as rank 8 */
        {8, 2, 3, 8, 64, LORA_ERR_FORMAT}, /* ranks 2 and 3 */
        {8, 2, 2, 8, 64, LORA_OK},
    };
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        tw_gguf_header(g, 3, 2, 2);
        tw_gguf_kv_str(g, "general.type", "adapter");
        tw_gguf_kv_str(g, "adapter.type", "lora");
        tw_gguf_info(g, "blk.3.attn_q.weight.lora_a", strlen("blk.3.attn_q.weight.lora_a"), pairs[i].a0, pairs[i].a1, 0, 0);
        tw_gguf_info(g, "blk.3.attn_q.weight.lora_b", strlen("blk.3.attn_q.weight.lora_b"), pairs[i].b0, pairs[i].b1, 0, pairs[i].boff);
        tw_align(g, 32);
        /* The data end exactly with the later tensor, padded to 32 (no trailing bytes). */
        const uint64_t a_end = pairs[i].a0 * pairs[i].a1 * 4;
        const uint64_t b_end = pairs[i].boff + pairs[i].b0 * pairs[i].b1 * 4;
        const uint64_t data = ((a_end > b_end ? a_end : b_end) + 31) / 32 * 32;
        for (uint64_t k = 0; k < data; k++)
            tw_u8(g, 0);
        const int st = gguf_status(path, g, &s);
        ck_assert_msg(st == pairs[i].want, "pair case %zu: status %d, want %d", i, st,
                      pairs[i].want);
    }
    tw_free(g);
    fx_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* Loading into a config whose layer does not match, capacity, arguments. */
START_TEST(test_load_mismatch_and_arguments)
{
    fx_spec s = fx_default();
    lora_adapter *ad[2];
    int64_t layers[2];
    make_set(&s, ad, layers, 2);
    char *dir = fx_tmpdir();
    char *gpath = path_in(dir, "a.gguf");
    ck_assert_int_eq(lora_save_peft(dir, ad, layers, 2), LORA_OK);
    ck_assert_int_eq(lora_save_gguf(gpath, ad, layers, 2, NULL), LORA_OK);
    for (int gguf = 0; gguf < 2; gguf++) {
        const char *p = gguf ? gpath : dir;
        int (*load)(lora_adapter **, int64_t *, size_t, size_t *, const char *, lora_config *) =
            gguf ? lora_load_gguf : lora_load_peft;
        fx_spec other = s;
        other.d_model = 32;
        other.n_heads = 8;
        other.n_kv_heads = 4;
        ck_assert_int_eq(load_status(gguf, p, &other), LORA_ERR_SHAPE);
        other = s;
        other.n_kv_heads = 4; /* kv_dim 16 instead of 8 */
        ck_assert_int_eq(load_status(gguf, p, &other), LORA_ERR_SHAPE);
        other = s;
        other.out_proj = 0; /* the file adapts O */
        other.targets = LORA_TARGET_Q;
        ck_assert_int_eq(load_status(gguf, p, &other), LORA_ERR_INVALID_ARG);
        lora_config *cfg = cfg_for(&s);
        lora_adapter *out[2] = {NULL, NULL};
        int64_t lay[2];
        size_t n = 99;
        ck_assert_int_eq(load(out, lay, 1, &n, p, cfg), LORA_ERR_INVALID_ARG);
        ck_assert_uint_eq(n, 2); /* tells the size needed */
        ck_assert(strstr(lora_config_last_error(cfg), "capacity") != NULL);
        ck_assert(out[0] == NULL && out[1] == NULL);
        ck_assert_int_eq(load(out, NULL, 2, &n, p, cfg), LORA_ERR_INVALID_ARG);
        ck_assert_int_eq(load(NULL, lay, 2, &n, p, cfg), LORA_ERR_INVALID_ARG);
        ck_assert_int_eq(load(out, lay, 2, NULL, p, cfg), LORA_ERR_INVALID_ARG);
        ck_assert_int_eq(load(out, lay, 2, &n, NULL, cfg), LORA_ERR_INVALID_ARG);
        ck_assert_int_eq(load(out, lay, 2, &n, p, NULL), LORA_ERR_INVALID_ARG);
        ck_assert_int_eq(load(out, lay, 2, &n, "/nonexistent/lora/x", cfg), LORA_ERR_IO);
        ck_assert(lora_config_last_error(cfg)[0] != '\0');
        ck_assert_int_eq(load(out, lay, 2, &n, p, cfg), LORA_OK);
        ck_assert_str_eq(lora_config_last_error(cfg), "");
        ck_assert_uint_eq(n, 2);
        /* cfg itself is unchanged by the load (rank stays the config's) */
        int64_t rank;
        ck_assert_int_eq(lora_config_get_int(cfg, LORA_CFG_RANK, &rank), LORA_OK);
        ck_assert_int_eq(rank, s.rank);
        lora_adapter_destroy(out[0]);
        lora_adapter_destroy(out[1]);
        lora_config_destroy(cfg);
    }
    /* A GGUF path given to the PEFT loader and vice versa. */
    ck_assert_int_eq(load_status(0, gpath, &s), LORA_ERR_IO);
    ck_assert_int_eq(load_status(1, dir, &s), LORA_ERR_IO);
    for (int i = 0; i < 2; i++)
        lora_adapter_destroy(ad[i]);
    fx_rmtree(dir);
    free(gpath);
    free(dir);
}
END_TEST

START_TEST(test_save_errors)
{
    fx_spec s = fx_default();
    lora_adapter *ad[3];
    int64_t layers[3];
    make_set(&s, ad, layers, 3);
    char *dir = fx_tmpdir();
    char *gpath = path_in(dir, "x.gguf");
    for (int gguf = 0; gguf < 2; gguf++) {
#define SAVE(a, l, n) (gguf ? lora_save_gguf(gpath, a, l, n, NULL) : lora_save_peft(dir, a, l, n))
        ck_assert_int_eq(SAVE(NULL, layers, 3), LORA_ERR_INVALID_ARG);
        ck_assert_int_eq(SAVE(ad, NULL, 3), LORA_ERR_INVALID_ARG);
        ck_assert_int_eq(SAVE(ad, layers, 0), LORA_ERR_INVALID_ARG);
        int64_t dup[3] = {1, 4, 1}, neg[3] = {1, -1, 2}, big[3] = {0, 1, INT64_C(1) << 31};
        ck_assert_int_eq(SAVE(ad, dup, 3), LORA_ERR_INVALID_ARG);
        ck_assert(strstr(lora_adapter_last_error(ad[0]), "twice") != NULL);
        ck_assert_int_eq(SAVE(ad, neg, 3), LORA_ERR_INVALID_ARG);
        ck_assert_int_eq(SAVE(ad, big, 3), LORA_ERR_INVALID_ARG);
        lora_adapter *mixed[3] = {ad[0], NULL, ad[2]};
        ck_assert_int_eq(SAVE(mixed, layers, 3), LORA_ERR_INVALID_ARG);
        fx_spec o = s;
        o.rank = 2;
        mixed[1] = fx_adapter_nobase(&o, 1);
        ck_assert_int_eq(SAVE(mixed, layers, 3), LORA_ERR_INVALID_ARG);
        lora_adapter_destroy(mixed[1]);
        o = s;
        o.alpha = 3.0;
        mixed[1] = fx_adapter_nobase(&o, 1);
        ck_assert_int_eq(SAVE(mixed, layers, 3), LORA_ERR_INVALID_ARG);
        lora_adapter_destroy(mixed[1]);
        o = s;
        o.targets = LORA_TARGET_Q;
        mixed[1] = fx_adapter_nobase(&o, 1);
        ck_assert_int_eq(SAVE(mixed, layers, 3), LORA_ERR_INVALID_ARG);
        lora_adapter_destroy(mixed[1]);
#undef SAVE
    }
    ck_assert_int_eq(lora_save_peft(NULL, ad, layers, 3), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_save_gguf(NULL, ad, layers, 3, NULL), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_save_peft("/nonexistent/dir/adapter", ad, layers, 3), LORA_ERR_IO);
    ck_assert(lora_adapter_last_error(ad[0])[0] != '\0');
    ck_assert_int_eq(lora_save_gguf("/nonexistent/dir/a.gguf", ad, layers, 3, NULL), LORA_ERR_IO);
    ck_assert_int_eq(lora_save_gguf(gpath, ad, layers, 3, "Llama!"), LORA_ERR_INVALID_ARG);
    /* alpha 0: llama.cpp would read "scale 1". */
    fx_spec z = s;
    z.alpha = 0.0;
    lora_config *cfg = fx_config(&z);
    ck_assert_int_eq(lora_config_set_double(cfg, LORA_CFG_ALPHA, 0.0), LORA_OK);
    lora_adapter *zero = NULL;
    ck_assert_int_eq(lora_adapter_create(&zero, cfg), LORA_OK);
    const int64_t l0 = 0;
    ck_assert_int_eq(lora_save_gguf(gpath, &zero, &l0, 1, NULL), LORA_ERR_UNSUPPORTED);
    ck_assert_int_eq(lora_save_peft(dir, &zero, &l0, 1), LORA_OK); /* PEFT can say 0 */
    lora_adapter_destroy(zero);
    lora_config_destroy(cfg);
    /* no temporary files left behind by the failures or the successes */
    ck_assert_int_eq(lora_save_gguf(gpath, ad, layers, 3, NULL), LORA_OK);
    for (int i = 0; i < 3; i++)
        lora_adapter_destroy(ad[i]);
    fx_rmtree(dir);
    free(gpath);
    free(dir);
}
END_TEST

/* ---- allocation failure ------------------------------------------------------------- */

typedef struct talloc {
    long calls, fail_at, injected, live;
} talloc;

static void *t_alloc(void *user, size_t size)
{
    talloc *t = user;
    if (++t->calls == t->fail_at) {
        t->injected++;
        return NULL;
    }
    void *p = malloc(size ? size : 1);
    t->live += p != NULL;
    return p;
}

static void t_free(void *user, void *ptr)
{
    talloc *t = user;
    t->live--;
    free(ptr);
}

static lora_config *alloc_config(talloc *t, const fx_spec *s)
{
    const lora_allocator a = {t_alloc, t_free, t};
    lora_config *cfg = NULL;
    ck_assert_int_eq(lora_config_create_with_allocator(&cfg, &a), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_D_MODEL, s->d_model), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, s->n_heads), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, s->n_kv_heads), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_RANK, s->rank), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_TARGETS, s->targets), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_OUT_PROJ, s->out_proj), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_THREADS, 1), LORA_OK);
    return cfg;
}

enum { OP_FORWARD_MERGED, OP_OPTIMIZER, OP_SAVE_PEFT, OP_SAVE_GGUF, OP_LOAD_PEFT,
       OP_LOAD_GGUF, OP_COUNT };

/* Runs op once; returns its status. Loaded adapters and the optimizer are freed. */
static int run_op(int op, lora_adapter *const *ad, lora_config *cfg, const char *dir,
                  const char *gpath, const char **msg)
{
    static const int64_t layers[2] = {3, 1};
    int st;
    *msg = "";
    switch (op) {
    case OP_FORWARD_MERGED: {
        float x[2 * 3 * 16], y[2 * 3 * 16];
        fill_uniform(x, 2 * 3 * 16, 1, 1.0f);
        st = lora_forward_merged(ad[0], x, 2, 3, y);
        *msg = lora_adapter_last_error(ad[0]);
        return st;
    }
    case OP_OPTIMIZER: {
        lora_optimizer *opt = NULL;
        st = lora_optimizer_create(&opt, ad[0], LORA_OPTIMIZER_ADAMW);
        if (st != LORA_OK) { /* ad[0] is const to create: the status is the report */
            ck_assert_str_eq(lora_adapter_last_error(ad[0]), "");
            *msg = "lora_optimizer_create failed (status only: its adapter is const)";
            return st;
        }
        *msg = lora_adapter_last_error(ad[0]);
        st = lora_optimizer_step(opt, ad[0]);
        lora_optimizer_destroy(opt);
        return st;
    }
    case OP_SAVE_PEFT:
    case OP_SAVE_GGUF:
        st = op == OP_SAVE_PEFT ? lora_save_peft(dir, ad, layers, 2)
                                : lora_save_gguf(gpath, ad, layers, 2, NULL);
        *msg = lora_adapter_last_error(ad[0]);
        return st;
    default: {
        lora_adapter *out[2] = {NULL, NULL};
        int64_t lay[2];
        size_t n = 0;
        st = op == OP_LOAD_PEFT ? lora_load_peft(out, lay, 2, &n, dir, cfg)
                                : lora_load_gguf(out, lay, 2, &n, gpath, cfg);
        *msg = lora_config_last_error(cfg);
        if (st != LORA_OK)
            ck_assert(out[0] == NULL && out[1] == NULL && n == 0);
        lora_adapter_destroy(out[0]);
        lora_adapter_destroy(out[1]);
        return st;
    }
    }
}

/* Failing the k-th allocation, for every k, of merged inference, an optimizer step,
 * saving and loading: NOMEM with a message, nothing leaked, and the retry succeeds. */
START_TEST(test_io_allocation_failures)
{
    const int op = _i;
    fx_spec s = fx_default();
    char *dir = fx_tmpdir();
    char *gpath = path_in(dir, "a.gguf");
    /* Files to load, written with the default allocator. */
    {
        lora_adapter *ad[2];
        int64_t layers[2];
        make_set(&s, ad, layers, 2);
        ck_assert_int_eq(lora_save_peft(dir, ad, layers, 2), LORA_OK);
        ck_assert_int_eq(lora_save_gguf(gpath, ad, layers, 2, NULL), LORA_OK);
        lora_adapter_destroy(ad[0]);
        lora_adapter_destroy(ad[1]);
    }
    int done = 0;
    for (long k = 1; k < 10000 && !done; k++) {
        talloc t = {0, 0, 0, 0};
        lora_config *cfg = alloc_config(&t, &s);
        lora_adapter *ad[2];
        fx_base base;
        fx_base_make(&base, &s, 2);
        for (int i = 0; i < 2; i++) {
            ck_assert_int_eq(lora_adapter_create(&ad[i], cfg), LORA_OK);
            fx_randomize_factors(ad[i], 7u + (uint64_t)i, 0.5f);
            fx_base_apply(&base, ad[i], 1);
        }
        t.fail_at = t.calls + k;
        const char *msg;
        const int st = run_op(op, ad, cfg, dir, gpath, &msg);
        if (t.injected == 0) {
            ck_assert_msg(st == LORA_OK, "op %d without failure: status %d (%s)", op, st, msg);
            done = 1;
        } else {
            ck_assert_msg(st == LORA_ERR_NOMEM, "op %d, allocation %ld failed: status %d (%s)",
                          op, k, st, msg);
            ck_assert_msg(msg[0] != '\0', "op %d, allocation %ld: no message", op, k);
            t.fail_at = 0;
            const int again = run_op(op, ad, cfg, dir, gpath, &msg);
            ck_assert_msg(again == LORA_OK, "op %d retry after failing allocation %ld: %d (%s)",
                          op, k, again, msg);
        }
        lora_adapter_destroy(ad[0]);
        lora_adapter_destroy(ad[1]);
        lora_config_destroy(cfg);
        fx_base_free(&base);
        ck_assert_msg(t.live == 0, "op %d, k %ld: %ld blocks leaked", op, k, t.live);
    }
    ck_assert(done);
    fx_rmtree(dir);
    free(gpath);
    free(dir);
}
END_TEST

Suite *io_suite(void)
{
    Suite *s = suite_create("io");
    TCase *tc = tcase_create("roundtrip");
    tcase_set_timeout(tc, 30);
    tcase_add_loop_test(tc, test_peft_roundtrip, 0, 2);
    tcase_add_test(tc, test_peft_independent_reader);
    tcase_add_loop_test(tc, test_gguf_roundtrip, 0, 2);
    tcase_add_test(tc, test_gguf_independent_reader);
    tcase_add_test(tc, test_peft_half_precision);
    suite_add_tcase(s, tc);
    tc = tcase_create("hostile");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_truncated_and_corrupted, 0, 3);
    tcase_add_test(tc, test_peft_hostile_headers);
    tcase_add_test(tc, test_gguf_hostile);
    tcase_add_test(tc, test_load_mismatch_and_arguments);
    tcase_add_test(tc, test_save_errors);
    tcase_add_loop_test(tc, test_io_allocation_failures, 0, OP_COUNT);
    suite_add_tcase(s, tc);
    return s;
}
