"""Errors: each carries the status code and the library's message."""
import numpy as np
import pytest

import lora
import reference


def test_error_attributes():
    with pytest.raises(lora.LoraError) as e:
        lora.Adapter(d_model=8, n_heads=3)
    err = e.value
    assert isinstance(err, lora.InvalidArgumentError) and isinstance(err, ValueError)
    assert err.status == lora.Status.INVALID_ARG == 1
    assert "N_HEADS" in err.message and err.function == "lora_adapter_create"
    assert "INVALID_ARG" in str(err)


def test_config_setter_errors():
    with pytest.raises(lora.InvalidArgumentError) as e:
        lora.Adapter(d_model=-1)
    assert e.value.function == "lora_config_set_int" and "d_model" in e.value.message
    with pytest.raises(lora.NonFiniteError):
        lora.Adapter(d_model=8, alpha=float("nan"))
    with pytest.raises(lora.InvalidArgumentError):
        lora.Adapter(d_model=8, backend="fast")
    with pytest.raises(lora.InvalidArgumentError):
        lora.Adapter(d_model=8, targets="qx")
    with pytest.raises(lora.InvalidArgumentError):
        lora.Adapter(d_model=8, targets="o")  # O without out_proj
    with pytest.raises(lora.InvalidArgumentError):
        lora.Adapter()  # D_MODEL is required


def test_forward_before_base_is_state_error():
    with lora.Adapter(d_model=8) as ad:
        with pytest.raises(lora.StateError) as e:
            ad.forward(np.zeros((1, 2, 8), dtype=np.float32))
        assert e.value.status == lora.Status.STATE
        assert "W_Q" in e.value.message and ad.last_error == e.value.message


def test_nonfinite_input():
    ad, _ = reference.make_layer(np.random.default_rng(0), d_model=8, rank=2)
    x = np.zeros((1, 3, 8), dtype=np.float32)
    x[0, 1, 2] = np.nan
    with pytest.raises(lora.NonFiniteError) as e:
        ad.forward(x)
    assert "index 10" in e.value.message
    with pytest.raises(lora.NonFiniteError):
        ad.set_param("q", "A", np.full((2, 8), np.inf, np.float32))
    with pytest.raises(lora.NonFiniteError):
        ad.set_base("k", np.full((8, 8), np.nan, np.float32))


def test_param_errors():
    with lora.Adapter(d_model=8, rank=2) as ad:
        with pytest.raises(lora.InvalidArgumentError) as e:
            ad.set_param("q", "A", np.zeros(15, np.float32))
        assert e.value.function == "lora_adapter_set_param" and e.value.message
        with pytest.raises(lora.InvalidArgumentError) as e:
            ad.param("k", "A")  # K not adapted
        assert "not adapted" in e.value.message
        with pytest.raises(lora.InvalidArgumentError):
            ad.param("x", "A")
        with pytest.raises(lora.InvalidArgumentError):
            ad.param("q", "C")
        with pytest.raises(lora.InvalidArgumentError):
            ad.grad("q", 7)
        with pytest.raises(lora.ShapeError):
            ad.param("q", "A", out=np.zeros((8, 2), dtype=np.float32))
        with pytest.raises(lora.InvalidArgumentError):
            ad.param("q", "A", out=np.zeros((2, 8), dtype=np.float64))


def test_binding_shape_checks():
    ad, _ = reference.make_layer(np.random.default_rng(0), d_model=8, rank=2)
    with pytest.raises(lora.ShapeError):
        ad.set_base("q", np.zeros((8, 7), np.float32))
    with pytest.raises(lora.ShapeError):
        ad.set_base("q", np.zeros((8, 8), np.float32), bias=np.zeros(9, np.float32))
    with pytest.raises(lora.ShapeError):
        ad.forward(np.zeros((1, 3, 7), np.float32))
    with pytest.raises(lora.ShapeError):
        ad.forward(np.zeros(8, np.float32))
    with pytest.raises(lora.ShapeError):
        ad.forward(np.zeros((1, 0, 8), np.float32))
    with pytest.raises(lora.ShapeError):
        ad.forward(np.zeros((1, 3, 8), np.float32), out=np.zeros((1, 3, 7), np.float32))
    out = ad.forward(np.zeros((2, 3, 8), np.float32))
    with pytest.raises(lora.ShapeError):
        ad.backward(np.zeros((2, 2, 8), np.float32))
    ad.backward(out)
    with pytest.raises(lora.ShapeError):
        ad.forward_cross(np.zeros((2, 3, 8), np.float32), np.zeros((1, 3, 8), np.float32))


def test_backward_out_of_order():
    ad, _ = reference.make_layer(np.random.default_rng(0), d_model=8, rank=2)
    with pytest.raises(lora.StateError):
        ad.backward(np.zeros((1, 3, 8), np.float32))
    out = ad.forward(np.ones((1, 3, 8), np.float32))
    with pytest.raises(lora.StateError):
        ad.backward_cross(out)
    ad.forward_cross(np.ones((1, 3, 8), np.float32), np.ones((1, 4, 8), np.float32))
    with pytest.raises(lora.StateError):
        ad.backward(out)


def test_failed_forward_drops_saved():
    ad, _ = reference.make_layer(np.random.default_rng(0), d_model=8, rank=2)
    out = ad.forward(np.ones((1, 3, 8), np.float32))
    with pytest.raises(lora.NonFiniteError):
        ad.forward(np.full((1, 3, 8), np.inf, np.float32))
    with pytest.raises(lora.StateError):
        ad.backward(out)


def test_causal_cross_shape_error_from_library():
    ad, _ = reference.make_layer(np.random.default_rng(0), d_model=8, rank=2, causal=True)
    with pytest.raises(lora.ShapeError) as e:
        ad.forward_cross(np.ones((1, 5, 8), np.float32), np.ones((1, 3, 8), np.float32))
    assert e.value.function == "lora_forward_cross" and "len_q" in e.value.message


def test_tolerance_error():
    ad, _ = reference.make_layer(np.random.default_rng(0), d_model=8, n_heads=1, rank=2,
                                 backend="poly", tolerance=1e-9)
    x = (5 * np.random.default_rng(1).standard_normal((1, 8, 8))).astype(np.float32)
    with pytest.raises(lora.ToleranceError) as e:
        ad.forward(x)
    assert e.value.status == 9


def test_mse_loss_errors():
    with pytest.raises(lora.ShapeError):
        lora.mse_loss(np.zeros(3, np.float32), np.zeros(4, np.float32))
    with pytest.raises(lora.NonFiniteError):
        lora.mse_loss(np.array([np.nan], np.float32), np.zeros(1, np.float32))
    with pytest.raises(lora.InvalidArgumentError):
        lora.mse_loss(np.zeros(0, np.float32), np.zeros(0, np.float32))
    if lora.has("lora_mse_loss_mean"):
        with pytest.raises(lora.ShapeError):
            lora.mse_loss_mean(np.zeros(3, np.float32), np.zeros(4, np.float32))
        with pytest.raises(lora.NonFiniteError):
            lora.mse_loss_mean(np.zeros(1, np.float32), np.array([np.inf], np.float32))


def test_float64_is_refused_everywhere_arrays_go_in():
    """No entry point turns float64 into float32 behind the caller's back; the error
    names the argument and nothing changes."""
    ad, P = reference.make_layer(np.random.default_rng(0), d_model=8, rank=2)
    x32 = np.ones((1, 3, 8), np.float32)
    x64 = x32.astype(np.float64)
    before = ad.params
    calls = {
        "x": lambda: ad.forward(x64),
        "xq": lambda: ad.forward_cross(x64, x32),
        "xkv": lambda: ad.forward_cross(x32, x64),
        "weight": lambda: ad.set_base("q", P["Wq"].astype(np.float64)),
        "value": lambda: ad.set_param("q", "A", before["q.A"].astype(np.float64)),
        "values": lambda: ad.set_params_flat(ad.get_params_flat().astype(np.float64)),
        "target": lambda: lora.mse_loss(x32, x64),
        "out": lambda: lora.mse_loss(x64, x32),
    }
    for name, call in calls.items():
        with pytest.raises(lora.DtypeError, match=": %s is float64" % name):
            call()
    out = ad.forward(x32)
    with pytest.raises(lora.DtypeError, match="dout is float64"):
        ad.backward(out.astype(np.float64))
    with pytest.raises(lora.DtypeError, match="weight is float64"):
        ad.merge("q", P["Wq"].astype(np.float64))
    for k, v in ad.params.items():
        assert np.array_equal(v, before[k]), k


def test_unknown_status_maps_to_base_class():
    from lora._errors import error_for
    e = error_for(77, "x")
    assert type(e) is lora.LoraError and e.status == 77
