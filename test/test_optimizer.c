/* optimizer_suite: AdamW and SGD against independent double-precision implementations of
 * PyTorch's update rules (torch.optim.AdamW, torch.optim.SGD, clip_grad_norm_) over
 * several steps, training end to end, parameters and errors; one optimizer over a set
 * of adapters with clipping by the global norm; the flat parameter and gradient
 * views. */
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

/* ---- the reference: PyTorch's single-tensor loops, in double ------------------------ */

typedef struct ref_opt {
    int adamw;
    double lr, beta1, beta2, eps, wd, momentum, dampening, max_norm;
    int nesterov;
} ref_opt;

/* torch.nn.utils.clip_grad_norm_(norm_type=2): returns the total norm, scales g. */
static double ref_clip(double *g, size_t n, double max_norm)
{
    double ss = 0.0;
    for (size_t i = 0; i < n; i++)
        ss += g[i] * g[i];
    const double total = sqrt(ss);
    if (max_norm > 0.0) {
        double coef = max_norm / (total + 1e-6);
        if (coef > 1.0)
            coef = 1.0; /* clip_coef_clamped = clamp(clip_coef, max=1.0) */
        for (size_t i = 0; i < n; i++)
            g[i] *= coef;
    }
    return total;
}

/* torch.optim.adamw._single_tensor_adamw (amsgrad=False, maximize=False). */
static void ref_adamw_step(const ref_opt *o, double *p, double *exp_avg, double *exp_avg_sq,
                           const double *g, size_t n, int step)
{
    const double bias_correction1 = 1.0 - pow(o->beta1, step);
    const double bias_correction2 = 1.0 - pow(o->beta2, step);
    const double step_size = o->lr / bias_correction1;
    const double bias_correction2_sqrt = sqrt(bias_correction2);
    for (size_t i = 0; i < n; i++) {
        p[i] *= 1.0 - o->lr * o->wd;                           /* param.mul_(1 - lr*wd) */
        exp_avg[i] += (g[i] - exp_avg[i]) * (1.0 - o->beta1); /* exp_avg.lerp_(g, 1-b1) */
        exp_avg_sq[i] = exp_avg_sq[i] * o->beta2 + (1.0 - o->beta2) * g[i] * g[i];
        const double denom = sqrt(exp_avg_sq[i]) / bias_correction2_sqrt + o->eps;
        p[i] += -step_size * exp_avg[i] / denom; /* param.addcdiv_(exp_avg, denom, -ss) */
    }
}

/* torch.optim.sgd._single_tensor_sgd. buf_set: the momentum buffer exists. */
static void ref_sgd_step(const ref_opt *o, double *p, double *buf, int *buf_set,
                         const double *g_in, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        double g = g_in[i];
        if (o->wd != 0.0)
            g += o->wd * p[i]; /* grad.add(param, alpha=weight_decay) */
        if (o->momentum != 0.0) {
            if (!*buf_set)
                buf[i] = g; /* torch.clone(grad).detach() */
            else
                buf[i] = buf[i] * o->momentum + (1.0 - o->dampening) * g;
            g = o->nesterov ? g + o->momentum * buf[i] : buf[i];
        }
        p[i] += -o->lr * g;
    }
    if (o->momentum != 0.0)
        *buf_set = 1;
}

static void set_opt(lora_optimizer *opt, const ref_opt *o)
{
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_LR, o->lr), LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_WEIGHT_DECAY, o->wd), LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_MAX_GRAD_NORM, o->max_norm),
                     LORA_OK);
    if (o->adamw) {
        ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_BETA1, o->beta1), LORA_OK);
        ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_BETA2, o->beta2), LORA_OK);
        ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_EPS, o->eps), LORA_OK);
    } else {
        ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_MOMENTUM, o->momentum), LORA_OK);
        ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_DAMPENING, o->dampening),
                         LORA_OK);
        ck_assert_int_eq(lora_optimizer_set_int(opt, LORA_OPT_NESTEROV, o->nesterov), LORA_OK);
    }
}

/* Runs `steps` steps of the library and the reference on the same injected gradients
 * (scale varying by step so that clipping is active on some steps only) and compares
 * every parameter after every step. The reference keeps parameters in double, the
 * library in float: allowed difference (step + 1) * 2^-23 * (|p| + lr) per entry. */
static void compare_with_reference(const ref_opt *o, int steps, int lr_schedule)
{
    fx_spec s = fx_default();
    lora_adapter *ad = fx_adapter_nobase(&s, 21);
    lora_optimizer *opt = NULL;
    ck_assert_int_eq(lora_optimizer_create(&opt, ad, o->adamw ? LORA_OPTIMIZER_ADAMW
                                                                : LORA_OPTIMIZER_SGD),
                     LORA_OK);
    ref_opt cur = *o;
    set_opt(opt, &cur);
    size_t n;
    float *pf = fx_params(ad, &n);
    double *p = malloc(n * sizeof(double)), *m = calloc(n, sizeof(double));
    double *v = calloc(n, sizeof(double)), *g = malloc(n * sizeof(double));
    float *gf = malloc(n * sizeof(float));
    ref_to_double(pf, p, n);
    int buf_set = 0, clipped_steps = 0;
    static const float scales[] = {0.01f, 3.0f, 0.2f, 10.0f, 0.05f, 1.0f, 0.5f, 2.0f};
    for (int step = 1; step <= steps; step++) {
        if (lr_schedule) { /* a schedule: the lr changes between steps */
            cur.lr = o->lr * (1.0 + 0.5 * cos(step));
            ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_LR, cur.lr), LORA_OK);
        }
        fill_uniform(gf, n, 1000u + (uint64_t)step, scales[(step - 1) % 8]);
        ck_assert_int_eq(lora_adapter_set_grads_flat(ad, gf, n), LORA_OK);
        ref_to_double(gf, g, n);
        const double norm = ref_clip(g, n, cur.max_norm);
        clipped_steps += cur.max_norm > 0.0 && norm > cur.max_norm;
        if (cur.adamw)
            ref_adamw_step(&cur, p, m, v, g, n, step);
        else
            ref_sgd_step(&cur, p, m, &buf_set, g, n);
        ck_assert_msg(lora_optimizer_step(opt, ad) == LORA_OK, "step %d: %s", step,
                      lora_optimizer_last_error(opt));
        int64_t st;
        double gn;
        ck_assert_int_eq(lora_optimizer_get_int(opt, LORA_OPT_STEP, &st), LORA_OK);
        ck_assert_int_eq(st, step);
        ck_assert_int_eq(lora_optimizer_get_double(opt, LORA_OPT_GRAD_NORM, &gn), LORA_OK);
        ck_assert_msg(fabs(gn - norm) <= 1e-12 * norm, "grad norm %.17g vs %.17g", gn, norm);
        ck_assert_int_eq(lora_adapter_get_params_flat(ad, pf, n), LORA_OK);
        double worst = 0.0;
        size_t at = 0;
        for (size_t i = 0; i < n; i++) {
            const double tol = (step + 1) * 0x1p-23 * (fabs(p[i]) + cur.lr);
            const double r = fabs((double)pf[i] - p[i]) / tol;
            if (r > worst) {
                worst = r;
                at = i;
            }
        }
        ck_assert_msg(worst <= 1.0,
                      "%s step %d: parameter %zu is %.9g, reference %.9g (error/tol %g)",
                      o->adamw ? "AdamW" : "SGD", step, at, pf[at], p[at], worst);
    }
    if (o->max_norm > 0.0)
        ck_assert_msg(clipped_steps > 0 && clipped_steps < steps,
                      "clipping active on %d of %d steps", clipped_steps, steps);
    /* The gradients themselves are left as they were (no in-place clipping). */
    float *g_after = malloc(n * sizeof(float));
    ck_assert_int_eq(lora_adapter_get_grads_flat(ad, g_after, n), LORA_OK);
    ck_assert(memcmp(g_after, gf, n * sizeof(float)) == 0);
    free(g_after);
    free(pf);
    free(p);
    free(m);
    free(v);
    free(g);
    free(gf);
    lora_optimizer_destroy(opt);
    lora_adapter_destroy(ad);
}

START_TEST(test_adamw_matches_pytorch)
{
    /* Default betas/eps with decay; small betas (bias correction matters more); large
     * eps; clipping; an lr schedule. */
    const ref_opt cases[] = {
        {1, 1e-2, 0.9, 0.999, 1e-8, 0.01, 0, 0, 0.0, 0},
        {1, 5e-2, 0.5, 0.7, 1e-8, 0.1, 0, 0, 0.0, 0},
        {1, 1e-2, 0.9, 0.999, 1e-3, 0.0, 0, 0, 0.0, 0},
        {1, 2e-2, 0.9, 0.99, 1e-8, 0.05, 0, 0, 1.0, 0},
        {1, 1e-2, 0.0, 0.0, 1e-8, 0.0, 0, 0, 0.5, 0},
    };
    const ref_opt *c = &cases[_i];
    compare_with_reference(c, 8, 0);
    if (_i == 3)
        compare_with_reference(c, 8, 1);
}
END_TEST

START_TEST(test_sgd_matches_pytorch)
{
    const ref_opt cases[] = {
        {0, 0.1, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0},  /* plain */
        {0, 0.05, 0, 0, 0, 0.01, 0.9, 0.0, 0.0, 0}, /* momentum, L2 decay */
        {0, 0.05, 0, 0, 0, 0.0, 0.9, 0.3, 0.0, 0},  /* dampening */
        {0, 0.05, 0, 0, 0, 0.02, 0.8, 0.0, 1.5, 1}, /* Nesterov, clipping */
    };
    compare_with_reference(&cases[_i], 8, 0);
}
END_TEST

/* Defaults are torch's. */
START_TEST(test_optimizer_defaults)
{
    fx_spec s = fx_default();
    lora_adapter *ad = fx_adapter_nobase(&s, 1);
    lora_optimizer *adamw = NULL, *sgd = NULL;
    ck_assert_int_eq(lora_optimizer_create(&adamw, ad, LORA_OPTIMIZER_ADAMW), LORA_OK);
    ck_assert_int_eq(lora_optimizer_create(&sgd, ad, LORA_OPTIMIZER_SGD), LORA_OK);
    const struct {
        lora_optimizer *o;
        int param;
        double want;
    } d[] = {
        {adamw, LORA_OPT_LR, 1e-3},       {adamw, LORA_OPT_BETA1, 0.9},
        {adamw, LORA_OPT_BETA2, 0.999},   {adamw, LORA_OPT_EPS, 1e-8},
        {adamw, LORA_OPT_WEIGHT_DECAY, 0.01}, {adamw, LORA_OPT_MAX_GRAD_NORM, 0.0},
        {adamw, LORA_OPT_GRAD_NORM, -1.0}, {sgd, LORA_OPT_LR, 1e-3},
        {sgd, LORA_OPT_MOMENTUM, 0.0},    {sgd, LORA_OPT_DAMPENING, 0.0},
        {sgd, LORA_OPT_WEIGHT_DECAY, 0.0},
    };
    for (size_t i = 0; i < sizeof d / sizeof d[0]; i++) {
        double v = -99;
        ck_assert_int_eq(lora_optimizer_get_double(d[i].o, d[i].param, &v), LORA_OK);
        ck_assert_msg(v == d[i].want, "param %d: %g, want %g", d[i].param, v, d[i].want);
    }
    int64_t v = -1;
    ck_assert_int_eq(lora_optimizer_get_int(sgd, LORA_OPT_NESTEROV, &v), LORA_OK);
    ck_assert_int_eq(v, 0);
    ck_assert_int_eq(lora_optimizer_get_int(adamw, LORA_OPT_STEP, &v), LORA_OK);
    ck_assert_int_eq(v, 0);
    lora_optimizer_destroy(adamw);
    lora_optimizer_destroy(sgd);
    lora_optimizer_destroy(NULL);
    lora_adapter_destroy(ad);
}
END_TEST

START_TEST(test_optimizer_bad_parameters)
{
    fx_spec s = fx_default();
    lora_adapter *ad = fx_adapter_nobase(&s, 1);
    lora_optimizer *opt = NULL, *sgd = NULL;
    ck_assert_int_eq(lora_optimizer_create(NULL, ad, 0), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_create(&opt, NULL, 0), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_null(opt);
    ck_assert_int_eq(lora_optimizer_create(&opt, ad, 2), LORA_ERR_INVALID_ARG);
    ck_assert_ptr_null(opt);
    ck_assert_str_eq(lora_adapter_last_error(ad), ""); /* const: no message (lora.h, Threads) */
    ck_assert_int_eq(lora_optimizer_create(&opt, ad, LORA_OPTIMIZER_ADAMW), LORA_OK);
    ck_assert_int_eq(lora_optimizer_create(&sgd, ad, LORA_OPTIMIZER_SGD), LORA_OK);
    const struct {
        lora_optimizer *o;
        int param;
        double value;
        int status;
    } bad[] = {
        {opt, LORA_OPT_LR, -1e-3, LORA_ERR_INVALID_ARG},
        {opt, LORA_OPT_LR, NAN, LORA_ERR_NONFINITE},
        {opt, LORA_OPT_LR, INFINITY, LORA_ERR_NONFINITE},
        {opt, LORA_OPT_BETA1, 1.0, LORA_ERR_INVALID_ARG},
        {opt, LORA_OPT_BETA1, -0.1, LORA_ERR_INVALID_ARG},
        {opt, LORA_OPT_BETA2, 1.5, LORA_ERR_INVALID_ARG},
        {opt, LORA_OPT_EPS, -1e-8, LORA_ERR_INVALID_ARG},
        {opt, LORA_OPT_WEIGHT_DECAY, -0.1, LORA_ERR_INVALID_ARG},
        {opt, LORA_OPT_MAX_GRAD_NORM, -1.0, LORA_ERR_INVALID_ARG},
        {opt, LORA_OPT_MOMENTUM, 0.9, LORA_ERR_INVALID_ARG},   /* SGD only */
        {sgd, LORA_OPT_BETA1, 0.9, LORA_ERR_INVALID_ARG},      /* AdamW only */
        {sgd, LORA_OPT_DAMPENING, 1.5, LORA_ERR_INVALID_ARG},
        {sgd, LORA_OPT_MOMENTUM, -0.5, LORA_ERR_INVALID_ARG},
        {opt, LORA_OPT_GRAD_NORM, 1.0, LORA_ERR_INVALID_ARG},  /* read-only */
        {opt, LORA_OPT_NESTEROV, 1.0, LORA_ERR_INVALID_ARG},   /* SGD's, and an int */
        {sgd, LORA_OPT_NESTEROV, 1.0, LORA_ERR_INVALID_ARG},   /* an int */
        {opt, 0, 1.0, LORA_ERR_INVALID_ARG},
        {opt, 12, 1.0, LORA_ERR_INVALID_ARG},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        double before = 0.0, after = 0.0;
        const int readable =
            lora_optimizer_get_double(bad[i].o, bad[i].param, &before) == LORA_OK;
        ck_assert_msg(lora_optimizer_set_double(bad[i].o, bad[i].param, bad[i].value) ==
                          bad[i].status,
                      "case %zu", i);
        ck_assert_msg(lora_optimizer_last_error(bad[i].o)[0] != '\0', "case %zu: no message",
                      i);
        if (readable) {
            ck_assert_int_eq(lora_optimizer_get_double(bad[i].o, bad[i].param, &after), LORA_OK);
            ck_assert_msg(before == after, "case %zu changed the value", i);
        }
    }
    ck_assert_int_eq(lora_optimizer_set_int(sgd, LORA_OPT_NESTEROV, 2), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_set_int(sgd, LORA_OPT_STEP, 3), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_set_int(sgd, LORA_OPT_LR, 1), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_set_int(NULL, LORA_OPT_NESTEROV, 1), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_set_double(NULL, LORA_OPT_LR, 1), LORA_ERR_INVALID_ARG);
    int64_t iv;
    double dv;
    ck_assert_int_eq(lora_optimizer_get_int(opt, LORA_OPT_STEP, NULL), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_get_double(opt, LORA_OPT_LR, NULL), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_get_int(opt, LORA_OPT_LR, &iv), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_get_double(opt, LORA_OPT_STEP, &dv), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_get_double(opt, LORA_OPT_MOMENTUM, &dv),
                     LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_get_int(NULL, LORA_OPT_STEP, &iv), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_get_double(NULL, LORA_OPT_LR, &dv), LORA_ERR_INVALID_ARG);
    ck_assert_str_eq(lora_optimizer_last_error(NULL), "NULL optimizer");
    ck_assert_int_eq(lora_optimizer_reset(NULL), LORA_ERR_INVALID_ARG);
    /* A good call clears the message. */
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_LR, 0.5), LORA_OK);
    ck_assert_str_eq(lora_optimizer_last_error(opt), "");
    lora_optimizer_destroy(opt);
    lora_optimizer_destroy(sgd);
    lora_adapter_destroy(ad);
}
END_TEST

/* A failing step changes nothing: NaN gradient, wrong adapter, Nesterov misuse,
 * an update overflowing a parameter. */
START_TEST(test_optimizer_step_failures_change_nothing)
{
    fx_spec s = fx_default();
    lora_adapter *ad = fx_adapter_nobase(&s, 1);
    size_t n;
    float *p0 = fx_params(ad, &n);
    float *g = malloc(n * sizeof(float)), *p1 = malloc(n * sizeof(float));
    fill_uniform(g, n, 3, 1.0f);
    lora_optimizer *opt = NULL, *sgd = NULL;
    ck_assert_int_eq(lora_optimizer_create(&opt, ad, LORA_OPTIMIZER_ADAMW), LORA_OK);
    ck_assert_int_eq(lora_optimizer_create(&sgd, ad, LORA_OPTIMIZER_SGD), LORA_OK);
    ck_assert_int_eq(lora_optimizer_step(NULL, ad), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_step(opt, NULL), LORA_ERR_INVALID_ARG);

    /* NaN in the last gradient: nothing moves, the step count stays. */
    g[n - 1] = NAN;
    ck_assert_int_eq(lora_adapter_set_grads_flat(ad, g, n), LORA_ERR_NONFINITE);
    /* (set_grads_flat refuses it; put it in through a backward-free route: a finite
     * vector, then check a real NaN path with a huge-but-finite gradient squared.) */
    g[n - 1] = 0.5f;
    ck_assert_int_eq(lora_adapter_set_grads_flat(ad, g, n), LORA_OK);

    /* Nesterov without momentum. */
    ck_assert_int_eq(lora_optimizer_set_int(sgd, LORA_OPT_NESTEROV, 1), LORA_OK);
    ck_assert_int_eq(lora_optimizer_step(sgd, ad), LORA_ERR_INVALID_ARG);
    ck_assert(strstr(lora_optimizer_last_error(sgd), "Nesterov") != NULL);
    ck_assert_int_eq(lora_optimizer_set_double(sgd, LORA_OPT_MOMENTUM, 0.9), LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_double(sgd, LORA_OPT_DAMPENING, 0.1), LORA_OK);
    ck_assert_int_eq(lora_optimizer_step(sgd, ad), LORA_ERR_INVALID_ARG);

    /* An update that overflows a float parameter (SGD, lr huge). */
    ck_assert_int_eq(lora_optimizer_set_int(sgd, LORA_OPT_NESTEROV, 0), LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_double(sgd, LORA_OPT_LR, 1e300), LORA_OK);
    ck_assert_int_eq(lora_optimizer_step(sgd, ad), LORA_ERR_NONFINITE);
    ck_assert(strstr(lora_optimizer_last_error(sgd), "nothing was updated") != NULL);

    /* An adapter of another shape. */
    fx_spec s2 = s;
    s2.rank = 2;
    lora_adapter *other = fx_adapter_nobase(&s2, 1);
    ck_assert_int_eq(lora_optimizer_step(opt, other), LORA_ERR_INVALID_ARG);
    ck_assert(strstr(lora_optimizer_last_error(opt), "rank") != NULL);
    s2 = s;
    s2.targets = LORA_TARGET_Q | LORA_TARGET_V;
    lora_adapter *other2 = fx_adapter_nobase(&s2, 1);
    ck_assert_int_eq(lora_optimizer_step(opt, other2), LORA_ERR_INVALID_ARG);

    ck_assert_int_eq(lora_adapter_get_params_flat(ad, p1, n), LORA_OK);
    ck_assert(memcmp(p0, p1, n * sizeof(float)) == 0);
    int64_t steps = -1;
    ck_assert_int_eq(lora_optimizer_get_int(sgd, LORA_OPT_STEP, &steps), LORA_OK);
    ck_assert_int_eq(steps, 0);
    double gn = 0;
    ck_assert_int_eq(lora_optimizer_get_double(sgd, LORA_OPT_GRAD_NORM, &gn), LORA_OK);
    ck_assert(gn == -1.0);

    /* A good step, then reset: state and count back to zero. The same adapter shape
     * from another handle is accepted (the optimizer keeps no pointer). */
    ck_assert_int_eq(lora_optimizer_step(opt, ad), LORA_OK);
    ck_assert_int_eq(lora_optimizer_get_int(opt, LORA_OPT_STEP, &steps), LORA_OK);
    ck_assert_int_eq(steps, 1);
    ck_assert_int_eq(lora_optimizer_reset(opt), LORA_OK);
    ck_assert_int_eq(lora_optimizer_get_int(opt, LORA_OPT_STEP, &steps), LORA_OK);
    ck_assert_int_eq(steps, 0);
    lora_adapter *twin = fx_adapter_nobase(&s, 1);
    ck_assert_int_eq(lora_adapter_set_grads_flat(twin, g, n), LORA_OK);
    ck_assert_int_eq(lora_optimizer_step(opt, twin), LORA_OK);
    free(p0);
    free(p1);
    free(g);
    lora_optimizer_destroy(opt);
    lora_optimizer_destroy(sgd);
    lora_adapter_destroy(ad);
    lora_adapter_destroy(other);
    lora_adapter_destroy(other2);
    lora_adapter_destroy(twin);
}
END_TEST

/* Overflow on the way to a step: a backward whose gradients would overflow is refused
 * (NONFINITE, gradients unchanged), and a step whose update would take a parameter
 * beyond float fails with NONFINITE and changes nothing. */
START_TEST(test_optimizer_overflowing_update)
{
    fx_spec s = fx_default();
    lora_adapter *ad = fx_adapter(&s, 4);
    const int64_t batch = 1, len = 3;
    const size_t nx = (size_t)(batch * len * s.d_model);
    float *x = malloc(nx * sizeof(float)), *y = malloc(nx * sizeof(float));
    float *dout = malloc(nx * sizeof(float));
    fill_uniform(x, nx, 1, 1.0f);
    for (size_t i = 0; i < nx; i++)
        dout[i] = 3e38f;
    size_t n;
    float *p0 = fx_params(ad, &n), *g = malloc(n * sizeof(float));
    ck_assert_int_eq(lora_forward(ad, x, batch, len, y), LORA_OK);
    ck_assert_int_eq(lora_backward(ad, dout, NULL), LORA_ERR_NONFINITE);
    ck_assert_int_eq(lora_adapter_get_grads_flat(ad, g, n), LORA_OK);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(g[i] == 0.0f, "the refused backward changed gradient %zu", i);
    /* Finite gradients whose update overflows: SGD with lr * g = 1e60. */
    for (size_t i = 0; i < n; i++)
        g[i] = i % 2 ? 1e30f : -1e30f;
    ck_assert_int_eq(lora_adapter_set_grads_flat(ad, g, n), LORA_OK);
    lora_optimizer *opt = NULL;
    ck_assert_int_eq(lora_optimizer_create(&opt, ad, LORA_OPTIMIZER_SGD), LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_LR, 1e30), LORA_OK);
    ck_assert_int_eq(lora_optimizer_step(opt, ad), LORA_ERR_NONFINITE);
    float *p1 = fx_params(ad, &n);
    ck_assert(memcmp(p0, p1, n * sizeof(float)) == 0);
    int64_t steps;
    ck_assert_int_eq(lora_optimizer_get_int(opt, LORA_OPT_STEP, &steps), LORA_OK);
    ck_assert_int_eq(steps, 0);
    free(p0);
    free(p1);
    free(g);
    free(x);
    free(y);
    free(dout);
    lora_optimizer_destroy(opt);
    lora_adapter_destroy(ad);
}
END_TEST

/* Fit a student to a teacher's outputs: AdamW (and SGD with momentum) bring the loss
 * down, and a step drops the saved forward. */
START_TEST(test_optimizer_trains)
{
    fx_spec s = fx_default();
    s.targets = LORA_TARGET_Q | LORA_TARGET_V;
    const int64_t batch = 4, len = 8;
    const size_t nx = (size_t)(batch * len * s.d_model);
    float *x = malloc(nx * sizeof(float)), *target = malloc(nx * sizeof(float));
    float *y = malloc(nx * sizeof(float)), *dout = malloc(nx * sizeof(float));
    fill_uniform(x, nx, 5, 1.0f);
    fx_base base;
    fx_base_make(&base, &s, 3);
    lora_adapter *teacher = fx_adapter_nobase(&s, 100), *student = fx_adapter_nobase(&s, 200);
    fx_base_apply(&base, teacher, 0);
    fx_base_apply(&base, student, 0);
    ck_assert_int_eq(lora_forward(teacher, x, batch, len, target), LORA_OK);
    lora_optimizer *opt = NULL;
    ck_assert_int_eq(lora_optimizer_create(&opt, student, _i ? LORA_OPTIMIZER_SGD
                                                             : LORA_OPTIMIZER_ADAMW),
                     LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_LR, _i ? 0.05 : 0.02), LORA_OK);
    if (_i)
        ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_MOMENTUM, 0.9), LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_MAX_GRAD_NORM, 10.0), LORA_OK);
    double first = 0.0, loss = 0.0;
    for (int it = 0; it < 60; it++) {
        ck_assert_int_eq(lora_adapter_zero_grad(student), LORA_OK);
        ck_assert_int_eq(lora_forward(student, x, batch, len, y), LORA_OK);
        ck_assert_int_eq(lora_mse_loss(y, target, nx, &loss, dout), LORA_OK);
        if (it == 0)
            first = loss;
        ck_assert_int_eq(lora_backward(student, dout, NULL), LORA_OK);
        ck_assert_int_eq(lora_optimizer_step(opt, student), LORA_OK);
        ck_assert_int_eq(lora_backward(student, dout, NULL), LORA_ERR_STATE);
    }
    ck_assert_msg(loss < 0.25 * first, "loss %g -> %g", first, loss);
    free(x);
    free(target);
    free(y);
    free(dout);
    lora_optimizer_destroy(opt);
    lora_adapter_destroy(teacher);
    lora_adapter_destroy(student);
    fx_base_free(&base);
}
END_TEST

/* The flat views follow the documented order and agree with the per-factor calls. */
START_TEST(test_flat_views)
{
    fx_spec s = fx_default();
    s.targets = LORA_TARGET_K | LORA_TARGET_O;
    lora_adapter *ad = fx_adapter_nobase(&s, 6);
    size_t n = 0;
    ck_assert_int_eq(lora_adapter_param_count(ad, &n), LORA_OK);
    ck_assert_uint_eq(n, 4 * 16 + 8 * 4 + 4 * 16 + 16 * 4);
    float *flat = malloc(n * sizeof(float)), *one = malloc(n * sizeof(float));
    ck_assert_int_eq(lora_adapter_get_params_flat(ad, flat, n), LORA_OK);
    size_t off = 0;
    const int order[2] = {LORA_TARGET_K, LORA_TARGET_O};
    for (int t = 0; t < 2; t++)
        for (int w = 0; w < 2; w++) {
            int64_t r, c;
            ck_assert_int_eq(lora_adapter_param_shape(ad, order[t], w, &r, &c), LORA_OK);
            ck_assert_int_eq(lora_adapter_get_param(ad, order[t], w, one, (size_t)(r * c)),
                             LORA_OK);
            ck_assert(memcmp(one, flat + off, (size_t)(r * c) * sizeof(float)) == 0);
            off += (size_t)(r * c);
        }
    ck_assert_uint_eq(off, n);
    /* set_params_flat / set_grads_flat round trips. */
    fill_uniform(flat, n, 8, 0.3f);
    ck_assert_int_eq(lora_adapter_set_params_flat(ad, flat, n), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_params_flat(ad, one, n), LORA_OK);
    ck_assert(memcmp(one, flat, n * sizeof(float)) == 0);
    fill_uniform(flat, n, 9, 0.3f);
    ck_assert_int_eq(lora_adapter_set_grads_flat(ad, flat, n), LORA_OK);
    int64_t r, c;
    ck_assert_int_eq(lora_adapter_param_shape(ad, LORA_TARGET_O, LORA_B, &r, &c), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_grad(ad, LORA_TARGET_O, LORA_B, one, (size_t)(r * c)),
                     LORA_OK);
    ck_assert(memcmp(one, flat + n - (size_t)(r * c), (size_t)(r * c) * sizeof(float)) == 0);
    ck_assert_int_eq(lora_adapter_zero_grad(ad), LORA_OK);
    ck_assert_int_eq(lora_adapter_get_grads_flat(ad, one, n), LORA_OK);
    for (size_t i = 0; i < n; i++)
        ck_assert(one[i] == 0.0f);
    /* Errors. */
    ck_assert_int_eq(lora_adapter_param_count(NULL, &n), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_param_count(ad, NULL), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_get_params_flat(ad, flat, n - 1), LORA_ERR_INVALID_ARG);
    ck_assert_str_eq(lora_adapter_last_error(ad), ""); /* const: no message (lora.h, Threads) */
    ck_assert_int_eq(lora_adapter_get_grads_flat(ad, NULL, n), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_set_params_flat(NULL, flat, n), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_set_grads_flat(ad, flat, n + 1), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_adapter_get_params_flat(ad, one, n), LORA_OK);
    flat[3] = INFINITY;
    ck_assert_int_eq(lora_adapter_set_params_flat(ad, flat, n), LORA_ERR_NONFINITE);
    float *after = malloc(n * sizeof(float));
    ck_assert_int_eq(lora_adapter_get_params_flat(ad, after, n), LORA_OK);
    ck_assert(memcmp(after, one, n * sizeof(float)) == 0);
    free(after);
    free(flat);
    free(one);
    lora_adapter_destroy(ad);
}
END_TEST

/* ---- one optimizer over a set of adapters (a model) ------------------------------- */

enum { SET_N = 3 };

/* Three adapters of different shapes: a model's LoRA layers. */
static void make_model(lora_adapter *ads[SET_N], size_t counts[SET_N], size_t *total)
{
    fx_spec s[SET_N] = {fx_default(), fx_default(), fx_default()};
    s[1].targets = LORA_TARGET_Q | LORA_TARGET_V;
    s[1].rank = 2;
    s[2].targets = LORA_TARGET_K | LORA_TARGET_O;
    s[2].rank = 3;
    *total = 0;
    for (int k = 0; k < SET_N; k++) {
        ads[k] = fx_adapter_nobase(&s[k], 40 + (uint64_t)k);
        ck_assert_int_eq(lora_adapter_param_count(ads[k], &counts[k]), LORA_OK);
        *total += counts[k];
    }
}

/* Largest |lib - ref| / tol over the set, tol as in compare_with_reference. */
static double set_error(lora_adapter *ads[SET_N], const size_t counts[SET_N],
                        const double *p, double lr, int step)
{
    double worst = 0.0;
    size_t off = 0;
    for (int k = 0; k < SET_N; k++) {
        float *pf = fx_params(ads[k], &(size_t){0});
        for (size_t i = 0; i < counts[k]; i++) {
            const double tol = (step + 1) * 0x1p-23 * (fabs(p[off + i]) + lr);
            const double r = fabs((double)pf[i] - p[off + i]) / tol;
            worst = r > worst ? r : worst;
        }
        off += counts[k];
        free(pf);
    }
    return worst;
}

/* 10 steps of lora_optimizer_step_set against the reference run on the concatenation
 * of the three adapters' parameters, clipped by their global norm (torch.optim over
 * model.parameters() after clip_grad_norm_(model.parameters())). The gradients of the
 * adapters differ in scale, so clipping each adapter by its own norm would give other
 * parameters: a second reference doing that must disagree. */
static void compare_set_with_reference(const ref_opt *o)
{
    lora_adapter *ads[SET_N];
    size_t counts[SET_N], n;
    make_model(ads, counts, &n);
    lora_optimizer *opt = NULL;
    ck_assert_int_eq(lora_optimizer_create_set(&opt, (const lora_adapter *const *)ads, SET_N,
                                               o->adamw ? LORA_OPTIMIZER_ADAMW
                                                        : LORA_OPTIMIZER_SGD),
                     LORA_OK);
    set_opt(opt, o);
    double *p = malloc(n * sizeof(double)), *m = calloc(n, sizeof(double));
    double *v = calloc(n, sizeof(double)), *g = malloc(n * sizeof(double));
    double *pl = malloc(n * sizeof(double)), *ml = calloc(n, sizeof(double));
    double *vl = calloc(n, sizeof(double));
    size_t off = 0;
    for (int k = 0; k < SET_N; k++) {
        float *pf = fx_params(ads[k], &(size_t){0});
        ref_to_double(pf, p + off, counts[k]);
        off += counts[k];
        free(pf);
    }
    memcpy(pl, p, n * sizeof(double));
    int buf_set = 0, buf_set_l = 0, clipped = 0;
    double per_layer_gap = 0.0;
    static const float layer_scale[SET_N] = {1.0f, 0.05f, 3.0f};
    static const float step_scale[] = {0.02f, 2.0f, 0.3f, 8.0f, 0.05f};
    for (int step = 1; step <= 10; step++) {
        off = 0;
        for (int k = 0; k < SET_N; k++) {
            float *gf = malloc(counts[k] * sizeof(float));
            fill_uniform(gf, counts[k], 500u + 10u * (uint64_t)step + (uint64_t)k,
                         layer_scale[k] * step_scale[(step - 1) % 5]);
            ck_assert_int_eq(lora_adapter_set_grads_flat(ads[k], gf, counts[k]), LORA_OK);
            ref_to_double(gf, g + off, counts[k]);
            off += counts[k];
            free(gf);
        }
        /* The per-layer alternative, on its own copy of the state. */
        double *gl = malloc(n * sizeof(double));
        memcpy(gl, g, n * sizeof(double));
        off = 0;
        for (int k = 0; k < SET_N; k++) {
            ref_clip(gl + off, counts[k], o->max_norm);
            off += counts[k];
        }
        const double norm = ref_clip(g, n, o->max_norm);
        clipped += norm > o->max_norm;
        if (o->adamw) {
            ref_adamw_step(o, p, m, v, g, n, step);
            ref_adamw_step(o, pl, ml, vl, gl, n, step);
        } else {
            ref_sgd_step(o, p, m, &buf_set, g, n);
            ref_sgd_step(o, pl, ml, &buf_set_l, gl, n);
        }
        free(gl);
        ck_assert_msg(lora_optimizer_step_set(opt, ads, SET_N) == LORA_OK, "step %d: %s", step,
                      lora_optimizer_last_error(opt));
        double gn = 0.0;
        ck_assert_int_eq(lora_optimizer_get_double(opt, LORA_OPT_GRAD_NORM, &gn), LORA_OK);
        ck_assert_msg(fabs(gn - norm) <= 1e-12 * norm, "grad norm %.17g vs %.17g", gn, norm);
        const double worst = set_error(ads, counts, p, o->lr, step);
        ck_assert_msg(worst <= 1.0, "%s step %d: error/tol %g against the global-norm reference",
                      o->adamw ? "AdamW" : "SGD", step, worst);
        const double gap = set_error(ads, counts, pl, o->lr, step);
        per_layer_gap = gap > per_layer_gap ? gap : per_layer_gap;
    }
    ck_assert_msg(clipped > 0 && clipped < 10, "clipping active on %d of 10 steps", clipped);
    ck_assert_msg(per_layer_gap > 100.0,
                  "clipping per adapter would agree too (error/tol %g): the test cannot tell",
                  per_layer_gap);
    free(p);
    free(m);
    free(v);
    free(g);
    free(pl);
    free(ml);
    free(vl);
    lora_optimizer_destroy(opt);
    for (int k = 0; k < SET_N; k++)
        lora_adapter_destroy(ads[k]);
}

START_TEST(test_optimizer_set_matches_pytorch)
{
    const ref_opt cases[] = {
        {1, 2e-2, 0.9, 0.99, 1e-8, 0.05, 0, 0, 1.0, 0},     /* AdamW, clipping */
        {0, 0.05, 0, 0, 0, 0.01, 0.9, 0.0, 1.0, 1},        /* SGD Nesterov, clipping */
    };
    compare_set_with_reference(&cases[_i]);
}
END_TEST

/* lora_optimizer_create is the set of one: both give the same parameters bit for bit,
 * and lora_optimizer_step_set steps a single-adapter optimizer. */
START_TEST(test_optimizer_set_of_one)
{
    fx_spec s = fx_default();
    lora_adapter *a = fx_adapter_nobase(&s, 3), *b = fx_adapter_nobase(&s, 3);
    lora_optimizer *single = NULL, *set = NULL;
    ck_assert_int_eq(lora_optimizer_create(&single, a, LORA_OPTIMIZER_ADAMW), LORA_OK);
    const lora_adapter *one[1] = {b};
    ck_assert_int_eq(lora_optimizer_create_set(&set, one, 1, LORA_OPTIMIZER_ADAMW), LORA_OK);
    size_t n;
    float *g = fx_params(a, &n);
    for (int step = 0; step < 3; step++) {
        fill_uniform(g, n, 70u + (uint64_t)step, 1.0f);
        ck_assert_int_eq(lora_adapter_set_grads_flat(a, g, n), LORA_OK);
        ck_assert_int_eq(lora_adapter_set_grads_flat(b, g, n), LORA_OK);
        ck_assert_int_eq(lora_optimizer_step(single, a), LORA_OK);
        ck_assert_int_eq(step % 2 ? lora_optimizer_step(set, b)
                                  : lora_optimizer_step_set(set, &b, 1),
                         LORA_OK);
    }
    float *pa = fx_params(a, &n), *pb = fx_params(b, &n);
    ck_assert(memcmp(pa, pb, n * sizeof(float)) == 0);
    free(g);
    free(pa);
    free(pb);
    lora_optimizer_destroy(single);
    lora_optimizer_destroy(set);
    lora_adapter_destroy(a);
    lora_adapter_destroy(b);
}
END_TEST

/* Bad sets: each call fails with INVALID_ARG or NONFINITE, no adapter or state
 * changed, and (creation takes the adapters as const) no message written to them. */
START_TEST(test_optimizer_set_errors)
{
    lora_adapter *ads[SET_N];
    size_t counts[SET_N], n;
    make_model(ads, counts, &n);
    const lora_adapter *const *cads = (const lora_adapter *const *)ads;
    lora_optimizer *opt = NULL;
    ck_assert_int_eq(lora_optimizer_create_set(NULL, cads, SET_N, 0), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_create_set(&opt, NULL, SET_N, 0), LORA_ERR_INVALID_ARG);
    ck_assert_int_eq(lora_optimizer_create_set(&opt, cads, 0, 0), LORA_ERR_INVALID_ARG);
    const lora_adapter *holes[SET_N] = {ads[0], NULL, ads[2]};
    ck_assert_int_eq(lora_optimizer_create_set(&opt, holes, SET_N, 0), LORA_ERR_INVALID_ARG);
    ck_assert_str_eq(lora_adapter_last_error(ads[0]), ""); /* const: no message (lora.h, Threads) */
    const lora_adapter *twice[SET_N] = {ads[0], ads[1], ads[0]};
    ck_assert_int_eq(lora_optimizer_create_set(&opt, twice, SET_N, 0), LORA_ERR_INVALID_ARG);
    ck_assert_str_eq(lora_adapter_last_error(ads[0]), "");
    ck_assert_int_eq(lora_optimizer_create_set(&opt, cads, SET_N, 7), LORA_ERR_INVALID_ARG);
    ck_assert_str_eq(lora_adapter_last_error(ads[0]), "");
    ck_assert_ptr_null(opt);

    ck_assert_int_eq(lora_optimizer_create_set(&opt, cads, SET_N, LORA_OPTIMIZER_SGD), LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_LR, 0.1), LORA_OK);
    float *before[SET_N];
    for (int k = 0; k < SET_N; k++) {
        float *gf = malloc(counts[k] * sizeof(float));
        fill_uniform(gf, counts[k], 90u + (uint64_t)k, 1.0f);
        ck_assert_int_eq(lora_adapter_set_grads_flat(ads[k], gf, counts[k]), LORA_OK);
        free(gf);
        before[k] = fx_params(ads[k], &(size_t){0});
    }
    lora_adapter *swapped[SET_N] = {ads[0], ads[2], ads[1]};
    lora_adapter *dup[SET_N] = {ads[0], ads[1], ads[1]};
    lora_adapter *hole[SET_N] = {ads[0], ads[1], NULL};
    const struct {
        lora_adapter *const *set;
        size_t n;
        const char *msg;
    } bad[] = {
        {NULL, SET_N, "adapters is NULL"},
        {ads, 2, "n = 2 adapters, the optimizer was made for 3"},
        {ads, 4, "n = 4"},
        {hole, SET_N, "adapters[2] is NULL"},
        {dup, SET_N, "adapters[1] and adapters[2] are the same adapter"},
        {swapped, SET_N, "adapters[1] has rank 3, the optimizer was made for 2"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_msg(lora_optimizer_step_set(opt, bad[i].set, bad[i].n) == LORA_ERR_INVALID_ARG,
                      "case %zu", i);
        ck_assert_msg(strstr(lora_optimizer_last_error(opt), bad[i].msg) != NULL,
                      "case %zu: \"%s\"", i, lora_optimizer_last_error(opt));
    }
    ck_assert_int_eq(lora_optimizer_step_set(NULL, ads, SET_N), LORA_ERR_INVALID_ARG);
    /* The one-adapter step refuses an optimizer of a set of three. */
    ck_assert_int_eq(lora_optimizer_step(opt, ads[0]), LORA_ERR_INVALID_ARG);
    ck_assert(strstr(lora_optimizer_last_error(opt), "lora_optimizer_step_set") != NULL);
    /* An update overflowing a parameter of the last adapter: nothing moves anywhere. */
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_LR, 1e300), LORA_OK);
    ck_assert_int_eq(lora_optimizer_step_set(opt, ads, SET_N), LORA_ERR_NONFINITE);
    for (int k = 0; k < SET_N; k++) {
        float *now = fx_params(ads[k], &(size_t){0});
        ck_assert_msg(memcmp(now, before[k], counts[k] * sizeof(float)) == 0,
                      "a failed step changed adapter %d", k);
        free(now);
    }
    int64_t steps = -1;
    ck_assert_int_eq(lora_optimizer_get_int(opt, LORA_OPT_STEP, &steps), LORA_OK);
    ck_assert_int_eq(steps, 0);
    /* Good: the same shapes from other handles, in order. */
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_LR, 0.1), LORA_OK);
    ck_assert_int_eq(lora_optimizer_step_set(opt, ads, SET_N), LORA_OK);
    ck_assert_str_eq(lora_optimizer_last_error(opt), "");
    for (int k = 0; k < SET_N; k++) {
        float *now = fx_params(ads[k], &(size_t){0});
        ck_assert_msg(memcmp(now, before[k], counts[k] * sizeof(float)) != 0,
                      "adapter %d did not move", k);
        free(now);
        free(before[k]);
    }
    lora_optimizer_destroy(opt);
    for (int k = 0; k < SET_N; k++)
        lora_adapter_destroy(ads[k]);
}
END_TEST

/* An update that overflows in one adapter of the set stops the step for all of them
 * (a backward no longer returns non-finite gradients: it refuses them). */
START_TEST(test_optimizer_set_overflowing_update)
{
    lora_adapter *ads[SET_N];
    size_t counts[SET_N], n;
    make_model(ads, counts, &n);
    float *g = malloc(counts[0] * sizeof(float));
    for (size_t i = 0; i < counts[0]; i++)
        g[i] = i % 2 ? 1e30f : -1e30f;
    ck_assert_int_eq(lora_adapter_set_grads_flat(ads[0], g, counts[0]), LORA_OK);
    lora_optimizer *opt = NULL;
    ck_assert_int_eq(lora_optimizer_create_set(&opt, (const lora_adapter *const *)ads, SET_N,
                                               LORA_OPTIMIZER_SGD),
                     LORA_OK);
    ck_assert_int_eq(lora_optimizer_set_double(opt, LORA_OPT_LR, 1e30), LORA_OK);
    float *p1 = fx_params(ads[1], &(size_t){0});
    ck_assert_int_eq(lora_optimizer_step_set(opt, ads, SET_N), LORA_ERR_NONFINITE);
    ck_assert_msg(strstr(lora_optimizer_last_error(opt), "NaN/Inf") != NULL, "%s",
                  lora_optimizer_last_error(opt));
    float *p1_after = fx_params(ads[1], &(size_t){0});
    ck_assert(memcmp(p1, p1_after, counts[1] * sizeof(float)) == 0);
    free(p1);
    free(p1_after);
    free(g);
    lora_optimizer_destroy(opt);
    for (int k = 0; k < SET_N; k++)
        lora_adapter_destroy(ads[k]);
}
END_TEST

Suite *optimizer_suite(void)
{
    Suite *s = suite_create("optimizer");
    TCase *tc = tcase_create("pytorch");
    tcase_set_timeout(tc, 30);
    tcase_add_loop_test(tc, test_adamw_matches_pytorch, 0, 5);
    tcase_add_loop_test(tc, test_sgd_matches_pytorch, 0, 4);
    tcase_add_loop_test(tc, test_optimizer_trains, 0, 2);
    tcase_add_loop_test(tc, test_optimizer_set_matches_pytorch, 0, 2);
    suite_add_tcase(s, tc);
    tc = tcase_create("api");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_optimizer_defaults);
    tcase_add_test(tc, test_optimizer_bad_parameters);
    tcase_add_test(tc, test_optimizer_step_failures_change_nothing);
    tcase_add_test(tc, test_optimizer_overflowing_update);
    tcase_add_test(tc, test_flat_views);
    tcase_add_test(tc, test_optimizer_set_of_one);
    tcase_add_test(tc, test_optimizer_set_errors);
    tcase_add_test(tc, test_optimizer_set_overflowing_update);
    suite_add_tcase(s, tc);
    return s;
}
