"""What a stored result depends on: model identity, dtype, device type, library versions and the code version.

The store key of a run (:meth:`RunSpec.key`) is the *config key*: a hash of the run spec, the model's identity
(:func:`model_identity`), the dtype, the device type and the torch / transformers versions. The lmcompress
*code version* (:func:`code_version`, a hash of the package's source files, so it works for an installed wheel
as well as a git checkout) is kept beside the key, not in it: a stored row whose config key matches but whose
code version differs is *stale* (computed by other code); executors recompute it unless told to reuse it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

#: file suffixes hashed into the code version (the package's sources and any data files it ships).
_CODE_SUFFIXES = (".py", ".json", ".txt", ".yaml", ".toml", ".cu", ".cuh", ".c", ".h")


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """``{"lmcompress", "torch", "transformers"}`` version strings."""
    import transformers

    from .. import __version__

    return {"lmcompress": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


@lru_cache(maxsize=1)
def _source_hash() -> str:
    root = Path(__file__).resolve().parent.parent  # the lmcompress package folder
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _CODE_SUFFIXES
                    and "__pycache__" not in p.parts):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:12]


def code_version() -> str:
    """``"<version>+src.<12 hex>"``: the package version and a hash of every source file of the installed
    ``lmcompress`` package (paths and contents), so any edit, a git checkout of another commit or another wheel
    gives another code version. Computed once per process."""
    return f"{library_versions()['lmcompress']}+src.{_source_hash()}"


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def device_type(device: torch.device | str) -> str:
    """``"cuda:1"`` -> ``"cuda"``; ``"cpu"`` -> ``"cpu"`` (results do not depend on which GPU of a kind)."""
    return torch.device(device).type


def _weight_files(folder: Path) -> list[Path]:
    """The files transformers loads from a folder: safetensors (with their index) if any, else ``.bin``."""
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return st + sorted(folder.glob("*.safetensors.index.json"))
    return sorted(folder.glob("*.bin")) + sorted(folder.glob("*.bin.index.json"))


def _file_stamp(f: Path) -> str:
    st = f.stat()
    return f"{f.name}:{st.st_size}:{st.st_mtime_ns}"


def model_identity(name_or_path: str) -> dict[str, Any]:
    """``{"name", "weights", "quantization_config"}`` of a model name or path, without loading it (read anew at
    every call: a few ``stat`` calls and one small JSON file).

    ``weights`` is the embedded GGUF's sha256, ``tiny:<name>`` for tiny test models (built from code: the code
    version covers them), or for a file or folder a hash of the name, size and mtime (ns) of each file loaded: a
    GGUF file itself; a folder's ``config.json`` and its ``*.safetensors`` (+ index) — or ``*.bin`` when there
    are none. (Size + mtime, not contents: rewriting a file changes its mtime; cheap for multi-GB checkpoints.)
    ``quantization_config`` is a folder's ``config.json`` entry of that name (AWQ / RTN checkpoints), else None.
    A folder whose ``config.json`` has ``dms_*`` keys (a DMS checkpoint) also gets ``dms``: those keys and values.
    """
    from ..models import EMBEDDED_MODELS, TINY_MODELS

    if name_or_path in EMBEDDED_MODELS:
        return {"name": name_or_path, "weights": "sha256:" + EMBEDDED_MODELS[name_or_path].sha256,
                "quantization_config": None}
    if name_or_path in TINY_MODELS:
        return {"name": name_or_path, "weights": "tiny:" + name_or_path, "quantization_config": None}
    p = Path(name_or_path).expanduser()
    quant = None
    dms: dict[str, Any] = {}
    files: list[Path] = []
    if p.is_dir():
        config = p / "config.json"
        files = ([config] if config.is_file() else []) + _weight_files(p)
        try:
            data = json.loads(config.read_text())
            quant = data.get("quantization_config")
            dms = {k: v for k, v in sorted(data.items()) if str(k).startswith("dms_")}
        except (OSError, ValueError, AttributeError):
            quant = None
    elif p.is_file():
        files = [p]
    h = hashlib.sha256()
    for f in files:
        h.update(_file_stamp(f).encode() + b"\0")
    identity = {"name": name_or_path, "weights": "files:" + h.hexdigest()[:16], "quantization_config": quant}
    if dms:  # a DMS checkpoint: its settings key its rows by value (not only through config.json's stamp)
        identity["dms"] = dms
    return identity


@dataclass(frozen=True)
class Provenance:
    """Where and with what a result was (or will be) computed; stored with each row."""

    dtype: str
    device_type: str
    code_version: str
    versions: dict[str, str]
    model: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "device_type": self.device_type, "code_version": self.code_version,
                "versions": self.versions, "model": self.model}


def config_blob(spec_dict: dict[str, Any], dtype: torch.dtype | str, device: torch.device | str) -> dict[str, Any]:
    """Everything the config key hashes: the spec (less its label), the model identity, dtype, device type and
    the torch / transformers versions (the lmcompress code version is left out on purpose)."""
    versions = library_versions()
    return {
        **{k: v for k, v in spec_dict.items() if k != "kv_label"},
        "model_identity": model_identity(spec_dict["model"]),
        "dtype": dtype_name(dtype),
        "device_type": device_type(device),
        "versions": {"torch": versions["torch"], "transformers": versions["transformers"]},
    }


def config_key(spec_dict: dict[str, Any], dtype: torch.dtype | str, device: torch.device | str) -> str:
    """24 hex digits of sha256 over :func:`config_blob` (canonical JSON)."""
    text = json.dumps(config_blob(spec_dict, dtype, device), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def provenance(spec_dict: dict[str, Any], dtype: torch.dtype | str, device: torch.device | str,
               code: str | None = None) -> Provenance:
    """The :class:`Provenance` of a run computed now, by code version ``code`` (default: this process's)."""
    return Provenance(dtype_name(dtype), device_type(device), code or code_version(), library_versions(),
                      model_identity(spec_dict["model"]))
