"""Q-Filters (Godey et al., 2025, arXiv:2503.02812): a key's importance is its projection on a fixed direction
per layer and KV head, the "Q-filter", computed once from the model's own queries.

Score (kvpress 0.5.5's ``QFilterPress``, read, not copied): ``s_j = -<f_{layer,h}, k_j>`` for the post-RoPE key
``k_j`` of KV head ``h``; the usual ratio top-k (``n - floor(r n)`` kept per head, :class:`EvictionPolicy`)
follows and the evicted entries are freed.

Filter (the Q-Filters authors' ``make_filters.py``, read, not copied; see :mod:`.qfilter_calibration`): for each
query head, ``v`` = the first right singular vector of a matrix of its post-RoPE queries on calibration text;
``sign = +1`` when more than half of the first left singular vector's entries are positive (most queries project
positively on ``v``), else ``-1``; the head's filter is ``-sign * v`` and a KV head's filter is the mean of its
group's query-head filters (GQA; not re-normalised). So ``s_j = sign * <v, k_j>`` averaged over the group: keys
pointing where most queries point score high. Only the sign convention matters for which keys are kept, and it is
the one kvpress's downloaded filters use (so kvpress's scoring fed these filters keeps the same keys).

Deviation: kvpress downloads the authors' filters from the hub (``nthngdy/<model>_qfilt``), which cannot be had
here and do not exist for our models; the filters are computed on this machine from Lee-corpus text (the authors
used 20 sequences of 2048 tokens from a web corpus). The method is approximate by design (a rank-1 estimate of
the average attention logit); nothing here is trained.

Files: ``PATH`` (safetensors, one tensor ``q_filters: [layers, Hkv, head_dim]`` float32) and ``PATH.json``
(kind, shape, the model it was made for with per-layer attention fingerprints, the weights' SHA-256, the
calibration text and sizes). A missing file, a file of another kind, weights that do not match the JSON, or a
file made for another model is refused with an error naming the path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import LMCompressError
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, ScoreInputs
from .calibration_files import check_layer_identity, load_calibration

KIND = "qfilter_filters"
TENSOR = "q_filters"
CALIBRATE = "`python -m lmcompress.kv.evict.qfilter_calibration --model NAME --out PATH`"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_filters(path: str | Path, filters: torch.Tensor, identity: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``filters: [layers, Hkv, head_dim]`` to ``path`` (safetensors) and ``path.json``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({TENSOR: filters.detach().float().cpu().contiguous()}, str(path))
    layers, heads, dim = filters.shape
    doc = {"kind": KIND, "model": identity, "shape": [layers, heads, dim], "layers": layers, "kv_heads": heads,
           "head_dim": dim, "sha256": file_sha256(path), **meta}
    Path(str(path) + ".json").write_text(json.dumps(doc, indent=1))
    return path


def load_filters(path: str | Path | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """``([layers, Hkv, head_dim] float32 filters, their JSON)``; every bad file is a clear error."""
    from safetensors.torch import load_file

    if path is None or str(path) == "":
        raise LMCompressError(f"QFilter needs filters=PATH (safetensors made for the model by {CALIBRATE})")
    if not Path(str(path)).is_file():
        raise LMCompressError(f"QFilter filters file {str(path)!r} does not exist; make one for the model with "
                              f"{CALIBRATE}")
    doc = load_calibration(str(path) + ".json", KIND, "QFilter")
    if doc.get("sha256") != file_sha256(path):
        raise LMCompressError(f"QFilter filters file {str(path)!r} does not match its {str(path) + '.json'!r} "
                              f"(SHA-256 differs): re-make both with {CALIBRATE}")
    try:
        filters = load_file(str(path))[TENSOR].float()
    except Exception as exc:
        raise LMCompressError(f"QFilter filters file {str(path)!r} holds no {TENSOR!r} tensor "
                              f"({type(exc).__name__})") from None
    if list(filters.shape) != list(doc.get("shape", [])) or filters.dim() != 3:
        raise LMCompressError(f"QFilter filters file {str(path)!r} holds shape {list(filters.shape)}; its JSON "
                              f"says {doc.get('shape')}")
    return filters, doc


@EVICTION_METHODS.register("qfilter")
@dataclass(frozen=True)
class QFilter(EvictionPolicy):
    """Q-Filters scores ``-<f, k_j>`` with filters calibrated for the model (see the module docstring).

    Attributes:
        filters: path of the safetensors filters (``PATH.json`` beside them), made by
            ``python -m lmcompress.kv.evict.qfilter_calibration``; required.
    """

    name = "qfilter"
    display = "QFilter"
    filters: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        tensor, doc = load_filters(self.filters)
        object.__setattr__(self, "_filters", tensor)
        object.__setattr__(self, "_doc", doc)

    @property
    def filter_tensor(self) -> torch.Tensor:
        """``[layers, Hkv, head_dim]`` float32."""
        return self._filters

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        path = str(self.filters)
        check_layer_identity(self._doc, path, self.display, inputs.layer_idx, inputs.num_layers, inputs.module)
        f = self._filters[inputs.layer_idx]  # [Hkv, D]
        if tuple(f.shape) != (inputs.keys.shape[1], inputs.keys.shape[3]):
            raise LMCompressError(f"QFilter filters file {path!r} has {f.shape[0]} KV heads x {f.shape[1]} channels "
                                  f"in layer {inputs.layer_idx}; this model has {inputs.keys.shape[1]} x "
                                  f"{inputs.keys.shape[3]}: calibrate it for this model with {CALIBRATE}")
        f = f.to(inputs.keys.device)
        return -torch.einsum("bhnd,hd->bhn", inputs.keys.float(), f)
