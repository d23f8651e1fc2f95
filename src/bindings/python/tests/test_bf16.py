"""compute="bf16" against torch.autocast("cpu", torch.bfloat16) on the same layer.

Both are measured the same way against one float64 torch autograd of the layer: per
tensor (out, dx and every dA, dB) max |g - ref| / max |ref|, then the largest. liblora's
bf16 error must be <= 1e-2 and no larger than autocast's. Skipped without torch or on a
CPU without AVX512_BF16 (the library then refuses compute="bf16")."""
import numpy as np
import pytest

import lora
import reference

torch = pytest.importorskip("torch")

LAYERS = {
    "gqa-causal-outproj": dict(d_model=128, n_heads=4, n_kv_heads=2, rank=8, targets="qkvo",
                               out_proj=True, causal=True, alpha=16.0),
    "mha-64": dict(d_model=128, n_heads=2, rank=4, targets="qkv"),
}


def torch_layer(ad, P, x, dtype):
    """out of the layer in torch (autograd through x and every factor), as lora.h
    defines it: projections with LoRA, GQA softmax attention, optional W_O."""
    c = ad.config
    s = reference.scale(ad)
    L, d = x.shape[1], c["head_dim"]
    t = {k: torch.tensor(v, dtype=dtype, requires_grad=k[0] in "AB")
         for k, v in P.items() if v is not None}

    def proj(letter, inp):
        y = inp @ t["W" + letter].T
        if "b" + letter in t:
            y = y + t["b" + letter]
        if "A" + letter in t:
            y = y + s * ((inp @ t["A" + letter].T) @ t["B" + letter].T)
        return y

    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    q = proj("q", xt).view(x.shape[0], L, c["n_heads"], d).transpose(1, 2)
    k = proj("k", xt).view(x.shape[0], L, c["n_kv_heads"], d).transpose(1, 2)
    v = proj("v", xt).view(x.shape[0], L, c["n_kv_heads"], d).transpose(1, 2)
    group = c["n_heads"] // c["n_kv_heads"]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * c["softmax_scale"]
    if c["causal"]:
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    o = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(x.shape[0], L, -1)
    if c["out_proj"]:
        o = proj("o", o)
    return o, xt, t


def torch_grads(ad, P, x, dout, dtype, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, xt, t = torch_layer(ad, P, x, dtype)
    out.backward(torch.tensor(dout, dtype=out.dtype))
    g = {"out": out.detach().double().numpy(), "dx": xt.grad.double().numpy()}
    for key, v in t.items():
        if v.grad is not None:
            g[key] = v.grad.double().numpy()
    return g


def lib_grads(ad, x, dout):
    ad.zero_grad()
    g = {"out": ad.forward(x).astype(np.float64)}
    g["dx"] = ad.backward(dout).astype(np.float64)
    for t in ad.targets:
        for f in "AB":
            g[f + t] = ad.grad(t, f).astype(np.float64)
    return g


def cpu_has_bf16():
    """The CPU flag the library needs (Linux /proc/cpuinfo; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any("avx512_bf16" in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def realistic_layer(rng, **cfg):
    """reference.make_layer with weights at the scale of a trained model (entries of W
    ~ N(0, 1/in), of A ~ N(0, 1/in), B ~ N(0, 0.1²)), so that scores are O(1) and the
    softmax is not saturated: a layer where bf16 rounding is what is measured."""
    ad, P = reference.make_layer(rng, **cfg)
    for t in ("qkvo" if cfg.get("out_proj") else "qkv"):
        w = P["W" + t]
        w = (w / 0.4 / np.sqrt(w.shape[1])).astype(np.float32)
        bias = P["b" + t]
        ad.set_base(t, w, None if bias is None else bias.astype(np.float32))
        P["W" + t] = w.astype(np.float64)
    for t in ad.targets:
        for f, sd in (("A", 1.0 / np.sqrt(ad.param_shape(t, "A")[1])), ("B", 0.1)):
            v = (P[f + t] / 0.3 * sd).astype(np.float32)
            ad.set_param(t, f, v)
            P[f + t] = v.astype(np.float64)
    return ad, P


def worst_rel_err(g, ref):
    return max(float(np.max(np.abs(g[k] - ref[k])) / max(np.max(np.abs(ref[k])), 1e-30))
               for k in ref)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_bf16_no_worse_than_autocast(name):
    rng = np.random.default_rng(17)
    try:
        ad, P = realistic_layer(rng, compute="bf16", threads=2, **LAYERS[name])
    except lora.UnsupportedError:
        if cpu_has_bf16():
            raise
        pytest.skip("this CPU has no AVX512_BF16")
    with ad:
        x = rng.standard_normal((2, 80, ad.d_model)).astype(np.float32)
        dout = rng.standard_normal((2, 80, ad.out_dim)).astype(np.float32)
        ref = torch_grads(ad, P, x.astype(np.float64), dout, torch.float64, False)
        ours = worst_rel_err(lib_grads(ad, x, dout), ref)
        auto = worst_rel_err(torch_grads(ad, P, x, dout, torch.float32, True), ref)
        fp32 = worst_rel_err(torch_grads(ad, P, x, dout, torch.float32, False), ref)
        assert ad.run_info.attention_compute == lora.Compute.BF16
    # The comparison means something: autocast really ran in bf16.
    assert auto > 10 * fp32, (auto, fp32)
    assert ours <= 1e-2, ours
    assert ours <= auto, "liblora bf16 %.3g vs torch autocast %.3g" % (ours, auto)


def test_compute_f32_reports_f32():
    rng = np.random.default_rng(3)
    ad, _ = reference.make_layer(rng, d_model=32, n_heads=2, rank=2, compute="f32")
    with ad:
        ad.forward(rng.standard_normal((1, 4, 32)).astype(np.float32))
        assert ad.run_info.attention_compute == lora.Compute.F32
