"""Bit packing of unsigned integer codes into bytes along the last dimension.

Codes of ``bits`` in 1..8 form a little-endian bit stream: code ``j`` occupies bits ``[j*bits, (j+1)*bits)``
of the row, byte ``k`` holding stream bits ``[8k, 8k+8)``. For 1, 2, 4 and 8 bits that is ``8/bits`` codes per
byte, code ``j`` of a byte at bits ``[j*bits, (j+1)*bits)``; other widths (3, 5, 6, 7) pack groups of 8 codes
into ``bits`` bytes (a row is padded to a multiple of 8 codes). No width wastes bits: 3-bit codes take 3/8 of a
byte each.
"""

from __future__ import annotations

import torch

from ...errors import LMCompressError

BYTE_ALIGNED_BITS = (1, 2, 4, 8)
#: kept for callers of the old name: every width is stored exactly
PACKABLE_BITS = tuple(range(1, 9))


def _check(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise LMCompressError(f"bits={bits!r} is not supported; allowed: 1..8")


def container_bits(bits: int) -> int:
    """Storage bits per code: ``bits`` itself (every width 1..8 is packed exactly)."""
    _check(bits)
    return bits


def packed_size(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits along the packed dimension."""
    _check(bits)
    if bits in BYTE_ALIGNED_BITS:
        return -(-n // (8 // bits))
    return -(-n // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dim.

    Args:
        codes: ``[..., n]`` integer tensor (any int dtype), values in ``[0, 2**bits)``.
        bits: code width, 1..8.

    Returns:
        ``[..., packed_size(n, bits)]`` uint8.
    """
    _check(bits)
    n = codes.shape[-1]
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if bits in BYTE_ALIGNED_BITS:
        per_byte = 8 // bits
        codes = codes.to(torch.uint8)
        pad = (-n) % per_byte
        if pad:
            codes = torch.nn.functional.pad(codes, (0, pad))
        codes = codes.reshape(*codes.shape[:-1], -1, per_byte)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return (codes << shifts).sum(dim=-1, dtype=torch.uint8)
    codes = codes.to(torch.int64)
    pad = (-n) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    groups = codes.reshape(*codes.shape[:-1], -1, 8)
    word = (groups << (torch.arange(8, device=codes.device) * bits)).sum(dim=-1)  # [..., n/8] < 2**(8*bits)
    out = (word.unsqueeze(-1) >> (torch.arange(bits, device=codes.device) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(*codes.shape[:-1], -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., bytes]`` uint8 -> ``[..., n]`` uint8 codes."""
    _check(bits)
    if bits == 8:
        return packed[..., :n]
    if bits in BYTE_ALIGNED_BITS:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        mask = (1 << bits) - 1
        codes = (packed.unsqueeze(-1) >> shifts) & mask
        return codes.reshape(*packed.shape[:-1], -1)[..., :n]
    groups = packed.to(torch.int64).reshape(*packed.shape[:-1], -1, bits)
    word = (groups << (torch.arange(bits, device=packed.device) * 8)).sum(dim=-1)
    codes = (word.unsqueeze(-1) >> (torch.arange(8, device=packed.device) * bits)) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], -1)[..., :n]
