"""Validation of device names given on the command line, before any model loads."""

from __future__ import annotations

import torch

from .errors import LMCompressError

ALLOWED = "cpu, cuda, cuda:N"


def check_device(text: str, option: str = "--device") -> str:
    """Return ``text`` if it names a device this machine has; else a one-line error.

    Allowed: ``cpu``; ``cuda`` / ``cuda:N`` when a CUDA GPU (number ``N``) is present; ``mps`` where available.

    Raises:
        LMCompressError: not a device name (``tpu``), or a device this machine lacks (``cuda`` without a GPU).
    """
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise LMCompressError(f"{option}={text!r} is not a device name; allowed: {ALLOWED}") from None
    if device.type == "cpu":
        return text
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LMCompressError(f"{option}={text!r}: no CUDA GPU is available on this machine; allowed: cpu")
        if device.index is not None and device.index >= count:
            raise LMCompressError(
                f"{option}={text!r}: this machine has {count} CUDA GPU(s); allowed: cpu, cuda, cuda:0-{count - 1}"
            )
        return text
    if device.type == "mps" and torch.backends.mps.is_available():
        return text
    raise LMCompressError(f"{option}={text!r} is not supported here; allowed: {ALLOWED}")
