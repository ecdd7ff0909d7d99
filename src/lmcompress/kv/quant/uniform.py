"""Uniform integer quantization of cached states, asymmetric (scale + zero point) or symmetric.

For each parameter group (see :mod:`~lmcompress.kv.quant.granularity`: per token with channel groups, per head,
per layer, or per channel over a block of tokens):

* asymmetric: ``zero = min``, ``scale = (max - min) / (2**bits - 1)``, ``code = round((x - zero) / scale)``,
  ``x_hat = code * scale + zero``;
* symmetric: ``scale = max|x| / (2**(bits-1) - 1)``, ``code = round(x / scale) + 2**(bits-1) - 1`` (codes stay
  unsigned; one of the ``2**bits`` codes is unused), ``x_hat = (code - (2**(bits-1) - 1)) * scale``.

Scales and zero points are stored in fp16, rounded outward (zero down, scale up) so the levels still cover
``[min, max]``: the rounding error of every element is at most ``scale / 2`` (``scale`` being the stored fp16
value). Rounding is half-up (``floor(v + 0.5)``), as in the Triton kernel. Codes are packed along the channel
axis (2 codes of 4 bits or 4 codes of 2 bits per byte; 8 codes of 3 bits in 3 bytes, see :mod:`.packing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import LMCompressError
from . import granularity as gr
from .packing import container_bits, pack, packed_size, unpack, unpack_float

FP16_MAX = 65504.0


def check_finite(x: torch.Tensor, what: str = "KV states") -> None:
    """Raise ``LMCompressError`` if ``x`` holds NaN/inf or values beyond the fp16 range of the parameters."""
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise LMCompressError(f"{what} contain {bad} NaN/inf values; only finite values can be quantized")
    if x.numel() and float(x.abs().max()) > FP16_MAX / 2:
        raise LMCompressError(f"{what} exceed ±{FP16_MAX / 2:g}; fp16 quantization parameters cannot hold them")


def check_bits(bits: int, low: int = 1, high: int = 8, what: str = "bits") -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise LMCompressError(f"{what}={bits!r} is not supported; allowed: integers {low}..{high}")


def fp16_down(x: torch.Tensor) -> torch.Tensor:
    """The largest fp16 value <= ``x`` (float32 in, fp16 out)."""
    h = x.to(torch.float16)
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -torch.inf)), h)


def fp16_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= ``x``."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, torch.inf)), h)


def round_half_up(v: torch.Tensor) -> torch.Tensor:
    return torch.floor(v + 0.5)


def pack_codes(codes: torch.Tensor, bits: int, tb: int) -> torch.Tensor:
    """``[B, H, T, D]`` codes -> packed part ``[B, H, T, P]`` (``tb == 1``) or ``[B, H, T/tb, tb, P]``."""
    packed = pack(codes, bits)
    if tb == 1:
        return packed
    b, h, t, p = packed.shape
    return packed.reshape(b, h, t // tb, tb, p)


def unpack_codes(part: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: -> ``[B, H, T, D]`` uint8 codes."""
    if part.dim() == 5:
        b, h, n, tb, p = part.shape
        part = part.reshape(b, h, n * tb, p)
    return unpack(part, bits, head_dim)


def unpack_codes_float(part: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """:func:`unpack_codes` as float32 codes ``[B, H, T, D]`` (a table lookup per byte on CPU)."""
    if part.dim() == 5:
        b, h, n, tb, p = part.shape
        part = part.reshape(b, h, n * tb, p)
    return unpack_float(part, bits, head_dim)


@dataclass(frozen=True)
class UniformCodec:
    """Uniform quantization of ``[B, H, T, D]`` states.

    Attributes:
        bits: code width, 1..8 (2..8 when symmetric).
        group_size: channels per group (``token`` granularity) or tokens per group (``channel``).
        symmetric: symmetric (scale only) instead of asymmetric (scale + zero point).
        granularity: ``token``, ``head``, ``layer`` or ``channel`` (see :mod:`.granularity`).

    Parts: ``codes`` uint8 ``[B, H, T, packed(D)]`` (``[B, H, T/g, g, packed(D)]`` for ``channel``), ``scale``
    fp16 and, when asymmetric, ``zero`` fp16, both shaped like the granularity's parameters.
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    granularity: str = "token"

    row_independent_granularities = ("token", "head")

    def __post_init__(self) -> None:
        check_bits(self.bits, 2 if self.symmetric else 1)
        gr.check_granularity(self.granularity, self.group_size)

    @property
    def token_block(self) -> int:
        return gr.token_block(self.granularity, self.group_size)

    @property
    def row_independent(self) -> bool:
        return self.granularity in self.row_independent_granularities

    @property
    def storage_bits(self) -> int:
        return container_bits(self.bits)

    # ------------------------------------------------------------------------------------------ encode
    def params(self, x: torch.Tensor, ignore: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """fp16 ``scale`` (and ``zero``) for ``x: [B, H, T, D]``, skipping ``ignore`` elements in the statistics."""
        xg = gr.groups(x.float(), self.granularity, self.group_size)
        ig = None if ignore is None else gr.groups(ignore, self.granularity, self.group_size)
        lo, hi = gr.masked_min_max(xg, ig)
        if self.symmetric:
            half = (1 << (self.bits - 1)) - 1
            scale = fp16_up(torch.maximum(hi.abs(), lo.abs()) / half)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            return {"scale": scale}
        qmax = (1 << self.bits) - 1
        zero = fp16_down(lo)
        scale = fp16_up((hi - zero.float()) / qmax)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return {"scale": scale, "zero": zero}

    def quantize(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Integer codes ``[B, H, T, D]`` (uint8) of ``x`` under ``params``."""
        shape = x.shape
        scale = gr.expand(params["scale"].float(), self.granularity, self.group_size, shape)
        if self.symmetric:
            half = (1 << (self.bits - 1)) - 1
            codes = round_half_up(x.float() / scale).clamp(-half, half) + half
        else:
            zero = gr.expand(params["zero"].float(), self.granularity, self.group_size, shape)
            codes = round_half_up((x.float() - zero) / scale).clamp(0, (1 << self.bits) - 1)
        return codes.to(torch.uint8)

    def encode(self, x: torch.Tensor, ignore: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``x: [B, H, T, D]`` -> parts. ``ignore`` (bool, like ``x``) marks elements left out of the statistics
        (outliers stored elsewhere); their codes are clamped and meaningless."""
        if not x.is_cuda and ignore is None:
            from ..kernels import cpu_fused

            parts = cpu_fused.encode(self, x)  # the C kernel, bit-identical to the torch ops below
            if parts is not None:
                return parts
        check_finite(x)
        if x.is_cuda and ignore is None:
            from ..kernels import dispatch

            parts = dispatch.quantize_pack(self, x)
            if parts is not None:
                return parts
        params = self.params(x, ignore)
        codes = self.quantize(x, params)
        return {**params, "codes": pack_codes(codes, self.bits, self.token_block)}

    # ------------------------------------------------------------------------------------------ decode
    def decode(self, parts: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack_codes_float(parts["codes"], self.bits, head_dim)
        shape = codes.shape
        if self.granularity == "token":  # affine in the grouped view: no expanded copy of the parameters
            b, h, t, d = shape
            cg = codes.view(b, h, t, d // self.group_size, self.group_size)
            scale = parts["scale"].float().unsqueeze(-1)
            if self.symmetric:
                x = (cg - ((1 << (self.bits - 1)) - 1)) * scale
            else:
                x = torch.addcmul(parts["zero"].float().unsqueeze(-1), cg, scale)
            return x.reshape(shape).to(dtype)
        scale = gr.expand(parts["scale"].float(), self.granularity, self.group_size, shape)
        if self.symmetric:
            x = (codes - ((1 << (self.bits - 1)) - 1)) * scale
        else:
            x = codes * scale + gr.expand(parts["zero"].float(), self.granularity, self.group_size, shape)
        return x.to(dtype)

    # ------------------------------------------------------------------------------------------ sizes
    def validate(self, head_dim: int) -> None:
        gr.check_head_dim(self.granularity, self.group_size, head_dim)

    def bits_per_value(self, head_dim: int, num_heads: int = 1) -> float:
        """Storage bits per element, fp16 parameters included."""
        self.validate(head_dim)
        kinds = 1 if self.symmetric else 2
        meta = 16 * kinds * gr.param_count(self.granularity, self.group_size, num_heads, head_dim)
        return packed_size(head_dim, self.bits) * 8 / head_dim + meta


#: the per-token codec of the original core (kept for callers of the old name).
UniformTokenCodec = UniformCodec
