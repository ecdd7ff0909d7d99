"""Calibration files of calibrated eviction methods (DuoAttention's head pattern, ...): a JSON document that names
the model it was computed for, checked when the file is used.

A model is identified by its geometry (layers, KV heads, head dim) and, per decoder layer, a fingerprint of its
attention module's parameters (SHA-256 of every parameter's name, shape and first 256 values in float32), so a
file made for another model, or for another checkpoint of the same architecture, is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ...errors import LMCompressError

FINGERPRINT_VALUES = 256


def attention_fingerprint(module: torch.nn.Module) -> str:
    """Hex SHA-256 of an attention module's parameters (names, shapes, first values)."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters()):
        head = param.detach().flatten()[:FINGERPRINT_VALUES].float().cpu().contiguous()
        digest.update(f"{name}:{tuple(param.shape)}".encode())
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:32]


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """``{"geometry": [layers, heads, kv_heads, head_dim], "layers": [fingerprint per layer], "name": ...}``."""
    from ..._compat import attention_modules, kv_geometry

    return {
        "name": str(getattr(model.config, "name_or_path", "") or model.config.model_type),
        "geometry": list(kv_geometry(model.config)),
        "layers": [attention_fingerprint(m) for m in attention_modules(model)],
    }


def save_calibration(path: str | Path, kind: str, identity: dict[str, Any], data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": kind, "model": identity, **data}, indent=1))
    return path


def load_calibration(path: str | Path | None, kind: str, method: str) -> dict[str, Any]:
    """Read a calibration file of ``kind``; a missing, unreadable or foreign file is a clear error."""
    if path is None or path == "":
        raise LMCompressError(f"{method} needs a calibration file (pattern=PATH); create one with "
                              f"`python -m lmcompress.kv.evict.duo_calibration --model NAME --out PATH`")
    p = Path(str(path))
    if not p.is_file():
        raise LMCompressError(f"{method} calibration file {str(path)!r} does not exist")
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise LMCompressError(f"{method} calibration file {str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        raise LMCompressError(f"{method} calibration file {str(path)!r} is not a {kind} file "
                              f"(kind={doc.get('kind') if isinstance(doc, dict) else None!r})")
    return doc


def check_layer_identity(doc: dict[str, Any], path: str, method: str, layer_idx: int, num_layers: int,
                         module: torch.nn.Module | None) -> None:
    """Refuse a file computed for another model (geometry or the layer's attention fingerprint differ)."""
    ident = doc["model"]
    layers = ident.get("layers", [])
    if len(layers) != num_layers:
        raise LMCompressError(f"{method} calibration file {path!r} was made for {ident.get('name')!r} with "
                              f"{len(layers)} layers; this model has {num_layers}: calibrate it for this model")
    if module is not None and attention_fingerprint(module) != layers[layer_idx]:
        raise LMCompressError(f"{method} calibration file {path!r} was made for another model "
                              f"({ident.get('name')!r}; layer {layer_idx}'s weights differ): calibrate it for this "
                              "model")
