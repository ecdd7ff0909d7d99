"""Growable tensors along the token axis (dim 2), with honest byte counts.

A :class:`TokenBuffer` holds ``data: [B, H, capacity, *rest]`` and a ``length``; appends grow the capacity by a
factor (amortized O(1) per token instead of a full copy per step, as ``torch.cat`` caches do). ``nbytes`` is the
capacity actually allocated, spare slots included, since that is what the device holds.
"""

from __future__ import annotations

import math

import torch


class TokenBuffer:
    """``[B, H, capacity, *rest]`` storage with ``length`` valid tokens.

    Args:
        first: the first chunk, ``[B, H, T, *rest]``; it defines dtype, device and trailing shape.
        growth: capacity multiplier when full (>= 1).
        min_extra: at least this many spare slots are added when growing.
        headroom: spare slots allocated beyond ``first`` at creation.
    """

    def __init__(self, first: torch.Tensor, *, growth: float = 1.125, min_extra: int = 16, headroom: int = 0):
        self.growth = growth
        self.min_extra = min_extra
        t = first.shape[2]
        cap = t + max(0, headroom)
        self.data = first.new_empty((*first.shape[:2], cap, *first.shape[3:]))
        self.data[:, :, :t] = first
        self.length = t

    @property
    def capacity(self) -> int:
        return self.data.shape[2]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def view(self) -> torch.Tensor:
        """The valid part, ``[B, H, length, *rest]`` (a view, no copy)."""
        return self.data[:, :, : self.length]

    def slice(self, start: int, end: int) -> torch.Tensor:
        return self.data[:, :, start:end]

    def _grow(self, needed: int) -> None:
        cap = max(needed, math.ceil(self.capacity * self.growth), self.capacity + self.min_extra)
        new = self.data.new_empty((*self.data.shape[:2], cap, *self.data.shape[3:]))
        new[:, :, : self.length] = self.data[:, :, : self.length]
        self.data = new

    def append(self, x: torch.Tensor) -> None:
        """Append ``x: [B, H, T, *rest]`` after the valid part."""
        t = x.shape[2]
        if self.length + t > self.capacity:
            self._grow(self.length + t)
        self.data[:, :, self.length : self.length + t] = x
        self.length += t

    def replace(self, x: torch.Tensor, headroom: int = 0) -> None:
        """Drop the old storage and hold exactly ``x`` (+ ``headroom`` spare slots): frees the old memory."""
        fresh = x.new_empty((*x.shape[:2], x.shape[2] + max(0, headroom), *x.shape[3:]))
        fresh[:, :, : x.shape[2]] = x
        self.data = fresh
        self.length = x.shape[2]

    def drop_front(self, n: int, headroom: int = 0) -> None:
        """Free the oldest ``n`` valid tokens; hold the rest (+ ``headroom`` spare slots)."""
        self.replace(self.data[:, :, n : self.length], headroom)

    def gather(self, index: torch.Tensor, headroom: int = 0) -> None:
        """Keep tokens ``index: [B, H, k]`` (per batch row and head) in that order; frees the rest."""
        idx = index.reshape(*index.shape, *([1] * (self.data.dim() - 3)))
        idx = idx.expand(*index.shape, *self.data.shape[3:])
        self.replace(torch.gather(self.view(), 2, idx), headroom)

    def compact(self, index: torch.Tensor) -> None:
        """Keep tokens ``index: [B, H, k]`` in place: the capacity stays, freed slots become spare capacity for
        the tokens that follow (decoding-time eviction of a few tokens per step, without reallocating)."""
        idx = index.reshape(*index.shape, *([1] * (self.data.dim() - 3)))
        kept = torch.gather(self.view(), 2, idx.expand(*index.shape, *self.data.shape[3:]))
        self.data[:, :, : index.shape[2]] = kept
        self.length = index.shape[2]

    def truncate_front(self, keep_last: int) -> None:
        """Keep only the last ``keep_last`` valid tokens (sliding windows); frees the rest."""
        if self.length > keep_last:
            self.replace(self.data[:, :, self.length - keep_last : self.length], headroom=0)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x: [B, H, T, *rest]``, ``index: [B, H, k]`` -> ``[B, H, k, *rest]``."""
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 3))).expand(*index.shape, *x.shape[3:])
    return torch.gather(x, 2, idx)
