"""EntropyGatedChunkKV (kvpress 0.5.5's extension of ChunkKV, Liu et al., 2025): chunk selection in which an
important chunk whose score is concentrated on a few tokens (low within-chunk entropy) keeps only its best
tokens, and the budget saved goes to further chunks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import LMCompressError, check_positive_int
from ...registry import EVICTION_METHODS
from .base import ScoreInputs
from .chunkkv import ChunkKV

EPSILON = 1e-8


def normalised_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy of one chunk's scores ``[c]`` (rebased to >= 0, normalised to a distribution) divided by
    ``log c``, in [0, 1]; 0 for a single token."""
    c = scores.shape[-1]
    if c == 1:
        return torch.zeros((), device=scores.device)
    s = scores - scores.min().clamp(max=0.0)
    p = s / (s.sum() + EPSILON)
    return (-(p * (p + EPSILON).log()).sum() / math.log(c)).clamp(0.0, 1.0)


@EVICTION_METHODS.register("entropy_chunkkv")
@dataclass(frozen=True)
class EntropyGatedChunkKV(ChunkKV):
    """Rule (kvpress's EntropyGatedChunkKVPress), per batch row, on the base's scores summed over heads: chunks of
    ``chunk_length`` (the last one shorter) get a score (mean) and a normalised entropy; going through the
    chunks by decreasing score, each takes ``min(its length, budget left)`` tokens, except a chunk with score
    >= the median and entropy < the median, which takes at most ``low_entropy_chunk_length`` (its best tokens);
    leftover budget then goes to the best remaining tokens. The budget is the base's per-head count
    ``n - floor(r n)`` (kvpress: ``max(1, int(n (1 - r)))``); every head keeps the same tokens.

    Deviation: kvpress selects on batch row 0 for every row; here each row selects its own.

    Attributes:
        chunk_length: tokens per chunk (default 10).
        low_entropy_chunk_length: tokens kept of a spiky important chunk (default 4, < chunk_length).
    """

    name = "entropy_chunkkv"
    display = "EntropyGatedChunkKV"
    chunk_length: int = 10
    low_entropy_chunk_length: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("low_entropy_chunk_length", self.low_entropy_chunk_length)
        if not self.chunk_length > self.low_entropy_chunk_length:
            raise LMCompressError(
                f"low_entropy_chunk_length={self.low_entropy_chunk_length} must be < chunk_length={self.chunk_length}"
            )

    def row_mask(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """``[n]`` bool kept tokens of one row from its head-summed scores ``[n]``."""
        n, c = scores.shape[0], self.chunk_length
        bounds = [(i, min(i + c, n)) for i in range(0, n, c)]
        chunk_scores = torch.stack([scores[s:e].mean() for s, e in bounds])
        entropy = torch.stack([normalised_entropy(scores[s:e]) for s, e in bounds])
        high = (chunk_scores >= chunk_scores.median()).tolist()
        spiky = (entropy < entropy.median()).tolist()
        keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
        for idx in torch.argsort(chunk_scores, descending=True).tolist():
            if budget <= 0:
                break
            s, e = bounds[idx]
            take = min(e - s, budget)
            if high[idx] and spiky[idx]:
                take = min(take, self.low_entropy_chunk_length)
            if take == e - s:
                keep[s:e] = True
            else:
                keep[s + scores[s:e].topk(take).indices] = True
            budget -= take
        if budget > 0:
            left = (~keep).nonzero().squeeze(-1)
            if left.numel():
                keep[left[scores[left].topk(min(budget, left.numel())).indices]] = True
        return keep

    def keep_mask(self, inputs: ScoreInputs) -> torch.Tensor:
        n = inputs.num_tokens
        if inputs.valid is not None:
            return self.base.keep_mask(inputs)
        budget = self.base.n_keep(n, inputs.layer_idx, inputs.num_layers)
        if budget >= n:
            return torch.ones(inputs.keys.shape[:3], dtype=torch.bool, device=inputs.keys.device)
        scores = self.base.final_scores(inputs).sum(dim=1)  # [B, n]
        scores = scores.masked_fill(torch.isinf(scores), torch.finfo(scores.dtype).max / 4)
        rows = torch.stack([self.row_mask(row, budget) for row in scores])  # [B, n]
        return rows[:, None, :].expand(inputs.keys.shape[:3]).clone()
