"""Outliers kept in full precision as a sparse set (QAQ's dense-and-sparse storage).

Within every unit of a token block and head (``token_block * D`` elements: one token's vector for per-token
codecs, a block of tokens for ``channel`` granularity; or, ``across_heads``, one token's vectors of all heads),
the ``k = ceil(alpha * unit)`` elements of largest magnitude are outliers: they are left out of the inner codec's statistics (so they do not stretch its
range) and stored exactly as ``(index, value)`` pairs in the states' dtype; decoding overwrites them.

Parts: the inner codec's parts plus ``outlier_idx`` (uint8 when the unit has at most 256 elements, else int16)
and ``outlier_val`` ``[B, H, T/token_block, k]``. All are counted in the cache's bytes.

Deviation from QAQ: QAQ takes ``alpha/2`` lowest and ``alpha/2`` highest values of each group; here the top
``alpha`` by magnitude, per unit (so the count is fixed and the storage stays a dense ``[.., k]`` tensor);
QAQ's size formula also ignores the indices, which are counted here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import LMCompressError, check_range


def check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise LMCompressError(f"outliers={alpha!r} is not a number; allowed: [0, 0.5)")
    check_range("outliers", float(alpha), 0.0, 0.5)


def outlier_count(alpha: float, unit: int) -> int:
    """Outliers among ``unit`` elements: ``ceil(alpha * unit)``."""
    return math.ceil(alpha * unit - 1e-9)


def to_units(x: torch.Tensor, tb: int, across_heads: bool) -> torch.Tensor:
    """``[B, H, T, D]`` -> units ``[B, H, T/tb, tb*D]`` (or ``[B, 1, T, H*D]`` across heads; a copy then)."""
    b, h, t, d = x.shape
    if across_heads:
        return x.transpose(1, 2).reshape(b, 1, t, h * d)
    return x.reshape(b, h, t // tb, tb * d)


def from_units(units: torch.Tensor, shape: torch.Size, across_heads: bool) -> torch.Tensor:
    """Inverse of :func:`to_units`."""
    b, h, t, d = shape
    if across_heads:
        return units.reshape(b, t, h, d).transpose(1, 2)
    return units.reshape(b, h, t, d)


def top_magnitudes(x: torch.Tensor, alpha: float, tb: int = 1,
                   across_heads: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[B, H, T/tb, k]`` (``[B, 1, T, k]`` across heads) of the ``k`` largest magnitudes in each unit
    of ``x: [B, H, T, D]`` (see :func:`to_units`), and the bool mask ``[B, H, T, D]`` of those elements."""
    units = to_units(x, tb, across_heads)
    idx = units.abs().topk(outlier_count(alpha, units.shape[-1]), dim=-1).indices
    mask = torch.zeros(units.shape, dtype=torch.bool, device=x.device)
    mask.scatter_(-1, idx, True)
    return idx, from_units(mask, x.shape, across_heads)


@dataclass(frozen=True)
class OutlierCodec:
    """Wraps a codec: top-``alpha`` magnitudes per unit kept exactly, the rest quantized by ``inner``.

    Attributes:
        inner: the codec of the other elements.
        alpha: the fraction kept, in (0, 0.5).
        across_heads: units are whole tokens across all KV heads (``H*D`` elements, parts ``[B, 1, T, k]``; for
            per-layer parameter groups, as QAQ's "layer" level) instead of token blocks of one head.
    """

    inner: Any
    alpha: float = 0.01
    across_heads: bool = False

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if self.alpha == 0:
            raise LMCompressError("outliers=0 needs no OutlierCodec; use the inner codec alone")
        if self.across_heads and self.inner.token_block != 1:
            raise LMCompressError("outliers across heads need a codec that quantizes each token on its own")

    @property
    def token_block(self) -> int:
        return self.inner.token_block

    @property
    def bits(self) -> int:
        return self.inner.bits

    def count(self, head_dim: int, num_heads: int = 1) -> int:
        """Outliers per unit."""
        unit = num_heads * head_dim if self.across_heads else self.token_block * head_dim
        return outlier_count(self.alpha, unit)

    @property
    def row_independent(self) -> bool:
        return self.inner.row_independent and not self.across_heads

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tb = self.token_block
        idx, ignore = top_magnitudes(x, self.alpha, tb, self.across_heads)  # [B, H or 1, n, k]
        units = to_units(x, tb, self.across_heads)
        vals = torch.gather(units, -1, idx)
        parts = self.inner.encode(x, ignore=ignore)
        index_dtype = torch.uint8 if units.shape[-1] <= 256 else torch.int16
        parts["outlier_idx"] = idx.to(index_dtype)
        parts["outlier_val"] = vals
        return parts

    def decode(self, parts: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        inner_parts = {k: v for k, v in parts.items() if not k.startswith("outlier_")}
        x = self.inner.decode(inner_parts, head_dim, dtype)
        units = to_units(x, self.token_block, self.across_heads).clone()
        units.scatter_(-1, parts["outlier_idx"].long(), parts["outlier_val"].to(dtype))
        return from_units(units, x.shape, self.across_heads)

    def validate(self, head_dim: int) -> None:
        self.inner.validate(head_dim)

    def state_tensors(self, head_dim: int, device: torch.device) -> list[torch.Tensor]:
        """The inner codec's per-layer state (e.g. a codebook), if any."""
        state = getattr(self.inner, "state_tensors", None)
        return [] if state is None else state(head_dim, device)

    def bits_per_value(self, head_dim: int, num_heads: int = 1, value_bits: int = 16) -> float:
        """Inner bits plus ``k`` (index, value) pairs per unit; values counted at ``value_bits``."""
        unit = num_heads * head_dim if self.across_heads else self.token_block * head_dim
        index_bits = 8 if unit <= 256 else 16
        extra = self.count(head_dim, num_heads) * (index_bits + value_bits) / unit
        return self.inner.bits_per_value(head_dim, num_heads) + extra
