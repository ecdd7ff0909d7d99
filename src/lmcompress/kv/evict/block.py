"""BlockPress (the block-wise prompt processing of KeyDiff, Park et al., 2025, arXiv:2504.15364, as kvpress's
BlockPress simulates it): compress the prompt block by block, each block scored together with what the previous
blocks kept, so a context-dependent scorer (KeyDiff's mean key, SnapKV's window, leverage scores) sees only the
kept cache and the new block, as it would under a fixed memory budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import check_positive_int
from ...registry import EVICTION_METHODS
from .base import (
    DelegatesToBase,
    EvictionPolicy,
    ScoreInputs,
    check_wraps_scorer,
)
from .subset import check_part_length, part_scores


@EVICTION_METHODS.register("block")
@dataclass(frozen=True)
class BlockPress(DelegatesToBase, EvictionPolicy):
    """Iterative block-wise selection around any score-based policy.

    Rule (kvpress's BlockPress): with ``k`` = the base's per-head count for ``n`` tokens, the first ``k`` tokens
    are kept; then for each block of ``block_size`` tokens starting at ``k``, the base scores the kept tokens
    plus the block (as if they were the whole cache) and the best ``k`` become the kept set. The base's
    protected tokens (sinks, recent ones, by position) stay kept. Query-based scorers score each part with the
    queries of its own tokens, which must all be in the forward chunk (a one-chunk prefill).

    Like kvpress this is computed after one full prefill (the attention of the prompt saw every token), not a
    true chunked prefill. Deviation: a query-based scorer reading the last ``w`` queries (SnapKV) needs each
    part's newest ``w`` tokens to be real block tokens, so a last block of at most ``w`` tokens is merged
    into the previous one here; kvpress builds those queries from hidden states gathered across heads.

    Attributes:
        base: a score-based policy (its ratio or budget gives ``k``).
        block_size: tokens per block (default 128).
    """

    name = "block"
    display = "BlockPress"
    is_scorer = False
    base: EvictionPolicy | None = None
    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wraps_scorer(self)
        check_positive_int("block_size", self.block_size)
        check_part_length(self.name, self.base, self.block_size, "block_size")

    @property
    def query_window(self) -> int | None:
        return None if self.base.query_window != 0 else 0

    def blocks(self, start: int, n: int) -> list[tuple[int, int]]:
        """``(begin, end)`` of the blocks covering tokens ``start .. n - 1``."""
        out = [(i, min(i + self.block_size, n)) for i in range(start, n, self.block_size)]
        need = self.base.query_window or 0
        if len(out) > 1 and out[-1][1] - out[-1][0] <= need:
            out[-2:] = [(out[-2][0], n)]
        return out

    def keep_mask(self, inputs: ScoreInputs) -> torch.Tensor:
        if inputs.valid is not None:  # ragged heads: no common block layout
            return self.base.keep_mask(inputs)
        b, h, n = inputs.keys.shape[:3]
        k = self.base.n_keep(n, inputs.layer_idx, inputs.num_layers)
        if k >= n:
            return torch.ones((b, h, n), dtype=torch.bool, device=inputs.keys.device)
        dev = inputs.keys.device
        kept = torch.arange(k, device=dev).expand(b, h, k)
        zeros = torch.zeros((b, h, n), device=dev)
        protected = torch.isinf(self.base.protect(zeros, inputs.positions))  # judged on the whole prompt
        for begin, end in self.blocks(k, n):
            block = torch.arange(begin, end, device=dev).expand(b, h, end - begin)
            current = torch.cat([kept, block], dim=-1)  # [B, Hkv, k + block], ascending
            scores = part_scores(self.base, inputs, current)
            scores = scores.masked_fill(protected.gather(2, current), float("inf"))
            top = scores.topk(k, dim=-1).indices
            kept = current.gather(-1, top).sort(dim=-1).values
        mask = torch.zeros((b, h, n), dtype=torch.bool, device=dev)
        return mask.scatter_(-1, kept, True)
