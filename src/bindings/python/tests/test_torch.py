"""Gradients against PyTorch autograd (float64), when torch is importable."""
import numpy as np
import pytest

import lora
import reference

torch = pytest.importorskip("torch", reason="PyTorch not installed (Debian: python3-torch)")


def torch_forward(ad, P, xq, xkv):
    c = ad.config
    s = reference.scale(ad)
    H, Hkv, dh = c["n_heads"], c["n_kv_heads"], c["head_dim"]

    def proj(x, t):
        y = torch.nn.functional.linear(x, P["W" + t], P["b" + t])
        if ("A" + t) in P:
            y = y + s * (x @ P["A" + t].T) @ P["B" + t].T
        return y

    B, Lq, Lkv = xq.shape[0], xq.shape[1], xkv.shape[1]
    q = proj(xq, "q").view(B, Lq, H, dh).transpose(1, 2)
    k = proj(xkv, "k").view(B, Lkv, Hkv, dh).transpose(1, 2)
    v = proj(xkv, "v").view(B, Lkv, Hkv, dh).transpose(1, 2)
    k = k.repeat_interleave(H // Hkv, dim=1)  # query head h uses kv head h // (H/Hkv)
    v = v.repeat_interleave(H // Hkv, dim=1)
    scores = c["softmax_scale"] * q @ k.transpose(-1, -2)
    if c["causal"]:
        i = torch.arange(Lq)[:, None]
        j = torch.arange(Lkv)[None, :]
        scores = scores.masked_fill(j > i + (Lkv - Lq), float("-inf"))
    o = torch.softmax(scores, dim=-1) @ v
    C = o.transpose(1, 2).reshape(B, Lq, H * dh)
    return proj(C, "o") if c["out_proj"] else C


@pytest.mark.parametrize("cross", [False, True])
def test_gradients_match_torch_autograd(cross):
    rng = np.random.default_rng(11)
    ad, P = reference.make_layer(rng, d_model=12, n_heads=4, n_kv_heads=2, rank=3,
                                 targets="qkvo", out_proj=True, causal=True, alpha=5.0)
    Lq, Lkv = (4, 7) if cross else (6, 6)
    xq = rng.standard_normal((2, Lq, 12)).astype(np.float32)
    xkv = rng.standard_normal((2, Lkv, 12)).astype(np.float32) if cross else xq
    target = rng.standard_normal((2, Lq, 12)).astype(np.float32)

    if cross:
        out = ad.forward_cross(xq, xkv)
        _, dout = lora.mse_loss(out, target)
        dxq, dxkv = ad.backward_cross(dout)
    else:
        out = ad.forward(xq)
        _, dout = lora.mse_loss(out, target)
        dxq = ad.backward(dout)

    TP = {k: None if v is None else torch.tensor(v, requires_grad=k[0] in "AB")
          for k, v in P.items()}
    txq = torch.tensor(xq, dtype=torch.float64, requires_grad=True)
    txkv = torch.tensor(xkv, dtype=torch.float64, requires_grad=True) if cross else txq
    tout = torch_forward(ad, TP, txq, txkv)
    loss = 0.5 * ((tout - torch.tensor(target, dtype=torch.float64)) ** 2).sum()
    loss.backward()

    assert np.allclose(out, tout.detach().numpy(), atol=3e-5)
    for key, g in ad.grads.items():
        t, f = key.split(".")
        ref = TP[f + t].grad.numpy()
        assert np.allclose(g, ref, rtol=1e-4, atol=1e-4 * max(1, np.abs(ref).max())), key
    assert np.allclose(dxq, txq.grad.numpy(), rtol=1e-4, atol=1e-4)
    if cross:
        assert np.allclose(dxkv, txkv.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_adamw_matches_torch_optim():
    if not lora.has("lora_optimizer_create"):
        pytest.skip("liblora has no optimizer")
    ad, _ = reference.make_layer(np.random.default_rng(12), d_model=8, n_heads=2, rank=2)
    rng = np.random.default_rng(13)
    p0 = ad.get_params_flat().copy()
    grads = [rng.standard_normal(p0.size).astype(np.float32) for _ in range(6)]
    opt = lora.Optimizer(ad, "adamw", lr=0.01, betas=(0.9, 0.95), eps=1e-8,
                         weight_decay=0.05, max_grad_norm=1.0)
    tp = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    topt = torch.optim.AdamW([tp], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    for g in grads:
        ad.set_grads_flat(g)
        opt.step()
        tp.grad = torch.tensor(g, dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_([tp], 1.0)
        topt.step()
    assert np.allclose(ad.get_params_flat(), tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def model_of_three(seed):
    """Three adapters of different shapes (a model's LoRA layers), with base weights."""
    rng = np.random.default_rng(seed)
    specs = [dict(d_model=8, n_heads=2, rank=2, targets="qv"),
             dict(d_model=8, n_heads=2, n_kv_heads=1, rank=3, targets="qkv"),
             dict(d_model=8, n_heads=2, rank=4, targets="qkvo", out_proj=True)]
    return [reference.make_layer(rng, **s)[0] for s in specs]


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_set_optimizer_matches_torch_optim_with_global_clipping(kind):
    """One optimizer over 3 adapters, 10 steps on real gradients, against torch.optim
    over the same parameters after clip_grad_norm_(all parameters). A torch run that
    clips each adapter by its own norm must disagree (the test can tell the two)."""
    if not lora.has("lora_optimizer_create_set"):
        pytest.skip("liblora has no lora_optimizer_create_set")
    ads = model_of_three(21)
    rng = np.random.default_rng(22)
    xs = [rng.standard_normal((2, 5, 8)).astype(np.float32) for _ in range(10)]
    targets = [rng.standard_normal((2, 5, 8)).astype(np.float32) for _ in range(10)]
    hyper = dict(lr=0.02, weight_decay=0.05)
    if kind == "adamw":
        hyper.update(betas=(0.9, 0.95), eps=1e-8)
        make = lambda ps: torch.optim.AdamW(ps, **hyper)  # noqa: E731
    else:
        hyper.update(momentum=0.9, nesterov=True)
        make = lambda ps: torch.optim.SGD(ps, **hyper)  # noqa: E731
    max_norm = 100.0  # the steps of large gradients (every third) are clipped
    opt = lora.Optimizer(ads, kind, max_grad_norm=max_norm, **hyper)
    assert opt.adapters == ads
    tps = [torch.tensor(a.get_params_flat(), dtype=torch.float64, requires_grad=True)
           for a in ads]
    lps = [t.detach().clone().requires_grad_(True) for t in tps]  # clipped per adapter
    topt, lopt = make(tps), make(lps)
    clipped, per_layer_gap = 0, 0.0
    for step in range(10):
        grads = []
        for k, ad in enumerate(ads):
            ad.zero_grad()
            out = ad.forward(xs[step])
            scale = [1.0, 0.05, 4.0][k] * (3.0 if step % 3 == 1 else 0.3)
            _, dout = lora.mse_loss(out, targets[step])
            ad.backward(dout * np.float32(scale), need_dx=False)
            grads.append(ad.get_grads_flat())
        opt.step()
        for t, lt, g in zip(tps, lps, grads):
            t.grad = torch.tensor(g, dtype=torch.float64)
            lt.grad = torch.tensor(g, dtype=torch.float64)
        norm = torch.nn.utils.clip_grad_norm_(tps, max_norm)
        for lt in lps:
            torch.nn.utils.clip_grad_norm_([lt], max_norm)
        topt.step()
        lopt.step()
        clipped += float(norm) > max_norm
        assert opt.grad_norm == pytest.approx(float(norm), rel=1e-12)
        for k, (ad, t, lt) in enumerate(zip(ads, tps, lps)):
            got = ad.get_params_flat()
            want = t.detach().numpy()
            assert np.allclose(got, want, rtol=1e-5, atol=1e-6), (step, k)
            per_layer_gap = max(per_layer_gap, np.abs(got - lt.detach().numpy()).max())
    assert 0 < clipped < 10
    assert per_layer_gap > 1e-4


def test_mse_loss_mean_matches_torch_mseloss():
    if not lora.has("lora_mse_loss_mean"):
        pytest.skip("liblora has no lora_mse_loss_mean")
    rng = np.random.default_rng(5)
    for shape in [(7,), (3, 5, 4), (2, 33, 16)]:
        out = rng.standard_normal(shape).astype(np.float32)
        target = rng.standard_normal(shape).astype(np.float32)
        loss, dout = lora.mse_loss_mean(out, target)
        tout = torch.tensor(out, requires_grad=True)
        tloss = torch.nn.MSELoss()(tout, torch.tensor(target))
        tloss.backward()
        assert loss == pytest.approx(float(tloss), rel=1e-6)
        assert dout.shape == out.shape and dout.dtype == np.float32
        assert np.allclose(dout, tout.grad.numpy(), rtol=1e-6, atol=0), shape
        # float64 oracle for the value: the mean is accumulated in double
        t64 = torch.nn.MSELoss()(torch.tensor(out, dtype=torch.float64),
                                 torch.tensor(target, dtype=torch.float64))
        assert loss == pytest.approx(float(t64), rel=1e-12)


@pytest.mark.parametrize("momentum,dampening,weight_decay", [(0.9, 0.5, 0.0), (0.5, 0.9, 0.01)])
def test_sgd_dampening_matches_torch_optim(momentum, dampening, weight_decay):
    """torch.optim.SGD's buffer: g on the first step, then momentum*buf + (1-dampening)*g."""
    if not lora.has("lora_optimizer_create"):
        pytest.skip("liblora has no optimizer")
    ad, _ = reference.make_layer(np.random.default_rng(21), d_model=8, n_heads=2, rank=2)
    rng = np.random.default_rng(22)
    p0 = ad.get_params_flat().copy()
    grads = [rng.standard_normal(p0.size).astype(np.float32) for _ in range(5)]
    opt = lora.Optimizer(ad, "sgd", lr=0.05, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay)
    tp = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    topt = torch.optim.SGD([tp], lr=0.05, momentum=momentum, dampening=dampening,
                           weight_decay=weight_decay)
    for g in grads:
        ad.set_grads_flat(g)
        opt.step()
        tp.grad = torch.tensor(g, dtype=torch.float64)
        topt.step()
    assert np.allclose(ad.get_params_flat(), tp.detach().numpy(), rtol=1e-5, atol=1e-6)
