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

/* ---- helpers ---------------------------------------------------------------------- */

static char *path_in(const char *dir, const char *file)
{
    char *p = malloc(strlen(dir) + strlen(file) + 2);
    sprintf(p, "%s/%s", dir, file);
    return p;
}

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

Suite *io_files_suite(void)
{
    Suite *s = suite_create("io_files");
    TCase *tc = tcase_create("paths");
    tcase_set_timeout(tc, 10);
    tcase_add_loop_test(tc, test_special_paths_refused, 0, 3);
    suite_add_tcase(s, tc);
    return s;
}
