"""Non-uniform (codebook) quantization of cached states: KVQuant's "nuq" data type.

For each parameter group (:mod:`~lmcompress.kv.quant.granularity`: per token with channel groups, or per channel
over a block of tokens) the group is normalised to ``u = (x - zero) / scale`` in ``[0, 1]`` with ``zero = min``
and ``scale = max - min`` (fp16, rounded outward as in :mod:`.uniform`), and each ``u`` is coded as the index of
the nearest of ``2**bits`` levels (a sorted codebook in ``[0, 1]``, one per layer and stream, fitted offline by
:func:`weighted_kmeans`); ``x_hat = zero + scale * level[code]``. Codes are packed like uniform codes.

Uniform levels ``k / (2**bits - 1)`` reproduce asymmetric uniform quantization (up to the fp16 scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import LMCompressError
from . import granularity as gr
from .packing import packed_size
from .uniform import check_finite, fp16_down, fp16_up, pack_codes, unpack_codes


def uniform_levels(bits: int) -> tuple[float, ...]:
    """``2**bits`` evenly spaced levels ``0 .. 1``."""
    n = 1 << bits
    return tuple(k / (n - 1) for k in range(n))


def weighted_kmeans(u: torch.Tensor, w: torch.Tensor, bits: int, iters: int = 60) -> torch.Tensor:
    """Sensitivity-weighted 1-D k-means (KVQuant): ``2**bits`` sorted levels in ``[0, 1]`` minimising
    ``sum_i w_i (u_i - level(u_i))**2`` for ``u, w: [N]`` float (``w >= 0``), by Lloyd iterations from uniform
    levels. A level whose cell gets no weight stays where it is. Returns ``[2**bits]`` float32."""
    if u.shape != w.shape or u.dim() != 1:
        raise LMCompressError(f"weighted_kmeans needs 1-D u and w of one shape, got {tuple(u.shape)}, {tuple(w.shape)}")
    u = u.float().clamp(0.0, 1.0)
    w = w.float().clamp_min(0.0)
    levels = torch.tensor(uniform_levels(bits), dtype=torch.float32, device=u.device)
    n = levels.numel()
    for _ in range(iters):
        idx = torch.bucketize(u, (levels[1:] + levels[:-1]) / 2)
        mass = torch.zeros(n, device=u.device).index_add_(0, idx, w)
        total = torch.zeros(n, device=u.device).index_add_(0, idx, w * u)
        new = torch.where(mass > 0, total / mass.clamp_min(1e-30), levels)
        new, _ = new.sort()
        if torch.allclose(new, levels, atol=1e-7, rtol=0):
            levels = new
            break
        levels = new
    return levels


def weighted_error(u: torch.Tensor, w: torch.Tensor, levels: torch.Tensor) -> float:
    """``sum w (u - nearest level)**2``."""
    idx = torch.bucketize(u.float(), (levels[1:] + levels[:-1]) / 2)
    return float((w.float() * (u.float() - levels[idx]) ** 2).sum())


@dataclass(frozen=True)
class CodebookCodec:
    """Codebook quantization of ``[B, H, T, D]`` states.

    Attributes:
        levels: ``2**bits`` sorted levels in ``[0, 1]`` (bits 1..8).
        group_size: channels per group (``token``) or tokens per group (``channel``).
        granularity: ``token`` or ``channel``.

    Parts: ``codes`` uint8 (packed like :class:`~.uniform.UniformCodec`'s), ``scale`` and ``zero`` fp16. The
    codebook itself is per-layer state (:meth:`state_tensors`, counted in the cache's bytes).
    """

    levels: tuple[float, ...]
    group_size: int = 64
    granularity: str = "token"

    def __post_init__(self) -> None:
        n = len(self.levels)
        bits = round(math.log2(n)) if n > 1 else 0
        if n < 2 or (1 << bits) != n or bits > 8:
            raise LMCompressError(f"a codebook of {n} levels is not supported; allowed: 2**bits levels, bits 1..8")
        if any(b < a for a, b in zip(self.levels, self.levels[1:], strict=False)) or not (
            self.levels[0] >= 0.0 and self.levels[-1] <= 1.0
        ):
            raise LMCompressError("codebook levels must be sorted and lie in [0, 1]")
        if self.granularity not in ("token", "channel"):
            raise LMCompressError(f"granularity={self.granularity!r} is not supported here; allowed: token, channel")
        gr.check_granularity(self.granularity, self.group_size)

    @property
    def bits(self) -> int:
        return round(math.log2(len(self.levels)))

    @property
    def token_block(self) -> int:
        return gr.token_block(self.granularity, self.group_size)

    @property
    def row_independent(self) -> bool:
        return self.granularity == "token"

    def _table(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.levels, dtype=torch.float32, device=device)

    def params(self, x: torch.Tensor, ignore: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """fp16 ``scale`` and ``zero`` of ``x: [B, H, T, D]`` (``ignore``d elements left out)."""
        xg = gr.groups(x.float(), self.granularity, self.group_size)
        ig = None if ignore is None else gr.groups(ignore, self.granularity, self.group_size)
        lo, hi = gr.masked_min_max(xg, ig)
        zero = fp16_down(lo)
        scale = fp16_up(hi - zero.float())
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return {"scale": scale, "zero": zero}

    def normalize(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``u = (x - zero) / scale`` ``[B, H, T, D]`` float32 (in ``[0, 1]`` for elements not ignored)."""
        shape = x.shape
        scale = gr.expand(params["scale"].float(), self.granularity, self.group_size, shape)
        zero = gr.expand(params["zero"].float(), self.granularity, self.group_size, shape)
        return (x.float() - zero) / scale

    def encode(self, x: torch.Tensor, ignore: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        check_finite(x)
        params = self.params(x, ignore)
        levels = self._table(x.device)
        u = self.normalize(x, params).clamp(0.0, 1.0)
        codes = torch.bucketize(u, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
        return {**params, "codes": pack_codes(codes, self.bits, self.token_block)}

    def decode(self, parts: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack_codes(parts["codes"], self.bits, head_dim).long()
        u = self._table(codes.device)[codes]
        shape = u.shape
        scale = gr.expand(parts["scale"].float(), self.granularity, self.group_size, shape)
        zero = gr.expand(parts["zero"].float(), self.granularity, self.group_size, shape)
        return torch.addcmul(zero, u, scale).to(dtype)

    def state_tensors(self, head_dim: int, device: torch.device) -> list[torch.Tensor]:
        """The codebook ``[2**bits]`` float32 (one per layer and stream)."""
        return [self._table(device)]

    def validate(self, head_dim: int) -> None:
        gr.check_head_dim(self.granularity, self.group_size, head_dim)

    def bits_per_value(self, head_dim: int, num_heads: int = 1) -> float:
        self.validate(head_dim)
        meta = 32 * gr.param_count(self.granularity, self.group_size, num_heads, head_dim)
        return packed_size(head_dim, self.bits) * 8 / head_dim + meta
