"""ChunkPress (the chunk-wise compression of FINCH, Corallo & Papotti, 2024, as kvpress's ChunkPress does it):
split the prompt into fixed-length chunks and compress each one on its own by the same ratio, so that every part
of the context keeps the same share of its tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import LMCompressError, check_positive_int
from ...registry import EVICTION_METHODS
from .base import (
    DelegatesToBase,
    EvictionPolicy,
    ScoreInputs,
    check_wraps_scorer,
    evicted_count,
    topk_mask,
)
from .per_layer import layer_ratio
from .subset import check_part_length, part_scores


@EVICTION_METHODS.register("chunk")
@dataclass(frozen=True)
class ChunkPress(DelegatesToBase, EvictionPolicy):
    """Independent per-chunk selection around any score-based policy.

    Rule (kvpress's ChunkPress): tokens ``[i, i + chunk_length)`` form a chunk; the base scores each chunk on its
    own (its keys, values and, for query-based scorers, its own queries, as if it were the whole cache) and keeps
    ``c - floor(r * c)`` of its ``c`` tokens (``r`` = the base's ratio; a budget is not allowed). Protected
    sink/recent tokens of the base are judged on the whole prompt.

    Deviations: kvpress keeps ``max(1, int(c * (1 - r)))`` per chunk (one fewer when ``r * c`` is not whole);
    a query-based scorer reading the last ``w`` queries needs more than ``w`` tokens per chunk, so a last chunk of
    at most ``w`` tokens is merged into the previous one here.

    Attributes:
        base: a score-based policy with a ratio.
        chunk_length: tokens per chunk (default 1024).
    """

    name = "chunk"
    display = "ChunkPress"
    is_scorer = False
    base: EvictionPolicy | None = None
    chunk_length: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wraps_scorer(self)
        check_positive_int("chunk_length", self.chunk_length)
        check_part_length(self.name, self.base, self.chunk_length, "chunk_length")
        if self.base.budget is not None:
            raise LMCompressError(
                f"chunk compresses each chunk by a ratio; give the base a ratio, not budget={self.base.budget}"
            )

    @property
    def query_window(self) -> int | None:
        return None if self.base.query_window != 0 else 0

    def with_budget(self, budget: int) -> ChunkPress:
        raise LMCompressError("chunk compresses by a ratio; it cannot be used with a token budget")

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """``(begin, end)`` of the chunks of ``n`` tokens."""
        out = [(i, min(i + self.chunk_length, n)) for i in range(0, n, self.chunk_length)]
        need = self.base.query_window or 0
        if len(out) > 1 and out[-1][1] - out[-1][0] <= need:
            out[-2:] = [(out[-2][0], n)]
        return out

    def n_keep(self, n: int, layer_idx: int = 0, num_layers: int = 1) -> int:
        r = layer_ratio(self.base, layer_idx, num_layers)
        return sum(e - s - evicted_count(e - s, r) for s, e in self.chunks(n))

    def keep_mask(self, inputs: ScoreInputs) -> torch.Tensor:
        if inputs.valid is not None:  # ragged heads: no common chunk layout
            return self.base.keep_mask(inputs)
        b, h, n = inputs.keys.shape[:3]
        dev = inputs.keys.device
        r = layer_ratio(self.base, inputs.layer_idx, inputs.num_layers)
        parts = []
        for begin, end in self.chunks(n):
            index = torch.arange(begin, end, device=dev).expand(b, h, end - begin)
            parts.append(part_scores(self.base, inputs, index))
        scores = self.base.protect(torch.cat(parts, dim=-1), inputs.positions)
        mask = torch.zeros((b, h, n), dtype=torch.bool, device=dev)
        for begin, end in self.chunks(n):
            c = end - begin
            mask[:, :, begin:end] = topk_mask(scores[:, :, begin:end], c - evicted_count(c, r))
        return mask
