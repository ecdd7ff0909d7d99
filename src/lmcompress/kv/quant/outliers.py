"""Outliers kept in full precision as a sparse set (QAQ's dense-and-sparse storage).

Within every unit of a token block and head (``token_block * D`` elements: one token's vector for per-token
codecs, a block of tokens for ``channel`` granularity), the ``k = ceil(alpha * token_block * D)`` elements of
largest magnitude are outliers: they are left out of the inner codec's statistics (so they do not stretch its
range) and stored exactly as ``(index, value)`` pairs in the states' dtype; decoding overwrites them.

Parts: the inner codec's parts plus ``outlier_idx`` (uint8 when the unit has at most 256 elements, else int16)
and ``outlier_val`` ``[B, H, T/token_block, k]``. All are counted in the cache's bytes.

Deviation from QAQ: QAQ takes ``alpha/2`` lowest and ``alpha/2`` highest values of each group; here the top
``alpha`` by magnitude, per token vector (so the count is fixed and the storage stays a dense ``[.., k]`` tensor);
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


def top_magnitudes(x: torch.Tensor, alpha: float, tb: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[B, H, T/tb, k]`` of the ``k`` largest magnitudes in each token-block unit of ``x: [B, H, T, D]``,
    and the bool mask ``[B, H, T, D]`` of those elements."""
    b, h, t, d = x.shape
    units = x.reshape(b, h, t // tb, tb * d)
    idx = units.abs().topk(outlier_count(alpha, tb * d), dim=-1).indices
    mask = torch.zeros(units.shape, dtype=torch.bool, device=x.device)
    mask.scatter_(-1, idx, True)
    return idx, mask.reshape(b, h, t, d)


@dataclass(frozen=True)
class OutlierCodec:
    """Wraps a codec: top-``alpha`` magnitudes per token-block unit kept exactly, the rest quantized by ``inner``."""

    inner: Any
    alpha: float = 0.01

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if self.alpha == 0:
            raise LMCompressError("outliers=0 needs no OutlierCodec; use the inner codec alone")

    @property
    def token_block(self) -> int:
        return self.inner.token_block

    @property
    def row_independent(self) -> bool:
        return self.inner.row_independent

    @property
    def bits(self) -> int:
        return self.inner.bits

    def count(self, head_dim: int) -> int:
        """Outliers per unit."""
        return outlier_count(self.alpha, self.token_block * head_dim)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, h, t, d = x.shape
        tb = self.token_block
        idx, ignore = top_magnitudes(x, self.alpha, tb)  # [B, H, n, k]
        vals = torch.gather(x.reshape(b, h, t // tb, tb * d), -1, idx)
        parts = self.inner.encode(x, ignore=ignore)
        index_dtype = torch.uint8 if tb * d <= 256 else torch.int16
        parts["outlier_idx"] = idx.to(index_dtype)
        parts["outlier_val"] = vals
        return parts

    def decode(self, parts: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        inner_parts = {k: v for k, v in parts.items() if not k.startswith("outlier_")}
        x = self.inner.decode(inner_parts, head_dim, dtype)
        b, h, t, d = x.shape
        tb = self.token_block
        units = x.reshape(b, h, t // tb, tb * d).clone()
        units.scatter_(-1, parts["outlier_idx"].long(), parts["outlier_val"].to(dtype))
        return units.reshape(b, h, t, d)

    def validate(self, head_dim: int) -> None:
        self.inner.validate(head_dim)

    def bits_per_value(self, head_dim: int, num_heads: int = 1, value_bits: int = 16) -> float:
        """Inner bits plus ``k`` (index, value) pairs per unit; values counted at ``value_bits``."""
        index_bits = 8 if self.token_block * head_dim <= 256 else 16
        extra = self.count(head_dim) * (index_bits + value_bits) / (self.token_block * head_dim)
        return self.inner.bits_per_value(head_dim, num_heads) + extra
