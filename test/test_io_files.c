/* io_files_suite: adapter files against hostile paths and file systems, torn and failed
 * saves, and PEFT's own reading rules. Each test names the behaviour it pins down
 * (docs/reliability.md lists them). */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <check.h>
#include <lora.h>

#include "fixtures.h"
#include "helpers.h"
#include "suites.h"
#include "test_io_util.h"

/* ---- helpers ---------------------------------------------------------------------- */

/* A set of n adapters of spec s at layers {5, 0, 2, 9}. */
static void make_set(const fx_spec *s, lora_adapter **ad, int64_t *layers, size_t n)
{
    static const int64_t order[4] = {5, 0, 2, 9};
    for (size_t i = 0; i < n; i++) {
        ad[i] = fx_adapter_nobase(s, 700u + (uint64_t)i);
        layers[i] = order[i];
    }
}

static void free_set(lora_adapter **ad, size_t n)
{
    for (size_t i = 0; i < n; i++)
        lora_adapter_destroy(ad[i]);
}

/* Query then load of path (gguf) or dir (PEFT) with cfg; returns the first failing
 * status (count 0 and no adapter left then) or LORA_OK (adapters destroyed). */
static int try_load(int gguf, const char *path, lora_config *cfg)
{
    size_t n = 77;
    int st = gguf ? lora_load_gguf(NULL, NULL, 0, &n, path, cfg)
                  : lora_load_peft(NULL, NULL, 0, &n, path, cfg);
    if (st != LORA_OK) {
        ck_assert_uint_eq(n, 0);
        return st;
    }
    lora_adapter *ad[8] = {NULL};
    int64_t layers[8];
    st = gguf ? lora_load_gguf(ad, layers, 8, &n, path, cfg)
              : lora_load_peft(ad, layers, 8, &n, path, cfg);
    if (st != LORA_OK)
        for (int i = 0; i < 8; i++)
            ck_assert(ad[i] == NULL);
    for (size_t i = 0; st == LORA_OK && i < n; i++)
        lora_adapter_destroy(ad[i]);
    return st;
}

/* ---- special files: FIFOs, devices, directories, symlink loops ----------------------- */

/* Replaces path by a special file of kind k; returns a name for messages. */
static const char *make_special(const char *dir, const char *path, int k)
{
    unlink(path);
    char *aux = path_in(dir, "aux-target");
    char *aux2 = path_in(dir, "aux-loop");
    unlink(aux);
    unlink(aux2);
    rmdir(aux);
    const char *what = "";
    switch (k) {
    case 0:
        ck_assert_int_eq(mkfifo(path, 0600), 0);
        what = "FIFO";
        break;
    case 1:
        ck_assert_int_eq(mkfifo(aux, 0600), 0);
        ck_assert_int_eq(symlink(aux, path), 0);
        what = "symlink to a FIFO";
        break;
    case 2:
        ck_assert_int_eq(symlink("/dev/zero", path), 0);
        what = "symlink to /dev/zero";
        break;
    case 3:
        ck_assert_int_eq(mkdir(path, 0700), 0);
        what = "directory";
        break;
    default:
        ck_assert_int_eq(symlink(aux2, path), 0);
        ck_assert_int_eq(symlink(path, aux2), 0);
        what = "symlink loop";
        break;
    }
    free(aux);
    free(aux2);
    return what;
}

/* A FIFO (or a symlink to one), /dev/zero, a directory or a symlink loop where the GGUF
 * file or either PEFT file should be: LORA_ERR_IO at once (a FIFO used to block the
 * open forever; the tcase timeout catches a hang). */
START_TEST(test_special_paths_refused)
{
    const int role = _i; /* 0 GGUF, 1 adapter_config.json, 2 adapter_model.safetensors */
    fx_spec s = fx_default();
    lora_adapter *ad[2];
    int64_t layers[2];
    make_set(&s, ad, layers, 2);
    char *dir = fx_tmpdir();
    char *gpath = path_in(dir, "a.gguf");
    ck_assert_int_eq(lora_save_peft(dir, ad, layers, 2), LORA_OK);
    ck_assert_int_eq(lora_save_gguf(gpath, ad, layers, 2, NULL), LORA_OK);
    lora_config *cfg = fx_config(&s);
    ck_assert_int_eq(try_load(role == 0, role == 0 ? gpath : dir, cfg), LORA_OK);
    static const char *const files[3] = {"a.gguf", "adapter_config.json",
                                         "adapter_model.safetensors"};
    char *victim = path_in(dir, files[role]);
    for (int k = 0; k < 5; k++) {
        const char *what = make_special(dir, victim, k);
        const int st = try_load(role == 0, role == 0 ? gpath : dir, cfg);
        ck_assert_msg(st == LORA_ERR_IO, "%s as %s: status %d (%s)", what, files[role], st,
                      lora_config_last_error(cfg));
        ck_assert_msg(strstr(lora_config_last_error(cfg), files[role]) != NULL,
                      "%s: the message does not name the file: %s", what,
                      lora_config_last_error(cfg));
        unlink(victim);
        rmdir(victim);
    }
    free(victim);
    lora_config_destroy(cfg);
    free_set(ad, 2);
    fx_rmtree(dir);
    free(gpath);
    free(dir);
}
END_TEST

/* ---- sparse files: only the header and the tensors' bytes are read ------------------ */

/* An allocator that counts the peak of live bytes and refuses any block over 64 MiB
 * (so a loader that would read a huge file into memory fails fast instead). */
typedef struct peak_alloc {
    size_t live, peak;
} peak_alloc;

static void *peak_malloc(void *user, size_t size)
{
    peak_alloc *p = user;
    if (size > ((size_t)64 << 20))
        return NULL;
    size_t *b = malloc(size + 16);
    if (!b)
        return NULL;
    b[0] = size;
    p->live += size;
    p->peak = p->live > p->peak ? p->live : p->peak;
    return (char *)b + 16;
}

static void peak_free(void *user, void *ptr)
{
    peak_alloc *p = user;
    size_t *b = (size_t *)(void *)((char *)ptr - 16);
    p->live -= b[0];
    free(b);
}

static lora_config *peak_config(peak_alloc *p, const fx_spec *s)
{
    const lora_allocator a = {peak_malloc, peak_free, p};
    lora_config *cfg = NULL;
    ck_assert_int_eq(lora_config_create_with_allocator(&cfg, &a), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_D_MODEL, s->d_model), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_HEADS, s->n_heads), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_N_KV_HEADS, s->n_kv_heads), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_OUT_PROJ, s->out_proj), LORA_OK);
    ck_assert_int_eq(lora_config_set_int(cfg, LORA_CFG_THREADS, 1), LORA_OK);
    return cfg;
}

static void extend_sparse(const char *path, off_t size)
{
    const int fd = open(path, O_WRONLY);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(ftruncate(fd, size), 0);
    close(fd);
}

/* A file whose apparent size is 3 GiB past its tensors (a hole): FORMAT ("bytes after
 * the last tensor"), with memory bounded by the header (the old loader read the whole
 * file into memory). */
START_TEST(test_sparse_trailing_refused)
{
    const int gguf = _i;
    fx_spec s = fx_default();
    lora_adapter *ad[2];
    int64_t layers[2];
    make_set(&s, ad, layers, 2);
    char *dir = fx_tmpdir();
    char *path = path_in(dir, gguf ? "a.gguf" : "adapter_model.safetensors");
    ck_assert_int_eq(gguf ? lora_save_gguf(path, ad, layers, 2, NULL)
                          : lora_save_peft(dir, ad, layers, 2),
                     LORA_OK);
    peak_alloc p = {0, 0};
    lora_config *cfg = peak_config(&p, &s);
    const char *target = gguf ? path : dir;
    ck_assert_int_eq(try_load(gguf, target, cfg), LORA_OK);
    /* Padding up to the alignment after the last tensor is fine in GGUF. */
    struct stat sb;
    ck_assert_int_eq(stat(path, &sb), 0);
    if (gguf) {
        extend_sparse(path, (sb.st_size + 31) / 32 * 32);
        ck_assert_int_eq(try_load(gguf, target, cfg), LORA_OK);
        ck_assert_int_eq(stat(path, &sb), 0);
    }
    extend_sparse(path, sb.st_size + 1);
    int st = try_load(gguf, target, cfg);
    ck_assert_msg(st == LORA_ERR_FORMAT && strstr(lora_config_last_error(cfg), "after the last"),
                  "one trailing byte: %d (%s)", st, lora_config_last_error(cfg));
    p.peak = p.live;
    extend_sparse(path, (off_t)3 << 30);
    st = try_load(gguf, target, cfg);
    ck_assert_msg(st == LORA_ERR_FORMAT, "3 GiB sparse file: %d (%s)", st,
                  lora_config_last_error(cfg));
    ck_assert_msg(p.peak - p.live < ((size_t)1 << 20), "the load held %zu bytes",
                  p.peak - p.live);
    lora_config_destroy(cfg);
    free_set(ad, 2);
    fx_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* The two factors of layer 0, target Q (fx_default: A (4, 16), B (16, 4)) where B lies
 * 2 GiB into the data and the gap is a hole: the load succeeds reading only the named
 * ranges, memory bounded by the tensors (the old loader read the 2 GiB). */
START_TEST(test_sparse_ranges_only)
{
    const int gguf = _i;
    fx_spec s = fx_default();
    s.targets = LORA_TARGET_Q;
    char *dir = fx_tmpdir();
    char *path = path_in(dir, gguf ? "a.gguf" : "adapter_model.safetensors");
    const uint64_t gap = (uint64_t)2 << 30, na = 4 * 16 * 4, nb = 16 * 4 * 4;
    tw_buf head = {0};
    if (gguf) {
        tw_gguf_header(&head, 3, 2, 2);
        tw_gguf_kv_str(&head, "general.type", "adapter");
        tw_gguf_kv_str(&head, "adapter.type", "lora");
        const char *names[2] = {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b"};
        const uint64_t ne[2][2] = {{16, 4}, {4, 16}}, off[2] = {0, gap};
        for (int t = 0; t < 2; t++)
            tw_gguf_info(&head, names[t], strlen(names[t]), ne[t][0], ne[t][1], 0, off[t]);
        tw_align(&head, 32);
    } else {
        char json[512];
        snprintf(json, sizeof json,
                 "{\"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight\":"
                 "{\"dtype\":\"F32\",\"shape\":[4,16],\"data_offsets\":[0,%llu]},"
                 "\"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight\":"
                 "{\"dtype\":\"F32\",\"shape\":[16,4],\"data_offsets\":[%llu,%llu]}}",
                 (unsigned long long)na, (unsigned long long)gap,
                 (unsigned long long)(gap + nb));
        tw_st_header(&head, json, 1, -1);
        tw_write_peft(dir, "{\"r\": 4, \"lora_alpha\": 8, \"target_modules\": [\"q_proj\"]}",
                      NULL);
    }
    const size_t data_start = head.n;
    /* A: 0.25 everywhere; B: 0.5 everywhere, at data_start + gap. */
    float a[64], b[64];
    for (int i = 0; i < 64; i++) {
        a[i] = 0.25f;
        b[i] = 0.5f;
    }
    const int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(pwrite(fd, head.b, data_start, 0), (ssize_t)data_start);
    tw_free(&head);
    ck_assert_int_eq(pwrite(fd, a, na, (off_t)data_start), (ssize_t)na);
    ck_assert_int_eq(pwrite(fd, b, nb, (off_t)(data_start + gap)), (ssize_t)nb);
    close(fd);
    peak_alloc p = {0, 0};
    lora_config *cfg = peak_config(&p, &s);
    const size_t base = p.live;
    size_t n = 0;
    lora_adapter *ad[1] = {NULL};
    int64_t layer = -1;
    const char *target = gguf ? path : dir;
    int st = gguf ? lora_load_gguf(NULL, NULL, 0, &n, target, cfg)
                  : lora_load_peft(NULL, NULL, 0, &n, target, cfg);
    ck_assert_msg(st == LORA_OK && n == 1, "query: %d (%s)", st, lora_config_last_error(cfg));
    st = gguf ? lora_load_gguf(ad, &layer, 1, &n, target, cfg)
              : lora_load_peft(ad, &layer, 1, &n, target, cfg);
    ck_assert_msg(st == LORA_OK, "load: %d (%s)", st, lora_config_last_error(cfg));
    ck_assert_int_eq(layer, 0);
    float got[64];
    ck_assert_int_eq(lora_adapter_get_param(ad[0], LORA_TARGET_Q, LORA_B, got, 64), LORA_OK);
    ck_assert(memcmp(got, b, sizeof b) == 0);
    ck_assert_int_eq(lora_adapter_get_param(ad[0], LORA_TARGET_Q, LORA_A, got, 64), LORA_OK);
    ck_assert(memcmp(got, a, sizeof a) == 0);
    ck_assert_msg(p.peak - base < ((size_t)1 << 20), "the loads held %zu bytes", p.peak - base);
    lora_adapter_destroy(ad[0]);
    lora_config_destroy(cfg);
    fx_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* ---- saves: torn pairs, modes, symlinks, failures, padding ------------------------- */

/* Copies file src to dst (replacing it). */
static void copy_file(const char *src, const char *dst)
{
    size_t n;
    unsigned char *b = fx_read_file(src, &n);
    unlink(dst);
    fx_write_file(dst, b, n);
    free(b);
}

/* A set of two adapters of spec s whose alpha / rsLoRA are given. */
static void make_scaled_set(fx_spec s, double alpha, int rslora, lora_adapter **ad,
                            int64_t *layers)
{
    s.alpha = alpha;
    s.rslora = rslora;
    make_set(&s, ad, layers, 2);
}

/* New weights beside an old config (a save torn between its two renames, or files
 * mixed by hand): the weights' __metadata__ records r, lora_alpha and use_rslora, and a
 * config that contradicts it is FORMAT naming the field (it used to load with the old
 * alpha: a silently wrong scale). */
START_TEST(test_torn_pair_refused)
{
    fx_spec s = fx_default();
    char *old_dir = fx_tmpdir(), *new_dir = fx_tmpdir();
    lora_config *cfg = fx_config(&s);
    static const struct {
        double alpha;
        int rslora;
        const char *field;
    } news[2] = {{32.0, 0, "lora_alpha"}, {8.0, 1, "use_rslora"}};
    for (int k = 0; k < 2; k++) {
        lora_adapter *ad[2], *nd[2];
        int64_t layers[2];
        make_scaled_set(s, 8.0, 0, ad, layers);
        make_scaled_set(s, news[k].alpha, news[k].rslora, nd, layers);
        ck_assert_int_eq(lora_save_peft(old_dir, ad, layers, 2), LORA_OK);
        ck_assert_int_eq(lora_save_peft(new_dir, nd, layers, 2), LORA_OK);
        ck_assert_int_eq(try_load(0, old_dir, cfg), LORA_OK);
        char *src = path_in(new_dir, "adapter_model.safetensors");
        char *dst = path_in(old_dir, "adapter_model.safetensors");
        copy_file(src, dst);
        const int st = try_load(0, old_dir, cfg);
        ck_assert_msg(st == LORA_ERR_FORMAT, "torn pair (%s): status %d (%s)", news[k].field,
                      st, lora_config_last_error(cfg));
        ck_assert_msg(strstr(lora_config_last_error(cfg), news[k].field) != NULL,
                      "the message does not name %s: %s", news[k].field,
                      lora_config_last_error(cfg));
        free(src);
        free(dst);
        free_set(ad, 2);
        free_set(nd, 2);
    }
    lora_config_destroy(cfg);
    fx_rmtree(old_dir);
    fx_rmtree(new_dir);
    free(old_dir);
    free(new_dir);
}
END_TEST

/* Names in dir other than the expected ones (temporaries left behind). */
static int stray_entries(const char *dir, const char *const *expected, int n)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "ls -A '%s'", dir);
    FILE *f = popen(cmd, "r");
    ck_assert_ptr_nonnull(f);
    char line[512];
    int stray = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        int known = 0;
        for (int i = 0; i < n; i++)
            known |= strcmp(line, expected[i]) == 0;
        stray += !known;
    }
    pclose(f);
    return stray;
}

static int mode_of(const char *path)
{
    struct stat sb;
    ck_assert_int_eq(stat(path, &sb), 0);
    return (int)(sb.st_mode & 07777);
}

/* A re-save keeps the replaced file's mode (0600 stayed 0644 before); a new file gets
 * 0666 less the umask; no temporary is left. */
START_TEST(test_save_keeps_mode)
{
    fx_spec s = fx_default();
    lora_adapter *ad[2];
    int64_t layers[2];
    make_set(&s, ad, layers, 2);
    char *dir = fx_tmpdir();
    char *gpath = path_in(dir, "a.gguf");
    char *wpath = path_in(dir, "adapter_model.safetensors");
    char *cpath = path_in(dir, "adapter_config.json");
    umask(027);
    ck_assert_int_eq(lora_save_peft(dir, ad, layers, 2), LORA_OK);
    ck_assert_int_eq(lora_save_gguf(gpath, ad, layers, 2, NULL), LORA_OK);
    ck_assert_int_eq(mode_of(wpath), 0640);
    ck_assert_int_eq(mode_of(cpath), 0640);
    ck_assert_int_eq(mode_of(gpath), 0640);
    ck_assert_int_eq(chmod(wpath, 0600), 0);
    ck_assert_int_eq(chmod(cpath, 0604), 0); /* bits the umask would cut */
    ck_assert_int_eq(chmod(gpath, 0600), 0);
    ck_assert_int_eq(lora_save_peft(dir, ad, layers, 2), LORA_OK);
    ck_assert_int_eq(lora_save_gguf(gpath, ad, layers, 2, NULL), LORA_OK);
    ck_assert_int_eq(mode_of(wpath), 0600);
    ck_assert_int_eq(mode_of(cpath), 0604);
    ck_assert_int_eq(mode_of(gpath), 0600);
    static const char *const files[3] = {"a.gguf", "adapter_model.safetensors",
                                         "adapter_config.json"};
    ck_assert_int_eq(stray_entries(dir, files, 3), 0);
    free_set(ad, 2);
    fx_rmtree(dir);
    free(gpath);
    free(wpath);
    free(cpath);
    free(dir);
}
END_TEST

/* Saves write through symlinks (the link stays and its target gets the new contents,
 * like most editors); a symlink that leads nowhere is IO and nothing is created. */
START_TEST(test_save_through_symlinks)
{
    fx_spec s = fx_default();
    lora_adapter *ad[2], *nd[2];
    int64_t layers[2];
    make_scaled_set(s, 8.0, 0, ad, layers);
    make_scaled_set(s, 16.0, 0, nd, layers);
    char *store = fx_tmpdir(), *dir = fx_tmpdir();
    static const char *const files[3] = {"a.gguf", "adapter_model.safetensors",
                                         "adapter_config.json"};
    char *real[3], *link[3];
    for (int i = 0; i < 3; i++) {
        real[i] = path_in(store, files[i]);
        link[i] = path_in(dir, files[i]);
    }
    ck_assert_int_eq(lora_save_peft(store, ad, layers, 2), LORA_OK);
    ck_assert_int_eq(lora_save_gguf(real[0], ad, layers, 2, NULL), LORA_OK);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(symlink(real[i], link[i]), 0);
    ck_assert_int_eq(lora_save_peft(dir, nd, layers, 2), LORA_OK);
    ck_assert_int_eq(lora_save_gguf(link[0], nd, layers, 2, NULL), LORA_OK);
    lora_config *cfg = fx_config(&s);
    for (int i = 0; i < 3; i++) {
        struct stat sb;
        ck_assert_int_eq(lstat(link[i], &sb), 0);
        ck_assert_msg(S_ISLNK(sb.st_mode), "%s is no longer a symlink", files[i]);
    }
    for (int gguf = 0; gguf < 2; gguf++) { /* the targets hold the new alpha */
        lora_adapter *got[2];
        int64_t l[2];
        size_t n;
        ck_assert_int_eq(gguf ? lora_load_gguf(got, l, 2, &n, real[0], cfg)
                              : lora_load_peft(got, l, 2, &n, store, cfg),
                         LORA_OK);
        double alpha;
        ck_assert_int_eq(lora_adapter_get_config_double(got[0], LORA_CFG_ALPHA, &alpha),
                         LORA_OK);
        ck_assert_msg(alpha == 16.0, "format %d: alpha %g after the save", gguf, alpha);
        free_set(got, n);
    }
    ck_assert_int_eq(stray_entries(dir, files, 3), 0);
    ck_assert_int_eq(stray_entries(store, files, 3), 0);
    /* A dangling link: IO, and its target is not created. */
    char *nowhere = path_in(store, "missing.gguf");
    unlink(link[0]);
    ck_assert_int_eq(symlink(nowhere, link[0]), 0);
    ck_assert_int_eq(lora_save_gguf(link[0], nd, layers, 2, NULL), LORA_ERR_IO);
    ck_assert_int_ne(access(nowhere, F_OK), 0);
    free(nowhere);
    for (int i = 0; i < 3; i++) {
        free(real[i]);
        free(link[i]);
    }
    lora_config_destroy(cfg);
    free_set(ad, 2);
    free_set(nd, 2);
    fx_rmtree(dir);
    fx_rmtree(store);
    free(dir);
    free(store);
}
END_TEST

/* A full disk (RLIMIT_FSIZE below the weights' size, SIGXFSZ ignored): the save fails
 * with IO, the old adapter stays loadable and bitwise unchanged, no temporary is left,
 * and a directory the save created is removed again. */
START_TEST(test_failed_save_leaves_old_adapter)
{
    fx_spec s = fx_default();
    lora_adapter *ad[2], *nd[2];
    int64_t layers[2];
    make_scaled_set(s, 8.0, 0, ad, layers);
    make_scaled_set(s, 32.0, 0, nd, layers);
    char *dir = fx_tmpdir();
    char *gpath = path_in(dir, "a.gguf");
    char *wpath = path_in(dir, "adapter_model.safetensors");
    char *cpath = path_in(dir, "adapter_config.json");
    char *fresh = path_in(dir, "fresh");
    ck_assert_int_eq(lora_save_peft(dir, ad, layers, 2), LORA_OK);
    ck_assert_int_eq(lora_save_gguf(gpath, ad, layers, 2, NULL), LORA_OK);
    size_t nw, nc, ng;
    unsigned char *w0 = fx_read_file(wpath, &nw), *c0 = fx_read_file(cpath, &nc),
                  *g0 = fx_read_file(gpath, &ng);
    signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim;
    ck_assert_int_eq(getrlimit(RLIMIT_FSIZE, &lim), 0);
    const rlim_t soft = lim.rlim_cur;
    lim.rlim_cur = 1024; /* the config (< 1 KiB) fits, the weights do not */
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &lim), 0);
    const int st_peft = lora_save_peft(dir, nd, layers, 2);
    const int st_gguf = lora_save_gguf(gpath, nd, layers, 2, NULL);
    const int st_fresh = lora_save_peft(fresh, nd, layers, 2);
    lim.rlim_cur = soft; /* Check reports failures through files */
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &lim), 0);
    ck_assert_int_eq(st_peft, LORA_ERR_IO);
    ck_assert_int_eq(st_gguf, LORA_ERR_IO);
    ck_assert_int_eq(st_fresh, LORA_ERR_IO);
    ck_assert(strstr(lora_adapter_last_error(nd[0]), "adapter_model.safetensors") != NULL);
    ck_assert_msg(access(fresh, F_OK) != 0, "the failed save left the directory it created");
    size_t n;
    unsigned char *b = fx_read_file(wpath, &n);
    ck_assert(n == nw && memcmp(b, w0, n) == 0);
    free(b);
    b = fx_read_file(cpath, &n);
    ck_assert(n == nc && memcmp(b, c0, n) == 0);
    free(b);
    b = fx_read_file(gpath, &n);
    ck_assert(n == ng && memcmp(b, g0, n) == 0);
    free(b);
    static const char *const files[3] = {"a.gguf", "adapter_model.safetensors",
                                         "adapter_config.json"};
    ck_assert_int_eq(stray_entries(dir, files, 3), 0);
    lora_config *cfg = fx_config(&s);
    ck_assert_int_eq(try_load(0, dir, cfg), LORA_OK);
    ck_assert_int_eq(try_load(1, gpath, cfg), LORA_OK);
    lora_config_destroy(cfg);
    free(w0);
    free(c0);
    free(g0);
    free_set(ad, 2);
    free_set(nd, 2);
    fx_rmtree(dir);
    free(gpath);
    free(wpath);
    free(cpath);
    free(fresh);
    free(dir);
}
END_TEST

/* GGUF data is padded to the alignment after the last tensor too (ggml's loader with
 * no_alloc = false reads aligned blocks): rank 1 and d_model 6 make 24-byte tensors. */
START_TEST(test_gguf_padded_after_last_tensor)
{
    fx_spec s = fx_default();
    s.d_model = 6;
    s.n_heads = 2;
    s.n_kv_heads = 2;
    s.rank = 1;
    s.targets = LORA_TARGET_Q;
    s.out_proj = 0;
    lora_adapter *ad[1];
    int64_t layers[1];
    make_set(&s, ad, layers, 1);
    char *dir = fx_tmpdir();
    char *gpath = path_in(dir, "a.gguf");
    ck_assert_int_eq(lora_save_gguf(gpath, ad, layers, 1, NULL), LORA_OK);
    size_t n;
    unsigned char *b = fx_read_file(gpath, &n);
    ck_assert_msg(n % 32 == 0, "file of %zu bytes: the last tensor is not padded", n);
    for (size_t k = n - 8; k < n; k++) /* 24 bytes of data, 8 of padding */
        ck_assert_uint_eq(b[k], 0);
    free(b);
    lora_config *cfg = fx_config(&s);
    ck_assert_int_eq(try_load(1, gpath, cfg), LORA_OK);
    lora_config_destroy(cfg);
    free_set(ad, 1);
    fx_rmtree(dir);
    free(gpath);
    free(dir);
}
END_TEST

/* ---- PEFT parity: PEFT's reading rules, strict JSON, meaning-changing keys --------- */

/* Replaces dir's adapter_config.json by {"r": 4, "lora_alpha": 8, <body>}. */
static void write_config(const char *dir, const char *body)
{
    char text[2048];
    snprintf(text, sizeof text, "{\"r\": 4, \"lora_alpha\": 8%s%s}", body[0] ? ", " : "", body);
    tw_write_peft(dir, text, NULL);
}

/* adapter_config.json read as PEFT reads it. The set: layers 5 and 0, targets Q and V,
 * rank 4, alpha 8. Each row: a config body and the status PEFT's meaning implies. */
START_TEST(test_peft_config_parity)
{
    fx_spec s = fx_default();
    s.targets = LORA_TARGET_Q | LORA_TARGET_V;
    lora_adapter *ad[2];
    int64_t layers[2];
    make_set(&s, ad, layers, 2);
    char *dir = fx_tmpdir();
    ck_assert_int_eq(lora_save_peft(dir, ad, layers, 2), LORA_OK);
    lora_config *cfg = fx_config(&s);
    static const struct {
        const char *body;
        int want;
        const char *names; /* in the message, when set */
    } rows[] = {
        /* target_modules: exact names or dotted suffixes of model.layers.N.self_attn.X */
        {"\"target_modules\": [\"self_attn.q_proj\", \"self_attn.v_proj\"]", LORA_OK, NULL},
        {"\"target_modules\": [\"q_proj\", \"layers.5.self_attn.v_proj\", "
         "\"model.layers.0.self_attn.v_proj\"]", LORA_OK, NULL},
        {"\"target_modules\": [\"q_proj\", \"model.layers.0.self_attn.v_proj\"]",
         LORA_ERR_FORMAT, "layers.5.self_attn.v_proj"},
        {"\"target_modules\": [\"q_proj\", \"elf_attn.v_proj\"]", LORA_ERR_FORMAT, "v_proj"},
        /* a string: "all-linear" (any case), else re.fullmatch over the module name */
        {"\"target_modules\": \"all-linear\"", LORA_OK, NULL},
        {"\"target_modules\": \"ALL-LINEAR\"", LORA_OK, NULL},
        {"\"target_modules\": \".*\\\\.(q_proj|v_proj)\"", LORA_OK, NULL},
        {"\"target_modules\": \"model\\\\.layers\\\\.\\\\d+\\\\.self_attn\\\\.[qv]_proj\"",
         LORA_OK, NULL},
        {"\"target_modules\": \"(?:.*)\\\\.[qv]_pro.*?\"", LORA_OK, NULL},
        {"\"target_modules\": \"q_proj|v_proj\"", LORA_ERR_FORMAT, "regex"},
        {"\"target_modules\": \".*\\\\.q_proj\"", LORA_ERR_FORMAT, "v_proj"},
        {"\"target_modules\": \"(?=x).*\"", LORA_ERR_UNSUPPORTED, "target_modules"},
        /* Repetitions that glibc's regcomp would expand exponentially (a fuzzed
         * "x++++...+" took gigabytes): refused before compiling. */
        {"\"target_modules\": \"x+++++++++++++++++++++++++++++++++++++++++++++++++\"",
         LORA_ERR_UNSUPPORTED, "target_modules"},
        {"\"target_modules\": \"((((((((((x+)+)+)+)+)+)+)+)+)+)\"", LORA_ERR_UNSUPPORTED,
         "target_modules"},
        {"\"target_modules\": \".*q_proj{2}\"", LORA_ERR_UNSUPPORTED, "target_modules"},
        /* layers_to_transform (with the list form of target_modules) */
        {"\"target_modules\": [\"q_proj\", \"v_proj\"], \"layers_to_transform\": [0, 5]",
         LORA_OK, NULL},
        {"\"target_modules\": [\"q_proj\", \"v_proj\"], \"layers_to_transform\": [0]",
         LORA_ERR_FORMAT, "layers_to_transform"},
        {"\"target_modules\": [\"q_proj\", \"v_proj\"], \"layers_to_transform\": 5",
         LORA_ERR_FORMAT, "layers_to_transform"},
        {"\"target_modules\": [\"q_proj\", \"v_proj\"], \"layers_to_transform\": []", LORA_OK,
         NULL},
        {"\"target_modules\": [\"q_proj\", \"v_proj\"], \"layers_to_transform\": [0.5]",
         LORA_ERR_FORMAT, "layers_to_transform"},
        {"\"target_modules\": [\"q_proj\", \"v_proj\"], \"layers_to_transform\": [0, 5], "
         "\"layers_pattern\": \"layers\"", LORA_OK, NULL},
        {"\"target_modules\": [\"q_proj\", \"v_proj\"], \"layers_to_transform\": [0, 5], "
         "\"layers_pattern\": [\"h\"]", LORA_ERR_FORMAT, "layers_pattern"},
        /* duplicate keys (Python keeps the last, cJSON the first) and escaped NULs */
        {"\"lora_alpha\": 64", LORA_ERR_FORMAT, "lora_alpha"},
        {"\"extra\": {\"x\": 1, \"x\": 2}", LORA_ERR_FORMAT, "'x'"},
        {"\"peft_type\": \"LORA\\u0000XX\"", LORA_ERR_FORMAT, "u0000"},
        {"\"task_type\": \"CAUSAL_LM\\u0000\"", LORA_ERR_FORMAT, "u0000"},
        {"\"note\": \"C:\\\\u0000\"", LORA_OK, NULL}, /* an escaped backslash, then text */
        /* keys that change what the adapter computes */
        {"\"alora_invocation_tokens\": [101, 102]", LORA_ERR_UNSUPPORTED,
         "alora_invocation_tokens"},
        {"\"alora_invocation_tokens\": null", LORA_OK, NULL},
        {"\"invocation_string\": \"<|assistant|>\"", LORA_ERR_UNSUPPORTED, "invocation_string"},
        {"\"init_lora_weights\": \"pissa\"", LORA_ERR_UNSUPPORTED, "init_lora_weights"},
        {"\"init_lora_weights\": \"pissa_niter_16\"", LORA_ERR_UNSUPPORTED, "pissa_niter_16"},
        {"\"init_lora_weights\": \"olora\"", LORA_ERR_UNSUPPORTED, "olora"},
        {"\"init_lora_weights\": \"corda\"", LORA_ERR_UNSUPPORTED, "corda"},
        {"\"init_lora_weights\": \"gaussian\"", LORA_OK, NULL},
        {"\"init_lora_weights\": true", LORA_OK, NULL},
        {"\"layer_replication\": [[0, 4], [2, 5]]", LORA_ERR_UNSUPPORTED, "layer_replication"},
        {"\"layer_replication\": null", LORA_OK, NULL},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        write_config(dir, rows[i].body);
        const int st = try_load(0, dir, cfg);
        ck_assert_msg(st == rows[i].want, "row %zu (%s): status %d, want %d (%s)", i,
                      rows[i].body, st, rows[i].want, lora_config_last_error(cfg));
        ck_assert_msg(!rows[i].names || strstr(lora_config_last_error(cfg), rows[i].names),
                      "row %zu: the message does not name %s: %s", i, rows[i].names,
                      lora_config_last_error(cfg));
    }
    lora_config_destroy(cfg);
    free_set(ad, 2);
    fx_rmtree(dir);
    free(dir);
}
END_TEST

#define ST_NAME(layer, f) \
    "base_model.model.model.layers." layer ".self_attn.q_proj.lora_" f ".weight"

/* A safetensors file with header json (space-padded) and n zero bytes of data. */
static void write_st(const char *dir, const char *json, size_t n)
{
    tw_buf w = {0};
    tw_st_header(&w, json, 1, -1);
    tw_zeros(&w, n);
    tw_write_peft(dir, NULL, &w);
    tw_free(&w);
}

/* Safetensors headers: a field twice inside one tensor entry (the reference reader
 * refuses it; cJSON kept the first) and an escaped NUL in a name are FORMAT; the layer
 * index limit is 2^31 - 1 exactly, and a name must end exactly with .lora_A.weight. */
START_TEST(test_safetensors_strict_names)
{
    fx_spec s = fx_default();
    s.targets = LORA_TARGET_Q;
    char *dir = fx_tmpdir();
    lora_config *cfg = fx_config(&s);
    write_config(dir, "");
    static const struct {
        const char *a_name, *a_extra, *b_name;
        int want;
    } rows[] = {
        {ST_NAME("0", "A"), "", ST_NAME("0", "B"), LORA_OK},
        /* the second of two equal fields (cJSON kept the first, which is valid) */
        {ST_NAME("0", "A"), ",\"dtype\":\"F16\"", ST_NAME("0", "B"), LORA_ERR_FORMAT},
        {ST_NAME("0", "A"), ",\"shape\":[8,8]", ST_NAME("0", "B"), LORA_ERR_FORMAT},
        {ST_NAME("0", "A") "\\u0000x", "", ST_NAME("0", "B"), LORA_ERR_FORMAT},
        {ST_NAME("2147483647", "A"), "", ST_NAME("2147483647", "B"), LORA_OK},
        {ST_NAME("2147483648", "A"), "", ST_NAME("2147483648", "B"), LORA_ERR_UNSUPPORTED},
        {ST_NAME("0", "A") "x", "", ST_NAME("0", "B"), LORA_ERR_UNSUPPORTED},
        {ST_NAME("0", "A") ".weight", "", ST_NAME("0", "B"), LORA_ERR_UNSUPPORTED},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        char json[1024];
        snprintf(json, sizeof json,
                 "{\"%s\":{\"dtype\":\"F32\",\"shape\":[4,16],\"data_offsets\":[0,256]%s},"
                 "\"%s\":{\"dtype\":\"F32\",\"shape\":[16,4],\"data_offsets\":[256,512]}}",
                 rows[i].a_name, rows[i].a_extra, rows[i].b_name);
        write_st(dir, json, 512);
        const int st = try_load(0, dir, cfg);
        ck_assert_msg(st == rows[i].want, "row %zu: status %d, want %d (%s)", i, st,
                      rows[i].want, lora_config_last_error(cfg));
    }
    lora_config_destroy(cfg);
    fx_rmtree(dir);
    free(dir);
}
END_TEST

/* A GGUF adapter of layer `layer` (fx_default with target Q) with an optional extra
 * key-value: a u32 array key of 2 entries; tensor names get `suffix` appended (with
 * its length, so a NUL can be part of it). */
static void build_gguf(tw_buf *g, const char *layer, const char *extra_key, const char *suffix,
                       size_t suffix_len)
{
    tw_gguf_header(g, 3, 2, extra_key ? 3 : 2);
    tw_gguf_kv_str(g, "general.type", "adapter");
    tw_gguf_kv_str(g, "adapter.type", "lora");
    if (extra_key) {
        tw_gguf_str(g, extra_key, strlen(extra_key));
        tw_u32(g, 9);
        tw_u32(g, 4);
        tw_u64(g, 2);
        tw_u32(g, 101);
        tw_u32(g, 102);
    }
    for (int t = 0; t < 2; t++) {
        char name[128];
        const int n = snprintf(name, sizeof name, "blk.%s.attn_q.weight.lora_%c", layer,
                               t ? 'b' : 'a');
        memcpy(name + n, suffix, suffix_len);
        tw_gguf_info(g, name, (size_t)n + suffix_len, t ? 4 : 16, t ? 16 : 4, 0, t ? 256 : 0);
    }
    tw_align(g, 32);
    tw_zeros(g, 512);
}

/* GGUF: adapter.alora.invocation_tokens (llama.cpp's activated LoRA) is UNSUPPORTED
 * naming the key; layer index 2^31 - 1 loads, 2^31 does not; a name with anything after
 * .lora_a (a character, a NUL) is refused. */
START_TEST(test_gguf_alora_and_names)
{
    fx_spec s = fx_default();
    s.targets = LORA_TARGET_Q;
    char *dir = fx_tmpdir();
    char *gpath = path_in(dir, "a.gguf");
    lora_config *cfg = fx_config(&s);
    static const struct {
        const char *layer, *extra_key, *suffix;
        size_t suffix_len;
        int want;
    } rows[] = {
        {"0", NULL, "", 0, LORA_OK},
        {"0", "adapter.alora.invocation_tokens", "", 0, LORA_ERR_UNSUPPORTED},
        {"0", "adapter.other.tokens", "", 0, LORA_OK},
        {"2147483647", NULL, "", 0, LORA_OK},
        {"2147483648", NULL, "", 0, LORA_ERR_UNSUPPORTED},
        {"0", NULL, "x", 1, LORA_ERR_UNSUPPORTED},
        {"0", NULL, "\0", 1, LORA_ERR_UNSUPPORTED},
    };
    tw_buf g = {0};
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        build_gguf(&g, rows[i].layer, rows[i].extra_key, rows[i].suffix, rows[i].suffix_len);
        tw_write(&g, gpath);
        const int st = try_load(1, gpath, cfg);
        ck_assert_msg(st == rows[i].want, "row %zu: status %d, want %d (%s)", i, st,
                      rows[i].want, lora_config_last_error(cfg));
        if (rows[i].extra_key && st != LORA_OK)
            ck_assert(strstr(lora_config_last_error(cfg), rows[i].extra_key) != NULL);
    }
    tw_free(&g);
    lora_config_destroy(cfg);
    fx_rmtree(dir);
    free(gpath);
    free(dir);
}
END_TEST

/* Layer 2^31 - 1 is the largest a set can hold, in both formats, both ways. */
START_TEST(test_layer_index_limit)
{
    fx_spec s = fx_default();
    lora_adapter *ad[1];
    int64_t layers[1];
    make_set(&s, ad, layers, 1);
    char *dir = fx_tmpdir();
    char *gpath = path_in(dir, "a.gguf");
    lora_config *cfg = fx_config(&s);
    for (int gguf = 0; gguf < 2; gguf++) {
        layers[0] = INT64_C(2147483648);
        ck_assert_int_eq(gguf ? lora_save_gguf(gpath, ad, layers, 1, NULL)
                              : lora_save_peft(dir, ad, layers, 1),
                         LORA_ERR_INVALID_ARG);
        layers[0] = INT64_C(2147483647);
        ck_assert_int_eq(gguf ? lora_save_gguf(gpath, ad, layers, 1, NULL)
                              : lora_save_peft(dir, ad, layers, 1),
                         LORA_OK);
        lora_adapter *got[1];
        int64_t l = 0;
        size_t n = 0;
        ck_assert_int_eq(gguf ? lora_load_gguf(got, &l, 1, &n, gpath, cfg)
                              : lora_load_peft(got, &l, 1, &n, dir, cfg),
                         LORA_OK);
        ck_assert(n == 1 && l == INT64_C(2147483647));
        lora_adapter_destroy(got[0]);
    }
    lora_config_destroy(cfg);
    free_set(ad, 1);
    fx_rmtree(dir);
    free(gpath);
    free(dir);
}
END_TEST

Suite *io_files_suite(void)
{
    Suite *s = suite_create("io_files");
    TCase *tc = tcase_create("paths");
    tcase_set_timeout(tc, 10);
    tcase_add_loop_test(tc, test_special_paths_refused, 0, 3);
    tcase_add_loop_test(tc, test_sparse_trailing_refused, 0, 2);
    tcase_add_loop_test(tc, test_sparse_ranges_only, 0, 2);
    suite_add_tcase(s, tc);
    tc = tcase_create("saves");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_torn_pair_refused);
    tcase_add_test(tc, test_save_keeps_mode);
    tcase_add_test(tc, test_save_through_symlinks);
    tcase_add_test(tc, test_failed_save_leaves_old_adapter);
    tcase_add_test(tc, test_gguf_padded_after_last_tensor);
    suite_add_tcase(s, tc);
    tc = tcase_create("parity");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_peft_config_parity);
    tcase_add_test(tc, test_safetensors_strict_names);
    tcase_add_test(tc, test_gguf_alora_and_names);
    tcase_add_test(tc, test_layer_index_limit);
    suite_add_tcase(s, tc);
    return s;
}
