"""Knorm (Devoto et al., 2024): keys with a small L2 norm draw the most attention; keep the smallest norms."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, ScoreInputs


@EVICTION_METHODS.register("knorm")
@dataclass(frozen=True)
class Knorm(EvictionPolicy):
    """score(j) = -||k_j||_2, computed in float32 (query-agnostic)."""

    name = "knorm"
    display = "Knorm"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return -torch.linalg.vector_norm(inputs.keys.float(), dim=-1)
