"""Gradients of the library against central finite differences in numpy.

The oracle is reference.forward, a float64 numpy model of the layer: its loss
1/2*sum((out - target)^2) is differentiated by central differences (step 1e-6, error
~1e-10) and compared with the float32 gradients liblora returns. A second check
differentiates through the library itself (float32 forward, double-accumulated loss)."""
import numpy as np
import pytest

import lora
import reference

CASES = {
    "mha-qv": dict(d_model=8, n_heads=2, rank=2),
    "gqa-qkv-causal": dict(d_model=8, n_heads=4, n_kv_heads=2, rank=3, targets="qkv",
                           causal=True, alpha=6.0),
    "outproj-all-rslora": dict(d_model=6, n_heads=2, head_dim=4, rank=2, targets="qkvo",
                               out_proj=True, rslora=True, alpha=3.0),
}


def numeric_grad(f, p, h=1e-6):
    g = np.zeros_like(p)
    for i in np.ndindex(p.shape):
        old = p[i]
        p[i] = old + h
        fp = f()
        p[i] = old - h
        fm = f()
        p[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


def check(lib_grad, num_grad, what):
    scale = max(1.0, float(np.max(np.abs(num_grad))))
    err = float(np.max(np.abs(lib_grad - num_grad)))
    assert err <= 2e-4 * scale, "%s: max |lib - fd| = %.3g (scale %.3g)" % (what, err, scale)


@pytest.mark.parametrize("name", sorted(CASES))
def test_self_attention_gradients(name):
    rng = np.random.default_rng(42)
    ad, P = reference.make_layer(rng, **CASES[name])
    x = rng.standard_normal((2, 5, ad.d_model)).astype(np.float32)
    target = rng.standard_normal((2, 5, ad.out_dim)).astype(np.float32)
    x64 = x.astype(np.float64)

    out = ad.forward(x)
    assert np.allclose(out, reference.forward(ad, P, x64), atol=3e-5)
    _, dout = lora.mse_loss(out, target)
    dx = ad.backward(dout)

    def loss():
        return 0.5 * np.sum((reference.forward(ad, P, x64) - target) ** 2)

    for key in ad.grads:
        t, f = key.split(".")
        check(ad.grad(t, f), numeric_grad(loss, P[f + t]), key)
    check(dx, numeric_grad(loss, x64), "dx")


def test_cross_attention_gradients():
    rng = np.random.default_rng(7)
    ad, P = reference.make_layer(rng, d_model=8, n_heads=2, rank=2, targets="qkv",
                                 causal=True)
    xq = rng.standard_normal((2, 3, 8))
    xkv = rng.standard_normal((2, 5, 8))
    target = rng.standard_normal((2, 3, 8)).astype(np.float32)
    out = ad.forward_cross(xq.astype(np.float32), xkv.astype(np.float32))
    _, dout = lora.mse_loss(out, target)
    dxq, dxkv = ad.backward_cross(dout)

    def loss():
        return 0.5 * np.sum((reference.forward(ad, P, xq, xkv) - target) ** 2)

    for key in ad.grads:
        t, f = key.split(".")
        check(ad.grad(t, f), numeric_grad(loss, P[f + t]), key)
    check(dxq, numeric_grad(loss, xq), "dxq")
    check(dxkv, numeric_grad(loss, xkv), "dxkv")


def test_finite_differences_through_the_library():
    """Perturb B of Q through set_param and difference the library's own loss."""
    rng = np.random.default_rng(3)
    ad, _ = reference.make_layer(rng, d_model=8, n_heads=2, rank=2)
    x = rng.standard_normal((1, 6, 8)).astype(np.float32)
    target = rng.standard_normal((1, 6, 8)).astype(np.float32)
    _, dout = lora.mse_loss(ad.forward(x), target)
    ad.backward(dout, need_dx=False)
    g = ad.grad("q", "B")
    b = ad.param("q", "B").astype(np.float64)
    h = 1e-2
    for i in [(0, 0), (3, 1), (7, 0)]:
        def f(delta):
            bb = b.copy()
            bb[i] += delta
            ad.set_param("q", "B", bb.astype(np.float32))
            return lora.mse_loss(ad.forward(x), target, want_dout=False)[0]
        fd = (f(h) - f(-h)) / (2 * h)
        assert abs(fd - g[i]) <= 1e-2 * max(1.0, abs(fd)), (i, fd, g[i])
