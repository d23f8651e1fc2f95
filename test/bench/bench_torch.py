#!/usr/bin/env python3
"""The overhead of lora.torch.LoraAttention over calling liblora directly.

For each layer shape, one forward + backward (dx and the LoRA gradients) is timed two
ways, alternating run by run so both see the same state of the machine:

  direct  lora.Adapter.forward_ex / backward_ex on numpy arrays, one reused lora.Tape,
          a preallocated output, base weights borrowed (the least a caller can do);
  module  lora.torch.LoraAttention(x) then y.backward(dout): autograd, Parameters
          sharing the factors' memory, factor gradients written by liblora into
          fresh tensors that autograd accumulates into .grad.

Both run the same adapter configuration on the same input, base weights and factors.
The overhead is median(module) / median(direct) - 1; the goal is at most 5% at L = 4096.

    make bench    (or: LORA_LIBRARY=lib/liblora.so PYTHONPATH=src/bindings/python \\
                   /usr/bin/python3 test/bench/bench_torch.py [--len 4096] [--reps 7]
                   [--threads 2] [--shapes all|small])

Exits 0 with a message when torch (or numpy) is not installed.
"""
import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# (name, Adapter keywords): a Llama-like layer with LoRA on every projection, and a GQA
# layer with RoPE adapting Q and V (the usual PEFT recipe).
SHAPES = [
    ("d512 h8 r16 qkvo causal", dict(d_model=512, n_heads=8, rank=16, targets="qkvo",
                                     out_proj=True, causal=True)),
    ("d1024 h16 kv4 r8 qv rope causal", dict(d_model=1024, n_heads=16, n_kv_heads=4, rank=8,
                                             targets="qv", out_proj=True, causal=True,
                                             rope="half")),
]


def imports():
    try:
        import numpy
        import torch
    except ImportError as e:
        print("bench_torch: skipped (%s; Debian: apt-get install python3-torch)" % e)
        return None
    sys.path.insert(0, os.path.join(ROOT, "src", "bindings", "python"))
    os.environ.setdefault("LORA_LIBRARY", os.path.join(ROOT, "lib", "liblora.so"))
    import lora
    import lora.torch
    return numpy, torch, lora


def make_case(np, torch, lora, config, L, threads):
    """The module, a direct adapter of the same configuration holding the same factors
    and (borrowed) bases, and the input and output gradient."""
    gen = np.random.default_rng(7)
    module = lora.torch.LoraAttention(threads=threads, backend="exact", **config)
    d = config["d_model"]
    direct = lora.Adapter(threads=threads, backend="exact", **config)
    bases = []
    for t in "qkvo":
        out, inp = direct.base_shape(t)
        w = (gen.standard_normal((out, inp)) / inp ** 0.5).astype(np.float32)
        module.set_base(t, torch.from_numpy(w))
        bases.append(w)
        direct.set_base_borrowed(t, w)
    for t in module.adapter.targets:
        for which in "AB":
            v = (0.05 * gen.standard_normal(direct.param_shape(t, which))).astype(np.float32)
            direct.set_param(t, which, v)
            with torch.no_grad():
                getattr(module, "lora_" + which)[t].copy_(torch.from_numpy(v))
    x = gen.standard_normal((1, L, d)).astype(np.float32)
    dout = gen.standard_normal((1, L, direct.out_dim)).astype(np.float32)
    return module, direct, bases, x, dout


def time_direct(lora, direct, tape, x, out, dout):
    t0 = time.perf_counter()
    direct.forward_ex(x, tape=tape, out=out)
    direct.backward_ex(dout, tape=tape)
    return time.perf_counter() - t0


def time_module(torch, module, xt, doutt):
    t0 = time.perf_counter()
    y = module(xt)
    y.backward(doutt)
    elapsed = time.perf_counter() - t0
    del y
    return elapsed


def run_shape(np, torch, lora, name, config, L, reps, threads):
    module, direct, _bases, x, dout = make_case(np, torch, lora, config, L, threads)
    tape = lora.Tape(direct)
    out = np.empty((1, L, direct.out_dim), dtype=np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    doutt = torch.from_numpy(dout)
    td, tm = [], []
    for rep in range(reps + 1):  # the first pair warms up (threads, tapes, page faults)
        a = time_direct(lora, direct, tape, x, out, dout)
        b = time_module(torch, module, xt, doutt)
        xt.grad = None
        if rep:
            td.append(a)
            tm.append(b)
    md, mm = statistics.median(td), statistics.median(tm)
    overhead = mm / md - 1.0
    print("%-34s L %5d  direct %8.1f ms  module %8.1f ms  overhead %+6.2f%%  %s"
          % (name, L, 1e3 * md, 1e3 * mm, 100.0 * overhead,
             "(goal <= 5%)" if overhead <= 0.05 else "ABOVE the 5% goal"))
    tape.close()
    return overhead


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--len", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", choices=("all", "small"), default="all",
                    help="small: only the first shape")
    args = ap.parse_args(argv)
    mods = imports()
    if mods is None:
        return 0
    np, torch, lora = mods
    torch.set_num_threads(args.threads)
    print("lora.torch.LoraAttention vs liblora direct: fwd+bwd, batch 1, exact backend, "
          "%d threads, medians of %d alternating runs (noisy on a loaded machine)"
          % (args.threads, args.reps))
    shapes = SHAPES if args.shapes == "all" else SHAPES[:1]
    for name, config in shapes:
        run_shape(np, torch, lora, name, config, args.len, args.reps, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
