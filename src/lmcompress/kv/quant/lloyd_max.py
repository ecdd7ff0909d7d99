"""Lloyd-Max scalar codes for rotated states (TurboQuant-style).

After a random rotation, each coordinate of ``x / |x|`` for a ``g``-channel group is distributed as one
coordinate of a uniformly random unit vector in ``R^g``; scaled by ``sqrt(g)`` its density is

    f(t) ∝ (1 - t^2 / g) ^ ((g - 3) / 2),   |t| < sqrt(g)

(close to the standard normal for large ``g``). :func:`lloyd_max_codebook` computes, once per ``(bits, g)``, the
``2**bits`` reconstruction levels and ``2**bits - 1`` boundaries that minimise the mean squared error under
``f``: Lloyd's algorithm (boundaries = midpoints of neighbouring levels, levels = conditional means of their
cells) on a fine grid, started from normal quantiles, run to a fixed point. At 1-4 bits the levels agree with
the classic Gaussian Lloyd-Max tables (e.g. +-0.4528, +-1.5104 at 2 bits) to within ~1 % for ``g = 64``.

:class:`LloydMaxCodec` codes each token's channel groups: ``n = |x_g|``, ``code = bucket(x_g sqrt(g) / n)``, and
one fp16 scale per group chosen by least squares for the chosen levels (``s = <x_g, c> / <c, c>``, which
is never worse than ``n / sqrt(g)``). Parts: ``codes`` (packed like the uniform codec's) and ``scale``.
Used in a rotated basis (:class:`~.rotation.RotatedCodec`); without rotation it is a (poor) codebook for
heavy-tailed channels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ...errors import LMCompressError, check_positive_int
from .packing import container_bits, packed_size
from .uniform import check_bits, check_finite, pack_codes, unpack_codes


def sphere_coordinate_density(t: torch.Tensor, g: int) -> torch.Tensor:
    """Unnormalised density of ``sqrt(g) u_1`` for ``u`` uniform on the unit sphere of ``R^g`` (float64)."""
    inside = (1 - t * t / g).clamp_min(0)
    return inside ** ((g - 3) / 2) if g > 3 else torch.where(inside > 0, inside ** ((g - 3) / 2), 0.0)


@functools.cache
def _codebook_cpu(bits: int, g: int, grid_points: int = 200_001, iters: int = 500) -> tuple[torch.Tensor, ...]:
    n = 1 << bits
    lim = min(math.sqrt(g), 12.0)
    t = torch.linspace(-lim, lim, grid_points, dtype=torch.float64)
    w = sphere_coordinate_density(t, g)
    w = w / w.sum()
    probs = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    levels = torch.special.ndtri(probs).clamp(-lim, lim)
    for _ in range(iters):
        bounds = (levels[1:] + levels[:-1]) / 2
        cell = torch.bucketize(t, bounds)
        mass = torch.zeros(n, dtype=torch.float64).index_add_(0, cell, w)
        moment = torch.zeros(n, dtype=torch.float64).index_add_(0, cell, w * t)
        new = torch.where(mass > 0, moment / mass.clamp_min(1e-300), levels)
        if torch.allclose(new, levels, atol=1e-10, rtol=0):
            levels = new
            break
        levels = new
    bounds = (levels[1:] + levels[:-1]) / 2
    return levels.float(), bounds.float()


def lloyd_max_codebook(bits: int, group_size: int, device: torch.device | str = "cpu"):
    """``(levels [2**bits], boundaries [2**bits - 1])``, ascending, for ``group_size``-channel groups."""
    levels, bounds = _codebook_cpu(bits, group_size)
    return levels.to(device), bounds.to(device)


def expected_mse(bits: int, group_size: int) -> float:
    """Mean squared error per coordinate of the codebook under its density (unit-variance coordinates)."""
    levels, bounds = _codebook_cpu(bits, group_size)
    lim = min(math.sqrt(group_size), 12.0)
    t = torch.linspace(-lim, lim, 200_001, dtype=torch.float64)
    w = sphere_coordinate_density(t, group_size)
    w = w / w.sum()
    recon = levels.double()[torch.bucketize(t, bounds.double())]
    return float((w * (t - recon) ** 2).sum())


@dataclass(frozen=True)
class LloydMaxCodec:
    """Per-token Lloyd-Max codes over channel groups.

    Attributes:
        bits: code width, 1..8.
        group_size: channels per group (must divide head_dim; None: the whole head); one fp16 scale per group.
    """

    bits: int = 2
    group_size: int | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size is not None:
            check_positive_int("group_size", self.group_size)
            if self.group_size < 4:
                raise LMCompressError(
                    f"group_size={self.group_size} is too small for Lloyd-Max codes; allowed: >= 4 or None"
                )

    token_block = 1
    row_independent = True

    def group(self, head_dim: int) -> int:
        """Channels per scale for states of ``head_dim`` channels."""
        self.validate(head_dim)
        return head_dim if self.group_size is None else self.group_size

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        b, h, t, d = x.shape
        g = self.group(d)
        return x.reshape(b, h, t, d // g, g)

    def encode(self, x: torch.Tensor, ignore: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``x: [B, H, T, D]`` -> ``codes [B, H, T, packed]`` uint8 and ``scale [B, H, T, D / group_size]`` fp16."""
        if ignore is not None:
            raise LMCompressError("LloydMaxCodec does not take ignore= (no outlier support)")
        check_finite(x)
        xg = self._grouped(x.float())
        g = xg.shape[-1]
        levels, bounds = lloyd_max_codebook(self.bits, g, x.device)
        norm = xg.norm(dim=-1, keepdim=True)
        z = xg * (math.sqrt(g) / norm.clamp_min(1e-30))
        codes = torch.bucketize(z.contiguous(), bounds)
        c = levels[codes]
        scale = (xg * c).sum(-1) / (c * c).sum(-1).clamp_min(1e-30)
        scale = torch.where(norm.squeeze(-1) > 0, scale, torch.zeros_like(scale))
        return {
            "codes": pack_codes(codes.reshape(x.shape).to(torch.uint8), self.bits, 1),
            "scale": scale.to(torch.float16),
        }

    def decode(self, parts: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack_codes(parts["codes"], self.bits, head_dim).long()
        g = self.group(head_dim)
        levels, _ = lloyd_max_codebook(self.bits, g, codes.device)
        b, h, t, d = codes.shape
        x = levels[codes].reshape(b, h, t, d // g, g)
        x = x * parts["scale"].float().unsqueeze(-1)
        return x.reshape(b, h, t, d).to(dtype)

    def validate(self, head_dim: int) -> None:
        if self.group_size is not None and head_dim % self.group_size:
            raise LMCompressError(
                f"group_size={self.group_size} does not divide head_dim={head_dim}; allowed: divisors of {head_dim}"
            )

    @property
    def storage_bits(self) -> int:
        return container_bits(self.bits)

    def bits_per_value(self, head_dim: int, num_heads: int = 1) -> float:
        return packed_size(head_dim, self.bits) * 8 / head_dim + 16 / self.group(head_dim)
