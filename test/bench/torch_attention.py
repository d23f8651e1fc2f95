#!/usr/bin/env python3
"""PyTorch CPU autograd of the layer bench_exact times, side by side with liblora.

The layer: batch 1, one head, head_dim = d_model = 64, frozen W_Q, W_K, W_V (64 x 64)
with LoRA rank 8 (s = 1) on Q, K and V, softmax attention O = softmax(Q K^T / 8) V,
fp32, torch.set_num_threads(T). Forward and backward (O.backward(dO), with dx and the
LoRA gradients) are timed separately; medians over --reps runs. Autograd keeps the
L x L score and probability matrices, so memory grows as L^2 (about 4.5 GB at L = 16384);
lengths above --max-len are skipped.

Then, unless --no-lora, runs lib/bench/bench_exact with the same lengths, threads and
causal flag, and prints both with the speedup, from the same session of the machine.

    /usr/bin/python3 test/bench/torch_attention.py [--lens 1024,4096,8192] [--threads 2]
        [--reps 5] [--causal] [--max-len 16384] [--no-lora] [--autocast]

--autocast runs torch under torch.autocast("cpu", torch.bfloat16) and liblora with
LORA_COMPUTE_BF16 (bench_exact --compute bf16): bf16 against bf16.

Exits 0 with a message when torch is not installed (Debian: apt-get install python3-torch).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

HEAD_DIM = 64
RANK = 8


def torch_case(torch, L, reps, causal, autocast=False):
    g = torch.Generator().manual_seed(1)
    d = HEAD_DIM

    def rnd(*shape, scale=1.0):
        return (torch.rand(*shape, generator=g) * 2 - 1) * scale

    w = {t: rnd(d, d, scale=0.2) for t in "qkv"}
    a = {t: rnd(RANK, d, scale=0.1).requires_grad_() for t in "qkv"}
    b = {t: rnd(d, RANK, scale=0.1).requires_grad_() for t in "qkv"}
    x = rnd(1, L, d).requires_grad_()
    dout = rnd(1, L, d)
    mask = None
    if causal:
        mask = torch.ones(L, L, dtype=torch.bool).triu_(1)

    def forward():
        proj = {t: x @ w[t].T + (x @ a[t].T) @ b[t].T for t in "qkv"}
        s = (proj["q"] @ proj["k"].transpose(-1, -2)) * (1.0 / d ** 0.5)
        if mask is not None:
            s = s.masked_fill(mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        return p @ proj["v"]

    tf, tb = [], []
    for r in range(reps + 1):  # the first run warms up
        for t in list(a.values()) + list(b.values()) + [x]:
            t.grad = None
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = forward()
        t1 = time.perf_counter()
        out.backward(dout)
        t2 = time.perf_counter()
        del out
        if r > 0:
            tf.append(t1 - t0)
            tb.append(t2 - t1)
    return statistics.median(tf), statistics.median(tb)


def lora_cases(lens, threads, reps, causal, autocast=False):
    exe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "lib", "bench",
                       "bench_exact")
    if not os.path.exists(exe):
        print(f"({exe} not built: run `make lib/bench/bench_exact` for the side by side)")
        return {}
    cmd = [exe, "--lens", ",".join(str(L) for L in lens), "--threads", str(threads),
           "--reps", str(reps), "--no-exp"] + (["--causal"] if causal else []) + \
        (["--compute", "bf16"] if autocast else [])
    print("$ " + " ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    print(out, end="")
    rows = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 11 and f[0].isdigit():
            rows[int(f[0])] = (float(f[2]) / 1e3, float(f[3]) / 1e3)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", default="1024,4096,8192")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--no-lora", action="store_true")
    ap.add_argument("--autocast", action="store_true",
                    help="torch autocast bf16 against liblora LORA_COMPUTE_BF16")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("torch_attention: torch is not installed (apt-get install python3-torch); "
              "skipped")
        return 0
    torch.set_num_threads(args.threads)
    lens = [int(s) for s in args.lens.split(",") if s]
    mode = "autocast bf16" if args.autocast else "fp32"
    print(f"PyTorch {torch.__version__} CPU autograd, {mode}, {torch.get_num_threads()} threads, "
          f"batch 1, 1 head, head_dim {HEAD_DIM}, LoRA rank {RANK} on Q,K,V"
          f"{', causal' if args.causal else ''}; median of {args.reps}")
    results = {}
    for L in lens:
        if L > args.max_len:
            print(f"  L = {L}: skipped (above --max-len; autograd needs ~{18 * L * L / 1e9:.0f} GB)")
            continue
        tf, tb = torch_case(torch, L, args.reps, args.causal, args.autocast)
        results[L] = (tf, tb)
        print(f"  L = {L:6d}: forward {tf * 1e3:9.2f} ms, backward {tb * 1e3:9.2f} ms", flush=True)
    if args.no_lora or not results:
        return 0
    rows = lora_cases(sorted(results), args.threads, args.reps, args.causal, args.autocast)
    if not rows:
        return 0
    print(f"{'L':>6} {'torch_fb_ms':>12} {'lora_fb_ms':>11} {'speedup':>8}")
    for L in sorted(results):
        if L in rows:
            t_torch, t_lora = sum(results[L]), sum(rows[L])
            print(f"{L:6d} {t_torch * 1e3:12.2f} {t_lora * 1e3:11.2f} {t_torch / t_lora:7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
