/* nonfinite_suite: finite inputs whose results overflow float. Forward, backward and
 * the loss report LORA_ERR_NONFINITE and change nothing; scale parameters stored as
 * float must fit one, whether set directly or read from an adapter file. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "fixtures.h"
#include "helpers.h"
#include "suites.h"

#define SENTINEL 12345.0f

static float *filled(size_t n, float v)
{
    float *x = malloc(n * sizeof(float));
    ck_assert_ptr_nonnull(x);
    for (size_t i = 0; i < n; i++)
        x[i] = v;
    return x;
}

static void assert_all(const float *x, size_t n, float v, const char *what)
{
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(x[i] == v, "%s[%zu] = %g changed by a failed call", what, i, x[i]);
}

static size_t grad_count(const lora_adapter *ad)
{
    size_t n = 0;
    ck_assert_int_eq(lora_adapter_param_count(ad, &n), LORA_OK);
    return n;
}

static float *grads(const lora_adapter *ad)
{
    const size_t n = grad_count(ad);
    float *g = malloc(n * sizeof(float));
    ck_assert_ptr_nonnull(g);
    ck_assert_int_eq(lora_adapter_get_grads_flat(ad, g, n), LORA_OK);
    return g;
}

enum { BATCH = 2, SEQ = 5 };

/* ---- forward ------------------------------------------------------------------------- */

/* Every forward entry point on x (BATCH, SEQ, d_model) must fail with NONFINITE and
 * leave out untouched; the failed training forward leaves nothing to backpropagate. */
static void assert_forwards_refuse(lora_adapter *ad, const fx_spec *s, const float *x,
                                   const char *what)
{
    const size_t nout = (size_t)BATCH * SEQ * (size_t)fx_out_cols(s);
    float *out = filled(nout, SENTINEL);
    int st = lora_forward(ad, x, BATCH, SEQ, out);
    ck_assert_msg(st == LORA_ERR_NONFINITE, "%s: lora_forward gave %d (%s)", what, st,
                  lora_adapter_last_error(ad));
    ck_assert_msg(strstr(lora_adapter_last_error(ad), "out") != NULL,
                  "%s: message '%s' does not name the output", what,
                  lora_adapter_last_error(ad));
    assert_all(out, nout, SENTINEL, "out");
    float *dout = filled(nout, 1.0f);
    ck_assert_int_eq(lora_backward(ad, dout, NULL), LORA_ERR_STATE);
    st = lora_forward_cross(ad, x, x, BATCH, SEQ, SEQ, out);
    ck_assert_msg(st == LORA_ERR_NONFINITE, "%s: lora_forward_cross gave %d", what, st);
    assert_all(out, nout, SENTINEL, "out");
    st = lora_forward_merged(ad, x, BATCH, SEQ, out);
    ck_assert_msg(st == LORA_ERR_NONFINITE, "%s: lora_forward_merged gave %d (%s)", what, st,
                  lora_adapter_last_error(ad));
    assert_all(out, nout, SENTINEL, "out");
    free(dout);
    free(out);
}

START_TEST(test_nonfinite_forward_huge_input)
{
    /* |x| = 1e30: Q, K, V overflow (the default backend choice and forced EXACT). */
    for (int backend = LORA_BACKEND_AUTO; backend <= LORA_BACKEND_EXACT; backend++) {
        fx_spec s = fx_default();
        lora_config *cfg = fx_config(&s);
        ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_BACKEND, backend), LORA_OK);
        lora_adapter *ad = NULL;
        ck_assert_int_eq(lora_adapter_create(&ad, cfg), LORA_OK);
        lora_config_destroy(cfg);
        fx_randomize_factors(ad, 3, 0.5f);
        fx_base b;
        fx_base_make(&b, &s, 4);
        fx_base_apply(&b, ad, 1);
        float *x = filled((size_t)BATCH * SEQ * (size_t)s.d_model, 1e30f);
        x[7] = -1e30f;
        assert_forwards_refuse(ad, &s, x, backend ? "EXACT, |x| = 1e30" : "AUTO, |x| = 1e30");
        free(x);
        fx_base_free(&b);
        lora_adapter_destroy(ad);
    }
}
END_TEST

START_TEST(test_nonfinite_forward_huge_input_and_weights)
{
    /* |x|, |W| ~ 1e19: every product of the projections is ~1e38 and their sums
     * overflow. */
    fx_spec s = fx_default();
    lora_adapter *ad = fx_adapter_nobase(&s, 5);
    fx_base b;
    fx_base_make(&b, &s, 6);
    for (int t = 0; t < 4; t++)
        for (size_t i = 0; i < b.nw[t]; i++)
            b.w[t][i] = (i % 3 == 0 ? -1e19f : 1e19f);
    fx_base_apply(&b, ad, 1);
    float *x = filled((size_t)BATCH * SEQ * (size_t)s.d_model, 1e19f);
    assert_forwards_refuse(ad, &s, x, "|x|, |W| ~ 1e19");
    free(x);
    fx_base_free(&b);
    lora_adapter_destroy(ad);
}
END_TEST

/* ---- backward -------------------------------------------------------------------------- */

/* An adapter with bases, one forward on random x and one good backward, so the
 * gradients hold nonzero values a failed backward must keep. */
typedef struct bwd_case {
    fx_spec s;
    lora_adapter *ad;
    fx_base b;
    float *x, *out, *dout;
    size_t nx, nout;
} bwd_case;

static void bwd_setup(bwd_case *c, const fx_spec *s, float x_gain)
{
    memset(c, 0, sizeof *c);
    c->s = *s;
    c->ad = fx_adapter_nobase(s, 7);
    fx_base_make(&c->b, s, 8);
    c->nx = (size_t)BATCH * SEQ * (size_t)s->d_model;
    c->nout = (size_t)BATCH * SEQ * (size_t)fx_out_cols(s);
    c->x = filled(c->nx, 0.0f);
    fill_uniform(c->x, c->nx, 9, x_gain);
    c->out = filled(c->nout, 0.0f);
    c->dout = filled(c->nout, 0.0f);
    fill_uniform(c->dout, c->nout, 10, 1.0f);
}

static void bwd_first_step(bwd_case *c)
{
    fx_base_apply(&c->b, c->ad, 1);
    ck_assert_int_eq(lora_forward(c->ad, c->x, BATCH, SEQ, c->out), LORA_OK);
    ck_assert_int_eq(lora_backward(c->ad, c->dout, NULL), LORA_OK);
}

static void bwd_free(bwd_case *c)
{
    free(c->x);
    free(c->out);
    free(c->dout);
    fx_base_free(&c->b);
    lora_adapter_destroy(c->ad);
}

/* backward(dout) fails with NONFINITE and a message naming `names`, leaving gradients
 * and dx as they were. */
static void assert_backward_refuses(bwd_case *c, const float *dout, const char *names,
                                    const char *what)
{
    float *before = grads(c->ad);
    float *dx = filled(c->nx, SENTINEL);
    const int st = lora_backward(c->ad, dout, dx);
    ck_assert_msg(st == LORA_ERR_NONFINITE, "%s: lora_backward gave %d", what, st);
    ck_assert_msg(strstr(lora_adapter_last_error(c->ad), names) != NULL,
                  "%s: message '%s' does not name %s", what, lora_adapter_last_error(c->ad),
                  names);
    assert_all(dx, c->nx, SENTINEL, "dx");
    float *after = grads(c->ad);
    ck_assert_msg(memcmp(before, after, grad_count(c->ad) * sizeof(float)) == 0,
                  "%s: a failed backward changed the gradients", what);
    free(after);
    free(before);
    free(dx);
}

START_TEST(test_nonfinite_backward_gradient_overflow)
{
    /* A finite dout near FLT_MAX: dA, dB (and dx) overflow. */
    bwd_case c;
    bwd_setup(&c, &(fx_spec){.d_model = 16, .n_heads = 4, .n_kv_heads = 2, .rank = 4,
                             .targets = 15, .out_proj = 1, .bias = 1, .alpha = 8.0},
              1.0f);
    bwd_first_step(&c);
    float *huge = filled(c.nout, 3e38f);
    for (size_t i = 0; i < c.nout; i += 2)
        huge[i] = -3e38f;
    assert_backward_refuses(&c, huge, "gradient", "dout = +-3e38");
    /* The gradients alone overflow too (no dx requested). */
    float *before = grads(c.ad);
    ck_assert_int_eq(lora_backward(c.ad, huge, NULL), LORA_ERR_NONFINITE);
    ck_assert_msg(strstr(lora_adapter_last_error(c.ad), "gradient") != NULL,
                  "message '%s' does not name the gradient", lora_adapter_last_error(c.ad));
    float *after = grads(c.ad);
    ck_assert(memcmp(before, after, grad_count(c.ad) * sizeof(float)) == 0);
    /* The saved forward is intact: a normal backward still accumulates. */
    ck_assert_int_eq(lora_backward(c.ad, c.dout, NULL), LORA_OK);
    float *twice = grads(c.ad);
    int grew = 0;
    for (size_t i = 0; i < grad_count(c.ad); i++)
        grew |= twice[i] != before[i];
    ck_assert_msg(grew, "the good backward after the failed one added nothing");
    free(twice);
    free(after);
    free(before);
    free(huge);
    bwd_free(&c);
}
END_TEST

START_TEST(test_nonfinite_backward_dx_overflow)
{
    /* W_V ~ 1e30 with x ~ 1e-20 keeps V (and the output) finite, but dx = dV*W_V
     * overflows while the gradients of the Q factors stay finite. */
    bwd_case c;
    bwd_setup(&c, &(fx_spec){.d_model = 16, .n_heads = 4, .n_kv_heads = 2, .rank = 4,
                             .targets = LORA_TARGET_Q, .alpha = 8.0},
              1e-20f);
    for (size_t i = 0; i < c.b.nw[2]; i++)
        c.b.w[2][i] = (i % 2 ? 1e30f : -1e30f);
    bwd_first_step(&c);
    for (size_t i = 0; i < c.nout; i++)
        ck_assert_msg(isfinite(c.out[i]), "the setup's output is not finite");
    float *dout = filled(c.nout, 1e10f);
    assert_backward_refuses(&c, dout, "dx", "dx = dV*W_V overflows");
    /* Without dx the same backward is fine: it was dx that overflowed. */
    ck_assert_int_eq(lora_backward(c.ad, dout, NULL), LORA_OK);
    free(dout);
    bwd_free(&c);
}
END_TEST

START_TEST(test_nonfinite_backward_cross_dx_overflow)
{
    bwd_case c;
    bwd_setup(&c, &(fx_spec){.d_model = 16, .n_heads = 4, .n_kv_heads = 2, .rank = 4,
                             .targets = LORA_TARGET_Q, .alpha = 8.0},
              1e-20f);
    for (size_t i = 0; i < c.b.nw[2]; i++)
        c.b.w[2][i] = (i % 2 ? 1e30f : -1e30f);
    fx_base_apply(&c.b, c.ad, 1);
    ck_assert_int_eq(lora_forward_cross(c.ad, c.x, c.x, BATCH, SEQ, SEQ, c.out), LORA_OK);
    float *dout = filled(c.nout, 1e10f);
    float *before = grads(c.ad);
    float *dxq = filled(c.nx, SENTINEL), *dxkv = filled(c.nx, SENTINEL);
    ck_assert_int_eq(lora_backward_cross(c.ad, dout, dxq, dxkv), LORA_ERR_NONFINITE);
    assert_all(dxq, c.nx, SENTINEL, "dxq");
    assert_all(dxkv, c.nx, SENTINEL, "dxkv");
    float *after = grads(c.ad);
    ck_assert(memcmp(before, after, grad_count(c.ad) * sizeof(float)) == 0);
    /* dxq alone is finite (W_Q is small). */
    ck_assert_int_eq(lora_backward_cross(c.ad, dout, dxq, NULL), LORA_OK);
    free(after);
    free(before);
    free(dxq);
    free(dxkv);
    free(dout);
    bwd_free(&c);
}
END_TEST

/* ---- loss ------------------------------------------------------------------------------ */

START_TEST(test_nonfinite_mse_loss_overflow)
{
    const float out[3] = {3e38f, 1.0f, -2.0f}, target[3] = {-3e38f, 0.5f, 2.0f};
    float dout[3] = {SENTINEL, SENTINEL, SENTINEL};
    double loss = -1.0;
    /* dout = out - target = 6e38 does not fit a float. */
    ck_assert_int_eq(lora_mse_loss(out, target, 3, &loss, dout), LORA_ERR_NONFINITE);
    ck_assert_double_eq(loss, -1.0);
    assert_all(dout, 3, SENTINEL, "dout");
    const float out2[2] = {-3e38f, 0.0f}, target2[2] = {3e38f, 0.0f};
    ck_assert_int_eq(lora_mse_loss(out2, target2, 2, &loss, dout), LORA_ERR_NONFINITE);
    assert_all(dout, 3, SENTINEL, "dout");
    /* The loss itself is a double: without dout the same inputs are fine. */
    ck_assert_int_eq(lora_mse_loss(out, target, 3, &loss, NULL), LORA_OK);
    ck_assert(isfinite(loss) && loss > 1e77);
    /* Large differences that still fit are fine. */
    const float out3[1] = {3e38f}, target3[1] = {0.0f};
    ck_assert_int_eq(lora_mse_loss(out3, target3, 1, &loss, dout), LORA_OK);
    ck_assert(dout[0] == 3e38f);
}
END_TEST

/* ---- scale parameters through adapter files ------------------------------------------- */

static void put_u32(FILE *f, uint32_t v)
{
    unsigned char b[4];
    for (int i = 0; i < 4; i++)
        b[i] = (unsigned char)(v >> (8 * i));
    ck_assert_int_eq(fwrite(b, 1, 4, f), 4);
}

static void put_u64(FILE *f, uint64_t v)
{
    unsigned char b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(v >> (8 * i));
    ck_assert_int_eq(fwrite(b, 1, 8, f), 8);
}

static void put_str(FILE *f, const char *s)
{
    put_u64(f, strlen(s));
    ck_assert_int_eq(fwrite(s, 1, strlen(s), f), strlen(s));
}

/* Rank 2 Q factors for d_model 8 (one head): A (2, 8) then B (8, 2), little-endian F32. */
enum { FD = 8, FR = 2 };

static void put_factor_data(FILE *f)
{
    for (int i = 0; i < 2 * FD * FR; i++) {
        const float v = 0.0625f * (float)(i % 7) - 0.125f;
        uint32_t u;
        memcpy(&u, &v, 4);
        put_u32(f, u);
    }
}

/* A GGUF v3 LoRA adapter with adapter.lora.alpha stored as F64 (type 12). */
static void write_gguf_f64_alpha(const char *path, double alpha)
{
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fwrite("GGUF", 1, 4, f), 4);
    put_u32(f, 3);
    put_u64(f, 2); /* tensors */
    put_u64(f, 3); /* key-values */
    put_str(f, "general.type");
    put_u32(f, 8);
    put_str(f, "adapter");
    put_str(f, "adapter.type");
    put_u32(f, 8);
    put_str(f, "lora");
    put_str(f, "adapter.lora.alpha");
    put_u32(f, 12);
    uint64_t bits;
    memcpy(&bits, &alpha, 8);
    put_u64(f, bits);
    const char *names[2] = {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b"};
    const uint64_t ne[2][2] = {{FD, FR}, {FR, FD}}; /* ggml order: [in, r], [r, out] */
    for (int t = 0; t < 2; t++) {
        put_str(f, names[t]);
        put_u32(f, 2);
        put_u64(f, ne[t][0]);
        put_u64(f, ne[t][1]);
        put_u32(f, 0); /* F32 */
        put_u64(f, (uint64_t)t * FD * FR * 4);
    }
    long pos = ftell(f);
    while (pos++ % 32)
        ck_assert_int_eq(fputc(0, f), 0);
    put_factor_data(f);
    ck_assert_int_eq(fclose(f), 0);
}

/* A PEFT directory whose adapter_config.json has the given lora_alpha text. */
static void write_peft_alpha(const char *dir, const char *alpha)
{
    char path[4096], json[256];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    snprintf(json, sizeof json,
             "{\"peft_type\": \"LORA\", \"r\": %d, \"lora_alpha\": %s, "
             "\"target_modules\": [\"q_proj\"]}",
             FR, alpha);
    fx_write_file(path, json, strlen(json));
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    char header[512];
    const char *pre = "base_model.model.model.layers.0.self_attn.q_proj";
    snprintf(header, sizeof header,
             "{\"%s.lora_A.weight\":{\"dtype\":\"F32\",\"shape\":[%d,%d],"
             "\"data_offsets\":[0,%d]},"
             "\"%s.lora_B.weight\":{\"dtype\":\"F32\",\"shape\":[%d,%d],"
             "\"data_offsets\":[%d,%d]}}",
             pre, FR, FD, FR * FD * 4, pre, FD, FR, FR * FD * 4, 2 * FR * FD * 4);
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    put_u64(f, strlen(header));
    ck_assert_int_eq(fwrite(header, 1, strlen(header), f), strlen(header));
    put_factor_data(f);
    ck_assert_int_eq(fclose(f), 0);
}

/* Loads (the count query, then with room) and returns the query's status; both must
 * agree and leave nothing created. */
static int load_status(int gguf, const char *path, const char *what)
{
    lora_config *cfg = cfg_new(FD);
    size_t count = 99;
    const int st = gguf ? lora_load_gguf(NULL, NULL, 0, &count, path, cfg)
                        : lora_load_peft(NULL, NULL, 0, &count, path, cfg);
    char msg[256];
    snprintf(msg, sizeof msg, "%s", lora_config_last_error(cfg));
    lora_adapter *ads[2] = {NULL, NULL};
    int64_t layers[2];
    const int st2 = gguf ? lora_load_gguf(ads, layers, 2, &count, path, cfg)
                         : lora_load_peft(ads, layers, 2, &count, path, cfg);
    ck_assert_msg(st2 == st, "%s: the load gave %d, the count query %d", what, st2, st);
    if (st == LORA_OK) {
        ck_assert_msg(count == 1 && ads[0] != NULL, "%s: %zu adapters loaded", what, count);
        lora_adapter_destroy(ads[0]);
    } else {
        ck_assert_msg(ads[0] == NULL, "%s: an adapter was left created", what);
        ck_assert_msg(strstr(msg, "alpha") || strstr(msg, "ALPHA"),
                      "%s: message '%s' does not name alpha", what, msg);
    }
    lora_config_destroy(cfg);
    return st;
}

START_TEST(test_nonfinite_load_gguf_alpha_beyond_float)
{
    char *dir = fx_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/a.gguf", dir);
    write_gguf_f64_alpha(path, 4.0); /* the file itself is good */
    ck_assert_int_eq(load_status(1, path, "GGUF alpha 4 (F64)"), LORA_OK);
    const double bad[] = {1e300, -1e300, 1e39};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_gguf_f64_alpha(path, bad[i]);
        const int st = load_status(1, path, "GGUF alpha beyond float");
        ck_assert_msg(st == LORA_ERR_INVALID_ARG || st == LORA_ERR_FORMAT,
                      "GGUF alpha %g: status %d", bad[i], st);
    }
    fx_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(test_nonfinite_load_peft_alpha_beyond_float)
{
    char *dir = fx_tmpdir();
    write_peft_alpha(dir, "4");
    ck_assert_int_eq(load_status(0, dir, "PEFT lora_alpha 4"), LORA_OK);
    const char *bad[] = {"1e300", "-1e300", "1e39"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_peft_alpha(dir, bad[i]);
        const int st = load_status(0, dir, "PEFT lora_alpha beyond float");
        ck_assert_msg(st == LORA_ERR_INVALID_ARG || st == LORA_ERR_FORMAT,
                      "PEFT lora_alpha %s: status %d", bad[i], st);
    }
    fx_rmtree(dir);
    free(dir);
}
END_TEST

Suite *nonfinite_suite(void)
{
    Suite *s = suite_create("nonfinite");
    TCase *tc = tcase_create("nonfinite");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_nonfinite_forward_huge_input);
    tcase_add_test(tc, test_nonfinite_forward_huge_input_and_weights);
    tcase_add_test(tc, test_nonfinite_backward_gradient_overflow);
    tcase_add_test(tc, test_nonfinite_backward_dx_overflow);
    tcase_add_test(tc, test_nonfinite_backward_cross_dx_overflow);
    tcase_add_test(tc, test_nonfinite_mse_loss_overflow);
    tcase_add_test(tc, test_nonfinite_load_gguf_alpha_beyond_float);
    tcase_add_test(tc, test_nonfinite_load_peft_alpha_beyond_float);
    suite_add_tcase(s, tc);
    return s;
}
