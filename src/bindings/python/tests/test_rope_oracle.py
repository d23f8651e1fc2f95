"""RoPE layouts against PyTorch, independent of the library.

HF's rotate_half RoPE (liblora's LORA_ROPE_HALF) on a checkpoint in HF row order equals
the interleaved (complex, Meta / GGUF llama: LORA_ROPE_INTERLEAVED) RoPE on the same
checkpoint with its Q/K rows permuted the way convert_hf_to_gguf.py's LlamaModel.permute
does, once the result is permuted back. The permutation is written here from its index
map (per head of head_dim d: new row 2i + c = old row c*d/2 + i), the same map as the C
reference's ref_rope_permute_rows, which the library's GGUF writer must reproduce.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed (Debian: python3-torch)")


def hf_to_gguf_rows(n_heads, head_dim):
    """Index array: gguf_rows = hf_rows[idx] (LlamaModel.permute for n_heads heads)."""
    idx = np.empty(n_heads * head_dim, dtype=np.int64)
    half = head_dim // 2
    for h in range(n_heads):
        for i in range(half):
            for c in range(2):
                idx[h * head_dim + 2 * i + c] = h * head_dim + c * half + i
    return idx


def permute(w, n_heads):
    return w[hf_to_gguf_rows(n_heads, w.shape[0] // n_heads)]


def unpermute(w, n_heads):
    out = np.empty_like(w)
    out[hf_to_gguf_rows(n_heads, w.shape[0] // n_heads)] = w
    return out


def inv_freq(head_dim, theta):
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def rope_half(x, pos, theta):
    """HF: x*cos + rotate_half(x)*sin, cos/sin of cat(freqs, freqs). x: (L, heads, d)."""
    d = x.shape[-1]
    freqs = torch.outer(pos.to(torch.float64), inv_freq(d, theta))
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


def rope_interleaved(x, pos, theta):
    """Meta: consecutive pairs as complex numbers times polar(1, pos*freq)."""
    d = x.shape[-1]
    freqs = torch.outer(pos.to(torch.float64), inv_freq(d, theta))
    cis = torch.polar(torch.ones_like(freqs), freqs)[:, None, :]
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * cis).flatten(-2)


def test_permutation_index_map_known_rows():
    assert hf_to_gguf_rows(1, 4).tolist() == [0, 2, 1, 3]
    assert hf_to_gguf_rows(2, 6).tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]
    w = np.arange(24.0).reshape(12, 2)
    assert np.array_equal(unpermute(permute(w, 2), 2), w)


@pytest.mark.parametrize("n_heads,n_kv,head_dim,theta", [(4, 4, 8, 10000.0),
                                                         (4, 2, 6, 500000.0),
                                                         (6, 1, 4, 100.0)])
def test_half_equals_permuted_interleaved(n_heads, n_kv, head_dim, theta):
    rng = np.random.default_rng(n_heads * 100 + head_dim)
    d_model, L = 10, 9
    wq = rng.standard_normal((n_heads * head_dim, d_model))
    wk = rng.standard_normal((n_kv * head_dim, d_model))
    x = rng.standard_normal((L, d_model))
    pos = torch.tensor([0, 1, 2, 3, 7, 8, 100, 5000, 3], dtype=torch.int64)

    def heads(m, n):
        return torch.from_numpy(m).reshape(L, n, head_dim)

    q_hf = rope_half(heads(x @ wq.T, n_heads), pos, theta).reshape(L, -1).numpy()
    k_hf = rope_half(heads(x @ wk.T, n_kv), pos, theta).reshape(L, -1).numpy()
    # GGUF order: Q rows permuted over n_head heads, K rows over n_head_kv heads.
    q_il = rope_interleaved(heads(x @ permute(wq, n_heads).T, n_heads), pos, theta)
    k_il = rope_interleaved(heads(x @ permute(wk, n_kv).T, n_kv), pos, theta)
    q_back = unpermute(q_il.reshape(L, -1).numpy().T, n_heads).T
    k_back = unpermute(k_il.reshape(L, -1).numpy().T, n_kv).T
    np.testing.assert_allclose(q_back, q_hf, rtol=0, atol=1e-12)
    np.testing.assert_allclose(k_back, k_hf, rtol=0, atol=1e-12)
    # Scores need no un-permuting: both sides permute the same dims of a head.
    g = n_heads // n_kv
    for h in range(n_heads):
        qs = slice(h * head_dim, (h + 1) * head_dim)
        ks = slice((h // g) * head_dim, (h // g + 1) * head_dim)
        s_hf = q_hf[:, qs] @ k_hf[:, ks].T
        s_il = q_il.reshape(L, -1).numpy()[:, qs] @ k_il.reshape(L, -1).numpy()[:, ks].T
        np.testing.assert_allclose(s_il, s_hf, rtol=0, atol=1e-10)
    # Without the permutation the layouts disagree (the GGUF bug the permutation fixes).
    q_wrong = rope_interleaved(heads(x @ wq.T, n_heads), pos, theta).reshape(L, -1).numpy()
    assert np.abs(q_wrong - q_hf).max() > 1e-3
