"""A float64 numpy model of the layer (docs/math.md §2), the oracle of the tests."""
import numpy as np

import lora

LETTERS = "qkvo"


def make_layer(rng, bias=True, **cfg):
    """An Adapter with random base weights (and biases) and random non-zero factors,
    plus the same values in float64 for the reference: returns (adapter, params)."""
    cfg.setdefault("threads", 1)
    cfg.setdefault("backend", "exact")
    ad = lora.Adapter(**cfg)
    P = {}
    letters = "qkvo" if cfg.get("out_proj") else "qkv"
    for t in letters:
        w = (rng.standard_normal(ad.base_shape(t)) * 0.4).astype(np.float32)
        b = (rng.standard_normal(ad.base_shape(t)[0]) * 0.1).astype(np.float32) \
            if bias else None
        ad.set_base(t, w, b)
        P["W" + t] = w.astype(np.float64)
        P["b" + t] = None if b is None else b.astype(np.float64)
    for t in ad.targets:
        for f in "AB":
            v = (rng.standard_normal(ad.param_shape(t, f)) * 0.3).astype(np.float32)
            ad.set_param(t, f, v)
            P[f + t] = v.astype(np.float64)
    return ad, P


def scale(ad):
    c = ad.config
    r = c["rank"]
    return c["alpha"] / (np.sqrt(r) if c["rslora"] else r)


def forward(ad, P, xq, xkv=None):
    """out (batch, Lq, out_dim) in float64 for the adapter's configuration."""
    c = ad.config
    s = scale(ad)
    xkv = xq if xkv is None else xkv

    def proj(x, t):
        y = x @ P["W" + t].T
        if P["b" + t] is not None:
            y = y + P["b" + t]
        if ("A" + t) in P:
            y = y + s * (x @ P["A" + t].T) @ P["B" + t].T
        return y

    Q, K, V = proj(xq, "q"), proj(xkv, "k"), proj(xkv, "v")
    H, Hkv, dh = c["n_heads"], c["n_kv_heads"], c["head_dim"]
    beta = c["softmax_scale"]
    B, Lq, Lkv = xq.shape[0], xq.shape[1], xkv.shape[1]
    C = np.zeros((B, Lq, H * dh))
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            S = beta * Q[b, :, h * dh:(h + 1) * dh] @ K[b, :, g * dh:(g + 1) * dh].T
            if c["causal"]:
                i = np.arange(Lq)[:, None]
                j = np.arange(Lkv)[None, :]
                S = np.where(j > i + (Lkv - Lq), -np.inf, S)
            S = S - S.max(axis=1, keepdims=True)
            E = np.exp(S)
            Pm = E / E.sum(axis=1, keepdims=True)
            C[b, :, h * dh:(h + 1) * dh] = Pm @ V[b, :, g * dh:(g + 1) * dh]
    return proj(C, "o") if c["out_proj"] else C
