/* split_suite: layers large enough that every product of the forward and backward is
 * split over two threads by la_gemm (src/linalg/blis_linalg.c), including the row split
 * of a transposed A (dB) and the column splits of a plain and a transposed B. Results
 * at THREADS 1 and 2 must agree bitwise (la_gemm computes every entry of C with the same
 * kernel and summation order whatever the split) and match the double reference.
 *
 * The sizes are checked against la_gemm's own thresholds (gemm_split.h), applying the
 * rule it documents: with two threads a product of 2·m·n·k flops is split when that is
 * at least 2·LA_MIN_FLOPS_PER_THREAD; the longer of m (rows, offsets into op(A) and C)
 * and n (columns, offsets into op(B) and C) is cut into ranges of
 * ceil(len/2) rounded up to LA_SPLIT_ALIGN, so it splits when len exceeds that. */
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <lora.h>

#include "../src/linalg/gemm_split.h"
#include "helpers.h"
#include "suites.h"

typedef struct gemm_shape {
    const char *what;
    int ta, tb; /* 1 = transposed operand */
    int64_t m, n, k;
} gemm_shape;

/* Offset kinds of a split: rows of a plain / transposed A, columns of a plain /
 * transposed B. */
enum { SPLIT_ROWS_A = 0, SPLIT_ROWS_AT = 1, SPLIT_COLS_B = 2, SPLIT_COLS_BT = 3 };

typedef struct split_info {
    int splits, kind, ragged; /* ragged: the last range is shorter than the others */
    int64_t last;             /* length of the last range */
} split_info;

static split_info split_of(const gemm_shape *g)
{
    split_info s = {0, -1, 0, 0};
    const double flops = 2.0 * (double)g->m * (double)g->n * (double)g->k;
    if (flops < 2.0 * LA_MIN_FLOPS_PER_THREAD)
        return s;
    const int rows = g->m >= g->n;
    const int64_t len = rows ? g->m : g->n, half = (len + 1) / 2;
    const int64_t step = (half + LA_SPLIT_ALIGN - 1) / LA_SPLIT_ALIGN * LA_SPLIT_ALIGN;
    if (len <= step)
        return s;
    s.splits = 1;
    s.kind = rows ? (g->ta ? SPLIT_ROWS_AT : SPLIT_ROWS_A) : (g->tb ? SPLIT_COLS_BT : SPLIT_COLS_B);
    s.ragged = len % step != 0;
    s.last = len - (len - 1) / step * step;
    return s;
}

/* The eight products of one adapted projection (MATH §2; src/layer/layer.c) over
 * `rows` input rows: y = x·Wᵀ, xa = x·Aᵀ, y += s·xa·Bᵀ; dY·B, dA = s·(dY·B)ᵀ·X,
 * dB = s·dYᵀ·XA, dX = dY·W, dX += s·(dY·B)·A. */
static int proj_products(int64_t rows, int64_t in, int64_t out, int64_t r, gemm_shape *g)
{
    const gemm_shape p[8] = {
        {"x*W^T", 0, 1, rows, out, in},   {"x*A^T", 0, 1, rows, r, in},
        {"xa*B^T", 0, 1, rows, out, r},   {"dY*B", 0, 0, rows, r, out},
        {"dA", 1, 0, r, in, rows},        {"dB", 1, 0, out, r, rows},
        {"dY*W", 0, 0, rows, in, out},    {"dYB*A", 0, 0, rows, in, r},
    };
    memcpy(g, p, sizeof p);
    return 8;
}

typedef struct split_case {
    ref_config c;
    int cross, batch, len_q, len_kv;
    int all_split; /* every product of every projection must split */
} split_case;

/* A: self-attention, 10 × 205 = 2050 rows (not a multiple of the alignment: ragged last
 * ranges), so even the rank-8 products reach the flop threshold. B: 150 query rows
 * under d_model 256 columns, so Q's and O's x·Wᵀ split by columns of a transposed B;
 * 2050 key rows split every K and V product. batch × kv heads is even: the exact
 * backend then gives each (batch, kv head) to one worker at either thread count. */
static const split_case split_cases[] = {
    {{.d_model = 256, .n_heads = 8, .rank = 8, .targets = 15, .causal = 1, .out_proj = 1,
      .bias = 1},
     0, 10, 205, 0, 1},
    {{.d_model = 256, .n_heads = 8, .rank = 8, .targets = 15, .out_proj = 1}, 1, 1, 150,
     2050, 0},
};

/* Checks the products of case k against the split rule; kinds[] counts offset kinds,
 * *ragged the splits whose last range is short. */
static void check_sizes(const split_case *k, const ref_layer *l, const ref_problem *p,
                        int kinds[4], int *ragged)
{
    for (int t = 0; t < REF_NPROJ; t++) {
        if (!ref_has_proj(l, t))
            continue;
        const int64_t rows = p->batch * ((t == REF_K || t == REF_V) ? p->len_kv : p->len_q);
        gemm_shape g[8];
        const int n = proj_products(rows, l->in[t], l->out[t], l->rank, g);
        for (int i = 0; i < n; i++) {
            const split_info s = split_of(&g[i]);
            if (k->all_split)
                ck_assert_msg(s.splits, "projection %d, %s (%lld x %lld x %lld) is not split",
                              t, g[i].what, (long long)g[i].m, (long long)g[i].n,
                              (long long)g[i].k);
            if (s.splits) {
                kinds[s.kind]++;
                *ragged += s.ragged;
            }
        }
    }
}

/* THREADS 1 and 2 agree bitwise; THREADS 2 matches the reference. */
static void run_case(const split_case *k, uint64_t seed, int kinds[4], int *ragged)
{
    ref_layer l;
    ref_problem p;
    ck_assert_int_eq(ref_layer_init(&l, &k->c), 0);
    ref_layer_randomize(&l, seed, 1.5, 0.5);
    ck_assert_int_eq(ref_problem_init(&p, &l, k->cross, k->batch, k->len_q, k->len_kv,
                                      seed + 1),
                     0);
    check_sizes(k, &l, &p, kinds, ragged);
    lib_result r[2];
    for (int threads = 1; threads <= 2; threads++) {
        lora_adapter *ad = NULL;
        ck_assert_int_eq(ref_make_adapter(&l, LORA_BACKEND_EXACT, threads, &ad), LORA_OK);
        ck_assert_int_eq(lib_run(ad, &l, &p, &r[threads - 1]), LORA_OK);
        if (threads == 2) {
            ref_errors e;
            char msg[512];
            ref_compare_adapter(ad, &l, &p, &e);
            ck_assert_msg(e.status == LORA_OK && e.max <= TOL_F32,
                          "THREADS 2 vs reference: %s", ref_errors_format(&e, msg, sizeof msg));
        }
        lora_adapter_destroy(ad);
    }
    ck_assert_msg(lib_result_same(&r[0], &r[1]), "THREADS 1 and 2 differ (out, dx or gradients)");
    lib_result_free(&r[0]);
    lib_result_free(&r[1]);
    ref_problem_free(&p);
    ref_layer_free(&l);
}

START_TEST(test_split_products_match)
{
    int kinds[4] = {0}, ragged = 0;
    for (size_t ci = 0; ci < sizeof split_cases / sizeof split_cases[0]; ci++)
        run_case(&split_cases[ci], 71 + 2 * ci, kinds, &ragged);
    ck_assert_msg(kinds[SPLIT_ROWS_A] && kinds[SPLIT_ROWS_AT] && kinds[SPLIT_COLS_B] &&
                      kinds[SPLIT_COLS_BT],
                  "split kinds not all covered: rows %d, rows of A^T %d, cols %d, cols of B^T %d",
                  kinds[0], kinds[1], kinds[2], kinds[3]);
    ck_assert_msg(ragged > 0, "no split has a short last range");
}
END_TEST

/* 193 query rows under d_model 192: x·Wᵀ and dX = dY·W (193 × 192 × 192) split into 192
 * rows and a last range of one row (head_dim 24: the exact backend's BLIS tiles). */
START_TEST(test_split_one_row_tail)
{
    const split_case k = {{.d_model = 192, .n_heads = 8, .rank = 4, .targets = 5}, 0, 1, 193,
                          0, 0};
    const gemm_shape xw = {"x*W^T", 0, 1, 193, 192, 192};
    const split_info si = split_of(&xw);
    ck_assert_msg(si.splits && si.kind == SPLIT_ROWS_A && si.last == 1,
                  "x*W^T: split %d kind %d last range %lld (want a 1-row last range)", si.splits,
                  si.kind, (long long)si.last);
    int kinds[4] = {0}, ragged = 0;
    run_case(&k, 91, kinds, &ragged);
    ck_assert(kinds[SPLIT_ROWS_A] > 0 && ragged > 0);
}
END_TEST

Suite *split_suite(void)
{
    Suite *s = suite_create("split");
    TCase *tc = tcase_create("real_sizes");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_split_products_match);
    tcase_add_test(tc, test_split_one_row_tail);
    suite_add_tcase(s, tc);
    return s;
}
