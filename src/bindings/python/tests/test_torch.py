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
