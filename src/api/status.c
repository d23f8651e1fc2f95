/* Version, status strings and error messages. */
#include <stdio.h>

#include <string.h>

#include "internal.h"

#define LORA_STR2(x) #x
#define LORA_STR(x) LORA_STR2(x)

LORA_API uint32_t lora_version_number(void) { return LORA_VERSION_NUMBER; }

LORA_API const char *lora_version_string(void)
{
    return LORA_STR(LORA_VERSION_MAJOR) "." LORA_STR(LORA_VERSION_MINOR) "." LORA_STR(
        LORA_VERSION_PATCH);
}

LORA_API const char *lora_status_string(int status)
{
    switch (status) {
    case LORA_OK: return "ok";
    case LORA_ERR_INVALID_ARG: return "invalid argument";
    case LORA_ERR_SHAPE: return "inconsistent or too large dimensions";
    case LORA_ERR_NOMEM: return "out of memory";
    case LORA_ERR_NONFINITE: return "non-finite value (NaN or Inf) in input";
    case LORA_ERR_UNSUPPORTED: return "unsupported by this build or backend";
    case LORA_ERR_STATE: return "call out of order";
    case LORA_ERR_IO: return "input/output error";
    case LORA_ERR_FORMAT: return "malformed file";
    case LORA_ERR_TOLERANCE: return "tolerance cannot be met by the approximate backend";
    default: return "unknown status";
    }
}

int lora_set_error(char *err, int status, const char *fmt, ...)
{
    if (!err)
        return status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, LORA_ERRMSG_SIZE, fmt, ap);
    va_end(ap);
    return status;
}

int lora_read_args_struct(char *err, const void *args, uint32_t struct_size, void *dst,
                          size_t known, size_t first, const char *type)
{
    memset(dst, 0, known);
    if (!args)
        return LORA_OK;
    const size_t size = struct_size;
    if (size < first)
        return lora_set_error(err, LORA_ERR_INVALID_ARG,
                              "args->struct_size = %zu is smaller than the first version "
                              "(%zu bytes): set it to sizeof(%s)",
                              size, first, type);
    const unsigned char *bytes = args;
    for (size_t i = known; i < size; i++)
        if (bytes[i])
            return lora_set_error(err, LORA_ERR_UNSUPPORTED,
                                  "args->struct_size = %zu: byte %zu is set, beyond the %zu "
                                  "bytes of %s this library knows",
                                  size, i, known, type);
    memcpy(dst, args, size < known ? size : known);
    return LORA_OK;
}
