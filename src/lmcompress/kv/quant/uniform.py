"""Uniform integer quantization of cached states, per token, with channel groups.

For each token and each group of ``group_size`` consecutive channels:

* asymmetric: ``scale = (max - min) / (2**bits - 1)``, ``zero = min``, ``code = round((x - zero) / scale)``,
  ``x_hat = code * scale + zero``;
* symmetric: ``scale = max|x| / (2**(bits-1) - 1)``, ``code = round(x / scale) + 2**(bits-1) - 1`` (so codes stay
  unsigned), ``x_hat = (code - (2**(bits-1) - 1)) * scale``.

Scales and zero points are stored in fp16 (a zero point only in the asymmetric case). The rounding error of
one element is at most ``scale / 2`` (plus fp16 rounding of the parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import LMCompressError, check_positive_int
from .packing import container_bits, pack, packed_size, unpack


def check_finite(x: torch.Tensor, what: str = "KV states") -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise LMCompressError(f"{what} contain {bad} NaN/inf values; only finite values can be quantized")


@dataclass(frozen=True)
class UniformTokenCodec:
    """Per-token uniform quantization of ``[B, H, T, D]`` with ``D`` split into groups of ``group_size``.

    Parts: ``codes`` uint8 ``[B, H, T, packed(D)]``, ``scale`` fp16 ``[B, H, T, D/group]`` and, when
    asymmetric, ``zero`` fp16 ``[B, H, T, D/group]``.
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False

    token_block = 1
    row_independent = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise LMCompressError(f"bits={self.bits!r} is not supported; allowed: integers 1..8")
        if self.symmetric and self.bits < 2:
            raise LMCompressError("symmetric quantization needs bits >= 2")
        check_positive_int("group_size", self.group_size)

    def _groups(self, head_dim: int) -> int:
        if head_dim % self.group_size:
            raise LMCompressError(
                f"group_size={self.group_size} does not divide head_dim={head_dim}; "
                f"allowed: divisors of {head_dim}"
            )
        return head_dim // self.group_size

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, h, t, d = x.shape
        g = self._groups(d)
        check_finite(x)
        xg = x.float().reshape(b, h, t, g, self.group_size)
        qmax = (1 << self.bits) - 1
        if self.symmetric:
            half = (1 << (self.bits - 1)) - 1
            scale = xg.abs().amax(dim=-1).clamp_min(1e-8) / half
            scale16 = scale.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)
            codes = (xg / scale16.float().unsqueeze(-1)).round().clamp(-half, half) + half
            parts = {"scale": scale16}
        else:
            lo = xg.amin(dim=-1)
            hi = xg.amax(dim=-1)
            zero16 = lo.to(torch.float16)
            scale16 = ((hi - zero16.float()) / qmax).to(torch.float16)
            scale16 = torch.where(scale16 > 0, scale16, torch.ones_like(scale16))
            codes = ((xg - zero16.float().unsqueeze(-1)) / scale16.float().unsqueeze(-1)).round().clamp(0, qmax)
            parts = {"scale": scale16, "zero": zero16}
        parts["codes"] = pack(codes.reshape(b, h, t, d), self.bits)
        return parts

    def decode(self, parts: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack(parts["codes"], self.bits, head_dim)
        b, h, t, d = codes.shape
        g = d // self.group_size
        cg = codes.reshape(b, h, t, g, self.group_size).float()
        scale = parts["scale"].float().unsqueeze(-1)
        if self.symmetric:
            half = (1 << (self.bits - 1)) - 1
            x = (cg - half) * scale
        else:
            x = cg * scale + parts["zero"].float().unsqueeze(-1)
        return x.reshape(b, h, t, d).to(dtype)

    def bits_per_value(self, head_dim: int) -> float:
        g = self._groups(head_dim)
        meta = g * 16 * (1 if self.symmetric else 2)
        return (packed_size(head_dim, self.bits) * 8 + meta) / head_dim

    @property
    def storage_bits(self) -> int:
        return container_bits(self.bits)
