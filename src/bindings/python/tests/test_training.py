"""Training and serving entry points: optimizer (one adapter or a set), flat vectors,
merge, borrowed bases, hot swap. Tests of 0.2 entry points are skipped when the loaded
library lacks them."""
import gc

import numpy as np
import pytest

import lora
import reference


def need(name):
    if not lora.has(name):
        pytest.skip("liblora %s has no %s" % (lora.version(), name))


@pytest.fixture
def layer():
    return reference.make_layer(np.random.default_rng(5), d_model=8, n_heads=2, rank=2,
                                targets="qkv")


def test_flat_vectors(layer):
    need("lora_adapter_get_params_flat")
    ad, _ = layer
    n = ad.param_count
    assert n == 3 * (2 * 8 + 8 * 2)
    flat = ad.get_params_flat()
    expect = np.concatenate([ad.param(t, f).ravel() for t in "qkv" for f in "AB"])
    assert np.array_equal(flat, expect)
    new = np.arange(n, dtype=np.float32) / n
    ad.set_params_flat(new)
    assert np.array_equal(ad.param("k", "A").ravel(), new[32:48])
    ad.set_grads_flat(-new)
    assert np.array_equal(ad.get_grads_flat(), -new)
    assert np.array_equal(ad.grad("v", "B").ravel(), -new[80:96])
    with pytest.raises(lora.InvalidArgumentError):
        ad.set_params_flat(new[:-1])
    with pytest.raises(lora.NonFiniteError):
        ad.set_grads_flat(np.full(n, np.nan, np.float32))


def adamw_reference(p, grads, lr, b1, b2, eps, wd, max_norm=0.0):
    p = p.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        if max_norm > 0:
            norm = np.sqrt(np.sum(g * g))
            g = g * min(1.0, max_norm / (norm + 1e-6))
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1 ** t)
        vhat = v / (1 - b2 ** t)
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
    return p


def sgd_reference(p, grads, lr, momentum, dampening, wd, nesterov):
    p = p.astype(np.float64)
    buf = None
    for g in grads:
        g = g.astype(np.float64) + wd * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    return p


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_adamw_matches_pytorch_rule(layer, clip):
    need("lora_optimizer_create")
    ad, _ = layer
    rng = np.random.default_rng(1)
    p0 = ad.get_params_flat().copy()
    grads = [rng.standard_normal(p0.size).astype(np.float32) for _ in range(5)]
    with lora.Optimizer(ad, "adamw", lr=0.01, betas=(0.8, 0.99), eps=1e-6,
                        weight_decay=0.1, max_grad_norm=clip) as opt:
        assert opt.kind == lora.OptimizerKind.ADAMW
        assert opt.lr == pytest.approx(0.01) and opt.get("beta1") == pytest.approx(0.8)
        assert opt.step_count == 0 and opt.grad_norm == -1
        for g in grads:
            ad.set_grads_flat(g)
            opt.step()
        assert opt.step_count == 5
        assert opt.grad_norm == pytest.approx(np.linalg.norm(grads[-1].astype(np.float64)),
                                              rel=1e-6)
    ref = adamw_reference(p0, grads, 0.01, 0.8, 0.99, 1e-6, 0.1, clip)
    assert np.allclose(ad.get_params_flat(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum,dampening,nesterov", [(0, 0, 0), (0.9, 0.1, 0),
                                                         (0.9, 0, 1)])
def test_sgd_matches_pytorch_rule(layer, momentum, dampening, nesterov):
    need("lora_optimizer_create")
    ad, _ = layer
    rng = np.random.default_rng(2)
    p0 = ad.get_params_flat().copy()
    grads = [rng.standard_normal(p0.size).astype(np.float32) for _ in range(4)]
    opt = lora.Optimizer(ad, "sgd", lr=0.05, momentum=momentum, dampening=dampening,
                         nesterov=nesterov, weight_decay=0.01)
    for g in grads:
        ad.set_grads_flat(g)
        opt.step()
    ref = sgd_reference(p0, grads, 0.05, momentum, dampening, 0.01, nesterov)
    assert np.allclose(ad.get_params_flat(), ref, rtol=1e-5, atol=1e-6)
    opt.reset()
    assert opt.step_count == 0
    opt.close()
    with pytest.raises(lora.StateError):
        opt.step()


def test_optimizer_errors(layer):
    need("lora_optimizer_create")
    ad, _ = layer
    opt = lora.Optimizer(ad, "sgd")
    with pytest.raises(lora.InvalidArgumentError) as e:
        opt.set("beta1", 0.9)  # an AdamW parameter on SGD
    assert e.value.function == "lora_optimizer_set_double" and e.value.message
    with pytest.raises(lora.InvalidArgumentError):
        opt.lr = -1
    with pytest.raises(lora.InvalidArgumentError):
        opt.set("step", 3)  # read-only
    with pytest.raises(TypeError):
        opt.set("learning_rate", 1)
    with pytest.raises(lora.InvalidArgumentError):
        lora.Optimizer(ad, "adam")
    other = lora.Adapter(d_model=8, rank=3)
    with pytest.raises(lora.InvalidArgumentError):
        opt.step(other)  # shaped unlike the optimizer's adapter
    ad.set_grads_flat(np.full(ad.param_count, 1e30, dtype=np.float32))
    before = ad.get_params_flat()
    with pytest.raises(lora.NonFiniteError):
        lora.Optimizer(ad, "sgd", lr=1e30).step()
    assert np.array_equal(ad.get_params_flat(), before)


def test_training_loop_with_adamw():
    need("lora_optimizer_create")
    rng = np.random.default_rng(3)
    teacher, P = reference.make_layer(rng, d_model=8, n_heads=2, rank=2)
    x = rng.standard_normal((4, 6, 8)).astype(np.float32)
    target = teacher.forward(x)
    student = lora.Adapter(d_model=8, n_heads=2, rank=2, threads=1, seed=9)
    for t in "qkv":
        student.set_base(t, P["W" + t].astype(np.float32), P["b" + t].astype(np.float32))
    opt = lora.Optimizer(student, "adamw", lr=0.02, weight_decay=0.0)
    losses = []
    for _ in range(60):
        student.zero_grad()
        loss, dout = lora.mse_loss(student.forward(x), target)
        student.backward(dout, need_dx=False)
        opt.step()
        losses.append(loss)
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_merge_unmerge(layer):
    need("lora_adapter_merge")
    ad, P = layer
    s = reference.scale(ad)
    for t in "qkv":
        W = P["W" + t].astype(np.float32)
        merged = ad.merge(t, W)
        assert merged is not W and np.array_equal(W, P["W" + t].astype(np.float32))
        expect = P["W" + t] + s * P["B" + t] @ P["A" + t]
        assert np.allclose(merged, expect, rtol=1e-6, atol=1e-7)
        back = ad.unmerge(t, merged)
        # the documented round-trip bound
        eps = 2.0 ** -23
        bound = eps * (1 + 2.0 ** -22) * (np.abs(P["W" + t]) + s * np.abs(P["B" + t])
                                           @ np.abs(P["A" + t])) + 2.0 ** -148
        assert np.all(np.abs(back.astype(np.float64) - P["W" + t]) <= bound)
    buf = P["Wq"].astype(np.float32)
    assert ad.merge("q", buf, inplace=True) is buf
    bad = P["Wq"].astype(np.float32)
    bad[0, 0] = np.nan
    keep = bad.copy()
    with pytest.raises(lora.NonFiniteError):
        ad.merge("q", bad, inplace=True)
    assert np.array_equal(bad, keep, equal_nan=True)
    with pytest.raises(lora.ShapeError):
        ad.merge("q", np.zeros((8, 7), np.float32))
    with pytest.raises(lora.InvalidArgumentError):
        ad.merge("q", np.zeros((8, 8)), inplace=True)  # float64: not writable in place


def test_forward_merged(layer):
    need("lora_forward_merged")
    ad, _ = layer
    x = np.random.default_rng(4).standard_normal((2, 5, 8)).astype(np.float32)
    out = ad.forward(x)
    assert np.allclose(ad.forward_merged(x), out, atol=1e-5)
    ad.backward(out, need_dx=False)  # the saved forward survived forward_merged
    xkv = np.random.default_rng(5).standard_normal((2, 7, 8)).astype(np.float32)
    assert np.allclose(ad.forward_merged_cross(x, xkv), ad.forward_cross(x, xkv), atol=1e-5)


def test_borrowed_base_and_hot_swap():
    need("lora_adapter_set_base_borrowed")
    rng = np.random.default_rng(6)
    owner, P = reference.make_layer(rng, d_model=8, n_heads=2, rank=2)
    x = rng.standard_normal((1, 5, 8)).astype(np.float32)
    want = owner.forward(x)
    shared = {t: np.ascontiguousarray(P["W" + t], dtype=np.float32) for t in "qkv"}
    bias = {t: np.ascontiguousarray(P["b" + t], dtype=np.float32) for t in "qkv"}
    tenants = [lora.Adapter(d_model=8, n_heads=2, rank=2, threads=1) for _ in range(2)]
    for ad in tenants:
        for t in "qkv":
            ad.set_base_borrowed(t, shared[t], bias[t])
    tenants[0].params = owner.params
    del shared, bias
    gc.collect()  # the adapters keep the arrays alive
    assert np.allclose(tenants[0].forward(x), want, atol=1e-6)
    need("lora_adapter_copy_params")
    tenants[1].copy_params_from(owner)
    assert np.allclose(tenants[1].forward(x), want, atol=1e-6)
    other = lora.Adapter(d_model=8, n_heads=2, rank=3)
    with pytest.raises(lora.InvalidArgumentError):
        tenants[1].copy_params_from(other)


def test_set_optimizer_clips_by_the_global_norm():
    """Three adapters, one optimizer: the numpy AdamW rule on the concatenated
    parameters, clipped by the norm of all gradients together."""
    need("lora_optimizer_create_set")
    rng = np.random.default_rng(8)
    ads = [reference.make_layer(rng, d_model=8, n_heads=2, rank=r, targets=t)[0]
           for r, t in [(2, "qv"), (3, "qkv"), (1, "k")]]
    p0 = np.concatenate([a.get_params_flat() for a in ads])
    sizes = [a.param_count for a in ads]
    grads = [np.concatenate([rng.standard_normal(n).astype(np.float32) * s
                             for n, s in zip(sizes, [1.0, 0.1, 5.0])]) * np.float32(f)
             for f in [0.05, 3.0, 0.1, 2.0, 0.02]]
    opt = lora.Optimizer(ads, "adamw", lr=0.01, betas=(0.8, 0.99), eps=1e-6,
                         weight_decay=0.1, max_grad_norm=1.0)
    for g in grads:
        for a, part in zip(ads, np.split(g, np.cumsum(sizes)[:-1])):
            a.set_grads_flat(part)
        opt.step()
    assert opt.step_count == 5
    assert opt.grad_norm == pytest.approx(np.linalg.norm(grads[-1].astype(np.float64)),
                                          rel=1e-6)
    ref = adamw_reference(p0, grads, 0.01, 0.8, 0.99, 1e-6, 0.1, 1.0)
    got = np.concatenate([a.get_params_flat() for a in ads])
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_set_optimizer_errors():
    need("lora_optimizer_create_set")
    rng = np.random.default_rng(9)
    a, _ = reference.make_layer(rng, d_model=8, n_heads=2, rank=2)
    b, _ = reference.make_layer(rng, d_model=8, n_heads=2, rank=3)
    with pytest.raises(lora.InvalidArgumentError, match="empty"):
        lora.Optimizer([], "sgd")
    with pytest.raises(lora.InvalidArgumentError, match="same adapter") as e:
        lora.Optimizer([a, b, a], "sgd")
    assert e.value.function == "lora_optimizer_create_set"
    opt = lora.Optimizer([a, b], "sgd", lr=0.1)
    for ad in (a, b):
        ad.set_grads_flat(np.ones(ad.param_count, np.float32))
    before = [a.get_params_flat(), b.get_params_flat()]
    with pytest.raises(lora.InvalidArgumentError, match="made for 2"):
        opt.step([a])
    with pytest.raises(lora.InvalidArgumentError, match="adapters\\[0\\] has rank 3"):
        opt.step([b, a])
    with pytest.raises(lora.InvalidArgumentError, match="same adapter"):
        opt.step([a, a])
    assert np.array_equal(a.get_params_flat(), before[0])
    assert np.array_equal(b.get_params_flat(), before[1])
    opt.step()
    assert not np.array_equal(a.get_params_flat(), before[0])
    assert not np.array_equal(b.get_params_flat(), before[1])
    # A list of one is a set of one; a bare adapter the classic optimizer.
    single = lora.Optimizer([a], "sgd")
    single.step()
    assert single.step_count == 1


def test_mse_loss_mean():
    need("lora_mse_loss_mean")
    out = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    t = np.array([[0.0, 2.0], [1.0, 8.0]], np.float32)
    loss, dout = lora.mse_loss_mean(out, t)
    assert loss == pytest.approx((1 + 0 + 4 + 16) / 4)
    assert np.array_equal(dout, np.float32(0.5) * (out - t))
    assert lora.mse_loss_mean(out, t, want_dout=False)[1] is None
    with pytest.raises(lora.DtypeError):
        lora.mse_loss_mean(out, t.astype(np.float64))
