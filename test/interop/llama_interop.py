"""liblora's GGUF adapters applied by real llama.cpp (test/interop/run.sh runs this).

A tiny Llama (random weights, 2 layers, d_model 64, 4 query heads over 2 KV heads) is
written as a Hugging Face checkpoint and converted by llama.cpp's own
convert_hf_to_gguf.py (which permutes the Q/K rows for llama.cpp's NORM RoPE). liblora
makes a LoRA adapter for layer 1's Q/K/V/O (RoPE HALF, as the model) and saves it as
GGUF. llama.cpp's logits for base + adapter must equal its logits for a second
checkpoint whose weights liblora merged (lora_adapter_merge) and the converter
converted. Controls: the base alone differs; the adapter with Hugging Face's row order
(what liblora wrote before) differs; llama.cpp's convert_lora_to_gguf.py run on
liblora's PEFT output writes the same factors as liblora's GGUF.

Usage: llama_interop.py WORKDIR LLAMA_CPP_SRC LLAMA_LOGITS
Environment: LORA_LIBRARY (liblora.so), PYTHONPATH with the liblora binding, gguf-py and
the transformers shim. Prints one line per check; exit status 1 on a failed check."""
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np

import lora

D_MODEL, N_HEADS, N_KV_HEADS, N_LAYERS, FFN = 64, 4, 2, 2, 128
HEAD_DIM = D_MODEL // N_HEADS
ADAPTED_LAYER, RANK, ALPHA = 1, 4, 8.0
TOLERANCE = 1e-4  # max |logit difference| / max |logit|
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")

failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)


def write_safetensors(path, tensors, metadata=None):
    """F32 tensors in the safetensors layout (8-byte header length, JSON, data)."""
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    data = blob[8 + n:]
    out = {}
    for name, info in header.items():
        assert info["dtype"] == "F32", name
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(data[b:e], dtype="<f4").reshape(info["shape"]).copy()
    return out


def train_tokenizer(model_dir, rng):
    """A small SentencePiece model (the converter reads tokenizer.model)."""
    import sentencepiece as spm
    letters = "abcdefghij"
    corpus = os.path.join(model_dir, "corpus.txt")
    with open(corpus, "w") as f:
        for _ in range(2000):
            words = ["".join(rng.choice(list(letters), size=rng.integers(1, 6)))
                     for _ in range(rng.integers(3, 10))]
            f.write(" ".join(words) + "\n")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(model_dir, "tokenizer"), vocab_size=96,
        model_type="unigram", character_coverage=1.0, num_threads=1,
        hard_vocab_limit=False, minloglevel=2)
    os.remove(corpus)
    os.remove(os.path.join(model_dir, "tokenizer.vocab"))
    return spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "tokenizer.model"))


def make_checkpoint(model_dir, weights, vocab):
    os.makedirs(model_dir, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": D_MODEL, "intermediate_size": FFN, "num_hidden_layers": N_LAYERS,
        "num_attention_heads": N_HEADS, "num_key_value_heads": N_KV_HEADS,
        "head_dim": HEAD_DIM, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 256, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1,
        "eos_token_id": 2, "attention_bias": False, "mlp_bias": False,
    }
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    write_safetensors(os.path.join(model_dir, "model.safetensors"), weights)


def random_weights(rng, vocab):
    def lin(out, inp):
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, D_MODEL)).astype(np.float32),
         "model.norm.weight": (1 + 0.1 * rng.standard_normal(D_MODEL)).astype(np.float32),
         "lm_head.weight": lin(vocab, D_MODEL)}
    q_dim, kv_dim = N_HEADS * HEAD_DIM, N_KV_HEADS * HEAD_DIM
    for i in range(N_LAYERS):
        p = "model.layers.%d." % i
        w[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(D_MODEL)).astype(np.float32)
        w[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(D_MODEL)).astype(np.float32)
        w[p + "self_attn.q_proj.weight"] = 2 * lin(q_dim, D_MODEL)
        w[p + "self_attn.k_proj.weight"] = 2 * lin(kv_dim, D_MODEL)
        w[p + "self_attn.v_proj.weight"] = lin(kv_dim, D_MODEL)
        w[p + "self_attn.o_proj.weight"] = lin(D_MODEL, q_dim)
        w[p + "mlp.gate_proj.weight"] = lin(FFN, D_MODEL)
        w[p + "mlp.up_proj.weight"] = lin(FFN, D_MODEL)
        w[p + "mlp.down_proj.weight"] = lin(D_MODEL, FFN)
    return w


def make_adapter(rng):
    """Layer 1's LoRA (RoPE HALF as the model; a build that cannot compute RoPE yet
    refuses that at create, then the adapter is made without it: the files are the
    same, HALF and NONE both hold Hugging Face's rows)."""
    kw = dict(d_model=D_MODEL, n_heads=N_HEADS, n_kv_heads=N_KV_HEADS, rank=RANK,
              alpha=ALPHA, targets="qkvo", out_proj=True, causal=True, seed=7)
    try:
        ad = lora.Adapter(rope="half", rope_theta=10000.0, **kw)
        rope = "half"
    except lora.UnsupportedError:
        ad = lora.Adapter(**kw)
        rope = "none (this build refuses RoPE adapters at create)"
    for t in "qkvo":
        for f, gain in (("A", 1.0), ("B", 0.3)):
            shape = ad.param_shape(t, f)
            ad.set_param(t, f, (gain * rng.standard_normal(shape) /
                                (np.sqrt(shape[1]) if f == "A" else 1)).astype(np.float32))
    return ad, rope


def run(cmd, env=None, what=""):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
        raise SystemExit("interop: %s failed (exit %d): %s" % (what, r.returncode, " ".join(cmd)))
    return r


def logits(llama_logits, model, adapter, tokens, out, vocab):
    run([llama_logits, model, adapter or "-", out] + [str(t) for t in tokens],
        what="llama.cpp")
    return np.fromfile(out, dtype="<f4").reshape(len(tokens), -1)[:, :vocab]


def rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main():
    work, src, llama_logits = sys.argv[1], sys.argv[2], sys.argv[3]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    rng = np.random.default_rng(2024)
    base_dir, merged_dir = os.path.join(work, "base-hf"), os.path.join(work, "merged-hf")
    os.makedirs(base_dir)
    sp = train_tokenizer(base_dir, rng)
    vocab = sp.vocab_size()
    weights = random_weights(rng, vocab)
    make_checkpoint(base_dir, weights, vocab)
    ad, rope = make_adapter(rng)
    print("model: llama, d_model %d, %d heads over %d KV heads, head_dim %d, %d layers, "
          "vocab %d; adapter: layer %d Q/K/V/O, rank %d, alpha %g, RoPE %s"
          % (D_MODEL, N_HEADS, N_KV_HEADS, HEAD_DIM, N_LAYERS, vocab, ADAPTED_LAYER, RANK,
             ALPHA, rope))

    # The merged checkpoint: liblora's merge, in Hugging Face's order.
    merged = dict(weights)
    for t, name in zip("qkvo", PROJ):
        key = "model.layers.%d.self_attn.%s.weight" % (ADAPTED_LAYER, name)
        merged[key] = ad.merge(t, weights[key])
    make_checkpoint(merged_dir, merged, vocab)
    shutil.copy(os.path.join(base_dir, "tokenizer.model"), merged_dir)

    env = dict(os.environ, LORA_INTEROP_TORCH_SHIM="1")
    gguf = {}
    for name, d in (("base", base_dir), ("merged", merged_dir)):
        gguf[name] = os.path.join(work, name + ".gguf")
        run([sys.executable, os.path.join(src, "convert_hf_to_gguf.py"), d, "--outfile",
             gguf[name], "--outtype", "f32"], env=env, what="convert_hf_to_gguf.py " + name)

    # liblora's adapter files.
    adapter = os.path.join(work, "liblora-adapter.gguf")
    lora.save_gguf(adapter, {ADAPTED_LAYER: ad}, architecture="llama",
                   base_model_name_or_path=base_dir)
    hf_rows = os.path.join(work, "hf-rows-adapter.gguf")  # the old behaviour, for control
    lora.save_gguf(hf_rows, {ADAPTED_LAYER: ad}, architecture="qwen2")
    blob = open(hf_rows, "rb").read()
    at = blob.index(b"qwen2")
    open(hf_rows, "wb").write(blob[:at] + b"llama" + blob[at + 5:])

    tokens = [int(t) for t in rng.integers(3, vocab, size=24)]
    out = os.path.join(work, "logits.f32")
    l_base = logits(llama_logits, gguf["base"], None, tokens, out, vocab)
    l_merged = logits(llama_logits, gguf["merged"], None, tokens, out, vocab)
    l_lora = logits(llama_logits, gguf["base"], adapter, tokens, out, vocab)
    l_hf = logits(llama_logits, gguf["base"], hf_rows, tokens, out, vocab)
    scale = float(np.max(np.abs(l_merged)))
    print("logits: %d tokens x %d, max |logit| %.3g" % (len(tokens), vocab, scale))
    check(rel(l_base, l_merged) > 1e-2,
          "the adapter changes the model: base vs merged %.3g relative" % rel(l_base, l_merged))
    check(rel(l_lora, l_merged) <= TOLERANCE,
          "llama.cpp base + liblora GGUF adapter = merged model: %.3g relative (<= %g), "
          "max |diff| %.3g" % (rel(l_lora, l_merged), TOLERANCE,
                               float(np.max(np.abs(l_lora - l_merged)))))
    check(rel(l_hf, l_merged) > 1e-2,
          "control: Q/K rows in Hugging Face's order do not match: %.3g relative, max |diff| "
          "%.3g" % (rel(l_hf, l_merged), float(np.max(np.abs(l_hf - l_merged)))))

    # llama.cpp's own LoRA converter on liblora's PEFT output writes the same factors.
    peft = os.path.join(work, "liblora-peft")
    lora.save_peft(peft, {ADAPTED_LAYER: ad}, base_model_name_or_path=base_dir)
    cfg = json.load(open(os.path.join(peft, "adapter_config.json")))
    check(cfg["base_model_name_or_path"] == base_dir, "adapter_config.json names the base model")
    import torch  # the converter reads adapter_model.bin without the safetensors package
    bin_dir = os.path.join(work, "peft-bin")
    os.makedirs(bin_dir)
    shutil.copy(os.path.join(peft, "adapter_config.json"), bin_dir)
    torch.save({k: torch.from_numpy(v) for k, v in
                read_safetensors(os.path.join(peft, "adapter_model.safetensors")).items()},
               os.path.join(bin_dir, "adapter_model.bin"))
    converted = os.path.join(work, "converted-adapter.gguf")
    run([sys.executable, os.path.join(src, "convert_lora_to_gguf.py"), bin_dir, "--base",
         base_dir, "--outfile", converted, "--outtype", "f32"], env=env,
        what="convert_lora_to_gguf.py")
    from gguf import GGUFReader
    mine, theirs = GGUFReader(adapter), GGUFReader(converted)
    t_mine = {t.name: np.array(t.data) for t in mine.tensors}
    t_theirs = {t.name: np.array(t.data) for t in theirs.tensors}
    same = sorted(t_mine) == sorted(t_theirs) and all(
        t_mine[k].shape == t_theirs[k].shape and np.array_equal(t_mine[k], t_theirs[k])
        for k in t_mine)
    check(same, "convert_lora_to_gguf.py on liblora's PEFT writes liblora's GGUF factors "
          "(%d tensors, bitwise)" % len(t_mine))
    alpha = float(theirs.fields["adapter.lora.alpha"].parts[-1][0])
    check(alpha == ALPHA, "converter's adapter.lora.alpha %g = %g" % (alpha, ALPHA))
    base_url = mine.fields.get("general.base_model.0.name")
    check(base_url is not None and bytes(base_url.parts[-1]).decode() == base_dir,
          "gguf-py reads general.base_model.0.name")
    l_conv = logits(llama_logits, gguf["base"], converted, tokens, out, vocab)
    check(rel(l_conv, l_merged) <= TOLERANCE,
          "llama.cpp base + converter's adapter = merged model: %.3g relative" % rel(l_conv, l_merged))
    if failures:
        print("interop: %d check(s) failed" % len(failures))
        return 1
    print("interop: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
