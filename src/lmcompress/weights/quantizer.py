"""Round-to-nearest group quantization of weight matrices: the integer grid both RTN and AWQ end on.

Groups run along the input dimension (the last dim of an ``[out, in]`` weight), ``group_size`` channels each.
With a zero point (asymmetric, AWQ's default)::

    scale = max(max(w) - min(w), 1e-5) / (2**bits - 1)      rounded to float16 (the stored precision)
    zero  = clamp(-round(min(w) / scale), 0, 2**bits - 1)
    code  = clamp(round(w / scale) + zero, 0, 2**bits - 1)
    w_hat = (code - zero) * scale

Without one (symmetric): ``scale = max(|w|, 1e-5) / (2**(bits-1) - 1)``, ``code = clamp(round(w / scale),
-2**(bits-1), 2**(bits-1) - 1) + 2**(bits-1)`` and ``zero = 2**(bits-1)``, so both kinds share one storage format.
Scales are rounded to float16 *before* the codes are computed, so :func:`fake_quantize` equals the dequantized
packed checkpoint exactly (in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LMCompressError


@dataclass
class QuantizedWeight:
    """Integer form of an ``[N, K]`` weight (``N`` outputs, ``K`` inputs, ``G = K // group_size``).

    Attributes:
        codes: ``[N, K]`` uint8 in ``[0, 2**bits)``.
        scales: ``[N, G]`` float16.
        zeros: ``[N, G]`` uint8 in ``[0, 2**bits)``.
        group_size: input channels per group.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[N, K]`` weight ``(code - zero) * scale`` computed in float32, returned in ``dtype``."""
        n, k = self.codes.shape
        codes = self.codes.to(torch.float32).reshape(n, -1, self.group_size)
        w = (codes - self.zeros.to(torch.float32)[..., None]) * self.scales.to(torch.float32)[..., None]
        return w.reshape(n, k).to(dtype)


def _check_groups(k: int, group_size: int) -> None:
    if k % group_size:
        raise LMCompressError(
            f"group_size={group_size} does not divide the input size {k}; use a group size that divides it"
        )


def _group_params(
    w: torch.Tensor, bits: int, zero_point: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w``: ``[R, group_size]`` float32 -> (scale float32 (float16-representable), zero, integer codes), each
    ``[R, 1]`` except codes ``[R, group_size]`` (stored form, in ``[0, 2**bits)``)."""
    if zero_point:
        max_int = 2**bits - 1
        w_max = w.amax(dim=1, keepdim=True)
        w_min = w.amin(dim=1, keepdim=True)
        scale = ((w_max - w_min).clamp(min=1e-5) / max_int).to(torch.float16).to(torch.float32)
        zero = (-torch.round(w_min / scale)).clamp(0, max_int)
        codes = (torch.round(w / scale) + zero).clamp(0, max_int)
    else:
        max_int = 2 ** (bits - 1) - 1
        offset = 2 ** (bits - 1)
        scale = (
            (w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / max_int).to(torch.float16).to(torch.float32)
        )
        codes = torch.round(w / scale).clamp(-offset, max_int) + offset
        zero = torch.full_like(scale, float(offset))
    if not torch.isfinite(scale).all():
        raise LMCompressError(
            "weight has non-finite values or a group range beyond float16; cannot quantize it"
        )
    return scale, zero, codes


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True) -> torch.Tensor:
    """Quantize and dequantize ``w`` (``[..., K]``, groups along the last dim); same shape and dtype as ``w``."""
    _check_groups(w.shape[-1], group_size)
    flat = w.reshape(-1, group_size).to(torch.float32)
    scale, zero, codes = _group_params(flat, bits, zero_point)
    return ((codes - zero) * scale).reshape(w.shape).to(w.dtype)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int, zero_point: bool = True) -> QuantizedWeight:
    """Quantize an ``[N, K]`` weight to :class:`QuantizedWeight`."""
    if w.dim() != 2:
        raise LMCompressError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    _check_groups(k, group_size)
    scale, zero, codes = _group_params(w.reshape(-1, group_size).to(torch.float32), bits, zero_point)
    return QuantizedWeight(
        codes=codes.reshape(n, k).to(torch.uint8),
        scales=scale.reshape(n, -1).to(torch.float16),
        zeros=zero.reshape(n, -1).to(torch.uint8),
        group_size=group_size,
    )
