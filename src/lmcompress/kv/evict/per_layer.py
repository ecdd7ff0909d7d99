"""Per-layer compression ratios around any score-based policy (kvpress's PerLayerCompressionPress): layer ``l``
evicts the fraction ``ratios[l]`` of its tokens, scored by the base policy."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...errors import LMCompressError, check_range
from ...registry import EVICTION_METHODS
from .base import (
    EvictionPolicy,
    ScoreInputs,
    check_wraps_scorer,
    evicted_count,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer


def parse_ratios(value: object) -> tuple[float, ...]:
    """``ratios`` as a tuple of floats: a sequence of numbers, or a string like ``"0.2/0.5/0.8"`` (the CLI's
    spelling, since commas separate method arguments)."""
    items: list
    if isinstance(value, str):
        items = [v for v in value.replace(";", "/").split("/") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise LMCompressError(f"ratios={value!r} must be a list of numbers in [0, 1), e.g. '0.2/0.5/0.8'")
    out = []
    for v in items:
        try:
            r = float(v) if not isinstance(v, bool) else None
        except ValueError:
            r = None
        if r is None:
            raise LMCompressError(f"ratios entry {v!r} is not a number; allowed: numbers in [0, 1)")
        check_range("ratios entry", r, 0.0, 1.0)
        out.append(r)
    if not out:
        raise LMCompressError("ratios is empty; give one ratio per decoder layer, e.g. '0.2/0.5/0.8'")
    return tuple(out)


@EVICTION_METHODS.register("per_layer")
@dataclass(frozen=True)
class PerLayerCompression(EvictionPolicy):
    """The base's scores with layer ``l`` keeping ``n - floor(ratios[l] * n)`` tokens per head.

    A score-based policy itself (the base's scores, protection included), so AdaKV, ChunkKV, BlockPress and
    decoding wrappers can wrap it. ``ratios`` must have one entry per decoder layer of the model (checked when a
    layer is compressed). kvpress's version works only with flash attention and keeps ``int(n * (1 - r))``.

    Attributes:
        base: a score-based policy; its own ratio is replaced by ``ratios`` (set to 0), a budget is refused.
        ratios: one eviction ratio per decoder layer, each in [0, 1) (a tuple, or ``"0.2/0.5/..."``).
    """

    name = "per_layer"
    display = "PerLayerCompression"
    base: EvictionPolicy | None = None
    ratios: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wraps_scorer(self)
        if self.base.budget is not None:
            raise LMCompressError(
                f"per_layer takes its sizes from ratios; the base cannot have a budget (got {self.base.budget})"
            )
        object.__setattr__(self, "ratios", parse_ratios(self.ratios))
        if self.base.ratio:  # e.g. a sweep's ratio given to the base by the CLI: the per-layer ratios replace it
            object.__setattr__(self, "base", dataclasses.replace(self.base, ratio=0.0))

    @property
    def is_noop(self) -> bool:
        return not any(self.ratios)

    @property
    def query_window(self) -> int | None:
        return self.base.query_window

    def layer_ratio(self, layer_idx: int, num_layers: int) -> float:
        if len(self.ratios) != num_layers:
            raise LMCompressError(
                f"per_layer has {len(self.ratios)} ratios but the model has {num_layers} decoder layers; "
                f"give exactly {num_layers}"
            )
        return self.ratios[layer_idx]

    def n_keep(self, n: int, layer_idx: int = 0, num_layers: int = 1) -> int:
        return n - evicted_count(n, self.layer_ratio(layer_idx, num_layers))

    def with_budget(self, budget: int) -> EvictionPolicy:
        return self.base.with_budget(budget)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return self.base.score(inputs)

    def final_scores(self, inputs: ScoreInputs) -> torch.Tensor:
        return self.base.final_scores(inputs)

    def observe(self, layer: CompressedLayer, query: torch.Tensor, scaling: float) -> None:
        self.base.observe(layer, query, scaling)

    def new_layer_state(self):
        return self.base.new_layer_state()

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["ratios"] = list(self.ratios)
        return out


def layer_ratio(policy: EvictionPolicy, layer_idx: int, num_layers: int) -> float:
    """The eviction ratio ``policy`` applies in layer ``layer_idx`` (its per-layer ratio, else its ratio)."""
    if isinstance(policy, PerLayerCompression):
        return policy.layer_ratio(layer_idx, num_layers)
    return float(policy.ratio)
