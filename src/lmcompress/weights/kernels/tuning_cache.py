"""W4A16 tuner results kept on disk, so that a shape is timed once per machine, not once per process.

One JSON file (``$LMCOMPRESS_CACHE_DIR/w4a16_tuning.json``, by default ``~/.cache/lmcompress/``) maps a key to
the chosen :class:`~lmcompress.weights.kernels.dispatch.KernelConfig`. The key names the device, the Triton
and torch versions, a hash of the kernel sources and the tuner's candidate list, and the problem (M bucket, N,
K, group, dtype, bias), so a result is reused only where it was measured and only for the code that was timed.
``LMCOMPRESS_W4A16_TUNE_CACHE=0`` turns the file off. An unreadable or malformed file, or an entry that is
no longer a valid configuration, is ignored with a warning and overwritten by the next result; writes go to a
temporary file that replaces the old one, so a reader never sees half a file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

FILE_NAME = "w4a16_tuning.json"


def enabled() -> bool:
    return os.environ.get("LMCOMPRESS_W4A16_TUNE_CACHE", "1") != "0"


def cache_path() -> Path:
    root = os.environ.get("LMCOMPRESS_CACHE_DIR")
    return Path(root) / FILE_NAME if root else Path.home() / ".cache" / "lmcompress" / FILE_NAME


@functools.cache
def code_hash() -> str:
    """Short hash of this package's sources (kernels, dispatch): any change to them makes earlier results stale."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def make_key(device_name: str, versions: str, problem: tuple) -> str:
    """``device | versions | code hash | problem`` as one string (the JSON key)."""
    return "|".join([device_name, versions, code_hash(), ",".join(map(str, problem))])


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warnings.warn(f"ignoring the W4A16 tuning cache {path}: {exc}", stacklevel=3)
        return {}
    if not isinstance(data, dict):
        warnings.warn(f"ignoring the W4A16 tuning cache {path}: not a JSON object", stacklevel=3)
        return {}
    return data


def load(key: str, config_cls: type, allowed_kinds: tuple[str, ...]) -> Any | None:
    """The configuration stored under ``key`` (an instance of ``config_cls``), or ``None``."""
    if not enabled():
        return None
    path = cache_path()
    entry = _read(path).get(key)
    if entry is None:
        return None
    try:
        fields = {f.name for f in dataclasses.fields(config_cls)}
        if not isinstance(entry, dict) or set(entry) - fields or entry.get("kind") not in allowed_kinds:
            raise ValueError(f"not a configuration of kinds {', '.join(allowed_kinds)}: {entry!r}")
        return config_cls(**entry)
    except (TypeError, ValueError) as exc:
        warnings.warn(f"ignoring W4A16 tuning cache entry {key!r} in {path}: {exc}", stacklevel=2)
        return None


def store(key: str, config: Any) -> None:
    """Add ``config`` under ``key`` to the file (other entries kept); a failure to write only warns."""
    if not enabled():
        return
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[key] = dataclasses.asdict(config)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{FILE_NAME}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        warnings.warn(f"could not write the W4A16 tuning cache {path}: {exc}", stacklevel=2)
