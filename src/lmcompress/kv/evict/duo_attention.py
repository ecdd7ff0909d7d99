"""DuoAttention (Xiao et al., 2024): retrieval heads keep the whole context, streaming heads only the first
``sink_size`` and the last ``recent_size`` tokens; heads are ranked by a calibrated score and the
``round(ratio * layers * KV heads)`` lowest-scored heads stream.

The pattern comes from a calibration file made on this machine by :mod:`.duo_calibration` (kvpress's approximate
on-the-fly scoring on installed text; the paper's trained gates cannot be downloaded here); the file names the
model it was made for and is refused for another one. Heads then hold different lengths, so layers are stored
ragged and the streaming heads' middle tokens are freed (kvpress masks them). As in kvpress, eviction happens
at prefill; the paper also keeps streaming heads at a constant size while decoding, which is not done here
(decoded tokens are appended to every head). Source: kvpress 0.5.5 ``duo_attention_press.py`` (read, not copied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ...errors import LMCompressError, check_positive_int
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, ScoreInputs
from .calibration_files import check_layer_identity, load_calibration
from .duo_calibration import KIND

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer


@EVICTION_METHODS.register("duo_attention")
@dataclass(frozen=True)
class DuoAttention(EvictionPolicy):
    """Retrieval vs streaming heads from a calibrated head pattern (see the module docstring).

    Attributes:
        ratio: fraction of all (layer, KV head) pairs made streaming heads, in [0, 1) (kvpress's
            ``head_compression_ratio``, which its evaluation sets from the compression ratio; the fraction of KV
            entries evicted is ``ratio * (1 - (sink_size + recent_size) / n)``). ``budget`` is not supported.
        pattern: path of the calibration file (required).
        sink_size, recent_size: what streaming heads keep; None takes the file's values (128 and 256 by default).
    """

    name = "duo_attention"
    display = "DuoAttention"
    is_scorer = False
    pattern: str | None = None
    sink_size: int | None = None
    recent_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is not None:
            raise LMCompressError(f"{self.display} takes ratio (the fraction of streaming heads), not "
                                  f"budget={self.budget}")
        hcr = self.ratio
        for key in ("sink_size", "recent_size"):
            if getattr(self, key) is not None:
                check_positive_int(key, getattr(self, key), allow_zero=True)
        doc = load_calibration(self.pattern, KIND, self.display)
        scores = torch.tensor(doc["scores"], dtype=torch.float64)
        n_stream = round(scores.numel() * float(hcr))
        streaming = torch.zeros(scores.numel(), dtype=torch.bool)
        if n_stream:
            streaming[scores.flatten().argsort(stable=True)[:n_stream]] = True
        object.__setattr__(self, "_doc", doc)
        object.__setattr__(self, "_streaming", streaming.view(scores.shape))

    @property
    def is_noop(self) -> bool:
        return self.ratio == 0

    @property
    def streaming_heads(self) -> torch.Tensor:
        """``[layers, Hkv]`` bool: the streaming heads."""
        return self._streaming

    @property
    def sizes(self) -> tuple[int, int]:
        """``(sink_size, recent_size)`` in effect."""
        doc: dict[str, Any] = self._doc
        sink = self.sink_size if self.sink_size is not None else int(doc.get("sink_size", 128))
        recent = self.recent_size if self.recent_size is not None else int(doc.get("recent_size", 256))
        return sink, recent

    def keep_mask(self, inputs: ScoreInputs) -> torch.Tensor:
        check_layer_identity(self._doc, str(self.pattern), self.display, inputs.layer_idx, inputs.num_layers,
                             inputs.module)
        stream = self._streaming[inputs.layer_idx].to(inputs.keys.device)  # [Hkv]
        if stream.numel() != inputs.keys.shape[1]:
            raise LMCompressError(f"{self.display} pattern {self.pattern!r} has {stream.numel()} KV heads in layer "
                                  f"{inputs.layer_idx}; this model has {inputs.keys.shape[1]}")
        sink, recent = self.sizes
        pos = inputs.positions
        newest = pos.amax(dim=-1, keepdim=True)
        window = (pos >= 0) & (pos < sink) | (pos > newest - recent)
        keep = window | ~stream[None, :, None]
        if self.protect_sinks or self.protect_recent:
            keep |= self.protect(torch.zeros(pos.shape), pos) == math.inf
        return keep if inputs.valid is None else keep & inputs.valid

    def after_forward(self, layer: CompressedLayer, query: torch.Tensor, scaling: float,
                      module: torch.nn.Module | None) -> None:
        if query.shape[2] > 1:
            layer.keep(self.keep_mask(layer.score_inputs(query, scaling, module)))
