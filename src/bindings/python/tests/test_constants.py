"""The binding's constants against include/lora.h: every enum of the header has a
Python class holding exactly its names and values, and the version macros match."""
import ctypes
import os
import re

import pytest

import lora
from lora import _core, _ffi


def _header_path():
    inc = os.environ.get("LORA_INCLUDE_DIR")
    if not inc:
        inc = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "..", "..", "..", "..", "include")
    return os.path.join(inc, "lora.h")


def _header():
    path = _header_path()
    if not os.path.exists(path):
        pytest.skip("lora.h not found at %s (set LORA_INCLUDE_DIR)" % path)
    with open(path) as f:
        text = f.read()
    # Comments mention names and values ("needs LORA_CFG_OUT_PROJ = 1"): drop them.
    return re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S)


def header_enums():
    """{C enum type name: {enumerator: value}} of every typedef enum in lora.h."""
    enums = {}
    for body, name in re.findall(r"typedef\s+enum\s+\w*\s*\{(.*?)\}\s*(\w+)\s*;",
                                 _header(), flags=re.S):
        members = {}
        for item in body.split(","):
            m = re.fullmatch(r"\s*(LORA_\w+)\s*=\s*(-?\d+)\s*", item)
            assert m, "%s: cannot parse enumerator %r" % (name, item)
            members[m.group(1)] = int(m.group(2))
        enums[name] = members
    return enums


# C enum type -> (Python class, prefix its members drop).
BINDING = {
    "lora_status": (lora.Status, ("LORA_ERR_", "LORA_")),
    "lora_config_param": (lora.Param, ("LORA_CFG_",)),
    "lora_target": (lora.Target, ("LORA_TARGET_",)),
    "lora_backend": (lora.Backend, ("LORA_BACKEND_",)),
    "lora_rope": (lora.Rope, ("LORA_ROPE_",)),
    "lora_compute": (lora.Compute, ("LORA_COMPUTE_",)),
    "lora_dtype": (lora.Dtype, ("LORA_DTYPE_",)),
    "lora_init": (lora.Init, ("LORA_INIT_",)),
    "lora_factor": (lora.Factor, ("LORA_",)),
    "lora_forward_flag": (lora.ForwardFlag, ("LORA_FWD_",)),
    "lora_optimizer_kind": (lora.OptimizerKind, ("LORA_OPTIMIZER_",)),
    "lora_optimizer_param": (lora.OptParam, ("LORA_OPT_",)),
}


def _python_name(c_name, prefixes):
    for p in prefixes:
        if c_name.startswith(p):
            return c_name[len(p):]
    raise AssertionError("%s has none of the prefixes %s" % (c_name, prefixes))


def test_header_parses():
    enums = header_enums()
    assert enums["lora_config_param"]["LORA_CFG_D_MODEL"] == 1
    assert len(enums) >= len(BINDING)


def test_every_header_enum_has_a_binding_class():
    missing = sorted(set(header_enums()) - set(BINDING))
    assert not missing, "lora.h enums without a Python class: %s" % missing


@pytest.mark.parametrize("c_enum", sorted(BINDING))
def test_enum_matches_header(c_enum):
    cls, prefixes = BINDING[c_enum]
    want = {_python_name(n, prefixes): v for n, v in header_enums()[c_enum].items()}
    have = {m.name: int(m.value) for m in cls}
    assert have == want, "%s (lora.h) vs lora.%s" % (c_enum, cls.__name__)


def test_version_macros_match_loaded_library():
    text = _header()
    nums = [int(re.search(r"#define\s+LORA_VERSION_%s\s+(\d+)" % k, text).group(1))
            for k in ("MAJOR", "MINOR", "PATCH")]
    assert lora.version() == "%d.%d.%d" % tuple(nums)
    assert lora.version_number() == nums[0] * 10000 + nums[1] * 100 + nums[2]


def test_double_params_are_the_librarys():
    """The binding sends each Param through set_double exactly when the library
    stores it as a double."""
    cfg = _ffi.ConfigP()
    assert _ffi.lib.lora_config_create(ctypes.byref(cfg)) == 0
    try:
        for p in lora.Param:
            v = ctypes.c_double()
            is_double = _ffi.lib.lora_config_get_double(cfg, int(p), ctypes.byref(v)) == 0
            assert is_double == (p in _core._DOUBLE_PARAMS), p
    finally:
        _ffi.lib.lora_config_destroy(cfg)
