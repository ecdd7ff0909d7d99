"""AdaKV (Feng et al., 2024): one top-k over all KV heads of a layer, so each head keeps its own number of
tokens while the layer keeps the same total as the uniform policy. The heads then hold different lengths and
the layer stores them ragged: only the kept entries of each head are held."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import LMCompressError, check_range
from ...registry import EVICTION_METHODS
from .base import (
    DelegatesToBase,
    EvictionPolicy,
    ScoreInputs,
    check_wraps_scorer,
    topk_mask,
)


def check_alpha_safeguard(alpha: object) -> None:
    """Raise ``LMCompressError`` unless ``alpha`` (the share of each head's budget kept by its own top scores)
    is a number in [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise LMCompressError(f"alpha_safeguard={alpha!r} is not a number; allowed: [0, 1]")
    check_range("alpha_safeguard", float(alpha), 0.0, 1.0, high_open=False)


@EVICTION_METHODS.register("adakv")
@dataclass(frozen=True)
class AdaKV(DelegatesToBase, EvictionPolicy):
    """Head-adaptive budgets around any score-based policy.

    Per batch row: every head first keeps its ``floor(alpha_safeguard * k)`` best tokens (at least one when
    ``alpha_safeguard > 0``), ``k`` being the base policy's per-head count; then the ``Hkv * k`` best-scored
    entries of the whole layer are kept (protected tokens of the base count as best). This is kvpress's
    AdaKVPress, which masks the dropped keys; here they are freed. Equal scores go to the newest positions, so
    with a windowed base and a budget below its window every head keeps the same newest window tokens.

    Attributes:
        base: a score-based policy that gives the scores and the per-head count (its ratio or budget).
        alpha_safeguard: fraction of ``k`` every head keeps at least, in [0, 1] (default 0.2).
    """

    name = "adakv"
    display = "AdaKV"
    is_scorer = False
    headwise = True
    base: EvictionPolicy | None = None
    alpha_safeguard: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wraps_scorer(self)
        check_alpha_safeguard(self.alpha_safeguard)

    def keep_mask(self, inputs: ScoreInputs) -> torch.Tensor:
        counts = inputs.valid_counts()
        k = self.base.keep_counts(counts, inputs.layer_idx, inputs.num_layers)
        if bool((k >= counts).all()):
            return self.base.keep_mask(inputs)
        scores = self.base.final_scores(inputs)
        safe = torch.floor(k.double() * float(self.alpha_safeguard)).long()
        if self.alpha_safeguard > 0:
            safe = torch.where(k > 0, safe.clamp_min(1), safe)
        guarded = topk_mask(scores, safe) & torch.isfinite(scores)
        scores = scores.masked_fill(guarded, torch.finfo(scores.dtype).max)
        b, h, n = scores.shape
        # equal scores (the +inf of a windowed base's window) go to the newest positions across all heads
        flat = topk_mask(scores.reshape(b, h * n), k.sum(dim=1), order=inputs.positions.reshape(b, h * n))
        return flat.view(b, h, n)
