"""Random eviction: the baseline every scorer must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import check_positive_int
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, ScoreInputs


@EVICTION_METHODS.register("random")
@dataclass(frozen=True)
class Random(EvictionPolicy):
    """score(j) ~ U(0, 1), independent per head and token.

    Attributes:
        seed: with a seed, layer ``l`` draws from a generator seeded ``seed + 7919 * l`` (reproducible); without,
            from torch's global generator.
    """

    name = "random"
    display = "Random"
    seed: int | None = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seed is not None:
            check_positive_int("seed", self.seed, allow_zero=True)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        shape = inputs.keys.shape[:3]
        gen = None
        if self.seed is not None:
            gen = torch.Generator().manual_seed(self.seed + 7919 * inputs.layer_idx)
        return torch.rand(shape, generator=gen).to(inputs.keys.device)
