"""Error types. Every user-facing bad value raises a subclass of ``ValueError`` with a one-line message that
names the value and what is allowed; the CLI turns these into exit code 2 without a traceback."""

from __future__ import annotations


class LMCompressError(ValueError):
    """Bad input: the message names the bad value and the allowed values or range."""


class UnknownNameError(LMCompressError, KeyError):
    """A name (method, task, model, ...) that no registry holds."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it a plain sentence
        return str(self.args[0]) if self.args else ""


class ModelFileError(LMCompressError, FileNotFoundError):
    """A model file or package that is missing or fails its checksum."""


def check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False,
                high_open: bool = True) -> None:
    """Raise ``LMCompressError`` unless ``low <= value < high`` (bounds' openness configurable)."""
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high) or value != value:  # NaN fails too
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise LMCompressError(f"{name}={value!r} is out of range; allowed: {lo}{low}, {high}{hi}")


def check_positive_int(name: str, value: int, *, allow_zero: bool = False) -> None:
    """Raise ``LMCompressError`` unless ``value`` is an int > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        bound = ">= 0" if allow_zero else ">= 1"
        raise LMCompressError(f"{name}={value!r} is not allowed; it must be an integer {bound}")


def check_choice(name: str, value: object, allowed: tuple | list) -> None:
    """Raise ``LMCompressError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise LMCompressError(f"{name}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}")
