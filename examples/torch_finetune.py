"""Fine-tunes a small torch language model whose two attention layers are liblora's
(lora.torch.LoraAttention) with torch.optim, then saves the LoRA factors as a PEFT
adapter directory and loads them back.

    make && PYTHONPATH=src/bindings/python python3 examples/torch_finetune.py [DIR] [--check]

The model: token embedding, two residual LoraAttention layers (causal, GQA, rotary position
embedding in Hugging Face's rotate_half layout, LoRA rank 4 on Q and V, output projection),
a residual MLP and a vocabulary head. Only the LoRA factors
train (the usual LoRA fine-tune: everything else is frozen). --check trains a pure-torch
twin alongside (the same layer written with torch ops, LoraAttention.reference, from the
same initial weights, RoPE included) and fails unless both loss curves agree within 1e-4 relative.
"""
import os
import sys
import tempfile

import numpy as np
import torch

import lora
import lora.torch

VOCAB, D_MODEL, HEADS, KV_HEADS, RANK, SEQ, BATCH = 24, 16, 4, 2, 4, 10, 6
ROPE_THETA = 10000.0


class TinyLM(torch.nn.Module):
    """embedding -> 2 x (h + attention(h)) -> h + mlp(h) -> head. reference=True runs the
    attention layers as plain torch ops (the twin); the weights are the same either way
    for the same seed."""

    def __init__(self, seed=0, reference=False):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.reference = reference
        self.embed = torch.nn.Embedding(VOCAB, D_MODEL)
        self.attn = torch.nn.ModuleList()
        for i in range(2):
            layer = lora.torch.LoraAttention(
                D_MODEL, n_heads=HEADS, n_kv_heads=KV_HEADS, rank=RANK, alpha=8.0,
                targets="qv", causal=True, out_proj=True, rope="half", rope_theta=ROPE_THETA,
                backend="exact", threads=1, seed=seed + i)
            for t in "qkvo":
                out, inp = layer.adapter.base_shape(t)
                layer.set_base(t, torch.randn(out, inp, generator=gen) / inp ** 0.5,
                               0.1 * torch.randn(out, generator=gen))
            self.attn.append(layer)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(D_MODEL, 4 * D_MODEL), torch.nn.GELU(),
                                       torch.nn.Linear(4 * D_MODEL, D_MODEL))
        self.head = torch.nn.Linear(D_MODEL, VOCAB)
        with torch.no_grad():  # deterministic frozen weights, from the same generator
            for p in list(self.embed.parameters()) + list(self.mlp.parameters()) + \
                    list(self.head.parameters()):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
                p.requires_grad_(False)

    def forward(self, tokens):
        h = self.embed(tokens)
        for layer in self.attn:
            h = h + (layer.reference(h) if self.reference else layer(h))
        h = h + self.mlp(h)
        return self.head(h)


def task(seed=1):
    """A fixed batch of a next-token task: each sequence counts up from a random start."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=gen)
    seq = (start + torch.arange(SEQ + 1)) % VOCAB
    return seq[:, :-1], seq[:, 1:]


def train(model, steps=50, lr=1e-2):
    """AdamW over the LoRA factors; returns the loss curve."""
    tokens, labels = task()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv):
    check = "--check" in argv
    args = [a for a in argv if a != "--check"]
    out_dir = args[0] if args else os.path.join(tempfile.mkdtemp(), "peft")
    model = TinyLM()
    losses = train(model)
    print("liblora model: loss %.5f -> %.5f over %d AdamW steps"
          % (losses[0], losses[-1], len(losses)))
    if check:
        twin = train(TinyLM(reference=True))
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, twin))
        print("pure-torch twin: loss %.5f -> %.5f; largest relative difference %.2e"
              % (twin[0], twin[-1], rel))
        if rel > 1e-4 or not losses[-1] < 0.5 * losses[0]:
            print("FAIL: the curves differ or the loss did not halve")
            return 1
    lora.torch.save_peft(out_dir, list(model.attn))
    loaded = lora.load_peft(out_dir, d_model=D_MODEL, n_heads=HEADS, n_kv_heads=KV_HEADS,
                            causal=True, out_proj=True, rope="half", rope_theta=ROPE_THETA)
    same = all(np.array_equal(loaded[i].param(t, w), model.attn[i].adapter.param(t, w))
               for i in range(2) for t in "qv" for w in "AB")
    print("saved PEFT adapter to %s; reloaded factors %s" % (out_dir,
                                                             "identical" if same else "DIFFER"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
