"""AutoAWQ's GEMM layout for 4-bit weights, and the torch reference dequantization.

For a linear with ``K = in_features``, ``N = out_features`` and ``G = K // group_size`` groups:

* ``qweight``: int32 ``[K, N // 8]``; the eight 4-bit codes of output columns ``8c .. 8c+7`` of input row ``k``
  sit in ``qweight[k, c]``, nibble ``i`` (bits ``4i .. 4i+3``) holding column ``8c + AWQ_ORDER[i]`` with
  ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``.
* ``qzeros``: int32 ``[G, N // 8]``, the per-group zero points packed the same way.
* ``scales``: float16 ``[G, N]``.
* weight ``W[n, k] = (code[k, n] - zero[k // group_size, n]) * scale[k // group_size, n]``.
"""

from __future__ import annotations

import torch

from ..errors import LMCompressError

AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
#: nibble holding column ``8c + j``: the inverse permutation of ``AWQ_ORDER``.
AWQ_NIBBLE_OF_COLUMN: tuple[int, ...] = (0, 4, 1, 5, 2, 6, 3, 7)
PACK = 8  # codes per int32


def pack_columns(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes along the last dim in the AWQ order.

    Args:
        codes: ``[R, N]`` integer tensor with values in ``[0, 16)``; ``N`` a multiple of 8.

    Returns:
        ``[R, N // 8]`` int32.
    """
    if codes.shape[-1] % PACK:
        raise LMCompressError(f"packing needs a multiple of 8 columns, got {codes.shape[-1]}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise LMCompressError("4-bit codes must lie in [0, 15]")
    shifts = torch.tensor([4 * n for n in AWQ_NIBBLE_OF_COLUMN], dtype=torch.int64, device=c.device)
    packed = (c.reshape(*c.shape[:-1], -1, PACK) << shifts).sum(dim=-1)  # column j -> its nibble
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement, explicitly
    return packed.to(torch.int32)


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_columns`: ``[R, N // 8]`` int32 -> ``[R, N]`` uint8 codes."""
    shifts = torch.tensor([4 * n for n in AWQ_NIBBLE_OF_COLUMN], dtype=torch.int32, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift: the mask drops sign bits
    return codes.reshape(*packed.shape[:-1], -1).to(torch.uint8)


def pack_gemm(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Pack quantized weights given in the linear's own ``[out, in]`` orientation.

    Args:
        codes: ``[N, K]`` codes in ``[0, 16)``.
        zeros: ``[N, G]`` zero points in ``[0, 16)``.
        scales: ``[N, G]`` scales (stored as float16).

    Returns:
        ``(qweight [K, N/8] int32, qzeros [G, N/8] int32, scales [G, N] float16)``.
    """
    qweight = pack_columns(codes.t().contiguous())
    qzeros = pack_columns(zeros.t().contiguous())
    return qweight, qzeros, scales.t().contiguous().to(torch.float16)


def dequantize_gemm(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The torch reference: packed GEMM tensors -> weight ``[K, N]`` (``x @ W`` orientation) in ``dtype``.

    The arithmetic is ``(code - zero) * scale`` in float32, rounded to ``dtype`` once at the end.
    """
    codes = unpack_columns(qweight).to(torch.float32)  # [K, N]
    zeros = unpack_columns(qzeros).to(torch.float32)  # [G, N]
    scale = scales.to(torch.float32)
    k = codes.shape[0]
    g = k // group_size
    w = (codes.reshape(g, group_size, -1) - zeros[:, None, :]) * scale[:, None, :]
    return w.reshape(k, -1).to(dtype)
