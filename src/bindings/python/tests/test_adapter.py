"""Behaviour of the Adapter class: configuration, parameters, compute, reports."""
import ctypes
import gc
import os
import subprocess
import sys

import numpy as np
import pytest

import lora
import reference


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_version():
    v = lora.version()
    major, minor, patch = (int(p) for p in v.split("."))
    assert lora.version_number() == major * 10000 + minor * 100 + patch
    assert lora.__version__ == v
    assert lora.status_string(0) == "ok"
    assert lora.status_string(lora.Status.SHAPE) != lora.status_string(lora.Status.STATE)
    assert lora.status_string(12345) == "unknown status"


def test_enum_values_match_header():
    assert (lora.Target.Q, lora.Target.K, lora.Target.V, lora.Target.O) == (1, 2, 4, 8)
    assert (lora.Backend.AUTO, lora.Backend.EXACT, lora.Backend.POLY) == (0, 1, 2)
    assert lora.Param.MEASURE_ROWS == 18 and lora.Param.D_MODEL == 1
    assert lora.Status.TOLERANCE == 9 and lora.Factor.B == 1


def test_struct_layout_matches_library():
    from lora import _ffi
    # The library writes back min(struct_size, sizeof(its struct)): ask with a big one.
    with lora.Adapter(d_model=4) as ad:
        buf = (ctypes.c_ubyte * 512)()
        info = ctypes.cast(buf, ctypes.POINTER(_ffi.RunInfoC)).contents
        info.struct_size = 512
        assert lora._ffi.lib.lora_adapter_get_run_info(ad._handle, ctypes.byref(info)) == 0
        assert info.struct_size == ctypes.sizeof(_ffi.RunInfoC) == 88
        assert info.measured_out_error == -1.0 and info.measured_dq_error == -1.0
        assert info.poly_groups == 0 and info.loss_grad_bound == 0.0
    ad, _ = reference.make_layer(np.random.default_rng(0), d_model=4)
    buf = (ctypes.c_ubyte * 512)()
    rep = ctypes.cast(buf, ctypes.POINTER(_ffi.ThresholdReportC)).contents
    rep.struct_size = 512
    x = np.ones((1, 3, 4), dtype=np.float32)
    assert _ffi.lib.lora_threshold_estimate(ad._handle, x.ctypes.data, 1, 3,
                                            ctypes.byref(rep)) == 0
    assert rep.struct_size == ctypes.sizeof(_ffi.ThresholdReportC) == 96
    assert rep.flops_exact > 0 and rep.recommended_backend in (1, 2)


def test_config_defaults_and_readback():
    with lora.Adapter(d_model=16, n_heads=4) as ad:
        c = ad.config
        assert c["head_dim"] == 4 and c["n_kv_heads"] == 4 and c["rank"] == 8
        assert c["alpha"] == 8.0 and c["targets"] == 5 and ad.targets == "qv"
        assert c["softmax_scale"] == pytest.approx(0.5)
        assert c["threads"] >= 1
        assert ad.q_dim == ad.kv_dim == ad.out_dim == 16
    with lora.Adapter(d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, targets="qkvo",
                      out_proj=True, rank=3, alpha=6, rslora=1, backend="poly",
                      init="gaussian", seed=7, tolerance=1e-2, causal=True) as ad:
        assert (ad.q_dim, ad.kv_dim, ad.out_dim) == (32, 16, 16)
        assert ad.targets == "qkvo"
        assert ad.get_config("backend") == lora.Backend.POLY
        assert ad.get_config(lora.Param.INIT) == lora.Init.GAUSSIAN
        assert ad.get_config("tolerance") == pytest.approx(1e-2)
        assert ad.param_shape("q", "A") == (3, 16) and ad.param_shape("o", "B") == (16, 3)
        assert ad.param_shape(lora.Target.K, lora.Factor.B) == (16, 3)
    assert lora.Adapter(16, targets=["q", "k"]).targets == "qk"
    assert lora.Adapter(16, targets=lora.Target.V | lora.Target.K).targets == "kv"


def test_unknown_keyword():
    with pytest.raises(TypeError):
        lora.Adapter(d_model=8, ranks=2)


def test_init_is_seeded_and_b_zero():
    a1 = lora.Adapter(d_model=8, rank=2, seed=3)
    a2 = lora.Adapter(d_model=8, rank=2, seed=3)
    a3 = lora.Adapter(d_model=8, rank=2, seed=4)
    assert np.array_equal(a1.param("q", "A"), a2.param("q", "A"))
    assert not np.array_equal(a1.param("q", "A"), a3.param("q", "A"))
    assert np.all(a1.param("q", "B") == 0)
    assert np.all(np.abs(a1.param("v", "A")) <= 1 / np.sqrt(8))
    assert np.all(lora.Adapter(d_model=8, init="zero").param("q", "A") == 0)


def test_params_roundtrip(rng):
    with lora.Adapter(d_model=8, rank=2, targets="qkv") as ad:
        new = {k: rng.standard_normal(v.shape).astype(np.float32)
               for k, v in ad.params.items()}
        assert sorted(new) == ["k.A", "k.B", "q.A", "q.B", "v.A", "v.B"]
        ad.params = new
        for k, v in ad.params.items():
            assert v.dtype == np.float32 and np.array_equal(v, new[k])
        # Fortran order and flat float32 inputs are accepted; float64 is refused
        f = np.asfortranarray(rng.standard_normal((8, 2)).astype(np.float32))
        ad.set_param("k", "B", f)
        assert np.array_equal(ad.param("k", "B"), f)
        ad.set_param("k", "B", f.ravel())
        with pytest.raises(lora.DtypeError, match="value is float64"):
            ad.set_param("k", "B", f.astype(np.float64))
        assert np.array_equal(ad.param("k", "B"), f)
        # out= receives the copy in place
        buf = np.zeros((2, 8), dtype=np.float32)
        assert ad.param("q", "A", out=buf) is buf
        assert np.array_equal(buf, new["q.A"])


def test_as_f32_zero_copy():
    a = np.zeros((3, 4), dtype=np.float32)
    assert lora.as_f32(a) is a
    assert lora.as_f32(a.T) is not a.T and lora.as_f32(a.T).flags.c_contiguous
    assert lora.as_f32([[1, 2]]).dtype == np.float32  # plain sequences are converted
    for dtype in (np.float64, np.float16, np.int32):
        with pytest.raises(lora.DtypeError, match="x is " + np.dtype(dtype).name):
            lora.as_f32(a.astype(dtype), "x")
    with pytest.raises(TypeError):  # DtypeError is a TypeError and a LoraError
        lora.as_f32(np.float64(1.0))


def test_forward_shapes_and_out_buffer(rng):
    ad, P = reference.make_layer(rng, d_model=8, n_heads=2, rank=2)
    x = rng.standard_normal((3, 5, 8)).astype(np.float32)
    out = ad.forward(x)
    assert out.shape == (3, 5, 8) and out.dtype == np.float32
    assert np.allclose(out, reference.forward(ad, P, x.astype(np.float64)), atol=2e-5)
    # (L, d_model) is batch 1
    o2 = ad.forward(x[1])
    assert o2.shape == (5, 8) and np.allclose(o2, out[1], atol=1e-6)
    # out= is written in place
    buf = np.empty((3, 5, 8), dtype=np.float32)
    assert ad.forward(x, out=buf) is buf and np.array_equal(buf, out)
    # a non-contiguous x gives the same result; float64 is refused, not cast
    xt = np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2)
    assert not xt.flags.c_contiguous
    assert np.array_equal(ad.forward(xt), out)
    with pytest.raises(lora.DtypeError, match="x is float64"):
        ad.forward(x.astype(np.float64))


def test_backward_accumulates_and_zero_grad(rng):
    ad, _ = reference.make_layer(rng, d_model=8, n_heads=2, rank=2)
    x = rng.standard_normal((2, 4, 8)).astype(np.float32)
    out = ad.forward(x)
    _, dout = lora.mse_loss(out, np.zeros_like(out))
    dx = ad.backward(dout)
    assert dx.shape == x.shape
    g1 = ad.grads
    assert ad.backward(dout, need_dx=False) is None
    g2 = ad.grads
    for k in g1:
        assert np.allclose(g2[k], 2 * g1[k], rtol=1e-5, atol=1e-6)
    ad.zero_grad()
    assert all(np.all(g == 0) for g in ad.grads.values())


def test_mse_loss():
    out = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    t = np.array([[0.0, 2.0], [1.0, 8.0]], np.float32)
    loss, dout = lora.mse_loss(out, t)
    assert loss == pytest.approx(0.5 * (1 + 0 + 4 + 16))
    assert np.array_equal(dout, np.array([[1, 0], [2, -4]], dtype=np.float32))
    assert lora.mse_loss(out, t, want_dout=False)[1] is None


def test_cross_attention(rng):
    ad, P = reference.make_layer(rng, d_model=8, n_heads=2, rank=2, causal=True,
                                 targets="qkv")
    xq = rng.standard_normal((2, 3, 8)).astype(np.float32)
    xkv = rng.standard_normal((2, 6, 8)).astype(np.float32)
    out = ad.forward_cross(xq, xkv)
    assert out.shape == (2, 3, 8)
    ref = reference.forward(ad, P, xq.astype(np.float64), xkv.astype(np.float64))
    assert np.allclose(out, ref, atol=2e-5)
    dxq, dxkv = ad.backward_cross(np.ones_like(out))
    assert dxq.shape == xq.shape and dxkv.shape == xkv.shape
    assert ad.backward_cross(np.ones_like(out), need_dx=False) is None


def test_run_info_and_threshold(rng):
    ad, _ = reference.make_layer(rng, d_model=8, n_heads=2, rank=2)
    assert ad.run_info.backend == 0
    x = rng.standard_normal((1, 16, 8)).astype(np.float32)
    ad.forward(x)
    info = ad.run_info
    assert info.backend == lora.Backend.EXACT and info.poly_degree == 0
    assert info.error_bound == 0 and info.score_bound > 0
    assert info.measured_out_error == -1
    assert set(info.asdict()) >= {"backend", "grad_bound", "measured_dq_error"}
    rep = ad.threshold_estimate(x)
    assert rep.recommended_backend in (lora.Backend.EXACT, lora.Backend.POLY)
    assert rep.score_bound == pytest.approx(info.score_bound, rel=1e-6)
    assert rep.gamma_q > 0 and rep.gamma_ratio > 0 and rep.flops_exact > 0
    # the estimate leaves the saved forward alone: backward still works
    ad.backward(np.ones((1, 16, 8), dtype=np.float32), need_dx=False)


def test_poly_backend_reports(rng):
    # narrow heads, small scores: POLY at a forced degree, with a measured error
    ad, P = reference.make_layer(rng, d_model=4, n_heads=2, rank=2, backend="poly",
                                 poly_degree=4, measure_rows=4)
    x = (0.3 * rng.standard_normal((1, 32, 4))).astype(np.float32)
    out = ad.forward(x)
    info = ad.run_info
    assert info.backend == lora.Backend.POLY and info.poly_degree == 4
    assert info.poly_rank == 15  # binom(4 + 2, 2)
    assert info.error_bound > 0 and info.measured_out_error >= 0
    ref = reference.forward(ad, P, x.astype(np.float64))
    assert np.max(np.abs(out - ref)) <= 10 * info.error_bound * np.max(np.abs(ref)) + 1e-5
    ad.backward(np.ones_like(out), need_dx=False)
    assert ad.run_info.grad_bound > 0


def test_context_manager_and_close():
    with lora.Adapter(d_model=4) as ad:
        assert not ad.closed
    assert ad.closed and "closed" in repr(ad)
    ad.close()  # idempotent
    with pytest.raises(lora.StateError):
        ad.param("q", "A")
    a = lora.Adapter(d_model=4)
    del a
    gc.collect()


def test_base_replacement_drops_forward(rng):
    ad, P = reference.make_layer(rng, d_model=8, rank=2)
    x = rng.standard_normal((1, 3, 8)).astype(np.float32)
    ad.forward(x)
    ad.set_base("q", P["Wq"].astype(np.float32))
    with pytest.raises(lora.StateError):
        ad.backward(np.ones((1, 3, 8), dtype=np.float32))


def test_library_search_order(monkeypatch):
    from lora import _ffi
    monkeypatch.setenv("LORA_LIBRARY", "/somewhere/liblora.so")
    assert _ffi._candidates() == [("$LORA_LIBRARY", "/somewhere/liblora.so")]
    monkeypatch.delenv("LORA_LIBRARY")
    monkeypatch.setattr(_ffi, "_installed_library", lambda: "/opt/lora/liblora.so.0")
    monkeypatch.setattr(_ffi, "_pkg_config_library", lambda: "/usr/local/lib/liblora.so.0")
    c = _ffi._candidates()
    where = [w for w, _ in c]
    checkout = os.path.exists(os.path.join(_ffi._REPO, "include", "lora.h"))
    want = ["recorded at install"] + (["build tree"] if checkout else []) + ["pkg-config lora"]
    assert where[:len(want)] == want
    assert c[0][1] == "/opt/lora/liblora.so.0" and c[-1] == ("system loader", "liblora.so.0")
    assert _ffi.BUILD_TREE_LIBRARY.endswith("lib/liblora.so")


def test_load_error_names_every_path_tried(monkeypatch):
    from lora import _ffi
    monkeypatch.setattr(_ffi, "_candidates", lambda: [
        ("recorded at install", "/nonexistent/liblora.so.0"),
        ("system loader", "liblora-not-a-library.so.9")])
    with pytest.raises(ImportError) as e:
        _ffi._load()
    msg = str(e.value)
    assert "recorded at install: /nonexistent/liblora.so.0 (no such file)" in msg
    assert "system loader: liblora-not-a-library.so.9 (" in msg
    assert "LORA_LIBRARY" in msg


def test_import_fails_clearly_without_a_library():
    env = dict(os.environ, LORA_LIBRARY="/nonexistent/liblora.so",
               PYTHONPATH=os.path.dirname(os.path.dirname(lora.__file__)))
    r = subprocess.run([sys.executable, "-c", "import lora"], env=env, capture_output=True,
                       text=True)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "/nonexistent/liblora.so (no such file)" in r.stderr


def test_rope_freqs_zero_table_is_no_rope(rng):
    """A RoPE table of zeros turns nothing: the output equals the layer without RoPE;
    a table of the wrong length or a negative value is refused."""
    x = rng.uniform(-1, 1, (2, 5, 8)).astype(np.float32)
    plain, _ = reference.make_layer(np.random.default_rng(7), d_model=8, n_heads=2)
    rope, _ = reference.make_layer(np.random.default_rng(7), d_model=8, n_heads=2,
                                   rope=lora.Rope.INTERLEAVED)
    with plain, rope:
        want = plain.forward(x)
        assert not np.array_equal(rope.forward(x), want)
        rope.set_rope_freqs([0.0, 0.0])
        np.testing.assert_array_equal(rope.forward(x), want)
        with pytest.raises(lora.InvalidArgumentError):
            rope.set_rope_freqs([1.0, 0.5, 0.25])
        with pytest.raises(lora.InvalidArgumentError):
            rope.set_rope_freqs([1.0, -0.5])
        with pytest.raises(lora.InvalidArgumentError):
            plain.set_rope_freqs([1.0, 0.5])
