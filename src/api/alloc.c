/* The allocator every buffer of the library comes from: the default one
 * (posix_memalign) or a user's lora_allocator, aligned to 64 bytes either way, and the
 * growable scratch buffers handles keep. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static void *default_alloc(void *opaque, size_t size)
{
    (void)opaque;
    void *p = NULL;
    /* 64-byte alignment: full cache lines and AVX-512 vectors for every buffer. The
     * extra 64 bytes absorb BLIS kernels' over-reads past an operand's last element
     * (harmless within a page, but memcheck reports them). */
    size_t rounded = (size + 127u) & ~(size_t)63u;
    if (rounded < size)
        return NULL;
    return posix_memalign(&p, 64, rounded) == 0 ? p : NULL;
}

static void default_free(void *opaque, void *ptr)
{
    (void)opaque;
    free(ptr);
}

const lora_mem lora_mem_default = {default_alloc, default_free, NULL, 0};

/* A user allocator (lora_allocator) promises no alignment: ask for size plus room to
 * align (and to store the user's pointer just before the aligned block) plus the same
 * 64-byte over-read pad as default_alloc. */
#define LORA_MEM_ALIGN 64u
#define LORA_MEM_EXTRA (3u * LORA_MEM_ALIGN) /* >= sizeof(void *) + 63 + 64 */

void *lora_mem_alloc(const lora_mem *m, size_t size)
{
    if (!m->wrap)
        return m->alloc(m->opaque, size);
    size_t total;
    if (__builtin_add_overflow(size, (size_t)LORA_MEM_EXTRA, &total))
        return NULL;
    unsigned char *raw = m->alloc(m->opaque, total);
    if (!raw)
        return NULL;
    const uintptr_t at = ((uintptr_t)raw + sizeof(void *) + LORA_MEM_ALIGN - 1) &
                         ~(uintptr_t)(LORA_MEM_ALIGN - 1);
    memcpy((void *)(at - sizeof(void *)), &raw, sizeof raw);
    return (void *)at;
}

void *lora_mem_calloc(const lora_mem *m, size_t count, size_t size)
{
    size_t bytes;
    if (__builtin_mul_overflow(count, size, &bytes))
        return NULL;
    void *p = lora_mem_alloc(m, bytes);
    if (p)
        memset(p, 0, bytes);
    return p;
}

void lora_mem_free(const lora_mem *m, void *ptr)
{
    if (!ptr)
        return;
    if (m->wrap) {
        void *raw;
        memcpy(&raw, (unsigned char *)ptr - sizeof(void *), sizeof raw);
        ptr = raw;
    }
    m->free(m->opaque, ptr);
}

int lora_buf_reserve(const lora_mem *m, lora_buf *b, size_t size)
{
    if (size <= b->size && b->ptr)
        return LORA_OK;
    void *p = lora_mem_alloc(m, size);
    if (!p)
        return LORA_ERR_NOMEM;
    lora_mem_free(m, b->ptr);
    b->ptr = p;
    b->size = size;
    return LORA_OK;
}

void lora_buf_free(const lora_mem *m, lora_buf *b)
{
    lora_mem_free(m, b->ptr);
    b->ptr = NULL;
    b->size = 0;
}
