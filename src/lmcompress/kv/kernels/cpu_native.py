"""The C kernels of the CPU path, built on first use and loaded with ctypes: fused decode attention over packed
codes (``cpu_decode_native.c``) and the per-token affine encode (``cpu_encode_native.c``, compiled with strict
float semantics so its codes are bit-identical to the torch encode's).

The sources ship with the package; the first call compiles one with the system C compiler (``cc``, ``-O3
-march=native``) into ``~/.cache/lmcompress/native/<hash>/`` (``$LMCOMPRESS_CACHE`` overrides the root),
keyed by the source, the flags and this CPU's feature flags, and later processes load the built library. Without
a compiler, or when the build fails, :func:`library` returns None and the torch codes path of
:mod:`.cpu_decode` runs (``LMCOMPRESS_NO_NATIVE=1`` forces that). Nothing is built at import time.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

HERE = Path(__file__).parent
#: the decode kernel may reorder sums (vectorised reductions): float32-rounding differences only
DECODE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=fast", "-fno-math-errno",
                "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-freciprocal-math")
#: the encode kernel must round every operation as torch does
ENCODE_FLAGS = ("-O2", "-march=native", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_root() -> Path:
    root = os.environ.get("LMCOMPRESS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "lmcompress"


def _build(compiler: str, source: Path, flags: tuple[str, ...], out: Path) -> bool:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, timeout=120)
        if done.returncode != 0:
            return False
        os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@cache
def _load(source_name: str, flags: tuple[str, ...]) -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    source = HERE / source_name
    if compiler is None or not source.exists():
        return None
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + _cpu_flags().encode()
                         + platform.machine().encode()).hexdigest()[:16]
    path = _cache_root() / "native" / key / f"lib{source.stem}.so"
    if not path.exists() and not _build(compiler, source, flags, path):
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        return None


def _disabled() -> bool:
    return os.environ.get("LMCOMPRESS_NO_NATIVE", "") == "1"


def library() -> ctypes.CDLL | None:
    """The decode-attention library, or None (no compiler, a failed build, or ``LMCOMPRESS_NO_NATIVE=1``)."""
    if _disabled():
        return None
    lib = _load("cpu_decode_native.c", DECODE_FLAGS)
    if lib is not None and lib.lmc_decode_attention.argtypes is None:
        i, f, p, long_ = ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_long
        lib.lmc_decode_attention.argtypes = [
            i, i, i, p, f,  # rows, G, D, q, scaling
            i, i, i, i, p, long_, long_, p, p, long_, long_,  # packed keys
            i, i, i, p, long_, long_, p, p, long_, long_,  # packed values
            i, p, long_, long_, p, long_, long_,  # full-precision keys, values
            p, p]  # out, work
        lib.lmc_decode_attention.restype = ctypes.c_int
    return lib


def encode_library() -> ctypes.CDLL | None:
    """The per-token affine encode library, or None (as :func:`library`)."""
    if _disabled():
        return None
    lib = _load("cpu_encode_native.c", ENCODE_FLAGS)
    if lib is not None and lib.lmc_encode_affine.argtypes is None:
        i, p, long_ = ctypes.c_int, ctypes.c_void_p, ctypes.c_long
        lib.lmc_encode_affine.argtypes = [p, long_, i, i, i, p, p, p]
        lib.lmc_encode_affine.restype = ctypes.c_int
    return lib
