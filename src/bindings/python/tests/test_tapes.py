"""Adapter.forward_ex / backward_ex and lora.Tape: several forwards in flight."""
import numpy as np
import pytest

import lora
import reference

pytestmark = pytest.mark.skipif(not lora.has("lora_forward_ex"),
                                reason="the loaded liblora has no lora_forward_ex")


def layer(seed=3, **extra):
    cfg = dict(d_model=12, n_heads=4, n_kv_heads=2, rank=3, targets="qkvo", out_proj=True,
               causal=True, alpha=5.0)
    cfg.update(extra)
    return reference.make_layer(np.random.default_rng(seed), **cfg)


def inputs(rng, L=5, Lkv=None, batch=2, d=12):
    xq = rng.standard_normal((batch, L, d)).astype(np.float32)
    xkv = None if Lkv is None else rng.standard_normal((batch, Lkv, d)).astype(np.float32)
    dout = rng.standard_normal((batch, L, d)).astype(np.float32)
    return xq, xkv, dout


def sequential(ad, xq, xkv, dout):
    """Gradients and dx of one forward immediately followed by its backward (0.1)."""
    ad.zero_grad()
    if xkv is None:
        out = ad.forward(xq)
        dx = ad.backward(dout)
    else:
        out = ad.forward_cross(xq, xkv)
        dx = ad.backward_cross(dout)
    return out, ad.get_grads_flat(), dx


@pytest.mark.parametrize("cross", [False, True])
def test_two_forwards_backward_in_reverse_order(cross):
    ad, _ = layer()
    twin, _ = layer()
    rng = np.random.default_rng(5)
    a = inputs(rng, 5, 7 if cross else None)
    b = inputs(rng, 4, 6 if cross else None)
    want_a, want_b = sequential(twin, *a), sequential(twin, *b)
    with lora.Tape(ad) as ta, lora.Tape(ad) as tb:
        out_a = ad.forward_ex(a[0], a[1], tape=ta)
        out_b = ad.forward_ex(b[0], b[1], tape=tb)
        for (x, xkv, dout), t, out, want in ((b, tb, out_b, want_b), (a, ta, out_a, want_a)):
            ad.zero_grad()
            dx = ad.backward_ex(dout, tape=t)
            np.testing.assert_array_equal(out, want[0])
            np.testing.assert_array_equal(ad.get_grads_flat(), want[1])
            if cross:
                np.testing.assert_array_equal(dx[0], want[2][0])
                np.testing.assert_array_equal(dx[1], want[2][1])
            else:
                np.testing.assert_array_equal(dx, want[2])


def test_stale_and_foreign_tapes_raise_state():
    ad, _ = layer()
    other, _ = layer()
    xq, _, dout = inputs(np.random.default_rng(7))
    t = lora.Tape(ad)
    with pytest.raises(lora.StateError):
        ad.backward_ex(dout, tape=t)  # empty
    ad.forward_ex(xq, tape=t)
    with pytest.raises(lora.StateError):
        other.backward_ex(dout, tape=t)
    with pytest.raises(lora.StateError):
        other.forward_ex(xq, tape=t)
    ad.set_param("q", "A", ad.param("q", "A"))  # same values, still a change
    with pytest.raises(lora.StateError) as e:
        ad.backward_ex(dout, tape=t)
    assert "changed" in str(e.value)
    ad.forward_ex(xq, tape=t)
    ad.backward_ex(dout, tape=t)
    ad.close()  # before its tape: allowed
    t.close()


def test_backward_twice_accumulates():
    ad, _ = layer()
    xq, _, dout = inputs(np.random.default_rng(9))
    with lora.Tape(ad) as t:
        ad.forward_ex(xq, tape=t)
        ad.zero_grad()
        dx1 = ad.backward_ex(dout, tape=t)
        g1 = ad.get_grads_flat()
        dx2 = ad.backward_ex(dout, tape=t)
        np.testing.assert_allclose(ad.get_grads_flat(), 2 * g1, rtol=1e-6,
                                   atol=1e-6 * np.abs(g1).max())
        np.testing.assert_array_equal(dx1, dx2)


def test_infer_saves_nothing_and_matches_forward():
    ad, _ = layer()
    rng = np.random.default_rng(11)
    xq, _, dout = inputs(rng)
    x2, _, _ = inputs(rng, L=3)
    ad.forward(xq)
    g0 = ad.get_grads_flat()
    y = ad.forward_ex(x2, infer=True)
    np.testing.assert_array_equal(ad.get_grads_flat(), g0)
    ad.backward(dout)  # the saved forward is still xq's (dout has its shape)
    np.testing.assert_array_equal(ad.forward(x2), y)


def test_defaults_equal_forward_and_backward_bitwise():
    ad, _ = layer()
    twin, _ = layer()
    xq, xkv, dout = inputs(np.random.default_rng(13), 5, 7)
    for kv in (None, xkv):
        want = sequential(twin, xq, kv, dout)
        ad.zero_grad()
        out = ad.forward_ex(xq, kv)
        dx = ad.backward_ex(dout)
        np.testing.assert_array_equal(out, want[0])
        np.testing.assert_array_equal(ad.get_grads_flat(), want[1])
        if kv is None:
            np.testing.assert_array_equal(dx, want[2])
            ad.backward(dout)  # forward_ex without a tape fills the 0.1 saved forward
        else:
            np.testing.assert_array_equal(dx[1], want[2][1])
            ad.backward_cross(dout)


def test_masks_need_integer_arrays_of_their_shape():
    ad, _ = layer()
    xq, _, _ = inputs(np.random.default_rng(15))
    with pytest.raises(lora.DtypeError):
        ad.forward_ex(xq, q_lens=np.array([5.0, 4.0]))
    with pytest.raises(lora.ShapeError):
        ad.forward_ex(xq, q_lens=np.array([5, 4, 3]))
