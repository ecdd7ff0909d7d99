"""Observed attention (kvpress's ObservedAttentionPress): H2O's accumulated attention divided by the number of
queries that could attend to each token, i.e. the mean attention a token received."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import EVICTION_METHODS
from .base import ScoreInputs
from .h2o import H2O, accumulated_attention


@EVICTION_METHODS.register("observed_attention")
@dataclass(frozen=True)
class ObservedAttention(H2O):
    """score(j) = accumulated attention to token j / (seen - position_j) (the queries at or after it).

    On a prompt compressed in one chunk this is kvpress's ``attentions.sum(queries) / arange(n, 0, -1)``,
    averaged over the query heads of each KV group.
    """

    name = "observed_attention"
    display = "ObservedAttention"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        acc = accumulated_attention(inputs, self.display)
        seen = inputs.seen if inputs.seen is not None else int(inputs.positions.max()) + 1
        count = (seen - inputs.positions).clamp_min(1).to(torch.float32)
        return acc / count
