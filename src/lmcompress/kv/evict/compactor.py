"""Compactor (Chari & Van Durme, 2025, arXiv:2507.08143, as kvpress's CompactorPress computes it): a blend of the
approximate leverage of the pre-RoPE keys (query-agnostic geometry) and non-causal chunked attention, with sink
and recent tokens protected. Approximate (random sketch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import LMCompressError, check_positive_int
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, ScoreInputs
from .leverage import LeverageScore
from .non_causal import NonCausalAttn
from .subset import gather_tokens


@EVICTION_METHODS.register("compactor")
@dataclass(frozen=True)
class Compactor(EvictionPolicy):
    """score = blending * LeverageScore + NonCausalAttn, both computed on the tokens between the first
    ``sink_size_start`` and the last ``sink_size_end`` (those get +inf; kvpress gives them the maximum score,
    the same kept set whenever they fit in the budget).

    ``blending`` defaults to the ratio (kvpress's heuristic; 0.35 with a budget, kvpress's fallback). Needs a
    one-chunk prefill (the queries of every token) and a rotary model. The sketch is seeded (``seed``) where
    kvpress draws from the global generator, so kept sets agree with kvpress only in distribution.

    Attributes:
        sink_size_start: first tokens always kept (default 8).
        sink_size_end: newest tokens always kept (default 4).
        chunk_size: chunk of the non-causal attention (default 256).
        sketch_dimension: leverage sketch size (default 48).
        blending: weight of the leverage scores (default: the ratio).
        seed: sketch seed (default 0).
    """

    name = "compactor"
    display = "Compactor"
    sink_size_start: int = 8
    sink_size_end: int = 4
    chunk_size: int = 256
    sketch_dimension: int = 48
    blending: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("sink_size_start", self.sink_size_start, allow_zero=True)
        check_positive_int("sink_size_end", self.sink_size_end, allow_zero=True)
        check_positive_int("chunk_size", self.chunk_size)
        check_positive_int("sketch_dimension", self.sketch_dimension)
        if self.blending is not None and (isinstance(self.blending, bool) or not isinstance(self.blending, (int, float))
                                          or not math.isfinite(self.blending)):
            raise LMCompressError(f"blending={self.blending!r} must be a finite number or none")

    @property
    def query_window(self) -> None:
        return None

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        n = inputs.num_tokens
        if inputs.queries.shape[2] != n:
            raise LMCompressError(f"{self.display} needs the queries of every cached token (a one-chunk prefill); "
                                  f"got {inputs.queries.shape[2]} queries for {n} tokens")
        left = min(self.sink_size_start, n)
        right = min(self.sink_size_end, n - left)
        b, h = inputs.keys.shape[:2]
        out = torch.full((b, h, n), math.inf, device=inputs.keys.device)
        if n - left - right <= 1:
            return out
        index = torch.arange(left, n - right, device=inputs.keys.device).expand(b, h, n - left - right)
        middle = gather_tokens(inputs, index, inputs.queries[:, :, left : n - right])
        lev = LeverageScore(sketch_dimension=self.sketch_dimension, seed=self.seed).score(middle)
        attn = NonCausalAttn(chunk_size=self.chunk_size).score(middle)
        blend = self.blending if self.blending is not None else (float(self.ratio) if self.budget is None else 0.35)
        out[:, :, left : n - right] = blend * lev + attn
        return out
