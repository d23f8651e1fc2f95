#!/usr/bin/env python3
"""liblora fp32 and bf16 (LORA_COMPUTE_BF16) against PyTorch fp32 and autocast bf16.

Two layers, fwd+bwd (dx and every LoRA gradient), batch 1, in one process with the
four variants interleaved rep by rep so that all see the same machine load:
  llama:  d_model 2048, 16 heads of 128 over 4 kv heads, L 2048, causal, LoRA r 16
          (alpha 32) on Q, K, V, O, output projection (the issue's Llama-like layer);
  single: one head, head_dim = d_model = 64, L 8192, LoRA r 8 on Q, K, V (the layer of
          bench_exact; torch is skipped there, its autograd keeps L x L matrices).
Weights at a trained model's scale (W ~ N(0, 1/in)). Prints medians and the speed-ups
the bf16 targets are stated in, then each variant's relative error against a float64
torch autograd of the same layer (--no-error skips it): per tensor (out, dx, every dA,
dB) max |g - ref| / max |ref|, the largest over tensors.

    /usr/bin/python3 test/bench/bf16_layer.py [--layers llama,single] [--threads 2]
        [--reps 5] [--len L] [--no-error] [--no-torch]

Needs the Python bindings (src/bindings/python, LORA_LIBRARY or lib/liblora.so), numpy,
and torch for the torch columns (Debian: python3-torch).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path.insert(0, os.path.join(ROOT, "src", "bindings", "python"))
os.environ.setdefault("LORA_LIBRARY", os.path.join(ROOT, "lib", "liblora.so"))
import lora  # noqa: E402

LAYERS = {
    "llama": dict(d_model=2048, n_heads=16, n_kv_heads=4, head_dim=128, rank=16, alpha=32.0,
                  targets="qkvo", out_proj=True, causal=True, L=2048),
    "single": dict(d_model=64, n_heads=1, rank=8, alpha=8.0, targets="qkv", out_proj=False,
                   causal=False, L=8192),
}


def make_weights(cfg, seed=1):
    rng = np.random.default_rng(seed)
    d, hd = cfg["d_model"], cfg.get("head_dim", cfg["d_model"] // cfg["n_heads"])
    qd, kvd = cfg["n_heads"] * hd, cfg.get("n_kv_heads", cfg["n_heads"]) * hd
    shapes = {"q": (qd, d), "k": (kvd, d), "v": (kvd, d), "o": (d, qd)}
    letters = "qkvo" if cfg["out_proj"] else "qkv"
    P = {}
    for t in letters:
        o, i = shapes[t]
        P["W" + t] = (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)
    for t in cfg["targets"]:
        o, i = shapes[t]
        P["A" + t] = (rng.standard_normal((cfg["rank"], i)) / np.sqrt(i)).astype(np.float32)
        P["B" + t] = (rng.standard_normal((o, cfg["rank"])) * 0.05).astype(np.float32)
    return P


def lib_adapter(cfg, P, compute, threads):
    kw = {k: v for k, v in cfg.items() if k != "L"}
    ad = lora.Adapter(backend="exact", threads=threads, compute=compute, **kw)
    for key, v in P.items():
        if key[0] == "W":
            ad.set_base(key[1], v)
        else:
            ad.set_param(key[1], key[0], v)
    return ad


def lib_run(ad, x, dout):
    ad.zero_grad()
    out = ad.forward(x)
    dx = ad.backward(dout)
    g = {"out": out, "dx": dx}
    for t in ad.targets:
        for f in "AB":
            g[f + t] = ad.grad(t, f)
    return g


def torch_run(torch, cfg, P, x, dout, dtype, autocast):
    """One fwd+bwd of the layer in torch; returns the same tensors as lib_run."""
    hd = cfg.get("head_dim", cfg["d_model"] // cfg["n_heads"])
    nh, nkv = cfg["n_heads"], cfg.get("n_kv_heads", cfg["n_heads"])
    s = cfg["alpha"] / cfg["rank"]
    t = {k: torch.tensor(v, dtype=dtype, requires_grad=k[0] in "AB") for k, v in P.items()}
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    L = x.shape[1]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        def proj(letter, inp):
            y = inp @ t["W" + letter].T
            if "A" + letter in t:
                y = y + s * ((inp @ t["A" + letter].T) @ t["B" + letter].T)
            return y
        q = proj("q", xt).view(1, L, nh, hd).transpose(1, 2)
        k = proj("k", xt).view(1, L, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, 1)
        v = proj("v", xt).view(1, L, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, 1)
        sc = (q @ k.transpose(-1, -2)) * (1.0 / hd ** 0.5)
        if cfg["causal"]:
            sc = sc.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        o = (torch.softmax(sc, dim=-1) @ v).transpose(1, 2).reshape(1, L, nh * hd)
        if cfg["out_proj"]:
            o = proj("o", o)
    o.backward(torch.tensor(dout, dtype=o.dtype))
    g = {"out": o.detach().float().numpy(), "dx": xt.grad.float().numpy()}
    for key, v in t.items():
        if v.grad is not None:
            g[key] = v.grad.float().numpy()
    return g


def worst_rel_err(g, ref):
    return max(float(np.max(np.abs(g[k].astype(np.float64) - ref[k])) /
                     max(float(np.max(np.abs(ref[k]))), 1e-30)) for k in ref)


def run_layer(name, cfg, args, torch):
    L = args.len or cfg["L"]
    rng = np.random.default_rng(2)
    P = make_weights(cfg)
    x = rng.standard_normal((1, L, cfg["d_model"])).astype(np.float32)
    out_dim = cfg["d_model"] if cfg["out_proj"] else \
        cfg["n_heads"] * cfg.get("head_dim", cfg["d_model"] // cfg["n_heads"])
    dout = rng.standard_normal((1, L, out_dim)).astype(np.float32)
    variants = {}
    ad32 = lib_adapter(cfg, P, "f32", args.threads)
    variants["liblora fp32"] = lambda: lib_run(ad32, x, dout)
    try:
        ad16 = lib_adapter(cfg, P, "bf16", args.threads)
        variants["liblora bf16"] = lambda: lib_run(ad16, x, dout)
    except lora.UnsupportedError as e:
        print(f"  liblora bf16: refused ({e})")
    use_torch = torch is not None and name == "llama"
    if use_torch:
        variants["torch fp32"] = lambda: torch_run(torch, cfg, P, x, dout, torch.float32, False)
        variants["torch autocast bf16"] = lambda: torch_run(torch, cfg, P, x, dout,
                                                            torch.float32, True)
    times = {k: [] for k in variants}
    results = {}
    for r in range(args.reps + 1):  # the first round warms up
        for k, fn in variants.items():
            t0 = time.perf_counter()
            res = fn()
            dt = time.perf_counter() - t0
            if r == 0:
                results[k] = res
            else:
                times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{name}: L {L}, {args.threads} threads, fwd+bwd medians of {args.reps} "
          f"(interleaved)")
    for k, v in med.items():
        print(f"  {k:22s} {v * 1e3:10.1f} ms")
    if "liblora bf16" in med:
        b = med["liblora bf16"]
        print(f"  bf16 vs liblora fp32: {med['liblora fp32'] / b:.2f}x (target >= 1.6x)")
        if "torch autocast bf16" in med:
            print(f"  bf16 vs torch autocast: {med['torch autocast bf16'] / b:.2f}x "
                  f"(target >= 1.5x); vs torch fp32: {med['torch fp32'] / b:.2f}x")
    if args.no_error or torch is None:
        return
    ref = {k: v.astype(np.float64) for k, v in
           torch_run(torch, cfg, {k: v.astype(np.float64) for k, v in P.items()},
                     x.astype(np.float64), dout.astype(np.float64), torch.float64,
                     False).items()}
    print("  relative error vs float64 (worst tensor of out, dx, dA, dB):")
    for k, res in results.items():
        print(f"  {k:22s} {worst_rel_err(res, ref):10.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="llama,single")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--len", type=int, default=0, help="override L (quick runs)")
    ap.add_argument("--no-error", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    torch = None
    if not args.no_torch:
        try:
            import torch as torch_mod
            torch = torch_mod
            torch.set_num_threads(args.threads)
        except ImportError:
            print("(torch not installed: liblora columns only)")
    print(f"liblora {lora.version()}{'; torch ' + torch.__version__ if torch else ''}")
    for name in args.layers.split(","):
        run_layer(name, LAYERS[name], args, torch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
