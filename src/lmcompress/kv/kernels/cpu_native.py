"""The fused C decode-attention kernel of the CPU path (``cpu_decode_native.c``): built on first use, loaded with
ctypes.

The source ships with the package; the first call compiles it with the system C compiler (``cc``, ``-O3
-march=native -fopenmp``) into ``~/.cache/lmcompress/native/<hash>/`` (``$LMCOMPRESS_CACHE`` overrides the root),
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
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_decode_native.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=fast", "-fno-math-errno",
         "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-freciprocal-math")


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


def _build(compiler: str, out: Path) -> bool:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, timeout=120)
        if done.returncode != 0:
            return False
        os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def _load() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or not SOURCE.exists():
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_flags().encode()
                         + platform.machine().encode()).hexdigest()[:16]
    path = _cache_root() / "native" / key / "libcpu_decode.so"
    if not path.exists() and not _build(compiler, path):
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    fn = lib.lmc_decode_attention
    i, f, p, long_ = ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_long
    fn.argtypes = [i, i, i, p, f,  # rows, G, D, q, scaling
                   i, i, i, i, p, long_, long_, p, p, long_, long_,  # packed keys
                   i, i, i, p, long_, long_, p, p, long_, long_,  # packed values
                   i, p, long_, long_, p, long_, long_,  # full-precision keys, values
                   p, p]  # out, work
    fn.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (no compiler, a failed build, or ``LMCOMPRESS_NO_NATIVE=1``)."""
    if os.environ.get("LMCOMPRESS_NO_NATIVE", "") == "1":
        return None
    return _load()
