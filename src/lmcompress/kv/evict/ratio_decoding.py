"""Decoding-time compression by ratio (kvpress's CompressionRatioDecodingPress): like decoding compression, but
each compression keeps a fixed fraction of all tokens seen so far instead of a fixed count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import LMCompressError, check_range
from ...registry import EVICTION_METHODS
from .base import evicted_count
from .decoding import DecodingCompression

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer


@EVICTION_METHODS.register("ratio_decoding")
@dataclass(frozen=True)
class CompressionRatioDecoding(DecodingCompression):
    """Every ``interval`` decoding steps, keep ``s - floor(target_ratio * s)`` tokens per head, ``s`` being the
    tokens the layer has seen (prompt and generated), scored by ``base``.

    kvpress keeps ``max(1, int(s * (1 - r)))`` (one fewer when ``r * s`` is not whole) and reads ``s`` from the
    position ids; it also compresses whenever a forward brings at least the target count. ``target_size`` is not
    used (leave it at its default). The prompt is compressed by the base's own ratio or budget, if any.

    Attributes:
        target_ratio: fraction of the seen tokens to evict at each compression, in [0, 1) (default 0.5).
    """

    name = "ratio_decoding"
    display = "CompressionRatioDecoding"
    target_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_ratio, bool) or not isinstance(self.target_ratio, (int, float)):
            raise LMCompressError(f"target_ratio={self.target_ratio!r} is not a number; allowed: [0, 1)")
        check_range("target_ratio", float(self.target_ratio), 0.0, 1.0)

    def target_for(self, layer: CompressedLayer) -> int:
        return layer.seen - evicted_count(layer.seen, float(self.target_ratio))
