"""The Adapter class and module-level functions over liblora's C API."""
import ctypes
import dataclasses
import enum
import os

import numpy as np

from . import _ffi
from ._errors import (Status, StateError, ShapeError, InvalidArgumentError, DtypeError,
                      error_for)

_lib = _ffi.lib


# ---- enums (values frozen in lora.h) ---------------------------------------------------

class Param(enum.IntEnum):
    """lora_config_param."""
    D_MODEL = 1
    N_HEADS = 2
    N_KV_HEADS = 3
    HEAD_DIM = 4
    TARGETS = 5
    RANK = 6
    ALPHA = 7
    RSLORA = 8
    SOFTMAX_SCALE = 9
    CAUSAL = 10
    BACKEND = 11
    TOLERANCE = 12
    POLY_DEGREE = 13
    THREADS = 14
    SEED = 15
    INIT = 16
    OUT_PROJ = 17
    MEASURE_ROWS = 18
    ROPE = 19
    ROPE_THETA = 20
    ROPE_DIM = 21
    WINDOW = 22
    SOFTCAP = 23
    DROPOUT = 24
    COMPUTE = 25


class Target(enum.IntFlag):
    """lora_target (a bitmask in LORA_CFG_TARGETS, one value elsewhere)."""
    Q = 1
    K = 2
    V = 4
    O = 8  # noqa: E741 (the projection's name)


class Backend(enum.IntEnum):
    """lora_backend."""
    AUTO = 0
    EXACT = 1
    POLY = 2


class Rope(enum.IntEnum):
    """lora_rope (LORA_CFG_ROPE)."""
    NONE = 0
    HALF = 1
    INTERLEAVED = 2


class Compute(enum.IntEnum):
    """lora_compute (LORA_CFG_COMPUTE)."""
    F32 = 0
    BF16 = 1


class Dtype(enum.IntEnum):
    """lora_dtype: element types of base weights (lora_adapter_set_base_typed)."""
    F32 = 0
    BF16 = 1
    F16 = 2


class ForwardFlag(enum.IntFlag):
    """lora_forward_flag (flags of a forward's per-call arguments)."""
    INFER = 1


class Init(enum.IntEnum):
    """lora_init."""
    KAIMING_ZERO = 0
    GAUSSIAN = 1
    ZERO = 2


class Factor(enum.IntEnum):
    """lora_factor."""
    A = 0
    B = 1


_DOUBLE_PARAMS = {Param.ALPHA, Param.SOFTMAX_SCALE, Param.TOLERANCE, Param.ROPE_THETA,
                  Param.SOFTCAP, Param.DROPOUT}
_TARGET_LETTERS = {"q": Target.Q, "k": Target.K, "v": Target.V, "o": Target.O}
_TARGET_ORDER = (Target.Q, Target.K, Target.V, Target.O)


# ---- version and status ----------------------------------------------------------------

def version():
    """The loaded library's "MAJOR.MINOR.PATCH"."""
    return _lib.lora_version_string().decode()


def version_number():
    """The loaded library's MAJOR*10000 + MINOR*100 + PATCH."""
    return int(_lib.lora_version_number())


def status_string(status):
    """lora_status_string: short English text for a status code."""
    return _lib.lora_status_string(int(status)).decode()


# ---- argument conversion ---------------------------------------------------------------

def as_f32(a, name="array"):
    """`a` as a C-contiguous float32 ndarray: `a` itself when it already is one (zero
    copy), else a contiguous copy of the same values. An array (anything with a dtype:
    numpy, a CPU torch tensor, requires_grad or not) must be float32: float64 and every
    other dtype raise DtypeError naming `name` rather than being converted silently.
    Python sequences and numbers (no dtype) are converted to float32."""
    if isinstance(a, np.ndarray):
        arr = a
    elif getattr(a, "dtype", None) is not None:
        if hasattr(a, "detach"):  # a torch tensor: read its memory, not its graph
            a = a.detach()
        if str(a.dtype) not in ("float32", "torch.float32"):
            raise DtypeError(Status.INVALID_ARG, "%s is %s; liblora computes in float32: "
                             "convert it explicitly" % (name, a.dtype))
        arr = np.asarray(a)
    else:
        return np.ascontiguousarray(a, dtype=np.float32)
    if arr.dtype != np.float32:
        raise DtypeError(Status.INVALID_ARG, "%s is %s; liblora computes in float32: "
                         "convert it explicitly (%s.astype(numpy.float32))"
                         % (name, arr.dtype, name))
    if arr.flags.c_contiguous and arr.flags.aligned:
        return arr
    return np.ascontiguousarray(arr)


def _out_buffer(out, shape, name):
    """A new float32 array of `shape`, or `out` checked to be a writable C-contiguous
    float32 array of that shape (written in place, zero copy)."""
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 \
            or not out.flags.c_contiguous or not out.flags.writeable \
            or not out.flags.aligned:
        raise InvalidArgumentError(Status.INVALID_ARG,
                                   "%s must be a writable C-contiguous float32 ndarray" % name)
    if out.shape != tuple(shape):
        raise ShapeError(Status.SHAPE, "%s has shape %s, expected %s"
                         % (name, out.shape, tuple(shape)))
    return out


def _ptr(a):
    return None if a is None else a.ctypes.data


def _need(name):
    """Raises UnsupportedError when the loaded library lacks entry point `name`."""
    if not _ffi.has(name):
        from ._errors import UnsupportedError
        raise UnsupportedError(Status.UNSUPPORTED, "the loaded liblora (%s) has no %s"
                               % (version(), name), name)


def _target(t):
    """A single lora_target from Target, 'q'/'k'/'v'/'o' or an int."""
    if isinstance(t, str):
        try:
            return int(_TARGET_LETTERS[t.lower()])
        except KeyError:
            raise InvalidArgumentError(Status.INVALID_ARG,
                                       "unknown target %r (q, k, v or o)" % t) from None
    return int(t)


def _targets_mask(t):
    """LORA_CFG_TARGETS from 'qv', ['q', 'v'], Target.Q | Target.V or an int."""
    if isinstance(t, str):
        return sum({_target(c) for c in t if c not in ", |+"})
    if isinstance(t, (list, tuple, set, frozenset)):
        return sum({_target(c) for c in t})
    return int(t)


def _factor(w):
    if isinstance(w, str):
        try:
            return int(Factor[w.upper()])
        except KeyError:
            raise InvalidArgumentError(Status.INVALID_ARG,
                                       "unknown factor %r (A or B)" % w) from None
    return int(w)


def _enum_value(enum_cls, v):
    if isinstance(v, str):
        try:
            return int(enum_cls[v.upper()])
        except KeyError:
            raise InvalidArgumentError(
                Status.INVALID_ARG, "unknown %s %r (one of %s)" % (
                    enum_cls.__name__.lower(), v,
                    ", ".join(m.name.lower() for m in enum_cls))) from None
    return int(v)


def _mse(name, out, target, want_dout):
    o, t = as_f32(out, "out"), as_f32(target, "target")
    if o.shape != t.shape:
        raise ShapeError(Status.SHAPE, "out %s and target %s differ in shape"
                         % (o.shape, t.shape), name)
    dout = np.empty(o.shape, dtype=np.float32) if want_dout else None
    loss = ctypes.c_double()
    st = getattr(_lib, name)(_ptr(o), _ptr(t), o.size, ctypes.byref(loss), _ptr(dout))
    if st != Status.OK:
        raise error_for(st, status_string(st), name)
    return loss.value, dout


def mse_loss(out, target, want_dout=True):
    """The paper's loss, lora_mse_loss: returns (loss, dout) with
    loss = 1/2 * sum((out - target)**2) (accumulated in double) and dout = out - target
    (float32, out's shape), or (loss, None) when want_dout is False."""
    return _mse("lora_mse_loss", out, target, want_dout)


def mse_loss_mean(out, target, want_dout=True):
    """torch.nn.MSELoss() (mean reduction), lora_mse_loss_mean: returns (loss, dout) with
    loss = mean((out - target)**2) (accumulated in double) and dout = 2*(out - target)/n
    its gradient (float32, out's shape; n = out.size), or (loss, None)."""
    _need("lora_mse_loss_mean")
    return _mse("lora_mse_loss_mean", out, target, want_dout)


# ---- reports ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What the last forward or backward ran (lora_run_info)."""
    backend: int
    poly_degree: int
    poly_rank: int
    error_bound: float
    grad_bound: float
    score_bound: float
    measured_out_error: float
    measured_dq_error: float
    poly_groups: int
    loss_grad_bound: float
    attention_compute: int  # Compute: what the EXACT groups' products ran in

    def asdict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ThresholdReport:
    """The threshold statistics of one input (lora_threshold_report)."""
    recommended_backend: int
    gamma_q: float
    gamma_k: float
    gamma_v: float
    gamma_ratio: float
    score_bound: float
    poly_degree: int
    poly_rank: int
    error_bound: float
    flops_exact: float
    flops_poly: float
    poly_groups: int

    def asdict(self):
        return dataclasses.asdict(self)


def _backend_or_int(v):
    try:
        return Backend(v)
    except ValueError:
        return int(v)


def _from_struct(cls, s):
    vals = {}
    for f in dataclasses.fields(cls):
        vals[f.name] = getattr(s, f.name)
    for k in ("backend", "recommended_backend"):
        if k in vals:
            vals[k] = _backend_or_int(vals[k])
    return cls(**vals)


# ---- the adapter -----------------------------------------------------------------------

def _make_config(config):
    """A new lora_config holding the keyword configuration (the caller destroys it)."""
    cfg = _ffi.ConfigP()
    st = _lib.lora_config_create(ctypes.byref(cfg))
    if st != Status.OK:
        raise error_for(st, status_string(st), "lora_config_create")
    try:
        for key, value in config.items():
            try:
                param = Param[key.upper()]
            except KeyError:
                raise TypeError("unknown configuration keyword %r" % key) from None
            if param == Param.TARGETS:
                value = _targets_mask(value)
            elif param == Param.BACKEND:
                value = _enum_value(Backend, value)
            elif param == Param.INIT:
                value = _enum_value(Init, value)
            elif param == Param.ROPE:
                value = _enum_value(Rope, value)
            elif param == Param.COMPUTE:
                value = _enum_value(Compute, value)
            if param in _DOUBLE_PARAMS:
                st = _lib.lora_config_set_double(cfg, int(param), float(value))
                fn = "lora_config_set_double"
            else:
                st = _lib.lora_config_set_int(cfg, int(param), int(value))
                fn = "lora_config_set_int"
            if st != Status.OK:
                raise error_for(st, "%s: %s" % (
                    key, _lib.lora_config_last_error(cfg).decode()), fn)
    except BaseException:
        _lib.lora_config_destroy(cfg)
        raise
    return cfg


class Adapter:
    """One attention layer with LoRA factors (a lora_adapter handle).

    Keyword configuration, names as LORA_CFG_* in lower case:
      d_model (required), n_heads, n_kv_heads, head_dim, targets ("qv", ["q", "v"] or a
      Target mask), rank, alpha, rslora, softmax_scale, causal, backend ("auto",
      "exact", "poly" or Backend), tolerance, poly_degree, threads, seed, init
      ("kaiming_zero", "gaussian", "zero" or Init), out_proj, measure_rows, rope
      ("none", "half", "interleaved" or Rope), rope_theta, rope_dim, window, softcap,
      dropout, compute ("f32", "bf16" or Compute).

    Arrays in are float32, row-major; a C-contiguous float32 ndarray is passed to the
    library without a copy, anything else is converted. Targets are 'q', 'k', 'v', 'o'
    (or Target values), factors 'A'/'B' (or Factor values). Use as a context manager or
    call close(); the handle is also freed when the object is collected.
    """

    _handle = None  # so __del__ works when __init__ failed early

    def __init__(self, d_model=None, **config):
        if d_model is not None:
            config["d_model"] = d_model
        cfg = _make_config(config)
        try:
            handle = _ffi.AdapterP()
            st = _lib.lora_adapter_create(ctypes.byref(handle), cfg)
            if st != Status.OK:
                # create cannot write into the const config: validate says why.
                _lib.lora_config_validate(cfg)
                raise error_for(st, _lib.lora_config_last_error(cfg).decode(),
                                "lora_adapter_create")
        finally:
            _lib.lora_config_destroy(cfg)
        self._adopt(handle)

    @classmethod
    def _from_handle(cls, handle):
        self = cls.__new__(cls)
        self._adopt(handle)
        return self

    def _adopt(self, handle):
        self._handle = handle
        self._borrowed = {}  # target -> arrays a borrowed base keeps alive
        self._borrowed_factors = {}  # (target, which) -> arrays borrowed as storage
        self._saved = None  # (kind, shapes...) of the forward a backward would use
        self._d_model = self.get_config(Param.D_MODEL)
        self._q_dim = self.get_config(Param.N_HEADS) * self.get_config(Param.HEAD_DIM)
        self._kv_dim = self.get_config(Param.N_KV_HEADS) * self.get_config(Param.HEAD_DIM)
        self._out_proj = bool(self.get_config(Param.OUT_PROJ))
        self._targets = Target(self.get_config(Param.TARGETS))

    # -- lifetime --

    def close(self):
        """Frees the handle (lora_adapter_destroy). Idempotent."""
        h, self._handle = self._handle, None
        if h:
            _lib.lora_adapter_destroy(h)
        self._borrowed = {}
        self._borrowed_factors = {}

    @property
    def closed(self):
        return not self._handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone
            pass

    def __repr__(self):
        if self.closed:
            return "<lora.Adapter closed>"
        return ("<lora.Adapter d_model=%d n_heads=%d rank=%d targets=%s>"
                % (self._d_model, self.get_config(Param.N_HEADS),
                   self.get_config(Param.RANK), self.targets))

    def _h(self):
        if not self._handle:
            raise StateError(Status.STATE, "the adapter is closed")
        return self._handle

    def _check(self, st, fn, const=False):
        # A call taking the adapter as const writes no message (lora.h, Threads): the
        # last error would be an older call's.
        if st != Status.OK:
            msg = "" if const else _lib.lora_adapter_last_error(self._handle).decode()
            raise error_for(st, msg, fn)

    # -- configuration --

    def get_config(self, param):
        """The resolved value of a configuration parameter (Param or its name)."""
        p = Param[param.upper()] if isinstance(param, str) else Param(param)
        if p in _DOUBLE_PARAMS:
            v = ctypes.c_double()
            self._check(_lib.lora_adapter_get_config_double(self._h(), int(p),
                                                             ctypes.byref(v)),
                        "lora_adapter_get_config_double", const=True)
        else:
            v = ctypes.c_int64()
            self._check(_lib.lora_adapter_get_config_int(self._h(), int(p),
                                                          ctypes.byref(v)),
                        "lora_adapter_get_config_int", const=True)
        return v.value

    @property
    def config(self):
        """Every parameter's resolved value, keyed by lower-case name."""
        return {p.name.lower(): self.get_config(p) for p in Param}

    @property
    def d_model(self):
        return self._d_model

    @property
    def q_dim(self):
        return self._q_dim

    @property
    def kv_dim(self):
        return self._kv_dim

    @property
    def out_dim(self):
        """Columns of the forward's output: d_model with out_proj, else q_dim."""
        return self._d_model if self._out_proj else self._q_dim

    @property
    def targets(self):
        """The adapted projections, as a string such as "qv"."""
        return "".join(n for n, t in _TARGET_LETTERS.items() if t & self._targets)

    @property
    def last_error(self):
        """lora_adapter_last_error: detail of the last failed call ("" if none)."""
        return _lib.lora_adapter_last_error(self._h()).decode()

    # -- base weights --

    def base_shape(self, target):
        """(out, in) of the base weight of `target`."""
        t = _target(target)
        if t == Target.Q:
            return (self._q_dim, self._d_model)
        if t in (Target.K, Target.V):
            return (self._kv_dim, self._d_model)
        if t == Target.O:
            return (self._d_model, self._q_dim)
        raise InvalidArgumentError(Status.INVALID_ARG, "bad target %r" % (target,))

    def _base_arrays(self, target, weight, bias, fn):
        """(target index, weight, bias) as float32 arrays of the base's shapes, or
        ShapeError naming fn."""
        t = _target(target)
        shape = self.base_shape(t)
        w = as_f32(weight, "weight")
        if w.shape != shape:
            raise ShapeError(Status.SHAPE, "weight has shape %s, expected %s"
                             % (w.shape, shape), fn)
        b = None
        if bias is not None:
            b = as_f32(bias, "bias")
            if b.shape != (shape[0],):
                raise ShapeError(Status.SHAPE, "bias has shape %s, expected %s"
                                 % (b.shape, (shape[0],)), fn)
        return t, w, b

    def set_base(self, target, weight, bias=None):
        """Copies a frozen base projection: weight (out, in) as torch.nn.Linear, bias
        (out,) or None. Drops the saved forward."""
        t, w, b = self._base_arrays(target, weight, bias, "set_base")
        self._saved = None
        self._check(_lib.lora_adapter_set_base(self._h(), t, _ptr(w), _ptr(b)),
                    "lora_adapter_set_base")
        self._borrowed.pop(t, None)

    def set_base_borrowed(self, target, weight, bias=None):
        """Uses a frozen base projection without copying it (many adapters may share
        one). A C-contiguous float32 array is used in place; anything else is converted
        once. The adapter keeps a reference to the arrays until the base is replaced or
        the adapter is closed; do not modify them meanwhile."""
        t, w, b = self._base_arrays(target, weight, bias, "set_base_borrowed")
        self._saved = None
        self._check(_lib.lora_adapter_set_base_borrowed(self._h(), t, _ptr(w), _ptr(b)),
                    "lora_adapter_set_base_borrowed")
        self._borrowed[t] = (w, b)

    def set_base_typed(self, target, weight, dtype, bias=None, borrow=False):
        """lora_adapter_set_base_typed: a frozen base projection stored as `dtype`
        (Dtype.BF16 / F16: weight (out, in) of uint16 holding the 16-bit patterns, e.g.
        a safetensors tensor's bytes viewed as uint16; Dtype.F32: float32). bias (out,)
        float32 or None. borrow=True (LORA_BASE_BORROW) uses the arrays in place: the
        adapter keeps a reference to them until the base is replaced or the adapter is
        closed; do not modify them meanwhile."""
        _need("lora_adapter_set_base_typed")
        t = _target(target)
        dt = _enum_value(Dtype, dtype)
        fn = "lora_adapter_set_base_typed"
        shape = self.base_shape(t)
        if dt == Dtype.F32:
            w = as_f32(weight, "weight")
        else:  # an unknown dtype goes to the library, which answers UNSUPPORTED
            w = np.asarray(weight)
            if dt in (Dtype.BF16, Dtype.F16) and w.dtype != np.uint16:
                raise DtypeError(Status.INVALID_ARG, "weight of dtype %s must be uint16 "
                                 "bit patterns (got %s)" % (Dtype(dt).name, w.dtype), fn)
            w = np.ascontiguousarray(w)
        if w.shape != shape:
            raise ShapeError(Status.SHAPE, "weight has shape %s, expected %s"
                             % (w.shape, shape), fn)
        b = None
        if bias is not None:
            b = as_f32(bias, "bias")
            if b.shape != (shape[0],):
                raise ShapeError(Status.SHAPE, "bias has shape %s, expected %s"
                                 % (b.shape, (shape[0],)), fn)
        self._saved = None
        self._check(_lib.lora_adapter_set_base_typed(self._h(), t, _ptr(w), dt, _ptr(b),
                                                     1 if borrow else 0), fn)
        if borrow:
            self._borrowed[t] = (w, b)
        else:
            self._borrowed.pop(t, None)

    def set_rope_freqs(self, inv_freq):
        """lora_adapter_set_rope_freqs: replaces RoPE's inverse frequencies
        (THETA^(-2i/ROPE_DIM) by default) with ROPE_DIM/2 finite values >= 0, used in
        float64: the route to linear, NTK, Llama 3 and YaRN scaling (docs/models.md).
        Drops the saved forward."""
        _need("lora_adapter_set_rope_freqs")
        f = np.ascontiguousarray(np.asarray(inv_freq, dtype=np.float64))
        if f.ndim != 1:
            raise ShapeError(Status.SHAPE, "inv_freq has shape %s, expected (ROPE_DIM/2,)"
                             % (f.shape,), "lora_adapter_set_rope_freqs")
        self._saved = None
        self._check(_lib.lora_adapter_set_rope_freqs(self._h(), _ptr(f), f.size),
                    "lora_adapter_set_rope_freqs")

    # -- LoRA factors and gradients --

    def param_shape(self, target, which):
        """(rows, cols) of factor `which` of `target`: A is (rank, in), B (out, rank)."""
        r, c = ctypes.c_int64(), ctypes.c_int64()
        t = _target(target)
        if t in (1, 2, 4, 8) and not t & self._targets:
            raise InvalidArgumentError(Status.INVALID_ARG, "target %s is not adapted"
                                       % "QKVO"[t.bit_length() - 1],
                                       "lora_adapter_param_shape")
        self._check(_lib.lora_adapter_param_shape(self._h(), t, _factor(which),
                                                  ctypes.byref(r), ctypes.byref(c)),
                    "lora_adapter_param_shape", const=True)
        return (r.value, c.value)

    def _get(self, fn, name, target, which, out):
        shape = self.param_shape(target, which)
        dst = _out_buffer(out, shape, "out")
        self._check(fn(self._h(), _target(target), _factor(which), _ptr(dst), dst.size),
                    name, const=True)
        return dst

    def param(self, target, which, out=None):
        """A copy of LoRA factor `which` ('A'/'B') of `target`, or written into `out`."""
        return self._get(_lib.lora_adapter_get_param, "lora_adapter_get_param",
                         target, which, out)

    def grad(self, target, which, out=None):
        """A copy of the accumulated gradient of factor `which` of `target`."""
        return self._get(_lib.lora_adapter_get_grad, "lora_adapter_get_grad",
                         target, which, out)

    def set_param(self, target, which, value):
        """Copies `value` (the factor's element count, any shape) into factor `which`
        of `target`. Drops the saved forward."""
        src = as_f32(value, "value")
        self._saved = None
        self._check(_lib.lora_adapter_set_param(self._h(), _target(target), _factor(which),
                                                _ptr(src), src.size),
                    "lora_adapter_set_param")

    def borrow_factor(self, target, which, param, grad=None):
        """lora_adapter_borrow_factor: `param` (and `grad`, if given) become the memory
        of factor `which` of `target` (and of its accumulated gradient), used in place
        with no copy: writable C-contiguous float32 arrays (numpy, or CPU torch tensors,
        e.g. a Parameter's .data and .grad) with the factor's element count. Their
        current values become the factor / gradient. None = the adapter's own storage
        (a borrowed buffer's values are copied back). The adapter keeps references to
        the arrays while it uses them. Writes into a borrowed factor between calls are
        noticed (older tapes become stale, merged weights are rebuilt)."""
        _need("lora_adapter_borrow_factor")
        t, w = _target(target), _factor(which)
        n = int(np.prod(self.param_shape(t, w)))
        p = None if param is None else _shared_f32(param, "param", n)
        g = None if grad is None else _shared_f32(grad, "grad", n)
        self._check(_lib.lora_adapter_borrow_factor(self._h(), t, w, _ptr(p), _ptr(g), n),
                    "lora_adapter_borrow_factor")
        before = self._borrowed_factors.get((t, w))
        old_ptr = before[1].ctypes.data if before and before[1] is not None else None
        if old_ptr != (None if p is None else p.ctypes.data):
            self._saved = None  # new memory is a new value: the saved forward is gone
        self._borrowed_factors[(t, w)] = (param, p, grad, g)

    def _names(self):
        for t in _TARGET_ORDER:
            if t & self._targets:
                letter = t.name.lower()
                yield letter + ".A", letter, "A"
                yield letter + ".B", letter, "B"

    @property
    def params(self):
        """{"q.A": array, "q.B": array, ...}: copies of every LoRA factor."""
        return {name: self.param(t, w) for name, t, w in self._names()}

    @params.setter
    def params(self, values):
        for name, value in values.items():
            t, w = name.split(".")
            self.set_param(t, w, value)

    @property
    def grads(self):
        """{"q.A": array, ...}: copies of every accumulated gradient."""
        return {name: self.grad(t, w) for name, t, w in self._names()}

    def zero_grad(self):
        """Resets every gradient to zero."""
        self._check(_lib.lora_adapter_zero_grad(self._h()), "lora_adapter_zero_grad")

    # -- flat vectors (one buffer for all factors: MPI, checkpoints) --

    @property
    def param_count(self):
        """Total floats in all LoRA factors (lora_adapter_param_count)."""
        n = ctypes.c_size_t()
        self._check(_lib.lora_adapter_param_count(self._h(), ctypes.byref(n)),
                    "lora_adapter_param_count", const=True)
        return n.value

    def get_params_flat(self, out=None):
        """All factors as one float32 vector: targets Q, K, V, O (adapted ones), each A
        then B, row-major."""
        dst = _out_buffer(out, (self.param_count,), "out")
        self._check(_lib.lora_adapter_get_params_flat(self._h(), _ptr(dst), dst.size),
                    "lora_adapter_get_params_flat", const=True)
        return dst

    def set_params_flat(self, values):
        """Sets all factors from one vector (get_params_flat's order)."""
        src = as_f32(values, "values")
        self._saved = None
        self._check(_lib.lora_adapter_set_params_flat(self._h(), _ptr(src), src.size),
                    "lora_adapter_set_params_flat")

    def get_grads_flat(self, out=None):
        """All accumulated gradients as one vector (get_params_flat's order)."""
        dst = _out_buffer(out, (self.param_count,), "out")
        self._check(_lib.lora_adapter_get_grads_flat(self._h(), _ptr(dst), dst.size),
                    "lora_adapter_get_grads_flat", const=True)
        return dst

    def set_grads_flat(self, values):
        """Overwrites the accumulated gradients (e.g. with an all-reduced average)."""
        src = as_f32(values, "values")
        self._check(_lib.lora_adapter_set_grads_flat(self._h(), _ptr(src), src.size),
                    "lora_adapter_set_grads_flat")

    # -- merge and serving --

    def _merge(self, name, target, weight, inplace):
        fn = getattr(_lib, name)
        t = _target(target)
        shape = self.base_shape(t)
        if inplace:
            w = _out_buffer(weight, shape, "weight")
        else:
            w = np.array(as_f32(weight, "weight"), order="C", copy=True)
            if w.shape != shape:
                raise ShapeError(Status.SHAPE, "weight has shape %s, expected %s"
                                 % (w.shape, shape), name)
        self._check(fn(self._h(), t, _ptr(w), w.size), name, const=True)
        return w

    def merge(self, target, weight, inplace=False):
        """W + s*B*A for `target` (weight (out, in) holding W): a new array, or written
        into `weight` (C-contiguous float32) when inplace. NaN/Inf leaves it untouched
        and raises NonFiniteError."""
        return self._merge("lora_adapter_merge", target, weight, inplace)

    def unmerge(self, target, weight, inplace=False):
        """Subtracts s*B*A back (the inverse of merge, up to its stated rounding)."""
        return self._merge("lora_adapter_unmerge", target, weight, inplace)

    def forward_merged(self, x, out=None):
        """Inference forward with merged weights (same result as forward up to
        rounding); keeps no activations and leaves the saved forward alone."""
        h = self._h()
        x3, given = self._input(x, "x")
        o = _out_buffer(out, given[:-1] + (self.out_dim,), "out")
        self._check(_lib.lora_forward_merged(h, _ptr(x3), x3.shape[0], x3.shape[1],
                                             _ptr(o)), "lora_forward_merged")
        return o

    def forward_merged_cross(self, xq, xkv, out=None):
        """forward_cross with merged weights (see forward_merged)."""
        h = self._h()
        q3, qgiven = self._input(xq, "xq")
        kv3, kvgiven = self._input(xkv, "xkv")
        if len(qgiven) != len(kvgiven) or q3.shape[0] != kv3.shape[0]:
            raise ShapeError(Status.SHAPE, "xq %s and xkv %s differ in batch"
                             % (qgiven, kvgiven))
        o = _out_buffer(out, qgiven[:-1] + (self.out_dim,), "out")
        self._check(_lib.lora_forward_merged_cross(h, _ptr(q3), _ptr(kv3), q3.shape[0],
                                                   q3.shape[1], kv3.shape[1], _ptr(o)),
                    "lora_forward_merged_cross")
        return o

    def copy_params_from(self, src):
        """Hot swap: copies src's LoRA factors and scaling (alpha, rsLoRA) into this
        adapter, keeping its base weights, settings and gradients."""
        self._saved = None
        self._check(_lib.lora_adapter_copy_params(self._h(), src._h()),
                    "lora_adapter_copy_params")

    # -- compute --

    def _input(self, x, name):
        """x as float32 (batch, L, d_model) plus the shape the caller gave."""
        a = as_f32(x, name)
        if a.ndim not in (2, 3) or a.shape[-1] != self._d_model or a.size == 0:
            raise ShapeError(Status.SHAPE, "%s has shape %s, expected (batch, L, %d) or "
                             "(L, %d)" % (name, a.shape, self._d_model, self._d_model))
        return a.reshape((1,) + a.shape if a.ndim == 2 else a.shape), a.shape

    def forward(self, x, out=None):
        """Self-attention forward: x (batch, L, d_model) or (L, d_model); returns out
        of shape (batch, L, out_dim) (or (L, out_dim)), written into `out` if given.
        Keeps what backward needs."""
        h = self._h()
        x3, given = self._input(x, "x")
        batch, L = x3.shape[0], x3.shape[1]
        oshape = given[:-1] + (self.out_dim,)
        o = _out_buffer(out, oshape, "out")
        self._saved = None
        self._check(_lib.lora_forward(h, _ptr(x3), batch, L, _ptr(o)), "lora_forward")
        self._saved = ("self", oshape, given)
        return o

    def _dout(self, dout, kind):
        if self._saved is None:
            raise StateError(Status.STATE, "no saved forward (run forward first; "
                             "set_base and set_param drop it)")
        if self._saved[0] != kind:
            raise StateError(Status.STATE, "the saved forward is %s-attention; "
                             "call backward%s" % (self._saved[0],
                                                  "" if self._saved[0] == "self"
                                                  else "_cross"))
        return _check_dout(dout, self._saved[1])

    def backward(self, dout, need_dx=True):
        """Backward of the last forward: adds dL/dA, dL/dB into the gradients and
        returns dL/dx (x's shape), or None when need_dx is False."""
        h = self._h()
        d = self._dout(dout, "self")
        dx = np.empty(self._saved[2], dtype=np.float32) if need_dx else None
        self._check(_lib.lora_backward(h, _ptr(d), _ptr(dx)), "lora_backward")
        return dx

    def forward_cross(self, xq, xkv, out=None):
        """Cross-attention forward: queries from xq (batch, len_q, d_model), keys and
        values from xkv (batch, len_kv, d_model); both 2-D or both 3-D."""
        h = self._h()
        q3, qgiven = self._input(xq, "xq")
        kv3, kvgiven = self._input(xkv, "xkv")
        if len(qgiven) != len(kvgiven) or q3.shape[0] != kv3.shape[0]:
            raise ShapeError(Status.SHAPE, "xq %s and xkv %s differ in batch"
                             % (qgiven, kvgiven))
        oshape = qgiven[:-1] + (self.out_dim,)
        o = _out_buffer(out, oshape, "out")
        self._saved = None
        self._check(_lib.lora_forward_cross(h, _ptr(q3), _ptr(kv3), q3.shape[0],
                                            q3.shape[1], kv3.shape[1], _ptr(o)),
                    "lora_forward_cross")
        self._saved = ("cross", oshape, qgiven, kvgiven)
        return o

    def backward_cross(self, dout, need_dx=True):
        """Backward of the last forward_cross: returns (dxq, dxkv), or None when need_dx
        is False."""
        h = self._h()
        d = self._dout(dout, "cross")
        dxq = dxkv = None
        if need_dx:
            dxq = np.empty(self._saved[2], dtype=np.float32)
            dxkv = np.empty(self._saved[3], dtype=np.float32)
        self._check(_lib.lora_backward_cross(h, _ptr(d), _ptr(dxq), _ptr(dxkv)),
                    "lora_backward_cross")
        return (dxq, dxkv) if need_dx else None

    # -- per-call arguments and tapes (lora_forward_ex, lora_backward_ex) --

    def forward_ex(self, xq, xkv=None, *, tape=None, infer=False, q_lens=None,
                   kv_lens=None, q_pos=None, kv_pos=None, q_seg=None, kv_seg=None,
                   out=None):
        """lora_forward_ex: self-attention on xq when xkv is None, else cross-attention
        (shapes as forward / forward_cross). A training forward records into `tape` (a
        Tape of this adapter), or into the adapter's own saved forward when tape is None
        (then backward / backward_cross / backward_ex(tape=None) read it). infer=True
        (LORA_FWD_INFER) saves nothing and touches no tape, parameter or gradient.
        q_lens, kv_lens (batch,) int64; q_pos (batch, len_q), kv_pos (batch, len_kv)
        int64; q_seg, kv_seg int32 of the same shapes: the per-call masks of
        lora_attn_args (a library without them raises UnsupportedError)."""
        _need("lora_forward_ex")
        h = self._h()
        q3, qgiven = self._input(xq, "xq")
        kvgiven = None
        kv3 = None
        if xkv is not None:
            kv3, kvgiven = self._input(xkv, "xkv")
            if len(qgiven) != len(kvgiven) or q3.shape[0] != kv3.shape[0]:
                raise ShapeError(Status.SHAPE, "xq %s and xkv %s differ in batch"
                                 % (qgiven, kvgiven))
        batch, len_q = q3.shape[0], q3.shape[1]
        len_kv = len_q if kv3 is None else kv3.shape[1]
        if tape is not None and (not isinstance(tape, Tape) or tape.adapter is not self):
            raise StateError(Status.STATE, "tape belongs to another adapter",
                             "lora_forward_ex")
        args, keep = _attn_args(batch, len_q, len_kv, ForwardFlag.INFER if infer else 0,
                                tape, q_lens, kv_lens, q_pos, kv_pos, q_seg, kv_seg)
        oshape = qgiven[:-1] + (self.out_dim,)
        o = _out_buffer(out, oshape, "out")
        saved = ("self", oshape, qgiven) if kv3 is None else ("cross", oshape, qgiven,
                                                                kvgiven)
        owner = tape if tape is not None else self
        if not infer:
            owner._saved = None
        self._check(_lib.lora_forward_ex(h, ctypes.byref(args), _ptr(q3), _ptr(kv3), batch,
                                         len_q, len_kv, _ptr(o)), "lora_forward_ex")
        if not infer:
            owner._saved = saved
        return o

    def backward_ex(self, dout, tape=None, need_dx=True):
        """lora_backward_ex: the backward of the forward recorded in `tape` (None: the
        adapter's own saved forward, self or cross). Accumulates the gradients; returns
        dx (self-attention), (dxq, dxkv) (cross-attention), or None when need_dx is
        False. A tape may be backwarded more than once; one recorded before a change of
        parameters or base weights raises StateError."""
        _need("lora_backward_ex")
        h = self._h()
        if tape is not None and (not isinstance(tape, Tape) or tape.adapter is not self):
            raise StateError(Status.STATE, "tape belongs to another adapter",
                             "lora_backward_ex")
        owner = tape if tape is not None else self
        saved = owner._saved
        if saved is None:
            raise StateError(Status.STATE, "the tape holds no forward (record one with "
                             "forward_ex)" if tape is not None else
                             "no saved forward (run forward first)", "lora_backward_ex")
        d = _check_dout(dout, saved[1])
        dxq = np.empty(saved[2], dtype=np.float32) if need_dx else None
        dxkv = np.empty(saved[3], dtype=np.float32) if need_dx and saved[0] == "cross" \
            else None
        self._check(_lib.lora_backward_ex(h, tape._h() if tape is not None else None,
                                          _ptr(d), _ptr(dxq), _ptr(dxkv)),
                    "lora_backward_ex")
        if not need_dx:
            return None
        return dxq if saved[0] == "self" else (dxq, dxkv)

    # -- decoding with a KV cache (lora_decode, lora_decode_ex) --

    def decode(self, cache, x, *, n_tokens=None, tenants=None, tenant_of_seq=None, out=None):
        """lora_decode: appends x (batch, n_new, d_model), or (batch, d_model) for one
        token each, to `cache` (a KvCache with that batch) and returns the new rows'
        outputs, shaped as x with out_dim columns. n_tokens (batch,) int64: tokens each
        sequence takes (the rest of its rows are not read; their outputs are 0).
        tenants (a list of Adapters) with tenant_of_seq (batch,) int32: each sequence
        uses its tenant's LoRA terms (-1: the base alone), this adapter the base weights
        and attention settings (lora_decode_ex). Saves nothing for backward."""
        h = self._h()
        a = as_f32(x, "x")
        if a.ndim not in (2, 3) or a.shape[-1] != self._d_model or a.size == 0:
            raise ShapeError(Status.SHAPE, "x has shape %s, expected (batch, n_new, %d) or "
                             "(batch, %d)" % (a.shape, self._d_model, self._d_model))
        x3 = a.reshape(a.shape[:1] + (1,) + a.shape[1:]) if a.ndim == 2 else a
        batch, n_new = x3.shape[0], x3.shape[1]
        if batch != cache.batch:
            raise ShapeError(Status.SHAPE, "x holds %d sequences, the cache %d"
                             % (batch, cache.batch))
        o = _out_buffer(out, a.shape[:-1] + (self.out_dim,), "out")
        if n_tokens is None and tenants is None and tenant_of_seq is None:
            self._check(_lib.lora_decode(h, cache._h(), _ptr(x3), n_new, _ptr(o)),
                        "lora_decode")
            return o
        _need("lora_decode_ex")
        args = _ffi.DecodeArgsC(struct_size=ctypes.sizeof(_ffi.DecodeArgsC))
        keep = []
        if n_tokens is not None:
            nt = _int_array(n_tokens, "n_tokens", np.int64, (batch,))
            keep.append(nt)
            args.n_tokens = _ptr(nt)
        if (tenants is None) != (tenant_of_seq is None):
            raise InvalidArgumentError(Status.INVALID_ARG, "tenants and tenant_of_seq go "
                                       "together")
        if tenants is not None:
            tlist = list(tenants)
            handles = (_ffi.AdapterP * max(1, len(tlist)))(*[t._h() for t in tlist])
            ids = _int_array(tenant_of_seq, "tenant_of_seq", np.int32, (batch,))
            keep += [handles, ids]
            args.tenants = ctypes.cast(handles, ctypes.POINTER(_ffi.AdapterP))
            args.n_tenants = len(tlist)
            args.tenant_of_seq = _ptr(ids)
        self._check(_lib.lora_decode_ex(h, ctypes.byref(args), cache._h(), _ptr(x3), n_new,
                                        _ptr(o)), "lora_decode_ex")
        return o

    @property
    def run_info(self):
        """RunInfo of the last forward/backward (lora_adapter_get_run_info)."""
        s = _ffi.RunInfoC(struct_size=ctypes.sizeof(_ffi.RunInfoC))
        self._check(_lib.lora_adapter_get_run_info(self._h(), ctypes.byref(s)),
                    "lora_adapter_get_run_info", const=True)
        return _from_struct(RunInfo, s)

    def threshold_estimate(self, x):
        """The paper's threshold statistics for self-attention on x and what AUTO would
        run (lora_threshold_estimate); leaves the saved forward and gradients alone."""
        h = self._h()
        x3, _ = self._input(x, "x")
        s = _ffi.ThresholdReportC(struct_size=ctypes.sizeof(_ffi.ThresholdReportC))
        self._check(_lib.lora_threshold_estimate(h, _ptr(x3), x3.shape[0], x3.shape[1],
                                                 ctypes.byref(s)),
                    "lora_threshold_estimate")
        return _from_struct(ThresholdReport, s)

    def threshold_estimate_ex(self, x, *, q_lens=None, q_pos=None, q_seg=None):
        """lora_threshold_estimate_ex: threshold_estimate for the self-attention
        forward_ex(x, q_lens=..., q_pos=..., q_seg=...) would run: statistics over the
        valid rows, RoPE at the given positions (masks as forward_ex's; a key's length,
        positions and segments are the query's in self-attention)."""
        _need("lora_threshold_estimate_ex")
        h = self._h()
        x3, _ = self._input(x, "x")
        batch, seq_len = x3.shape[0], x3.shape[1]
        args, keep = _attn_args(batch, seq_len, seq_len, 0, None, q_lens, None, q_pos,
                                None, q_seg, None)
        s = _ffi.ThresholdReportC(struct_size=ctypes.sizeof(_ffi.ThresholdReportC))
        self._check(_lib.lora_threshold_estimate_ex(h, ctypes.byref(args), _ptr(x3), batch,
                                                    seq_len, ctypes.byref(s)),
                    "lora_threshold_estimate_ex")
        del keep
        return _from_struct(ThresholdReport, s)


def _attn_args(batch, len_q, len_kv, flags, tape, q_lens, kv_lens, q_pos, kv_pos, q_seg,
               kv_seg):
    """(lora_attn_args, arrays it points to): the caller keeps the arrays alive through
    the C call."""
    args = _ffi.AttnArgsC(struct_size=ctypes.sizeof(_ffi.AttnArgsC), flags=int(flags),
                          tape=tape._h() if tape is not None else None)
    keep = []
    for name, value, dtype, shape in (
            ("q_lens", q_lens, np.int64, (batch,)),
            ("kv_lens", kv_lens, np.int64, (batch,)),
            ("q_pos", q_pos, np.int64, (batch, len_q)),
            ("kv_pos", kv_pos, np.int64, (batch, len_kv)),
            ("q_seg", q_seg, np.int32, (batch, len_q)),
            ("kv_seg", kv_seg, np.int32, (batch, len_kv))):
        if value is not None:
            arr = _int_array(value, name, dtype, shape)
            keep.append(arr)
            setattr(args, name, arr.ctypes.data)
    return args, keep


def _shared_f32(a, name, count):
    """A float32 ndarray over `a`'s own memory (a numpy array, or a CPU torch tensor
    through .detach().numpy()), never a copy: anything that would need one raises."""
    if not isinstance(a, np.ndarray) and hasattr(a, "detach"):
        t = a.detach()
        if str(t.dtype) != "torch.float32" or t.device.type != "cpu" \
                or not t.is_contiguous():
            raise DtypeError(Status.INVALID_ARG, "%s must be a contiguous CPU float32 "
                             "tensor (it is %s on %s)" % (name, t.dtype, t.device))
        a = t.numpy()
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        raise DtypeError(Status.INVALID_ARG, "%s must be a float32 array used in place "
                         "(got %s)" % (name, getattr(a, "dtype", type(a).__name__)))
    if not a.flags.c_contiguous or not a.flags.writeable or not a.flags.aligned:
        raise InvalidArgumentError(Status.INVALID_ARG, "%s must be writable, aligned and "
                                   "C-contiguous (it is used in place)" % name)
    if a.size != count:
        raise ShapeError(Status.SHAPE, "%s has %d values, the factor %d" % (name, a.size,
                                                                          count))
    return a


def _check_dout(dout, oshape):
    """dout as float32 with the saved forward's out shape (any equal-sized reshape)."""
    d = as_f32(dout, "dout")
    if d.size != int(np.prod(oshape)) or d.shape[-1] != oshape[-1]:
        raise ShapeError(Status.SHAPE, "dout has shape %s, expected %s" % (d.shape, oshape))
    return d


def _int_array(value, name, dtype, shape):
    """An integer mask argument as a C-contiguous array of dtype and shape (integers
    only: a float array raises DtypeError)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise DtypeError(Status.INVALID_ARG, "%s is %s; it holds integers" % (name, arr.dtype))
    if arr.shape != tuple(shape):
        raise ShapeError(Status.SHAPE, "%s has shape %s, expected %s"
                         % (name, arr.shape, tuple(shape)))
    return np.ascontiguousarray(arr, dtype=dtype)


class Tape:
    """A lora_tape: what one training forward keeps for its backward, so several
    forwards can be in flight (layer reuse, weight tying, chosen/rejected pairs,
    activation checkpointing). Made for one adapter; record with
    adapter.forward_ex(x, tape=t), replay with adapter.backward_ex(dout, tape=t).

        with lora.Tape(ad) as t1, lora.Tape(ad) as t2:
            y1 = ad.forward_ex(x1, tape=t1)
            y2 = ad.forward_ex(x2, tape=t2)
            ad.backward_ex(dy2, tape=t2)
            ad.backward_ex(dy1, tape=t1)
    """

    _handle = None

    def __init__(self, adapter):
        _need("lora_tape_create")
        handle = _ffi.TapeP()
        st = _lib.lora_tape_create(ctypes.byref(handle), adapter._h())
        adapter._check(st, "lora_tape_create", const=True)
        self._handle = handle
        self._adapter = adapter
        self._saved = None  # (kind, out shape, xq shape[, xkv shape]) of its forward

    @property
    def adapter(self):
        """The Adapter this tape belongs to."""
        return self._adapter

    def _h(self):
        if not self._handle:
            raise StateError(Status.STATE, "the tape is closed")
        return self._handle

    def close(self):
        """Frees the tape and its activations (lora_tape_destroy). Idempotent."""
        h, self._handle = self._handle, None
        self._saved = None
        if h:
            _lib.lora_tape_destroy(h)

    @property
    def closed(self):
        return not self._handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone
            pass

    def __repr__(self):
        state = "closed" if self.closed else (self._saved[0] + " forward" if self._saved
                                              else "empty")
        return "<lora.Tape %s>" % state


class KvCache:
    """A lora_kv_cache: keys and values of `batch` sequences of up to `capacity` tokens,
    shaped for `adapter` (its kv heads, head_dim and window: with 0 < WINDOW < capacity
    it keeps only the last WINDOW tokens). Fill it with adapter.decode(cache, x).

        with lora.KvCache(ad, batch=2, capacity=64) as cache:
            y = ad.decode(cache, prompt)           # (2, n, d_model): prefill
            y = ad.decode(cache, next_tokens)      # (2, d_model): one step
    """

    _handle = None

    def __init__(self, adapter, batch, capacity):
        _need("lora_kv_cache_create")
        handle = _ffi.KvCacheP()
        st = _lib.lora_kv_cache_create(ctypes.byref(handle), adapter._h(), int(batch),
                                       int(capacity))
        if st != Status.OK:
            raise error_for(st, "lora_kv_cache_create(batch=%d, capacity=%d) failed"
                            % (batch, capacity), "lora_kv_cache_create")
        self._handle = handle
        self.batch = int(batch)
        self.capacity = int(capacity)

    def _h(self):
        if not self._handle:
            raise StateError(Status.STATE, "the cache is closed")
        return self._handle

    def reset(self, b=-1):
        """Empties sequence b (-1: all)."""
        st = _lib.lora_kv_cache_reset(self._h(), int(b))
        if st != Status.OK:
            raise error_for(st, "sequence %d is outside [-1, %d)" % (b, self.batch),
                            "lora_kv_cache_reset")

    def length(self, b):
        """Tokens sequence b holds."""
        v = ctypes.c_int64()
        st = _lib.lora_kv_cache_length(self._h(), int(b), ctypes.byref(v))
        if st != Status.OK:
            raise error_for(st, "sequence %d is outside [0, %d)" % (b, self.batch),
                            "lora_kv_cache_length")
        return v.value

    @property
    def lengths(self):
        return [self.length(b) for b in range(self.batch)]

    def close(self):
        """Frees the cache (lora_kv_cache_destroy). Idempotent."""
        h, self._handle = self._handle, None
        if h:
            _lib.lora_kv_cache_destroy(h)

    @property
    def closed(self):
        return not self._handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone
            pass


# ---- optimizer -------------------------------------------------------------------------

class OptParam(enum.IntEnum):
    """lora_optimizer_param."""
    LR = 1
    BETA1 = 2
    BETA2 = 3
    EPS = 4
    WEIGHT_DECAY = 5
    MOMENTUM = 6
    DAMPENING = 7
    NESTEROV = 8
    MAX_GRAD_NORM = 9
    STEP = 10
    GRAD_NORM = 11


class OptimizerKind(enum.IntEnum):
    """lora_optimizer_kind."""
    ADAMW = 0
    SGD = 1


_OPT_INT_PARAMS = {OptParam.NESTEROV, OptParam.STEP}


class Optimizer:
    """AdamW or SGD on LoRA factors (a lora_optimizer handle), with PyTorch's update
    rules, over one adapter or a set of adapters (a whole model: one state, and
    max_grad_norm clips by the global norm over every factor of the set, as
    torch.nn.utils.clip_grad_norm_(model.parameters())). Keyword parameters: lr,
    betas=(beta1, beta2) or beta1/beta2, eps, weight_decay, momentum, dampening,
    nesterov, max_grad_norm.

        opt = lora.Optimizer(ad, "adamw", lr=1e-3, weight_decay=0.01)
        opt = lora.Optimizer([layer0, layer1], "adamw", lr=1e-3, max_grad_norm=1.0)
        ad.zero_grad(); ad.forward(x); ad.backward(dout); opt.step()
    """

    _handle = None

    def __init__(self, adapters, kind="adamw", **params):
        k = _enum_value(OptimizerKind, kind)
        self._single = isinstance(adapters, Adapter)
        self._adapters = [adapters] if self._single else list(adapters)
        h = _ffi.OptimizerP()
        if self._single:
            st = _lib.lora_optimizer_create(ctypes.byref(h), adapters._h(), k)
            fn = "lora_optimizer_create"
        else:
            _need("lora_optimizer_create_set")
            if not self._adapters:
                raise InvalidArgumentError(Status.INVALID_ARG, "the adapter set is empty",
                                           "lora_optimizer_create_set")
            arr = _handles(self._adapters)
            seen = {}
            for i, handle in enumerate(arr):  # the library names no repeat (const)
                a = ctypes.cast(handle, ctypes.c_void_p).value
                if a in seen:
                    raise InvalidArgumentError(
                        Status.INVALID_ARG, "adapters[%d] and adapters[%d] are the same "
                        "adapter" % (seen[a], i), "lora_optimizer_create_set")
                seen[a] = i
            st = _lib.lora_optimizer_create_set(ctypes.byref(h), arr, len(arr), k)
            fn = "lora_optimizer_create_set"
        if st != Status.OK:
            raise error_for(st, "", fn)  # the adapters are const: no message
        self._handle = h
        self.kind = OptimizerKind(k)
        betas = params.pop("betas", None)
        if betas is not None:
            params["beta1"], params["beta2"] = betas
        for key, value in params.items():
            self.set(key, value)

    @property
    def adapters(self):
        """The adapters given at creation (a list; one element for a single adapter)."""
        return list(self._adapters)

    def _h(self):
        if not self._handle:
            raise StateError(Status.STATE, "the optimizer is closed")
        return self._handle

    def _check(self, st, fn):
        if st != Status.OK:
            raise error_for(st, _lib.lora_optimizer_last_error(self._handle).decode(), fn)

    @staticmethod
    def _param(param):
        if isinstance(param, str):
            try:
                return OptParam[param.upper()]
            except KeyError:
                raise TypeError("unknown optimizer parameter %r" % param) from None
        return OptParam(param)

    def set(self, param, value):
        """Sets a parameter (OptParam or its name), e.g. set("lr", 1e-4)."""
        p = self._param(param)
        if p in _OPT_INT_PARAMS:
            self._check(_lib.lora_optimizer_set_int(self._h(), int(p), int(value)),
                        "lora_optimizer_set_int")
        else:
            self._check(_lib.lora_optimizer_set_double(self._h(), int(p), float(value)),
                        "lora_optimizer_set_double")

    def get(self, param):
        """Reads a parameter (STEP and GRAD_NORM included)."""
        p = self._param(param)
        if p in _OPT_INT_PARAMS:
            v = ctypes.c_int64()
            self._check(_lib.lora_optimizer_get_int(self._h(), int(p), ctypes.byref(v)),
                        "lora_optimizer_get_int")
        else:
            v = ctypes.c_double()
            self._check(_lib.lora_optimizer_get_double(self._h(), int(p), ctypes.byref(v)),
                        "lora_optimizer_get_double")
        return v.value

    @property
    def lr(self):
        return self.get(OptParam.LR)

    @lr.setter
    def lr(self, value):
        self.set(OptParam.LR, value)

    @property
    def step_count(self):
        """Steps taken since creation or reset()."""
        return self.get(OptParam.STEP)

    @property
    def grad_norm(self):
        """Global L2 norm of the gradients at the last step, before clipping (-1 before
        any step)."""
        return self.get(OptParam.GRAD_NORM)

    def step(self, adapters=None):
        """One update of every factor from the accumulated gradients (which are left as
        they are: zero_grad before the next accumulation). `adapters` defaults to those
        given at creation; another adapter (or list, in the same order) of the same
        shapes may be given instead."""
        h = self._h()
        if adapters is None:
            ads = self._adapters
        else:
            ads = [adapters] if isinstance(adapters, Adapter) else list(adapters)
        for ad in ads:
            ad._saved = None
        if self._single and len(ads) == 1:
            self._check(_lib.lora_optimizer_step(h, ads[0]._h()), "lora_optimizer_step")
            return
        _need("lora_optimizer_step_set")
        arr = _handles(ads)
        self._check(_lib.lora_optimizer_step_set(h, arr, len(arr)), "lora_optimizer_step_set")

    def reset(self):
        """Zeroes the moments/momentum and the step count."""
        self._check(_lib.lora_optimizer_reset(self._h()), "lora_optimizer_reset")

    def close(self):
        h, self._handle = self._handle, None
        if h:
            _lib.lora_optimizer_destroy(h)

    @property
    def closed(self):
        return not self._handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _handles(adapters):
    """A C array of the adapters' handles."""
    return (_ffi.AdapterP * len(adapters))(*[a._h() for a in adapters])


def apply(tenants, target, tenant_of_row, x, y):
    """lora_apply: for every row r with t = tenant_of_row[r] >= 0, adds tenant t's LoRA
    delta of `target` to y in place: y[r] += s_t * (x[r] @ A_t.T) @ B_t.T (bases and
    biases not involved; rows of -1 are left alone). tenants: Adapters adapting target
    with the same (in, out), ranks and scales may differ; tenant_of_row (rows,) int32;
    x (rows, in) float32; y (rows, out) a writable C-contiguous float32 array. Returns
    y. Failures raise with lora_apply_with_error's message; y is then unchanged."""
    fn = "lora_apply"
    _need("lora_apply_with_error")
    tenants = list(tenants)
    t = _target(target)
    ids = np.asarray(tenant_of_row)
    if ids.dtype.kind not in "iu" or ids.ndim != 1:
        raise DtypeError(Status.INVALID_ARG, "tenant_of_row must be a 1-D integer array "
                         "(got %s of shape %s)" % (ids.dtype, ids.shape), fn)
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    rows = ids.shape[0]
    a = as_f32(x, "x")
    if tenants and isinstance(tenants[0], Adapter):
        out_f, in_f = tenants[0].base_shape(t)
        if a.shape != (rows, in_f):
            raise ShapeError(Status.SHAPE, "x has shape %s, expected %s"
                             % (a.shape, (rows, in_f)), fn)
        if not isinstance(y, np.ndarray) or y.shape != (rows, out_f):
            raise ShapeError(Status.SHAPE, "y has shape %s, expected %s"
                             % (getattr(y, "shape", None), (rows, out_f)), fn)
    if not isinstance(y, np.ndarray) or y.dtype != np.float32 or \
            not y.flags.c_contiguous or not y.flags.writeable:
        raise DtypeError(Status.INVALID_ARG, "y must be a writable C-contiguous float32 "
                         "array (it is added to in place)", fn)
    handles = _handles(tenants) if tenants else None
    err = ctypes.create_string_buffer(512)
    st = _lib.lora_apply_with_error(handles, len(tenants), t, _ptr(ids), _ptr(a), rows,
                                    _ptr(y), err, len(err))
    if st != Status.OK:
        raise error_for(st, err.value.decode(), fn)
    return y


# ---- adapter files (PEFT directory, llama.cpp GGUF) ------------------------------------

def _adapter_set(adapters, layers):
    if isinstance(adapters, Adapter):
        adapters = [adapters]
    if isinstance(adapters, dict):
        layers, adapters = list(adapters.keys()), list(adapters.values())
    adapters = list(adapters)
    if layers is None:
        layers = list(range(len(adapters)))
    layers = list(layers)
    if len(layers) != len(adapters) or not adapters:
        raise InvalidArgumentError(Status.INVALID_ARG, "%d adapters and %d layers"
                                   % (len(adapters), len(layers)))
    arr = _handles(adapters)
    lay = (ctypes.c_int64 * len(layers))(*[int(v) for v in layers])
    return adapters, arr, lay


def _save(name, path, adapters, layers, *extra):
    ads, arr, lay = _adapter_set(adapters, layers)
    st = getattr(_lib, name)(os.fsencode(path), arr, lay, len(ads), *extra)
    if st != Status.OK:
        raise error_for(st, _lib.lora_adapter_last_error(arr[0]).decode(), name)


def _load(name, path, config):
    cfg = _make_config(config)
    try:
        count = ctypes.c_size_t()
        st = getattr(_lib, name)(None, None, 0, ctypes.byref(count), os.fsencode(path), cfg)
        if st != Status.OK:
            raise error_for(st, _lib.lora_config_last_error(cfg).decode(), name)
        n = count.value
        arr = (_ffi.AdapterP * max(n, 1))()
        lay = (ctypes.c_int64 * max(n, 1))()
        st = getattr(_lib, name)(arr, lay, n, ctypes.byref(count), os.fsencode(path), cfg)
        if st != Status.OK:
            raise error_for(st, _lib.lora_config_last_error(cfg).decode(), name)
        return {int(lay[i]): Adapter._from_handle(arr[i]) for i in range(count.value)}
    finally:
        _lib.lora_config_destroy(cfg)


def _save_options(base_model, architecture):
    """A lora_save_options for the _ex saves (strings UTF-8 encoded)."""
    o = _ffi.SaveOptionsC()
    o.struct_size = ctypes.sizeof(o)
    o.base_model_name_or_path = None if base_model is None else base_model.encode("utf-8")
    o.architecture = None if architecture is None else architecture.encode("utf-8")
    return o


def save_peft(directory, adapters, layers=None, base_model_name_or_path=None):
    """Writes a PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
    `adapters`: an Adapter, a list (layers default to 0, 1, ...) or {layer: Adapter}.
    base_model_name_or_path: the config's key (a Hugging Face id or a path)."""
    if base_model_name_or_path is None:
        _save("lora_save_peft", directory, adapters, layers)
        return
    _need("lora_save_peft_ex")
    o = _save_options(base_model_name_or_path, None)
    _save("lora_save_peft_ex", directory, adapters, layers, ctypes.byref(o))


def load_peft(directory, **config):
    """Reads a PEFT adapter directory: {layer: Adapter}. The keyword configuration
    supplies what the file does not (d_model, n_heads, out_proj, backend, ...); rank,
    alpha, rslora and targets come from the file. Base weights are unset."""
    return _load("lora_load_peft", directory, config)


def save_gguf(path, adapters, layers=None, architecture=None, base_model_name_or_path=None):
    """Writes a llama.cpp GGUF LoRA adapter (architecture default "llama"; it also
    decides the Q/K row order, docs/format-gguf.md). base_model_name_or_path: written
    as general.base_model.*."""
    if base_model_name_or_path is None:
        _save("lora_save_gguf", path, adapters, layers,
              None if architecture is None else architecture.encode())
        return
    _need("lora_save_gguf_ex")
    o = _save_options(base_model_name_or_path, architecture)
    _save("lora_save_gguf_ex", path, adapters, layers, ctypes.byref(o))


def load_gguf(path, **config):
    """Reads a llama.cpp GGUF LoRA adapter: {layer: Adapter} (see load_peft)."""
    return _load("lora_load_gguf", path, config)
