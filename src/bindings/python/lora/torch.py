"""liblora inside PyTorch: `LoraAttention`, an nn.Module whose LoRA factors are
nn.Parameters sharing memory with a liblora adapter, trained with torch.optim.

    import torch, lora.torch
    attn = lora.torch.LoraAttention(64, n_heads=4, rank=8, targets="qv", causal=True)
    attn.set_base("q", wq); attn.set_base("k", wk); attn.set_base("v", wv)
    opt = torch.optim.AdamW(attn.parameters(), lr=1e-3)
    y = attn(x)                     # x: (batch, L, 64) float32, requires_grad or not
    loss = y.square().mean(); loss.backward(); opt.step(); opt.zero_grad()

- Zero copy: each factor Parameter's memory is the adapter's factor. torch.optim writes
  the Parameters in place and liblora sees it (lora_adapter_borrow_factor's
  fingerprint). The factors are ordinary autograd inputs: each backward has liblora
  write their gradients into fresh tensors (borrowed as the adapter's gradient memory)
  that it returns to autograd, which accumulates them into .grad, runs hooks, serves
  torch.autograd.grad and DDP. Nothing writes .grad behind autograd's back.
- Every forward that autograd may differentiate records into its own lora.Tape, so a
  layer can run several times before its backwards (reuse, weight tying, checkpointing,
  chosen/rejected pairs). Forwards under torch.no_grad() (or with nothing requiring
  grad) are LORA_FWD_INFER: nothing is saved. Tapes come from a small per-module pool
  and go back when autograd frees the node, so a training loop allocates no activation
  memory per step.
- float32 on the CPU only: a float64 (or other) input raises lora.DtypeError, with no
  silent cast. `reference(x)` computes the same layer with plain torch ops (any dtype,
  autograd through torch): the oracle of the tests and a fallback for other devices.
- Save the trained factors with `save_peft(directory, [layer0, layer1, ...])`.

Importable only when torch is installed (ImportError otherwise).
"""
import math

import numpy as np
import torch

from . import _core
from ._core import Adapter, Tape
from ._errors import DtypeError, Status, StateError

_LETTERS = "qkvo"


def _as_input(x, name):
    """x as a contiguous CPU float32 tensor without a graph; anything else raises."""
    if not isinstance(x, torch.Tensor):
        raise DtypeError(Status.INVALID_ARG, "%s must be a torch.Tensor" % name)
    if x.dtype != torch.float32:
        raise DtypeError(Status.INVALID_ARG,
                         "%s is %s; liblora computes in float32: convert it explicitly "
                         "(%s.float()), or use LoraAttention.reference for other dtypes"
                         % (name, x.dtype, name))
    if x.device.type != "cpu":
        raise DtypeError(Status.INVALID_ARG, "%s is on %s; liblora runs on the CPU"
                         % (name, x.device))
    return x.detach().contiguous()


def _np(t):
    return None if t is None else t.numpy()


def _ptrs(w, b):
    return (w.data_ptr(), None if b is None else b.data_ptr())


class _TapeLease:
    """A tape of the module's pool, lent to one autograd node: returned to the pool
    when the node is freed (the graph is gone, so no backward can read it again). A
    tape keeps its activation memory between recordings, so a training loop reuses a
    few tapes instead of allocating and faulting in megabytes per forward."""

    __slots__ = ("module", "tape")

    def __init__(self, module):
        pool = module._tape_pool
        self.module = module
        self.tape = pool.pop() if pool else Tape(module.adapter)

    def __del__(self):
        tape, self.tape = self.tape, None
        if tape is None:
            return
        try:
            pool = self.module._tape_pool
            if len(pool) < _TAPE_POOL_MAX and not tape.closed:
                pool.append(tape)
            else:
                tape.close()
        except Exception:  # interpreter shutdown: the tape's own finaliser frees it
            pass


# Idle tapes a module keeps (each holds one forward's activations).
_TAPE_POOL_MAX = 4


class _AttentionFunction(torch.autograd.Function):
    """One liblora forward on its own tape; the backward reads that tape. Inputs: the
    module, the mask arguments, xq, xkv (or None), then the factor Parameters, whose
    gradients backward returns like any other input's: autograd accumulates them
    (into .grad, through hooks, torch.autograd.grad, DDP)."""

    @staticmethod
    def forward(ctx, module, masks, xq, xkv, *factors):
        lease = _TapeLease(module)
        kv = None if xkv is None else _as_input(xkv, "xkv")
        out = module.adapter.forward_ex(_as_input(xq, "xq").numpy(), _np(kv),
                                        tape=lease.tape, **masks)
        ctx.module, ctx.lease, ctx.cross = module, lease, xkv is not None
        return torch.from_numpy(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        module, tape = ctx.module, ctx.lease.tape
        grads = module._fresh_grads()
        want_dx = ctx.needs_input_grad[2] or (ctx.cross and ctx.needs_input_grad[3])
        d = dout.detach().to(torch.float32).contiguous().numpy()
        dx = module.adapter.backward_ex(d, tape=tape, need_dx=want_dx)
        dxq = dxkv = None
        if want_dx:
            dq, dkv = dx if ctx.cross else (dx, None)
            dxq = torch.from_numpy(dq) if ctx.needs_input_grad[2] else None
            if ctx.cross and ctx.needs_input_grad[3]:
                dxkv = torch.from_numpy(dkv)
        dfactors = tuple(g if need else None
                         for g, need in zip(grads, ctx.needs_input_grad[4:]))
        return (None, None, dxq, dxkv) + dfactors


class LoraAttention(torch.nn.Module):
    """A liblora attention layer as an nn.Module.

    LoraAttention(d_model, **config): the keyword configuration of lora.Adapter
    (n_heads, n_kv_heads, head_dim, targets, rank, alpha, rslora, causal, out_proj,
    backend, threads, seed, init, ...). Parameters: lora_A[t] (rank, in) and lora_B[t]
    (out, rank) per adapted target t ("q", "k", "v", "o"). Frozen base projections are
    buffers base_weight_t / base_bias_t, set with set_base (the adapter reads them in
    place). forward(xq, xkv=None, **masks) -> out (batch, len_q, out_dim); masks are
    lora_attn_args' q_lens, kv_lens, q_pos, kv_pos, q_seg, kv_seg (int arrays).
    """

    def __init__(self, d_model, **config):
        super().__init__()
        self.adapter = Adapter(d_model=d_model, **config)
        self.config = self.adapter.config
        self.lora_A = torch.nn.ParameterDict()
        self.lora_B = torch.nn.ParameterDict()
        self._bound = {}  # (target, factor) -> the Parameter's data_ptr the adapter uses
        self._base_ptrs = {}  # target -> (weight data_ptr, bias data_ptr or None)
        self._tape_pool = []  # idle tapes (_TapeLease)
        self._rope_freqs = None  # a table set by set_rope_freqs (float64), for reference
        for t in self.adapter.targets:
            for w, store in (("A", self.lora_A), ("B", self.lora_B)):
                store[t] = torch.nn.Parameter(torch.from_numpy(self.adapter.param(t, w)))
        self._bind_params()

    # -- binding Parameters and buffers to the adapter's storage --

    def _factors(self):
        for t in self.adapter.targets:
            yield t, "A", self.lora_A[t]
            yield t, "B", self.lora_B[t]

    def _check_param(self, t, w, p):
        if p.dtype != torch.float32 or p.device.type != "cpu" or not p.is_contiguous():
            raise DtypeError(Status.INVALID_ARG,
                             "lora_%s[%r] is %s on %s; LoraAttention keeps its factors in "
                             "contiguous CPU float32 (liblora's storage)"
                             % (w, t, p.dtype, p.device))

    def _bind_params(self):
        """Points the adapter at each Parameter's current memory (after .to(), a
        load_state_dict that replaced tensors, ...); cheap when nothing moved."""
        for t, w, p in self._factors():
            key = (t, w)
            if self._bound.get(key) == p.data_ptr():
                continue
            self._check_param(t, w, p)
            self.adapter.borrow_factor(t, w, p.data)
            self._bound[key] = p.data_ptr()

    def _fresh_grads(self):
        """New zeroed tensors, one per factor (_factors' order), made the adapter's
        gradient memory for one backward: liblora accumulates into its gradient, so a
        fresh buffer per backward yields exactly this backward's contribution, handed
        to autograd with no copy. Giving the factor's own memory again is not a
        parameter change, so the tape stays valid."""
        self._bind_params()
        grads = []
        for t, w, p in self._factors():
            g = torch.zeros_like(p, memory_format=torch.contiguous_format)
            self.adapter.borrow_factor(t, w, p.data, g)
            grads.append(g)
        return grads

    def set_base(self, target, weight, bias=None):
        """Copies a frozen base projection (weight (out, in), bias (out) or None) into
        buffers that the adapter reads in place."""
        w = torch.as_tensor(weight).detach().to(torch.float32).contiguous().clone()
        b = None if bias is None else \
            torch.as_tensor(bias).detach().to(torch.float32).contiguous().clone()
        self.register_buffer("base_weight_" + target, w)
        self.register_buffer("base_bias_" + target, b)
        self.adapter.set_base_borrowed(target, w.numpy(), None if b is None else b.numpy())
        self._base_ptrs[target] = _ptrs(w, b)

    def _bind_bases(self):
        """Re-points the adapter at base buffers that moved (.to(), load_state_dict)."""
        for t, ptrs in list(self._base_ptrs.items()):
            w = getattr(self, "base_weight_" + t)
            b = getattr(self, "base_bias_" + t, None)
            if _ptrs(w, b) == ptrs:
                continue
            for name, buf in (("base_weight_", w), ("base_bias_", b)):
                if buf is not None and (buf.dtype != torch.float32 or buf.device.type != "cpu"):
                    raise DtypeError(Status.INVALID_ARG, "%s%s is %s on %s; LoraAttention "
                                     "keeps its bases in CPU float32"
                                     % (name, t, buf.dtype, buf.device))
            self.set_base(t, w, b)

    # -- compute --

    def forward(self, xq, xkv=None, **masks):
        self._bind_params()
        self._bind_bases()
        q = _as_input(xq, "xq")
        kv = None if xkv is None else _as_input(xkv, "xkv")
        factors = [p for _, _, p in self._factors()]
        record = torch.is_grad_enabled() and (
            xq.requires_grad or (xkv is not None and xkv.requires_grad)
            or any(p.requires_grad for p in factors))
        if not record:
            return torch.from_numpy(self.adapter.forward_ex(q.numpy(), _np(kv), infer=True,
                                                            **masks))
        return _AttentionFunction.apply(self, masks, xq, xkv, *factors)

    def set_rope_freqs(self, inv_freq):
        """Replaces RoPE's inverse frequencies (lora_adapter_set_rope_freqs: rope_dim/2
        values) in the adapter and in `reference`."""
        self.adapter.set_rope_freqs(inv_freq)
        self._rope_freqs = torch.as_tensor(np.asarray(inv_freq, dtype=np.float64)).clone()

    def _rope(self, x, first):
        """x (batch, heads, length, head_dim) rotated at positions first, first + 1, ...
        as the configured RoPE does it (angles in float64, applied in x's dtype)."""
        c = self.config
        if c["rope"] == _core.Rope.NONE:
            return x
        rd = c["rope_dim"]
        inv = self._rope_freqs
        if inv is None:
            inv = c["rope_theta"] ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)
        pos = torch.arange(first, first + x.shape[-2], dtype=torch.float64)
        angle = torch.outer(pos, inv)
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        rot, rest = x[..., :rd], x[..., rd:]
        if c["rope"] == _core.Rope.HALF:  # Hugging Face rotate_half: i pairs with i + rd/2
            x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
            rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:  # interleaved (GPT-J, Meta): 2i pairs with 2i + 1
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((rot, rest), dim=-1)

    def reference(self, xq, xkv=None, factors=None):
        """The same layer in plain torch ops, in xq's dtype, differentiable by autograd
        (RoPE at liblora's default positions; no per-call masks, window, softcap
        or dropout): the tests' oracle. factors: {("q", "A"): tensor, ...} to use
        instead of this module's Parameters."""
        c = self.config
        for name in ("window", "softcap", "dropout"):
            if c[name]:
                raise NotImplementedError("LoraAttention.reference has no %s" % name)
        factors = factors or {}
        dt = xq.dtype
        xkv = xq if xkv is None else xkv
        r = c["rank"]
        s = c["alpha"] / (math.sqrt(r) if c["rslora"] else r)
        H, Hkv, dh = c["n_heads"], c["n_kv_heads"], c["head_dim"]

        def proj(x, t):
            w = getattr(self, "base_weight_" + t)
            b = getattr(self, "base_bias_" + t, None)
            y = torch.nn.functional.linear(x, w.to(dt), None if b is None else b.to(dt))
            if t in self.lora_A:
                a = factors.get((t, "A"), self.lora_A[t]).to(dt)
                bb = factors.get((t, "B"), self.lora_B[t]).to(dt)
                y = y + s * (x @ a.T) @ bb.T
            return y

        B, Lq, Lkv = xq.shape[0], xq.shape[1], xkv.shape[1]
        # liblora's default positions: keys j, queries (Lkv - Lq) + i
        q = self._rope(proj(xq, "q").view(B, Lq, H, dh).transpose(1, 2), Lkv - Lq)
        k = self._rope(proj(xkv, "k").view(B, Lkv, Hkv, dh).transpose(1, 2), 0)
        v = proj(xkv, "v").view(B, Lkv, Hkv, dh).transpose(1, 2)
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
        scores = c["softmax_scale"] * (q @ k.transpose(-1, -2))
        if c["causal"]:
            i = torch.arange(Lq)[:, None]
            j = torch.arange(Lkv)[None, :]
            scores = scores.masked_fill(j > i + (Lkv - Lq), float("-inf"))
        o = torch.softmax(scores, dim=-1) @ v
        o = o.transpose(1, 2).reshape(B, Lq, H * dh)
        return proj(o, "o") if c["out_proj"] else o

    def extra_repr(self):
        c = self.config
        return "d_model=%d, n_heads=%d, rank=%d, targets=%s" % (
            c["d_model"], c["n_heads"], c["rank"], self.adapter.targets)


def save_peft(directory, layers):
    """Writes the LoRA factors of LoraAttention modules as a PEFT adapter directory:
    `layers` is a list (layer indices 0, 1, ...) or {layer index: LoraAttention}."""
    items = layers.items() if isinstance(layers, dict) else enumerate(layers)
    adapters = {}
    for i, m in items:
        if not isinstance(m, LoraAttention):
            raise StateError(Status.INVALID_ARG, "layer %r is not a LoraAttention" % (i,))
        m._bind_params()
        adapters[i] = m.adapter
    _core.save_peft(directory, adapters)


__all__ = ["LoraAttention", "save_peft"]
