"""lora.torch: LoraAttention against the same layer in plain torch ops (float64), the
autograd paths, and the worked example's 50 training steps against its pure-torch twin."""
import importlib.util
import os

import numpy as np
import pytest

import lora

torch = pytest.importorskip("torch", reason="PyTorch not installed (Debian: python3-torch)")
import lora.torch as lt  # noqa: E402

pytestmark = pytest.mark.skipif(not lora.has("lora_adapter_borrow_factor"),
                                reason="the loaded liblora has no borrowed factors")

TOL = 1e-4  # float32 against float64, relative to the largest entry


def layer(seed=0, **extra):
    cfg = dict(n_heads=4, n_kv_heads=2, rank=3, alpha=5.0, targets="qkvo", out_proj=True,
               causal=True, backend="exact", threads=1, seed=seed)
    cfg.update(extra)
    m = lt.LoraAttention(12, **cfg)
    gen = torch.Generator().manual_seed(seed)
    for t in "qkvo":
        out, inp = m.adapter.base_shape(t)
        m.set_base(t, 0.4 * torch.randn(out, inp, generator=gen),
                   0.1 * torch.randn(out, generator=gen))
    with torch.no_grad():  # B is zero at PEFT's init: make every gradient non-trivial
        for p in list(m.lora_A.values()) + list(m.lora_B.values()):
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return m


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def reference_grads(m, xq, xkv, g):
    """out and gradients of sum(out * g) from LoraAttention.reference in float64."""
    x64 = xq.detach().double().requires_grad_()
    kv64 = None if xkv is None else xkv.detach().double().requires_grad_()
    f64 = {(t, w): getattr(m, "lora_" + w)[t].detach().double().requires_grad_()
           for t in m.adapter.targets for w in "AB"}
    out = m.reference(x64, kv64, factors=f64)
    (out * g.double()).sum().backward()
    return out, x64.grad, None if kv64 is None else kv64.grad, {k: v.grad for k, v in f64.items()}


def test_reference_is_correct_by_finite_differences():
    m = layer(1, n_heads=2, n_kv_heads=1, rank=2)
    x = torch.randn(1, 3, 12, dtype=torch.float64, requires_grad=True)
    f64 = {("q", "A"): m.lora_A["q"].detach().double().requires_grad_()}
    assert torch.autograd.gradcheck(
        lambda x_, a_: m.reference(x_, factors={("q", "A"): a_}), (x, f64[("q", "A")]))


@pytest.mark.parametrize("cross", [False, True])
def test_gradients_match_float64_reference(cross):
    m = layer(2)
    gen = torch.Generator().manual_seed(3)
    xq = torch.randn(2, 5, 12, generator=gen, requires_grad=True)
    xkv = torch.randn(2, 7, 12, generator=gen, requires_grad=True) if cross else None
    g = torch.randn(2, 5, 12, generator=gen)
    out = m(xq, xkv)
    (out * g).sum().backward()
    ref_out, ref_dxq, ref_dxkv, ref_f = reference_grads(m, xq, xkv, g)
    assert rel(out, ref_out) < TOL
    assert rel(xq.grad, ref_dxq) < TOL
    if cross:
        assert rel(xkv.grad, ref_dxkv) < TOL
    for (t, w), want in ref_f.items():
        assert rel(getattr(m, "lora_" + w)[t].grad, want) < TOL, (t, w)


@pytest.mark.parametrize("rope,rope_dim,custom,cross", [
    ("half", None, False, False), ("interleaved", None, False, False),
    ("half", 2, False, True), ("interleaved", 2, True, False), ("half", None, True, True)])
def test_rope_gradients_match_float64_reference(rope, rope_dim, custom, cross):
    """RoPE in the module (liblora) and in reference (torch ops): both layouts, partial
    rotation, a custom frequency table, cross-attention (query positions offset)."""
    extra = dict(rope=rope, head_dim=4, rope_theta=100.0)
    if rope_dim:
        extra["rope_dim"] = rope_dim
    m = layer(8, **extra)
    if custom:
        n = m.config["rope_dim"] // 2
        m.set_rope_freqs(np.linspace(0.9, 0.05, n))
    gen = torch.Generator().manual_seed(9)
    xq = torch.randn(2, 5, 12, generator=gen, requires_grad=True)
    xkv = torch.randn(2, 7, 12, generator=gen, requires_grad=True) if cross else None
    g = torch.randn(2, 5, 12, generator=gen)
    out = m(xq, xkv)
    (out * g).sum().backward()
    ref_out, ref_dxq, ref_dxkv, ref_f = reference_grads(m, xq, xkv, g)
    assert rel(out, ref_out) < TOL
    assert rel(xq.grad, ref_dxq) < TOL
    if cross:
        assert rel(xkv.grad, ref_dxkv) < TOL
    for (t, w), want in ref_f.items():
        assert rel(getattr(m, "lora_" + w)[t].grad, want) < TOL, (t, w)
    m0 = layer(8, **dict(extra, rope="none"))  # the rotation changes the output
    assert rel(m0.reference(xq.detach().double(), None if xkv is None else
                            xkv.detach().double()), ref_out) > 1e-3


def test_tapes_come_from_a_pool():
    """A training loop reuses the module's tapes (and their activation memory) once
    autograd has freed a step's graph; forwards in flight get tapes of their own."""
    m = layer(10)
    x = torch.randn(2, 4, 12, requires_grad=True)
    y = m(x)
    first = y.grad_fn.lease.tape
    y.sum().backward()
    del y  # frees the graph: the tape goes back to the pool
    y = m(x)
    assert y.grad_fn.lease.tape is first
    y2 = m(x)
    assert y2.grad_fn.lease.tape is not first
    (y + y2).sum().backward()
    del y, y2
    assert len(m._tape_pool) == 2


def test_layer_reused_twice_before_backward():
    """Two forwards of one layer in flight (each on its own tape)."""
    m = layer(4)
    x = torch.randn(2, 4, 12, requires_grad=True)
    g = torch.randn(2, 4, 12)
    (m(m(x)) * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    f64 = {(t, w): getattr(m, "lora_" + w)[t].detach().double().requires_grad_()
           for t in m.adapter.targets for w in "AB"}
    (m.reference(m.reference(x64, factors=f64), factors=f64) * g.double()).sum().backward()
    assert rel(x.grad, x64.grad) < TOL
    for (t, w), p in f64.items():
        assert rel(getattr(m, "lora_" + w)[t].grad, p.grad) < TOL, (t, w)


def factor_params(m):
    return [(t, w, getattr(m, "lora_" + w)[t]) for t in m.adapter.targets for w in "AB"]


def test_factor_grads_accumulate_like_torch():
    """Two backwards add into .grad (autograd accumulates what backward returns);
    zero_grad(set_to_none=True) starts again; retain_graph backwards the same tape twice."""
    m = layer(5)
    x = torch.randn(2, 4, 12)  # no grad: the factors alone make autograd call backward
    m(x).sum().backward()
    g1 = {k: p.grad.clone() for k, p in m.named_parameters()}
    m(x).sum().backward()
    for k, p in m.named_parameters():
        assert torch.allclose(p.grad, 2 * g1[k], rtol=1e-6, atol=1e-6), k
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.zero_grad(set_to_none=True)
    y = m(x).sum()
    y.backward(retain_graph=True)
    y.backward()
    for k, p in m.named_parameters():
        assert torch.allclose(p.grad, 2 * g1[k], rtol=1e-6, atol=1e-6), k


def test_autograd_grad_on_factors_leaves_grad_untouched():
    m = layer(8)
    x = torch.randn(2, 4, 12, requires_grad=True)
    g = torch.randn(2, 4, 12)
    params = [p for _, _, p in factor_params(m)]
    got = torch.autograd.grad((m(x) * g).sum(), params + [x])
    assert all(p.grad is None for p in params) and x.grad is None
    (m(x) * g).sum().backward()
    for (t, w, p), d in zip(factor_params(m), got):
        assert d is not None and torch.equal(d, p.grad), (t, w)
    _, dx64, _, f64 = reference_grads(m, x, None, g)
    assert rel(got[-1], dx64) < TOL
    for (t, w, _), d in zip(factor_params(m), got):
        assert rel(d, f64[(t, w)]) < TOL, (t, w)
    # one factor alone (no allow_unused needed), and .grad again left as it was
    before = m.lora_B["q"].grad.clone()
    (dbq,) = torch.autograd.grad((m(x) * g).sum(), [m.lora_B["q"]])
    assert torch.equal(dbq, before) and torch.equal(m.lora_B["q"].grad, before)


def test_hooks_on_factor_parameters_fire():
    m = layer(9)
    x = torch.randn(2, 4, 12)
    seen = {}
    for t, w, p in factor_params(m):
        p.register_hook(lambda grad, key=(t, w): seen.setdefault(key, grad.clone()))
    doubled = m.lora_A["k"]
    doubled.register_hook(lambda grad: 2 * grad)  # a hook's result is what accumulates
    m(x).sum().backward()
    assert set(seen) == {(t, w) for t, w, _ in factor_params(m)}
    for t, w, p in factor_params(m):
        want = 2 * seen[(t, w)] if (t, w) == ("k", "A") else seen[(t, w)]
        assert torch.equal(p.grad, want), (t, w)


def test_frozen_factors_get_no_gradient():
    m = layer(10)
    m.lora_A["q"].requires_grad_(False)
    m(torch.randn(2, 4, 12)).sum().backward()
    assert m.lora_A["q"].grad is None and m.lora_B["q"].grad is not None


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_gives_the_same_gradients(reentrant):
    from torch.utils.checkpoint import checkpoint
    m = layer(13)
    x = torch.randn(2, 4, 12, requires_grad=True)
    g = torch.randn(2, 4, 12)
    (m(m(x)) * g).sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for _, _, p in factor_params(m)]
    m.zero_grad(set_to_none=True)
    x.grad = None
    y = checkpoint(lambda a: m(m(a)), x, use_reentrant=reentrant)
    (y * g).sum().backward()
    got = [x.grad] + [p.grad for _, _, p in factor_params(m)]
    for w, d in zip(want, got):
        assert torch.allclose(d, w, rtol=1e-5, atol=1e-6)


def test_double_backward_through_layer_raises():
    """The node is once-differentiable: a second derivative through it is refused."""
    m = layer(11)
    x = torch.randn(2, 4, 12, requires_grad=True)
    g = torch.randn(2, 4, 12, requires_grad=True)
    (dx,) = torch.autograd.grad(m(x), [x], grad_outputs=g, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


def test_no_grad_is_inference_and_equal():
    m = layer(6)
    x = torch.randn(2, 4, 12)
    with torch.no_grad():
        y0 = m(x)
    y1 = m(x.clone().requires_grad_())
    assert torch.equal(y0, y1.detach())
    for p in m.parameters():
        p.requires_grad_(False)
    y2 = m(x)  # nothing requires grad: no tape either
    assert not y2.requires_grad and torch.equal(y0, y2)


def test_float64_is_refused():
    m = layer(7)
    with pytest.raises(lora.DtypeError, match="float64"):
        m(torch.randn(2, 4, 12, dtype=torch.float64))
    m.double()
    with pytest.raises(lora.DtypeError, match="float64"):
        m(torch.randn(2, 4, 12))


def test_worked_example_matches_pure_torch_twin(tmp_path):
    """examples/torch_finetune.py: 50 AdamW steps of the liblora model (RoPE layers)
    against its pure-torch twin (RoPE in torch ops) within 1e-4 relative, then a PEFT save and reload."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "examples",
                        "torch_finetune.py")
    if not os.path.exists(path):
        pytest.skip("the examples/ directory of a checkout is not here")
    spec = importlib.util.spec_from_file_location("torch_finetune", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.TinyLM()
    assert all(a.config["rope"] == lora.Rope.HALF for a in model.attn)  # RoPE layers
    lib = example.train(model)
    twin = example.train(example.TinyLM(reference=True))
    assert len(lib) == 50 and lib[-1] < 0.5 * lib[0]
    assert max(abs(a - b) / abs(b) for a, b in zip(lib, twin)) < 1e-4
    assert example.main([str(tmp_path / "peft")]) == 0


def _ddp_rank(rank, store_file, result_file):
    """One DDP process: its own input; saves its factors' .grad after one backward."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="file://" + store_file, rank=rank,
                            world_size=2)
    try:
        m = layer(12)
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        x = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(100 + rank))
        ddp(x).sum().backward()
        torch.save({k: p.grad for k, p in m.named_parameters()}, result_file % rank)
    finally:
        dist.destroy_process_group()


def test_ddp_averages_factor_gradients(tmp_path):
    """DDP reduces what autograd accumulates: each rank ends with the mean over ranks."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed without gloo")
    result = str(tmp_path / "grads%d.pt")
    torch.multiprocessing.spawn(_ddp_rank, args=(str(tmp_path / "store"), result),
                                nprocs=2, join=True)
    got = [torch.load(result % r) for r in range(2)]
    m = layer(12)
    mean = {k: torch.zeros_like(p) for k, p in m.named_parameters()}
    for r in range(2):
        m.zero_grad(set_to_none=True)
        x = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(100 + r))
        m(x).sum().backward()
        for k, p in m.named_parameters():
            mean[k] += p.grad / 2
    for k in mean:
        for r in range(2):
            assert torch.allclose(got[r][k], mean[k], rtol=1e-5, atol=1e-5), (k, r)
