"""ChunkKV (Liu et al., 2025, arXiv:2502.00299): keep or drop whole chunks of consecutive tokens, ranked by the
mean score of their tokens, so that kept context stays in semantically whole pieces."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import check_positive_int
from ...registry import EVICTION_METHODS
from .base import (
    DelegatesToBase,
    EvictionPolicy,
    ScoreInputs,
    check_wraps_scorer,
    evicted_count,
)
from .per_layer import layer_ratio


def chunk_means(scores: torch.Tensor, chunk_length: int) -> torch.Tensor:
    """``[B, n]`` -> ``[B, ceil(n / c)]`` mean score of each chunk of ``c`` consecutive tokens (the last one
    may be shorter; its mean is over its own tokens)."""
    b, n = scores.shape
    full = n // chunk_length
    parts = [scores[:, : full * chunk_length].reshape(b, full, chunk_length).mean(dim=-1)]
    if n % chunk_length:
        parts.append(scores[:, full * chunk_length :].mean(dim=-1, keepdim=True))
    return torch.cat(parts, dim=-1)


@EVICTION_METHODS.register("chunkkv")
@dataclass(frozen=True)
class ChunkKV(DelegatesToBase, EvictionPolicy):
    """Chunk-level selection around any score-based policy.

    Rule (kvpress's ChunkKVPress): the base's scores ``[B, Hkv, n]`` are summed over the KV heads; the sequence
    is cut into chunks of ``chunk_length`` tokens (the last one holds the remainder); each chunk's score is the
    mean of its tokens' summed scores; the ``C - floor(r * C)`` best of the ``C`` chunks are kept whole, in
    every head alike (``r`` = the base's ratio, per layer for PerLayerCompression). With a budget ``b``
    instead, ``ceil(b / chunk_length)`` chunks are kept. When ``n < chunk_length`` the base's own per-token
    selection applies, and so it does on a ragged layer (heads holding different tokens).

    Deviations: kvpress keeps ``max(1, int(C * (1 - r)))`` chunks (one fewer when ``r * C`` is not whole or
    ``1 - r`` rounds down, e.g. C = 10, r = 0.9 gives 0 -> 1 there and 1 here, C = 30, r = 0.9: 2 there, 3
    here); it selects chunks on batch row 0 for every row where each row selects its own; the base's protected
    sink/recent tokens (score +inf) make their chunks kept here. The kept count is the kept chunks' length, so it
    is not the base's per-token count.

    Attributes:
        base: a score-based policy (its ratio or budget sets the chunk count).
        chunk_length: tokens per chunk (default 20).
    """

    name = "chunkkv"
    display = "ChunkKV"
    is_scorer = False
    base: EvictionPolicy | None = None
    chunk_length: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wraps_scorer(self)
        check_positive_int("chunk_length", self.chunk_length)

    def chunks_kept(self, num_chunks: int, layer_idx: int = 0, num_layers: int = 1) -> int:
        """Chunks kept out of ``num_chunks`` in layer ``layer_idx``."""
        if self.base.budget is not None:
            return min(num_chunks, math.ceil(self.base.budget / self.chunk_length))
        return num_chunks - evicted_count(num_chunks, layer_ratio(self.base, layer_idx, num_layers))

    def keep_mask(self, inputs: ScoreInputs) -> torch.Tensor:
        n = inputs.num_tokens
        if n < self.chunk_length or inputs.valid is not None:
            # short input, or ragged heads (chunks are shared by the heads): the base's per-token selection
            return self.base.keep_mask(inputs)
        scores = self.base.final_scores(inputs).sum(dim=1)  # [B, n]
        chunk_scores = chunk_means(scores, self.chunk_length)  # [B, C]
        c = chunk_scores.shape[-1]
        kept = self.chunks_kept(c, inputs.layer_idx, inputs.num_layers)
        top = chunk_scores.topk(kept, dim=-1).indices  # [B, kept]
        chosen = torch.zeros_like(chunk_scores, dtype=torch.bool).scatter_(-1, top, True)
        token_chunk = torch.arange(n, device=scores.device) // self.chunk_length  # [n]
        mask = chosen[:, token_chunk]  # [B, n]
        return mask[:, None, :].expand(inputs.keys.shape[:3]).clone()
