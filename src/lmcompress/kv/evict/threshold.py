"""Threshold eviction, the inference mechanism of Dynamic Memory Sparsification (DMS, Łańcucki et al., 2025) as
kvpress's DMSPress implements it without trained evictors: a score-based policy scores every token when it
enters the cache; once the token leaves a sliding window of recent tokens it is evicted if its score is below a
threshold. Heads evict different tokens, so the layer stores them ragged; the compression ratio is whatever the
content gives."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...errors import LMCompressError, check_positive_int
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, check_wraps_scorer

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer

#: name of the per-token arrival scores kept by the layer.
THRESHOLD_AUX = "threshold"


@EVICTION_METHODS.register("threshold")
@dataclass(frozen=True)
class ThresholdEviction(EvictionPolicy):
    """Evict tokens scoring below ``threshold`` once they are older than the newest ``window`` tokens.

    Scores come from ``base.score`` on the newest tokens only, at the forward that brings them (the prompt, and
    each decoding step when ``decoding``); tokens that arrive while compression is paused, or while decoding
    with ``decoding=False``, are never evicted. ``protect_sinks`` keeps the first tokens regardless of score.

    Attributes:
        base: a score-based policy (e.g. ``Knorm()``; its scale sets what a sensible threshold is).
        threshold: tokens with a score strictly below it are evicted (required).
        window: recent tokens protected from eviction (default 128).
        decoding: also score and evict during decoding (default True).
    """

    name = "threshold"
    display = "ThresholdEviction"
    is_scorer = False
    headwise = True
    base: EvictionPolicy | None = None
    threshold: float | None = None
    window: int = 128
    decoding: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wraps_scorer(self)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or \
                self.threshold != self.threshold:
            raise LMCompressError(f"threshold={self.threshold!r} is required and must be a number")
        check_positive_int("window", self.window, allow_zero=True)

    @property
    def is_noop(self) -> bool:
        return False

    def observe(self, layer: CompressedLayer, query: torch.Tensor, scaling: float) -> None:
        self.base.observe(layer, query, scaling)

    def after_forward(self, layer: CompressedLayer, query: torch.Tensor, scaling: float,
                      module: torch.nn.Module | None) -> None:
        q = query.shape[2]
        if q == 1 and not self.decoding:
            return
        inputs = layer.score_inputs(query, scaling, module)
        new_scores = self.base.score(inputs.tail(q)).float()  # [B, Hkv, q]
        scores = inputs.aux.get(THRESHOLD_AUX)
        if scores is None:
            scores = torch.full(inputs.keys.shape[:3], math.inf, device=new_scores.device)
        else:
            scores = scores.clone()
        scores[:, :, -q:] = new_scores
        layer.set_aux(THRESHOLD_AUX, scores, fill=math.inf)
        pos = inputs.positions
        old = (pos >= 0) & (pos < layer.seen - self.window)
        evict = old & (scores < self.threshold)
        if self.protect_sinks:
            evict &= pos >= self.protect_sinks
        if bool(evict.any()):
            keep = ~evict if inputs.valid is None else inputs.valid & ~evict
            layer.keep(keep, in_place=q == 1)
