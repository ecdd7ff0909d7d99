"""CriticalAdaKV (Feng et al., 2025): CriticalKV's two-stage value-norm weighting inside AdaKV's head-adaptive
budgets, with memory freed for real (heads stored ragged).

Rule, per batch row and layer with ``k`` tokens per head from the base policy (``Hkv * k`` in all):

1. safeguard: every head's ``floor(alpha_safeguard * k)`` best tokens by base score count as best;
2. head budgets ``b_h``: how many of the layer's ``Hkv * k`` best (safeguarded) entries fall in head ``h``;
3. stage 1: in each head the ``floor(first_stage_ratio * b_h)`` best by (safeguarded) base score are kept;
4. stage 2: each head fills its ``b_h`` slots with the best of ``(s_j + epsilon) * ||v_j W_o||_1`` (mean over
   the head's query heads, as :mod:`.critical_kv`).

Source: kvpress 0.5.5 ``criticalkv_press.py`` (``CriticalAdaKVPress``; read, not copied), which masks the dropped
keys. Deviations: kvpress marks chosen entries with the float maximum and multiplies them in stage 2, so a
safeguarded entry outside stage 1 stays chosen only while that product stays the largest (it overflows to inf
when the value norm exceeds 1); here safeguarded and stage-1 entries are always kept (they fit: ``b_h`` is at
least the safeguard count) and exactly ``b_h`` entries per head; kvpress's ``k`` is ``int(n (1 - r))``, ours
``n - floor(r n)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...registry import EVICTION_METHODS
from .adakv import check_alpha_safeguard
from .base import (
    DelegatesToBase,
    EvictionPolicy,
    ScoreInputs,
    check_wraps_scorer,
    topk_mask,
)
from .critical_kv import check_critical_params, projected_value_norms


@EVICTION_METHODS.register("criticaladakv")
@dataclass(frozen=True)
class CriticalAdaKV(DelegatesToBase, EvictionPolicy):
    """CriticalKV weighting with AdaKV head budgets around a score-based policy (see the module docstring).

    Attributes:
        base: the score-based policy (its ratio or budget sets ``k``).
        alpha_safeguard: fraction of ``k`` every head keeps at least, in [0, 1] (default 0.2).
        epsilon: added to the base score before the value-norm weighting (default 1e-4).
        first_stage_ratio: fraction of each head's budget chosen by the base score alone (default 0.5).
    """

    name = "criticaladakv"
    display = "CriticalAdaKV"
    is_scorer = False
    base: EvictionPolicy | None = None
    alpha_safeguard: float = 0.2
    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wraps_scorer(self)
        check_alpha_safeguard(self.alpha_safeguard)
        check_critical_params(self.display, self.epsilon, self.first_stage_ratio)

    def keep_mask(self, inputs: ScoreInputs) -> torch.Tensor:
        counts = inputs.valid_counts()
        k = self.base.keep_counts(counts, inputs.layer_idx, inputs.num_layers)
        if bool((k >= counts).all()):
            return self.base.keep_mask(inputs)
        scores = self.base.final_scores(inputs)
        big = torch.finfo(scores.dtype).max
        safe = torch.floor(k.double() * float(self.alpha_safeguard) + 1e-9).long()
        guarded = topk_mask(scores, safe) & torch.isfinite(scores)
        scores = scores.masked_fill(guarded, big)
        b, h, n = scores.shape
        chosen = topk_mask(scores.reshape(b, h * n), k.sum(dim=1)).view(b, h, n)
        budgets = chosen.sum(dim=-1)  # [B, Hkv]
        first = torch.floor(budgets.double() * float(self.first_stage_ratio) + 1e-9).long()
        stage1 = topk_mask(scores, first)
        weighted = (scores.clamp(max=big) + self.epsilon) * projected_value_norms(inputs)
        weighted = weighted.masked_fill(stage1 | guarded | (scores == math.inf), math.inf)
        weighted = weighted.masked_fill(scores == -math.inf, -math.inf)
        return topk_mask(weighted, budgets)
