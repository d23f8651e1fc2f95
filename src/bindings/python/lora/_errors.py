"""Exceptions: one class per lora_status, all subclasses of LoraError."""
import enum


class Status(enum.IntEnum):
    """lora_status values (frozen in lora.h)."""
    OK = 0
    INVALID_ARG = 1
    SHAPE = 2
    NOMEM = 3
    NONFINITE = 4
    UNSUPPORTED = 5
    STATE = 6
    IO = 7
    FORMAT = 8
    TOLERANCE = 9


class LoraError(Exception):
    """A liblora call failed.

    Attributes: ``status`` (a :class:`Status`, or the raw int for a value outside the
    enum), ``message`` (lora_adapter_last_error / lora_config_last_error, or the
    binding's own check) and ``function`` (the C function or binding method)."""

    def __init__(self, status, message="", function=""):
        try:
            status = Status(status)
        except ValueError:
            pass
        self.status = status
        self.message = message
        self.function = function
        name = status.name if isinstance(status, Status) else str(status)
        text = "%s: %s" % (function, name) if function else name
        if message:
            text += ": " + message
        super().__init__(text)


class InvalidArgumentError(LoraError, ValueError):
    """LORA_ERR_INVALID_ARG."""


class DtypeError(InvalidArgumentError, TypeError):
    """An array that is not float32 (float64 included): the binding never narrows
    precision behind the caller's back. Convert explicitly (``x.astype(np.float32)``)."""


class ShapeError(LoraError, ValueError):
    """LORA_ERR_SHAPE (also raised by the binding for arrays of the wrong shape)."""


class OutOfMemoryError(LoraError, MemoryError):
    """LORA_ERR_NOMEM."""


class NonFiniteError(LoraError, ValueError):
    """LORA_ERR_NONFINITE."""


class UnsupportedError(LoraError):
    """LORA_ERR_UNSUPPORTED."""


class StateError(LoraError):
    """LORA_ERR_STATE (call out of order; also: using a closed Adapter)."""


class LoraIOError(LoraError):
    """LORA_ERR_IO."""


class FormatError(LoraError):
    """LORA_ERR_FORMAT."""


class ToleranceError(LoraError):
    """LORA_ERR_TOLERANCE."""


_BY_STATUS = {
    Status.INVALID_ARG: InvalidArgumentError,
    Status.SHAPE: ShapeError,
    Status.NOMEM: OutOfMemoryError,
    Status.NONFINITE: NonFiniteError,
    Status.UNSUPPORTED: UnsupportedError,
    Status.STATE: StateError,
    Status.IO: LoraIOError,
    Status.FORMAT: FormatError,
    Status.TOLERANCE: ToleranceError,
}


def error_for(status, message="", function=""):
    """The exception instance for a non-zero status."""
    cls = _BY_STATUS.get(status, LoraError)
    return cls(status, message, function)
