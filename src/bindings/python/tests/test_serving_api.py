"""Typed (bf16/f16) bases, multi-tenant lora.apply, threshold_estimate_ex, and that the
binding declares every function of include/lora.h."""
import gc
import os
import re

import numpy as np
import pytest

import lora
from lora import _ffi
import reference

CFG = dict(d_model=32, n_heads=2, rank=4, targets="qv", threads=1, backend="exact")
HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "..",
                      "include", "lora.h")


def need(name):
    if not lora.has(name):
        pytest.skip("the loaded liblora has no " + name)


def bf16_bits(w):
    """float32 -> bfloat16 bit patterns, rounded to nearest even."""
    u = w.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_header_functions_all_declared():
    """Every LORA_API function of lora.h has a ctypes prototype (parsed from the header,
    so a new C function without a binding fails here)."""
    if not os.path.exists(HEADER):
        pytest.skip("include/lora.h not next to the package (installed test)")
    text = open(HEADER).read()
    names = set(re.findall(r"LORA_API\b[^;(]*?\b(lora_\w+)\s*\(", text))
    assert len(names) > 60, "parsed only %d functions from lora.h" % len(names)
    declared = set(_ffi._PROTOTYPES) | set(_ffi._OPTIONAL_PROTOTYPES)
    assert sorted(names - declared) == []


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("borrow", [False, True])
def test_typed_base_equals_float_base_of_rounded_values(dtype, borrow):
    need("lora_adapter_set_base_typed")
    rng = np.random.default_rng(11)
    ad, P = reference.make_layer(rng, **CFG)
    w = (rng.standard_normal(ad.base_shape("q")) * 0.4).astype(np.float32)
    bias = (rng.standard_normal(ad.base_shape("q")[0]) * 0.1).astype(np.float32)
    if dtype == "bf16":
        bits = bf16_bits(w)
        rounded = bf16_values(bits)
    else:
        bits = w.astype(np.float16).view(np.uint16)
        rounded = w.astype(np.float16).astype(np.float32)
    assert not np.array_equal(rounded, w)  # the rounding is visible
    x = rng.standard_normal((2, 5, 32)).astype(np.float32)
    with ad:
        ad.set_base("q", rounded, bias)
        want = ad.forward(x, out=None).copy()
        ad.set_base_typed("q", bits.copy(), dtype, bias=bias.copy(), borrow=borrow)
        gc.collect()  # a borrowed array lives on in the adapter
        got = ad.forward(x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        ad.set_base_typed("q", w, lora.Dtype.F32, bias=bias)
        assert not np.allclose(ad.forward(x), want, rtol=1e-6, atol=1e-6)


def test_typed_base_errors():
    need("lora_adapter_set_base_typed")
    with lora.Adapter(**CFG) as ad:
        w = np.zeros(ad.base_shape("q"), np.float32)
        with pytest.raises(lora.DtypeError):
            ad.set_base_typed("q", w, "bf16")  # float32 where bit patterns are needed
        with pytest.raises(lora.ShapeError):
            ad.set_base_typed("q", np.zeros((3, 3), np.uint16), "bf16")
        with pytest.raises(lora.UnsupportedError):
            ad.set_base_typed("q", np.zeros(ad.base_shape("q"), np.uint16), 9)
        bad = np.full(ad.base_shape("q"), 0x7FC0, np.uint16)  # bf16 NaN
        with pytest.raises(lora.NonFiniteError):
            ad.set_base_typed("q", bad, lora.Dtype.BF16)


def tenants_of_ranks(rng, ranks, alphas):
    out = []
    for r, a in zip(ranks, alphas):
        ad = lora.Adapter(d_model=32, n_heads=2, rank=r, alpha=a, targets="qv", threads=1)
        for t in ad.targets:
            for f in "AB":
                ad.set_param(t, f, rng.standard_normal(ad.param_shape(t, f))
                             .astype(np.float32) * 0.3)
        out.append(ad)
    return out


def test_apply_equals_numpy_reference():
    need("lora_apply_with_error")
    rng = np.random.default_rng(5)
    tenants = tenants_of_ranks(rng, [2, 4, 8], [4.0, 8.0, 3.0])
    ids = np.array([2, -1, 0, 1, 2, -1, 0, 0, 1], np.int32)
    x = rng.standard_normal((len(ids), 32)).astype(np.float32)
    y0 = rng.standard_normal((len(ids), 32)).astype(np.float32)
    want = y0.astype(np.float64)
    for r, t in enumerate(ids):
        if t >= 0:
            ad = tenants[t]
            A = ad.param("v", "A").astype(np.float64)
            B = ad.param("v", "B").astype(np.float64)
            want[r] += reference.scale(ad) * (x[r] @ A.T) @ B.T
    y = y0.copy()
    assert lora.apply(tenants, "v", ids, x, y) is y
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[ids == -1], y0[ids == -1])
    for ad in tenants:
        ad.close()


def test_apply_error_message_and_y_unchanged():
    need("lora_apply_with_error")
    rng = np.random.default_rng(6)
    tenants = tenants_of_ranks(rng, [2, 4], [2.0, 4.0])
    x = rng.standard_normal((3, 32)).astype(np.float32)
    y = np.ones((3, 32), np.float32)
    with pytest.raises(lora.InvalidArgumentError) as e:
        lora.apply(tenants, "q", np.array([0, 2, 1]), x, y)  # tenant 2 does not exist
    assert "tenant" in str(e.value)
    assert e.value.args and str(e.value).strip()
    np.testing.assert_array_equal(y, 1.0)
    with pytest.raises(lora.InvalidArgumentError):
        lora.apply(tenants, "k", np.array([0, 1, 1]), x, y)  # k is not adapted
    with pytest.raises(lora.ShapeError):
        lora.apply(tenants, "q", np.array([0, 1]), x, y)
    for ad in tenants:
        ad.close()


def test_threshold_estimate_ex_with_lengths_equals_estimate_on_valid_rows():
    need("lora_threshold_estimate_ex")
    rng = np.random.default_rng(8)
    ad, _ = reference.make_layer(rng, **CFG)
    with ad:
        x = rng.standard_normal((2, 9, 32)).astype(np.float32)
        want = ad.threshold_estimate(x[:, :6])
        padded = x.copy()
        padded[:, 6:] = 1e3  # padding must not count
        got = ad.threshold_estimate_ex(padded, q_lens=[6, 6])
        for k in ("gamma_q", "gamma_k", "gamma_v", "score_bound", "flops_exact"):
            assert getattr(got, k) == pytest.approx(getattr(want, k), rel=1e-6), k
        assert got.recommended_backend == want.recommended_backend
        assert ad.threshold_estimate_ex(x) == ad.threshold_estimate(x)
        assert ad.threshold_estimate_ex(padded).gamma_q > want.gamma_q
        with pytest.raises(lora.ShapeError):
            ad.threshold_estimate_ex(x, q_lens=[6])
