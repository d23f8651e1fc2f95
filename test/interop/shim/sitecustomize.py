"""Lets llama.cpp's converters import under Debian's torch 1.13 (test/interop/run.sh sets
LORA_INTEROP_TORCH_SHIM=1 for them only). They name the float8 dtypes of newer torch in
tables of dtypes they might meet; the test's checkpoints are F32, so stand-ins that
equal no real dtype are enough."""
import os

if os.environ.get("LORA_INTEROP_TORCH_SHIM") == "1":
    import torch

    for _name in ("float8_e4m3fn", "float8_e5m2"):
        if not hasattr(torch, _name):
            setattr(torch, _name, type(_name, (), {"__repr__": lambda self, n=_name: n})())
