"""KeyDiff (Park et al., 2025): keep the keys least similar to the average key direction (query-agnostic)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, ScoreInputs


@EVICTION_METHODS.register("keydiff")
@dataclass(frozen=True)
class KeyDiff(EvictionPolicy):
    """score(j) = -cos(k_j, anchor), anchor = mean over the head's tokens of the unit-normalised keys.

    This is kvpress's one-shot KeyDiff; the paper evicts block by block while the prompt streams in.
    """

    name = "keydiff"
    display = "KeyDiff"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        keys = inputs.keys.float()
        unit = F.normalize(keys, p=2, dim=-1)
        if inputs.valid is None:
            anchor = unit.mean(dim=2, keepdim=True)
        else:
            w = inputs.valid.unsqueeze(-1).float()
            anchor = (unit * w).sum(dim=2, keepdim=True) / w.sum(dim=2, keepdim=True).clamp_min(1)
        return -F.cosine_similarity(keys, anchor, dim=-1)
