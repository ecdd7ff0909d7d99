"""Compression during decoding (kvpress's DecodingPress): every ``interval`` generated tokens, compress each layer
back down to ``target_size`` tokens per head with a score-based policy. For long generations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...errors import LMCompressError, check_positive_int
from ...registry import EVICTION_METHODS
from .adakv import AdaKV
from .base import EvictionPolicy, check_wrapper_sizes, require_scorer

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer

#: query buffer when the base policy reads every query it is given (kvpress's hidden-state buffer size).
DEFAULT_QUERY_BUFFER = 256


class DecodingState:
    """Per-layer state: decoding steps since the last compression and the newest queries ``[B, Hq, m, D]``."""

    def __init__(self) -> None:
        self.steps = 0
        self.queries: torch.Tensor | None = None

    def push(self, query: torch.Tensor, limit: int) -> None:
        q = query if self.queries is None else torch.cat([self.queries, query], dim=2)
        self.queries = q[:, :, -max(limit, 1):].contiguous()

    def clear(self) -> None:
        self.queries = None

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.queries is None else [self.queries]


@EVICTION_METHODS.register("decoding")
@dataclass(frozen=True)
class DecodingCompression(EvictionPolicy):
    """Every ``interval`` decoding steps, keep the ``target_size`` best tokens per head (by ``base``'s scores).

    The prompt is compressed by ``base``'s own ratio or budget (not at all when it has neither). Between
    compressions the layer buffers the newest post-RoPE queries (``query_buffer`` of them, counted in
    ``nbytes``) so that query-based scorers (SnapKV's window, TOVA's last query, ExpectedAttention's statistics)
    see the generated tokens' queries; the buffer is cleared after each compression, so ``interval`` must cover
    the base's query window.

    Attributes:
        base: a score-based policy, or AdaKV around one (head-adaptive decoding compression).
        interval: decoding steps between compressions (default 512).
        target_size: tokens per head kept by each compression (default 2048).
        query_buffer: queries kept for scoring; default: the base's query window (256 when it reads them all).
    """

    name = "decoding"
    display = "DecodingCompression"
    is_scorer = False
    base: EvictionPolicy | None = None
    interval: int = 512
    target_size: int = 2048
    query_buffer: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.base, AdaKV):
            require_scorer(self.name, self.base)
        check_wrapper_sizes(self)
        check_positive_int("interval", self.interval)
        check_positive_int("target_size", self.target_size)
        if self.query_buffer is not None:
            check_positive_int("query_buffer", self.query_buffer, allow_zero=True)
        need = self.base.query_window
        if need and need > min(self.interval, self.buffer_length):
            raise LMCompressError(
                f"{self.base.name} reads the last {need} queries but decoding compression buffers "
                f"min(interval={self.interval}, query_buffer={self.buffer_length}); raise them to >= {need}"
            )

    @property
    def buffer_length(self) -> int:
        if self.query_buffer is not None:
            return self.query_buffer
        need = self.base.query_window
        return DEFAULT_QUERY_BUFFER if need is None else need

    @property
    def is_noop(self) -> bool:
        return False

    @property
    def query_window(self) -> int | None:
        return self.base.query_window

    def new_layer_state(self) -> DecodingState:
        return DecodingState()

    def observe(self, layer: CompressedLayer, query: torch.Tensor, scaling: float) -> None:
        self.base.observe(layer, query, scaling)

    def after_forward(self, layer: CompressedLayer, query: torch.Tensor, scaling: float,
                      module: torch.nn.Module | None) -> None:
        state: DecodingState = layer.evict_state
        if query.shape[2] > 1:
            if not self.base.is_noop:
                self.base.after_forward(layer, query, scaling, module)
            return
        state.push(query, self.buffer_length)
        state.steps += 1
        if state.steps < self.interval:
            return
        state.steps = 0
        target = self.target_for(layer)
        if layer.held > target:
            inputs = layer.score_inputs(state.queries, scaling, module)
            # a few tokens over the target: keep the capacity for the next ones; far over (a long prompt): free
            in_place = layer.held - target <= self.interval
            layer.keep(self.base.with_budget(target).keep_mask(inputs), in_place=in_place)
        state.clear()

    def target_for(self, layer: CompressedLayer) -> int:
        """Tokens per head a compression of ``layer`` keeps (``target_size``)."""
        return self.target_size
