"""Bit packing of unsigned integer codes into bytes along the last dimension.

Codes of ``bits`` in 1..8 form a little-endian bit stream: code ``j`` occupies bits ``[j*bits, (j+1)*bits)``
of the row, byte ``k`` holding stream bits ``[8k, 8k+8)``. For 1, 2, 4 and 8 bits that is ``8/bits`` codes per
byte, code ``j`` of a byte at bits ``[j*bits, (j+1)*bits)``; other widths (3, 5, 6, 7) pack groups of 8 codes
into ``bits`` bytes (a row is padded to a multiple of 8 codes). No width wastes bits: 3-bit codes take 3/8 of a
byte each. Shifts run on int32/int64 (uint8 shifts take a slow path on CPU).
"""

from __future__ import annotations

import functools

import torch

from ...errors import LMCompressError

BYTE_ALIGNED_BITS = (1, 2, 4, 8)
#: every width is stored exactly
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
        codes = codes.to(torch.int32)
        pad = (-n) % per_byte
        if pad:
            codes = torch.nn.functional.pad(codes, (0, pad))
        codes = codes.reshape(*codes.shape[:-1], -1, per_byte)
        out = codes[..., 0].clone()
        for j in range(1, per_byte):
            out |= codes[..., j] << (j * bits)
        return out.to(torch.uint8)
    codes = codes.to(torch.int64)
    pad = (-n) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    groups = codes.reshape(*codes.shape[:-1], -1, 8)
    word = groups[..., 0].clone()  # 8 codes -> one int64 word of 8 * bits bits
    for j in range(1, 8):
        word |= groups[..., j] << (j * bits)
    out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(bits)], dim=-1)
    return out.to(torch.uint8).reshape(*codes.shape[:-1], -1)


@functools.cache
def _byte_table_cpu(bits: int) -> torch.Tensor:
    per = 8 // bits
    byte = torch.arange(256, dtype=torch.int32).unsqueeze(-1)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32)
    return ((byte >> shifts) & ((1 << bits) - 1)).to(torch.float32).reshape(256, per)


def byte_table(bits: int, device: torch.device) -> torch.Tensor:
    """``[256, 8 // bits]`` float32: the codes held by each byte value (1, 2 or 4 bits), in stream order."""
    return _byte_table_cpu(bits).to(device)


def unpack_float(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """:func:`unpack` straight to float32 codes ``[..., n]``.

    For 1/2-bit codes on the CPU this is one table lookup per byte (``byte_table``), about 2x faster than
    shifting and masking each of the 4-8 code slots (measured: 1.0 vs 2.4 ms for 196k 2-bit codes, one
    thread); at 4 bits (two slots) shifting is faster, and other widths and devices unpack and convert."""
    if bits in (1, 2) and not packed.is_cuda:
        table = byte_table(bits, packed.device)
        codes = table.index_select(0, packed.reshape(-1).to(torch.int64))
        return codes.reshape(*packed.shape[:-1], -1)[..., :n]
    return unpack(packed, bits, n).float()


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., bytes]`` uint8 -> ``[..., n]`` integer codes (uint8 for 8 bits, else
    int32)."""
    _check(bits)
    if bits == 8:
        return packed[..., :n]
    mask = (1 << bits) - 1
    if bits in BYTE_ALIGNED_BITS:
        wide = packed.to(torch.int32)
        codes = torch.stack([(wide >> s) & mask for s in range(0, 8, bits)], dim=-1)
        return codes.reshape(*packed.shape[:-1], -1)[..., :n]
    groups = packed.to(torch.int64).reshape(*packed.shape[:-1], -1, bits)
    word = groups[..., 0].clone()
    for i in range(1, bits):
        word |= groups[..., i] << (8 * i)
    codes = torch.stack([((word >> (j * bits)) & mask).to(torch.int32) for j in range(8)], dim=-1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]
