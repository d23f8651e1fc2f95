"""lora.KvCache and Adapter.decode: token-by-token decoding equals one causal inference
forward; many tenants in one batch equal each sequence decoded alone."""
import numpy as np
import pytest

import lora
import reference

pytestmark = pytest.mark.skipif(not lora.has("lora_decode"),
                                reason="the loaded liblora has no lora_decode")


def layer(seed=3, **extra):
    cfg = dict(d_model=16, n_heads=4, n_kv_heads=2, rank=3, targets="qkvo", out_proj=True,
               causal=True, rope="half")
    cfg.update(extra)
    return reference.make_layer(np.random.default_rng(seed), **cfg)


def test_token_by_token_equals_forward():
    ad, _ = layer()
    x = np.random.default_rng(1).standard_normal((2, 7, 16)).astype(np.float32)
    full = ad.forward_ex(x, infer=True)
    with lora.KvCache(ad, batch=2, capacity=7) as cache:
        head = ad.decode(cache, x[:, :3])                   # prefill
        steps = [ad.decode(cache, x[:, i]) for i in range(3, 7)]  # (2, d) each
        assert cache.lengths == [7, 7]
        got = np.concatenate([head] + [s[:, None] for s in steps], axis=1)
        np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
        with pytest.raises(lora.ShapeError):               # over capacity
            ad.decode(cache, x[:, 0])
        assert cache.lengths == [7, 7]
        cache.reset(0)
        assert cache.length(0) == 0 and cache.length(1) == 7
        with pytest.raises(lora.InvalidArgumentError):
            cache.reset(5)


def test_n_tokens_and_tenants():
    base, P = layer(seed=4)
    t1, _ = layer(seed=5, rank=2)
    t2, _ = layer(seed=6, rank=5)
    for t in (t1, t2):  # alone, each tenant runs on base's weights
        for p in "qkvo":
            t.set_base(p, P["W" + p].astype(np.float32), P["b" + p].astype(np.float32))
    x = np.random.default_rng(2).standard_normal((3, 4, 16)).astype(np.float32)
    ids = np.array([1, 0, -1], dtype=np.int32)
    with lora.KvCache(base, batch=3, capacity=8) as cache:
        y = base.decode(cache, x, n_tokens=[4, 2, 0], tenants=[t1, t2], tenant_of_seq=ids)
        assert cache.lengths == [4, 2, 0]
        assert not y[1, 2:].any() and not y[2].any()
    for b, tenant, n in ((0, t2, 4), (1, t1, 2)):
        with lora.KvCache(tenant, batch=1, capacity=8) as own:
            alone = tenant.decode(own, x[b:b + 1, :n])
        np.testing.assert_allclose(y[b, :n], alone[0], rtol=1e-5, atol=1e-5)
