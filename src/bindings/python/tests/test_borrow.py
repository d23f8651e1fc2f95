"""Adapter.borrow_factor: numpy arrays and torch Parameters as the factors' memory."""
import numpy as np
import pytest

import lora
import reference

pytestmark = pytest.mark.skipif(not lora.has("lora_adapter_borrow_factor"),
                                reason="the loaded liblora has no lora_adapter_borrow_factor")

CFG = dict(d_model=12, n_heads=4, n_kv_heads=2, rank=3, targets="qkvo", out_proj=True,
           causal=True, alpha=5.0)


def names(ad):
    return [(t, w) for t in ad.targets for w in "AB"]


def test_numpy_arrays_are_used_in_place():
    ad, _ = reference.make_layer(np.random.default_rng(1), **CFG)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)
    bufs = {}
    for t, w in names(ad):
        p = ad.param(t, w)  # a fresh array holding the current values
        g = np.zeros_like(p)
        ad.borrow_factor(t, w, p, g)
        bufs[t, w] = (p, g)
    y = ad.forward(x)
    ad.backward(y)
    for (t, w), (p, g) in bufs.items():
        np.testing.assert_array_equal(g, ad.grad(t, w))  # written in place
        assert np.abs(g).max() > 0
    p = bufs["v", "B"][0]
    p *= 0.5  # the caller's write: the next forward sees it, old tapes are stale
    with pytest.raises(lora.StateError):
        ad.backward_ex(y)
    np.testing.assert_array_equal(ad.param("v", "B"), p)
    with pytest.raises(lora.DtypeError):
        ad.borrow_factor("q", "A", np.zeros(ad.param_shape("q", "A")))  # float64
    with pytest.raises(lora.InvalidArgumentError):
        ad.borrow_factor("q", "A", np.zeros(ad.param_shape("q", "A")[::-1],
                                            dtype=np.float32).T)  # not C-contiguous
    ad.borrow_factor("v", "B", None, None)  # back to own storage, values kept
    np.testing.assert_array_equal(ad.param("v", "B"), p)


def test_torch_optim_on_shared_memory_equals_liblora_optimizer():
    torch = pytest.importorskip("torch", reason="PyTorch not installed")
    a1, _ = reference.make_layer(np.random.default_rng(3), **CFG)
    a2, _ = reference.make_layer(np.random.default_rng(3), **CFG)
    params = []
    for t, w in names(a1):
        p = torch.nn.Parameter(torch.from_numpy(a1.param(t, w)))
        p.grad = torch.zeros_like(p)
        a1.borrow_factor(t, w, p, p.grad)
        params.append((t, w, p))
    hyper = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    topt = torch.optim.AdamW([p for _, _, p in params], **hyper)
    lopt = lora.Optimizer(a2, "adamw", **hyper)
    rng = np.random.default_rng(4)
    for _ in range(4):
        x = rng.standard_normal((2, 6, 12)).astype(np.float32)
        target = rng.standard_normal((2, 6, 12)).astype(np.float32)
        for ad in (a1, a2):
            ad.zero_grad()  # zeroes p.grad in place for a1
            _, dout = lora.mse_loss(ad.forward(x), target)
            ad.backward(dout, need_dx=False)
        for t, w, p in params:  # liblora wrote p.grad itself: nothing was copied
            np.testing.assert_array_equal(p.grad.numpy(), a1.grad(t, w))
            np.testing.assert_allclose(p.grad.numpy(), a2.grad(t, w), rtol=1e-4,
                                       atol=1e-5 * np.abs(a2.grad(t, w)).max())
        topt.step()  # torch writes p.data in place: a1's factors
        lopt.step()
        for t, w, p in params:
            np.testing.assert_array_equal(a1.param(t, w), p.detach().numpy())
            np.testing.assert_allclose(p.detach().numpy(), a2.param(t, w), rtol=1e-5,
                                       atol=1e-6)
    # The memory liblora uses is the Parameters' own.
    for t, w, p in params:
        kept = a1._borrowed_factors[lora._core._target(t), lora._core._factor(w)]
        assert kept[1].ctypes.data == p.data_ptr()
        assert kept[3].ctypes.data == p.grad.data_ptr()
