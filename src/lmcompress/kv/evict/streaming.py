"""StreamingLLM (Xiao et al., 2023): keep the first ``n_sink`` tokens (attention sinks) and the most recent ones."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import check_positive_int
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, ScoreInputs


@EVICTION_METHODS.register("streaming_llm")
@dataclass(frozen=True)
class StreamingLLM(EvictionPolicy):
    """Sinks plus a recent window. Score = position (newer is better); sinks score +inf.

    Attributes:
        n_sink: number of initial tokens always kept (default 4, as in the paper and kvpress).
    """

    name = "streaming_llm"
    display = "StreamingLLM"
    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("n_sink", self.n_sink, allow_zero=True)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        pos = inputs.positions.float()
        return pos.masked_fill(inputs.positions < self.n_sink, math.inf)
