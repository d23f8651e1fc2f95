"""Loading liblora and declaring its C functions for ctypes (private module).

The library is looked for, in order, at:
  1. $LORA_LIBRARY (a path to liblora.so; when set, nothing else is tried),
  2. the path recorded when the package was installed (lora/_install.py: $LORA_LIBRARY
     at install time, else pkg-config's libdir of lora, else the checkout's lib/),
  3. the build tree: lib/liblora.so of the checkout this package sits in (uninstalled),
  4. pkg-config: liblora.so.<major> in `pkg-config --variable=libdir lora`,
  5. the system loader: ctypes.util.find_library("lora"), then "liblora.so.<major>".
When none loads, ImportError lists every path tried and why it failed.
"""
import ctypes
import ctypes.util
import os
import shutil
import subprocess

#: Major version this binding was written for (the header's LORA_VERSION_MAJOR).
ABI_MAJOR = 0

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.normpath(os.path.join(_HERE, "..", "..", "..", ".."))
#: The build tree's library: <repo>/lib/liblora.so from <repo>/src/bindings/python/lora.
BUILD_TREE_LIBRARY = os.path.join(_REPO, "lib", "liblora.so")


class _Config(ctypes.Structure):
    """Opaque lora_config."""


class _Adapter(ctypes.Structure):
    """Opaque lora_adapter."""


ConfigP = ctypes.POINTER(_Config)
AdapterP = ctypes.POINTER(_Adapter)


class _Optimizer(ctypes.Structure):
    """Opaque lora_optimizer."""


OptimizerP = ctypes.POINTER(_Optimizer)


class _Tape(ctypes.Structure):
    """Opaque lora_tape."""


TapeP = ctypes.POINTER(_Tape)


class _KvCache(ctypes.Structure):
    """Opaque lora_kv_cache."""


KvCacheP = ctypes.POINTER(_KvCache)


class DecodeArgsC(ctypes.Structure):
    """struct lora_decode_args, field for field."""
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("n_tokens", ctypes.c_void_p),
        ("tenants", ctypes.POINTER(AdapterP)),
        ("n_tenants", ctypes.c_size_t),
        ("tenant_of_seq", ctypes.c_void_p),
    ]


class AttnArgsC(ctypes.Structure):
    """struct lora_attn_args, field for field (the mask pointers as void *)."""
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("q_lens", ctypes.c_void_p),
        ("kv_lens", ctypes.c_void_p),
        ("q_pos", ctypes.c_void_p),
        ("kv_pos", ctypes.c_void_p),
        ("q_seg", ctypes.c_void_p),
        ("kv_seg", ctypes.c_void_p),
        ("tape", TapeP),
    ]


class RunInfoC(ctypes.Structure):
    """struct lora_run_info, field for field."""
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("backend", ctypes.c_int32),
        ("poly_degree", ctypes.c_int64),
        ("poly_rank", ctypes.c_int64),
        ("error_bound", ctypes.c_double),
        ("grad_bound", ctypes.c_double),
        ("score_bound", ctypes.c_double),
        ("measured_out_error", ctypes.c_double),
        ("measured_dq_error", ctypes.c_double),
        ("poly_groups", ctypes.c_int64),
        ("loss_grad_bound", ctypes.c_double),
        ("attention_compute", ctypes.c_int32),
    ]


class SaveOptionsC(ctypes.Structure):
    """struct lora_save_options, field for field."""
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("base_model_name_or_path", ctypes.c_char_p),
        ("architecture", ctypes.c_char_p),
    ]


class ThresholdReportC(ctypes.Structure):
    """struct lora_threshold_report, field for field."""
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("recommended_backend", ctypes.c_int32),
        ("gamma_q", ctypes.c_double),
        ("gamma_k", ctypes.c_double),
        ("gamma_v", ctypes.c_double),
        ("gamma_ratio", ctypes.c_double),
        ("score_bound", ctypes.c_double),
        ("poly_degree", ctypes.c_int64),
        ("poly_rank", ctypes.c_int64),
        ("error_bound", ctypes.c_double),
        ("flops_exact", ctypes.c_double),
        ("flops_poly", ctypes.c_double),
        ("poly_groups", ctypes.c_int64),
    ]


_i = ctypes.c_int
_i64 = ctypes.c_int64
_u32 = ctypes.c_uint32
_sz = ctypes.c_size_t
_d = ctypes.c_double
_p = ctypes.c_void_p      # float * / const float *: numpy data pointers or None (NULL)
_s = ctypes.c_char_p

# name: (restype, argtypes). Every function of lora.h 0.1.0, the baseline.
_PROTOTYPES = {
    "lora_version_number": (_u32, []),
    "lora_version_string": (_s, []),
    "lora_status_string": (_s, [_i]),
    "lora_config_create": (_i, [ctypes.POINTER(ConfigP)]),
    "lora_config_destroy": (None, [ConfigP]),
    "lora_config_set_int": (_i, [ConfigP, _i, _i64]),
    "lora_config_set_double": (_i, [ConfigP, _i, _d]),
    "lora_config_get_int": (_i, [ConfigP, _i, ctypes.POINTER(_i64)]),
    "lora_config_get_double": (_i, [ConfigP, _i, ctypes.POINTER(_d)]),
    "lora_config_validate": (_i, [ConfigP]),
    "lora_config_last_error": (_s, [ConfigP]),
    "lora_adapter_create": (_i, [ctypes.POINTER(AdapterP), ConfigP]),
    "lora_adapter_destroy": (None, [AdapterP]),
    "lora_adapter_set_base": (_i, [AdapterP, _i, _p, _p]),
    "lora_adapter_set_param": (_i, [AdapterP, _i, _i, _p, _sz]),
    "lora_adapter_get_param": (_i, [AdapterP, _i, _i, _p, _sz]),
    "lora_adapter_get_grad": (_i, [AdapterP, _i, _i, _p, _sz]),
    "lora_adapter_param_shape": (_i, [AdapterP, _i, _i, ctypes.POINTER(_i64),
                                      ctypes.POINTER(_i64)]),
    "lora_adapter_zero_grad": (_i, [AdapterP]),
    "lora_adapter_get_config_int": (_i, [AdapterP, _i, ctypes.POINTER(_i64)]),
    "lora_adapter_get_config_double": (_i, [AdapterP, _i, ctypes.POINTER(_d)]),
    "lora_adapter_last_error": (_s, [AdapterP]),
    "lora_adapter_get_run_info": (_i, [AdapterP, ctypes.POINTER(RunInfoC)]),
    "lora_forward": (_i, [AdapterP, _p, _i64, _i64, _p]),
    "lora_backward": (_i, [AdapterP, _p, _p]),
    "lora_forward_cross": (_i, [AdapterP, _p, _p, _i64, _i64, _i64, _p]),
    "lora_backward_cross": (_i, [AdapterP, _p, _p, _p]),
    "lora_mse_loss": (_i, [_p, _p, _sz, ctypes.POINTER(_d), _p]),
    "lora_threshold_estimate": (_i, [AdapterP, _p, _i64, _i64,
                                     ctypes.POINTER(ThresholdReportC)]),
    "lora_optimizer_create": (_i, [ctypes.POINTER(OptimizerP), AdapterP, _i]),
    "lora_optimizer_destroy": (None, [OptimizerP]),
    "lora_optimizer_set_int": (_i, [OptimizerP, _i, _i64]),
    "lora_optimizer_set_double": (_i, [OptimizerP, _i, _d]),
    "lora_optimizer_get_int": (_i, [OptimizerP, _i, ctypes.POINTER(_i64)]),
    "lora_optimizer_get_double": (_i, [OptimizerP, _i, ctypes.POINTER(_d)]),
    "lora_optimizer_step": (_i, [OptimizerP, AdapterP]),
    "lora_optimizer_reset": (_i, [OptimizerP]),
    "lora_optimizer_last_error": (_s, [OptimizerP]),
    "lora_adapter_param_count": (_i, [AdapterP, ctypes.POINTER(_sz)]),
    "lora_adapter_get_params_flat": (_i, [AdapterP, _p, _sz]),
    "lora_adapter_set_params_flat": (_i, [AdapterP, _p, _sz]),
    "lora_adapter_get_grads_flat": (_i, [AdapterP, _p, _sz]),
    "lora_adapter_set_grads_flat": (_i, [AdapterP, _p, _sz]),
    "lora_adapter_merge": (_i, [AdapterP, _i, _p, _sz]),
    "lora_adapter_unmerge": (_i, [AdapterP, _i, _p, _sz]),
    "lora_forward_merged": (_i, [AdapterP, _p, _i64, _i64, _p]),
    "lora_forward_merged_cross": (_i, [AdapterP, _p, _p, _i64, _i64, _i64, _p]),
    "lora_adapter_set_base_borrowed": (_i, [AdapterP, _i, _p, _p]),
    "lora_adapter_copy_params": (_i, [AdapterP, AdapterP]),
    "lora_save_peft": (_i, [_s, ctypes.POINTER(AdapterP), ctypes.POINTER(_i64), _sz]),
    "lora_load_peft": (_i, [ctypes.POINTER(AdapterP), ctypes.POINTER(_i64), _sz,
                            ctypes.POINTER(_sz), _s, ConfigP]),
    "lora_save_gguf": (_i, [_s, ctypes.POINTER(AdapterP), ctypes.POINTER(_i64), _sz, _s]),
    "lora_load_gguf": (_i, [ctypes.POINTER(AdapterP), ctypes.POINTER(_i64), _sz,
                            ctypes.POINTER(_sz), _s, ConfigP]),
}

# Entry points of 0.2: declared when the loaded library exports them (has(name) tells);
# the Python API raises UnsupportedError otherwise.
_OPTIONAL_PROTOTYPES = {
    "lora_optimizer_create_set": (_i, [ctypes.POINTER(OptimizerP), ctypes.POINTER(AdapterP),
                                       _sz, _i]),
    "lora_optimizer_step_set": (_i, [OptimizerP, ctypes.POINTER(AdapterP), _sz]),
    "lora_mse_loss_mean": (_i, [_p, _p, _sz, ctypes.POINTER(_d), _p]),
    "lora_tape_create": (_i, [ctypes.POINTER(TapeP), AdapterP]),
    "lora_tape_destroy": (None, [TapeP]),
    "lora_forward_ex": (_i, [AdapterP, ctypes.POINTER(AttnArgsC), _p, _p, _i64, _i64, _i64,
                             _p]),
    "lora_backward_ex": (_i, [AdapterP, TapeP, _p, _p, _p]),
    "lora_adapter_borrow_factor": (_i, [AdapterP, _i, _i, _p, _p, _sz]),
    "lora_save_peft_ex": (_i, [_s, ctypes.POINTER(AdapterP), ctypes.POINTER(_i64), _sz,
                               ctypes.POINTER(SaveOptionsC)]),
    "lora_save_gguf_ex": (_i, [_s, ctypes.POINTER(AdapterP), ctypes.POINTER(_i64), _sz,
                               ctypes.POINTER(SaveOptionsC)]),
    "lora_adapter_set_rope_freqs": (_i, [AdapterP, _p, _sz]),
    "lora_kv_cache_create": (_i, [ctypes.POINTER(KvCacheP), AdapterP, _i64, _i64]),
    "lora_kv_cache_destroy": (None, [KvCacheP]),
    "lora_kv_cache_reset": (_i, [KvCacheP, _i64]),
    "lora_kv_cache_length": (_i, [KvCacheP, _i64, ctypes.POINTER(_i64)]),
    "lora_decode": (_i, [AdapterP, KvCacheP, _p, _i64, _p]),
    "lora_decode_ex": (_i, [AdapterP, ctypes.POINTER(DecodeArgsC), KvCacheP, _p, _i64, _p]),
    "lora_adapter_set_base_typed": (_i, [AdapterP, _i, _p, _i, _p, _u32]),
    "lora_apply": (_i, [ctypes.POINTER(AdapterP), _sz, _i, _p, _p, _i64, _p]),
    "lora_apply_with_error": (_i, [ctypes.POINTER(AdapterP), _sz, _i, _p, _p, _i64, _p,
                                   ctypes.c_char_p, _sz]),
    "lora_threshold_estimate_ex": (_i, [AdapterP, ctypes.POINTER(AttnArgsC), _p, _i64, _i64,
                                        ctypes.POINTER(ThresholdReportC)]),
    # Declared for completeness; the package does not plug allocators (docs/python.md).
    "lora_config_create_with_allocator": (_i, [ctypes.POINTER(ConfigP), _p]),
}


def _installed_library():
    """The path recorded at install time, or None (running from a checkout)."""
    try:
        from . import _install
    except ImportError:
        return None
    return getattr(_install, "LIBRARY", None) or None


def _pkg_config_library():
    """liblora.so.<major> in pkg-config's libdir of lora, or None."""
    if not shutil.which("pkg-config"):
        return None
    try:
        libdir = subprocess.run(["pkg-config", "--variable=libdir", "lora"],
                                capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return os.path.join(libdir, "liblora.so.%d" % ABI_MAJOR) if libdir else None


def _candidates():
    """[(where, path)] in the order tried."""
    env = os.environ.get("LORA_LIBRARY")
    if env:
        return [("$LORA_LIBRARY", env)]
    out = []
    installed = _installed_library()
    if installed:
        out.append(("recorded at install", installed))
    if os.path.exists(os.path.join(_REPO, "include", "lora.h")):  # a checkout
        out.append(("build tree", BUILD_TREE_LIBRARY))
    pc = _pkg_config_library()
    if pc:
        out.append(("pkg-config lora", pc))
    found = ctypes.util.find_library("lora")
    if found:
        out.append(("find_library", found))
    out.append(("system loader", "liblora.so.%d" % ABI_MAJOR))
    return out


def _load():
    tried = []
    for where, path in _candidates():
        if os.path.sep in path and not os.path.exists(path):
            tried.append("%s: %s (no such file)" % (where, path))
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            tried.append("%s: %s (%s)" % (where, path, e))
            continue
        return lib, path
    raise ImportError("lora: cannot load liblora; tried: " + "; ".join(tried) +
                      ". Build it with `make` (and `make install`), or set "
                      "LORA_LIBRARY=/path/to/liblora.so")


lib, library_path = _load()

for _name, (_res, _args) in _PROTOTYPES.items():
    _f = getattr(lib, _name)
    _f.restype = _res
    _f.argtypes = _args

for _name, (_res, _args) in _OPTIONAL_PROTOTYPES.items():
    if hasattr(lib, _name):
        _f = getattr(lib, _name)
        _f.restype = _res
        _f.argtypes = _args

_major = lib.lora_version_number() // 10000
if _major != ABI_MAJOR:
    raise ImportError("lora: %s is version %s, this binding needs major version %d"
                      % (library_path, lib.lora_version_string().decode(), ABI_MAJOR))


def has(name):
    """True when the loaded library exports the C function `name` (entry points of 0.2
    may be missing from an older library)."""
    return hasattr(lib, name)
