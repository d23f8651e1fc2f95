"""Adapter files written by liblora, read back by independent readers written here with
json + numpy only (no liblora code): PEFT's safetensors and llama.cpp's GGUF."""
import json
import struct

import numpy as np
import pytest

import lora

PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
GGUF_PROJ = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}


def need(name):
    if not lora.has(name):
        pytest.skip("liblora %s has no %s" % (lora.version(), name))


def read_safetensors(path):
    """{name: ndarray} and the metadata: 8-byte little-endian header length, a JSON
    header {name: {dtype, shape, data_offsets}}, then the raw little-endian data."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = blob[8 + n:]
    meta = header.pop("__metadata__", {})
    dtypes = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}
    out = {}
    end_max = 0
    for name, info in header.items():
        begin, end = info["data_offsets"]
        assert 0 <= begin <= end <= len(data), name
        arr = np.frombuffer(data[begin:end], dtype=dtypes[info["dtype"]])
        out[name] = arr.reshape(info["shape"])
        end_max = max(end_max, end)
    assert end_max == len(data), "trailing bytes after the last tensor"
    return out, meta


def read_gguf(path):
    """(metadata dict, {name: ndarray}) of a GGUF v2/v3 file with F32 tensors."""
    with open(path, "rb") as f:
        blob = f.read()
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, blob, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string():
        nonlocal pos
        n = take("Q")
        s = blob[pos:pos + n].decode("utf-8")
        pos += n
        return s

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
              11: "q", 12: "d"}

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        return take(scalar[t])

    assert blob[:4] == b"GGUF"
    pos = 4
    version = take("I")
    assert version in (2, 3)
    n_tensors, n_kv = take("Q"), take("Q")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        n_dims = take("I")
        dims = [take("Q") for _ in range(n_dims)]
        ggml_type, offset = take("I"), take("Q")
        infos.append((name, dims, ggml_type, offset))
    align = meta.get("general.alignment", 32)
    base = (pos + align - 1) // align * align
    tensors = {}
    for name, dims, ggml_type, offset in infos:
        assert ggml_type == 0, "F32 expected"  # GGML_TYPE_F32
        assert offset % align == 0
        count = int(np.prod(dims))
        start = base + offset
        assert start + 4 * count <= len(blob)
        arr = np.frombuffer(blob[start:start + 4 * count], dtype="<f4")
        tensors[name] = arr.reshape(list(reversed(dims)))  # ggml ne0 is the fastest
    return meta, tensors


@pytest.fixture
def adapter_set():
    ads = {}
    for i, layer in enumerate([0, 5, 2]):
        ad = lora.Adapter(d_model=12, n_heads=3, n_kv_heads=1, rank=2, alpha=4.0,
                          targets="qkvo", out_proj=True, seed=10 + i)
        rng = np.random.default_rng(i)
        for t in ad.targets:
            for f in "AB":
                ad.set_param(t, f, rng.standard_normal(ad.param_shape(t, f))
                             .astype(np.float32))
        ads[layer] = ad
    return ads


def test_peft_safetensors_independent_reader(adapter_set, tmp_path):
    need("lora_save_peft")
    d = tmp_path / "adapter"
    lora.save_peft(str(d), adapter_set)
    tensors, meta = read_safetensors(d / "adapter_model.safetensors")
    assert len(tensors) == 3 * 4 * 2
    for layer, ad in adapter_set.items():
        for t in "qkvo":
            for f in "AB":
                name = "base_model.model.model.layers.%d.self_attn.%s.lora_%s.weight" % (
                    layer, PROJ[t], f)
                assert tensors[name].dtype == np.float32
                assert tensors[name].shape == ad.param_shape(t, f)
                assert np.array_equal(tensors[name], ad.param(t, f)), name
    assert tensors["base_model.model.model.layers.5.self_attn.k_proj.lora_B.weight"].shape \
        == (4, 2)  # kv_dim = 1 head of 4
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4 and cfg["use_rslora"] is False
    assert cfg["peft_type"] == "LORA"
    assert sorted(cfg["target_modules"]) == sorted(PROJ.values())
    assert isinstance(meta, dict)


def test_peft_roundtrip_and_errors(adapter_set, tmp_path):
    need("lora_load_peft")
    d = tmp_path / "adapter"
    lora.save_peft(str(d), adapter_set)
    loaded = lora.load_peft(str(d), d_model=12, n_heads=3, n_kv_heads=1, out_proj=True)
    assert sorted(loaded) == [0, 2, 5]
    for layer, ad in loaded.items():
        assert ad.targets == "qkvo" and ad.config["alpha"] == 4.0
        for k, v in adapter_set[layer].params.items():
            assert np.array_equal(ad.params[k], v)
    with pytest.raises(lora.LoraIOError):
        lora.load_peft(str(tmp_path / "missing"), d_model=12, n_heads=3)
    with pytest.raises(lora.ShapeError):  # the file's factors do not fit d_model 16
        lora.load_peft(str(d), d_model=16, n_heads=4, n_kv_heads=1, out_proj=True)
    st = d / "adapter_model.safetensors"
    blob = st.read_bytes()
    st.write_bytes(blob[:len(blob) - 10])  # truncated data
    with pytest.raises(lora.FormatError) as e:
        lora.load_peft(str(d), d_model=12, n_heads=3, n_kv_heads=1, out_proj=True)
    assert e.value.message
    st.write_bytes(struct.pack("<Q", 1 << 60) + blob[8:])  # hostile header length
    with pytest.raises(lora.FormatError):
        lora.load_peft(str(d), d_model=12, n_heads=3, n_kv_heads=1, out_proj=True)
    with pytest.raises(lora.InvalidArgumentError):  # duplicate layer
        lora.save_peft(str(tmp_path / "x"), list(adapter_set.values()), [1, 1, 2])


def hf_to_interleaved(rows, heads):
    """Q/K rows from Hugging Face's rotate_half order to the interleaved one of a llama
    GGUF: per head of d rows, row 2i + c comes from row c*d/2 + i."""
    d = rows.shape[0] // heads
    out = np.empty_like(rows)
    for h in range(heads):
        for i in range(d // 2):
            for c in range(2):
                out[h * d + 2 * i + c] = rows[h * d + c * d // 2 + i]
    return out


def test_gguf_independent_reader_and_roundtrip(adapter_set, tmp_path):
    need("lora_save_gguf")
    for arch in ("llama", "qwen2"):
        path = tmp_path / ("adapter-%s.gguf" % arch)
        lora.save_gguf(str(path), adapter_set, architecture=arch)
        meta, tensors = read_gguf(path)
        assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
        assert meta["general.architecture"] == arch
        assert meta["adapter.lora.alpha"] == pytest.approx(4.0)
        assert (meta["liblora.n_heads"], meta["liblora.n_kv_heads"]) == (3, 1)
        permuted = arch == "llama"  # llama.cpp's NORM RoPE; qwen2 runs NEOX on HF rows
        assert meta["liblora.qk_rows"] == ("interleaved" if permuted else "half")
        for layer, ad in adapter_set.items():
            for t in "qkvo":
                a = tensors["blk.%d.%s.weight.lora_a" % (layer, GGUF_PROJ[t])]
                b = tensors["blk.%d.%s.weight.lora_b" % (layer, GGUF_PROJ[t])]
                want_b = ad.param(t, "B")
                if permuted and t in "qk":
                    want_b = hf_to_interleaved(want_b, 3 if t == "q" else 1)
                    assert not np.array_equal(want_b, ad.param(t, "B"))
                assert np.array_equal(a, ad.param(t, "A")) and np.array_equal(b, want_b)
    path = tmp_path / "adapter-llama.gguf"
    need("lora_load_gguf")
    loaded = lora.load_gguf(str(path), d_model=12, n_heads=3, n_kv_heads=1, out_proj=True)
    assert sorted(loaded) == [0, 2, 5]
    assert np.array_equal(loaded[5].get_params_flat(), adapter_set[5].get_params_flat())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(lora.FormatError):
        lora.load_gguf(str(path), d_model=12, n_heads=3, n_kv_heads=1, out_proj=True)


def test_base_model_name_or_path(adapter_set, tmp_path):
    need("lora_save_peft_ex")
    d = tmp_path / "adapter"
    lora.save_peft(str(d), adapter_set, base_model_name_or_path="meta-llama/Llama-3.2-1B")
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "meta-llama/Llama-3.2-1B"
    lora.save_peft(str(d), adapter_set)
    assert json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    path = tmp_path / "a.gguf"
    lora.save_gguf(str(path), adapter_set, architecture="qwen2",
                   base_model_name_or_path="Qwen/Qwen2-0.5B")
    meta, _ = read_gguf(path)
    assert meta["general.architecture"] == "qwen2"
    assert meta["general.base_model.count"] == 1
    assert meta["general.base_model.0.name"] == "Qwen/Qwen2-0.5B"
    assert meta["general.base_model.0.repo_url"] == "https://huggingface.co/Qwen/Qwen2-0.5B"
    with pytest.raises(lora.InvalidArgumentError):
        lora.save_gguf(str(path), adapter_set, base_model_name_or_path="bad\x01name")


def test_rope_freqs_recorded_and_restored(tmp_path):
    """A custom RoPE table (Adapter.set_rope_freqs) travels with the files: the PEFT
    __metadata__ holds it as JSON text, and a load gives the loaded adapter the same
    function as the saved one (a default table would not)."""
    need("lora_adapter_set_rope_freqs")
    cfg = dict(d_model=16, n_heads=2, rank=2, targets="qk", rope="half", threads=1)
    rng = np.random.default_rng(3)
    ad = lora.Adapter(seed=1, **cfg)
    ad.set_rope_freqs([0.9, 0.5, 0.25, 0.003])
    bases = {t: rng.standard_normal(ad.base_shape(t)).astype(np.float32) for t in "qkv"}
    for t in "qk":
        for f in "AB":
            ad.set_param(t, f, rng.standard_normal(ad.param_shape(t, f)).astype(np.float32))
    for t, w in bases.items():
        ad.set_base(t, w)
    x = rng.standard_normal((1, 7, 16)).astype(np.float32)
    want = ad.forward(x)
    d = tmp_path / "peft"
    lora.save_peft(str(d), {0: ad})
    _, meta = read_safetensors(d / "adapter_model.safetensors")
    assert json.loads(meta["liblora.rope_freqs"]) == [0.9, 0.5, 0.25, 0.003]
    gguf = tmp_path / "a.gguf"
    lora.save_gguf(str(gguf), {0: ad})
    for back in (lora.load_peft(str(d), **cfg)[0], lora.load_gguf(str(gguf), **cfg)[0]):
        for t, w in bases.items():
            back.set_base(t, w)
        np.testing.assert_array_equal(back.forward(x), want)
    plain = lora.Adapter(seed=1, **cfg)
    plain.copy_params_from(ad)
    for t, w in bases.items():
        plain.set_base(t, w)
    assert not np.array_equal(plain.forward(x), want)
