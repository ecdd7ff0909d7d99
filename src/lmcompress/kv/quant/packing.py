"""Bit packing of unsigned integer codes into bytes along the last dimension.

Codes of ``bits`` in {1, 2, 4, 8} are packed little-end-first: code ``j`` of a byte sits at bits
``[j*bits, (j+1)*bits)``. Odd widths (3, 5, 6, 7) are stored in the next supported width (3 -> 4, 5..7 -> 8),
so their memory is that of the container; :func:`container_bits` says which.
"""

from __future__ import annotations

import torch

from ...errors import LMCompressError

PACKABLE_BITS = (1, 2, 4, 8)


def container_bits(bits: int) -> int:
    """The storage width used for ``bits``-bit codes (the smallest of 1, 2, 4, 8 that holds them)."""
    if not 1 <= bits <= 8:
        raise LMCompressError(f"bits={bits!r} is not supported; allowed: 1..8")
    return next(b for b in PACKABLE_BITS if b >= bits)


def packed_size(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits along the packed dimension."""
    per_byte = 8 // container_bits(bits)
    return -(-n // per_byte)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dim.

    Args:
        codes: ``[..., n]`` integer tensor (any int dtype), values in ``[0, 2**bits)``.
        bits: code width, 1..8.

    Returns:
        ``[..., ceil(n * container_bits / 8)]`` uint8.
    """
    cb = container_bits(bits)
    if cb == 8:
        return codes.to(torch.uint8).contiguous()
    per_byte = 8 // cb
    n = codes.shape[-1]
    pad = (-n) % per_byte
    codes = codes.to(torch.int32)  # uint8 shifts take a slow path on CPU
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.reshape(*codes.shape[:-1], -1, per_byte)
    out = codes[..., 0].clone()
    for j in range(1, per_byte):
        out |= codes[..., j] << (j * cb)
    return out.to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., bytes]`` uint8 -> ``[..., n]`` integer codes (uint8 for 8-bit, else
    int32: CPU shifts on int32 are an order of magnitude faster than on uint8)."""
    cb = container_bits(bits)
    if cb == 8:
        return packed[..., :n]
    wide = packed.to(torch.int32)
    mask = (1 << cb) - 1
    codes = torch.stack([(wide >> s) & mask for s in range(0, 8, cb)], dim=-1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]
