"""The codec contract: how one tensor of cached states (keys or values) is quantized into packed parts.

A codec turns a chunk of tokens ``x: [B, H, T, D]`` into a dict of tensors (the *parts*), each of shape
``[B, H, T / token_block, ...]``: the token axis is dim 2 for every part, so storage can append, slice and
gather along it. ``token_block`` is the number of tokens that share quantization parameters (1 for per-token
codecs; the group size for codecs that group along tokens, e.g. KIVI's per-channel keys).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Codec(Protocol):
    """Quantizes ``[B, H, T, D]`` states into packed parts and back."""

    #: tokens that share parameters; T passed to :meth:`encode` is a multiple of it.
    token_block: int
    #: whether each token's code depends on that token alone (so storage may gather tokens without
    #: re-quantizing). True for per-token codecs.
    row_independent: bool

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x: [B, H, T, D]`` float -> parts, each ``[B, H', T // token_block, ...]`` (``H'`` is 1 for parts shared
        by all heads). Codecs in this package also take ``ignore=`` (bool like ``x``): elements left out of the
        statistics (outliers stored elsewhere)."""
        ...

    def decode(self, parts: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """Parts (any slice along dim 2) -> ``[B, H, T, D]`` of ``dtype``."""
        ...

    def validate(self, head_dim: int) -> None:
        """Raise ``LMCompressError`` if states of ``head_dim`` channels cannot be stored."""
        ...

    def bits_per_value(self, head_dim: int) -> float:
        """Storage bits per cached element, metadata included (for reporting)."""
        ...
