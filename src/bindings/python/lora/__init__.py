"""liblora for Python: LoRA fine-tuning of one transformer attention layer.

A ctypes binding (standard library + numpy) of include/lora.h. See docs/python.md.

    import numpy as np, lora
    with lora.Adapter(d_model=64, n_heads=4, rank=8, targets="qv") as ad:
        for t in "qkv":
            ad.set_base(t, w[t])               # (out, in), like torch.nn.Linear
        out = ad.forward(x)                    # x: (batch, L, 64)
        loss, dout = lora.mse_loss(out, target)
        dx = ad.backward(dout)                 # accumulates ad.grads
        ad.grad("q", "B")
"""
from . import _ffi
from ._errors import (Status, LoraError, InvalidArgumentError, ShapeError,
                      OutOfMemoryError, NonFiniteError, UnsupportedError, StateError,
                      LoraIOError, FormatError, ToleranceError, DtypeError)
from ._core import (Param, Target, Backend, Rope, Compute, Dtype, ForwardFlag, Init, Factor,
                    RunInfo, ThresholdReport,
                    Adapter, Tape, KvCache, Optimizer, OptParam, OptimizerKind, mse_loss, mse_loss_mean,
                    version, version_number, status_string, as_f32, save_peft, load_peft,
                    save_gguf, load_gguf, apply)

#: Path of the liblora shared library that was loaded.
library_path = _ffi.library_path
#: The loaded library's version string.
__version__ = version()


def has(name):
    """True when the loaded library exports the C function `name` (0.2 entry points such
    as lora_optimizer_create_set or lora_apply are missing from a 0.1 library)."""
    return _ffi.has(name)

__all__ = [
    "Adapter", "Tape", "KvCache", "Optimizer", "save_peft", "load_peft", "save_gguf", "load_gguf", "OptParam", "OptimizerKind", "RunInfo", "ThresholdReport", "mse_loss",
    "mse_loss_mean", "apply", "version", "version_number",
    "status_string", "as_f32", "library_path", "has",
    "Param", "Target", "Backend", "Rope", "Compute", "Dtype", "ForwardFlag", "Init", "Factor",
    "Status",
    "LoraError", "InvalidArgumentError", "ShapeError", "OutOfMemoryError",
    "NonFiniteError", "UnsupportedError", "StateError", "LoraIOError", "FormatError",
    "ToleranceError", "DtypeError",
]
