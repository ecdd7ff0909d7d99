"""Byte sizes given on the command line or in a grid file: ``20GiB``, ``512MiB``, ``1.5GB``, ``4096``."""

from __future__ import annotations

import re

from .errors import LMCompressError

UNITS: dict[str, int] = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
ALLOWED = "a byte count such as 20GiB, 512MiB, 1.5GB or 4096 (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: str | int, name: str) -> int:
    """``value`` as a whole number of bytes > 0 (``"20GiB"`` -> 21474836480; an int is taken as bytes).

    Raises:
        LMCompressError: not a size (``"20 gigs"``, ``"-1"``, ``""``), or zero; the message names ``name``.
    """
    if isinstance(value, bool):
        raise LMCompressError(f"{name}={value!r} is not a size; allowed: {ALLOWED}")
    if isinstance(value, int):
        number, unit = float(value), ""
    else:
        match = _SIZE.match(str(value))
        if match is None or match.group(2).lower() not in UNITS:
            raise LMCompressError(f"{name}={value!r} is not a size; allowed: {ALLOWED}")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * UNITS[unit])
    if size <= 0:
        raise LMCompressError(f"{name}={value!r} is not a size > 0; allowed: {ALLOWED}")
    return size
