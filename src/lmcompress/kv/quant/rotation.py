"""Randomised Hadamard rotations of cached states, and a codec wrapper that quantizes in the rotated basis.

A rotation ``R = diag(s) H / sqrt(D)`` (``H`` the Sylvester Hadamard matrix of order ``D``, ``s`` a seeded vector
of random signs) is orthogonal, so ``(q R) . (k R) = q . k``: quantizing ``k R`` instead of ``k`` changes only
the basis the rounding error lives in. A rotation spreads a vector's energy evenly over its channels (outlier
channels are mixed into all others), and for a random rotation the coordinates of ``x / |x|`` follow the
distribution of one coordinate of a uniformly random unit vector, which :mod:`.lloyd_max` quantizes optimally
(TurboQuant, Zandieh et al., 2025; QuaRot / KVLinC use the same Hadamard rotation of values).

``R`` is never materialised: ``x R = fwht(x * s) / sqrt(D)`` with the fast Walsh-Hadamard transform (``log2 D``
butterfly passes), and ``y R^T = fwht(y) / sqrt(D) * s``. The per-layer state is the sign vector ``s`` (``D``
bytes as int8), which :class:`RotatedCodec` reports in ``state_tensors`` so ``cache.nbytes`` counts it.
``D`` must be a power of two (64, 128, 256: every head size of the supported models).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import LMCompressError


def check_power_of_two(dim: int, what: str = "head_dim") -> None:
    if dim < 1 or dim & (dim - 1):
        raise LMCompressError(
            f"{what}={dim} cannot be Hadamard-rotated; allowed: powers of two (64, 128, 256, ...)"
        )


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform over the last dim: ``x [..., D] -> x @ H`` (``D`` a power of 2).

    Computed in the input's dtype (callers pass float32)."""
    d = x.shape[-1]
    check_power_of_two(d)
    lead = x.shape[:-1]
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.reshape(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, d)


@functools.cache
def _signs_cpu(dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int8) * 2 - 1).to(torch.int8)


def rotation_signs(dim: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The seeded sign vector ``s: [dim]`` (int8, +-1) of the rotation."""
    check_power_of_two(dim)
    return _signs_cpu(dim, seed).to(device)


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x [..., D] -> x R`` in float32, ``R = diag(signs) H / sqrt(D)``."""
    d = x.shape[-1]
    return fwht(x.float() * signs.float()) / math.sqrt(d)


def unrotate(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``y [..., D] -> y R^T`` in float32 (the inverse of :func:`rotate`)."""
    d = y.shape[-1]
    return fwht(y.float()) / math.sqrt(d) * signs.float()


def layer_seed(seed: int, layer_idx: int, stream: int) -> int:
    """Distinct, reproducible seeds per layer and per stream (0: keys, 1: values)."""
    return (seed * 1_000_003 + layer_idx * 2 + stream) % (2**63 - 1)


@dataclass(frozen=True)
class RotatedCodec:
    """Any codec applied in a randomised Hadamard basis.

    ``encode(x) = inner.encode(x R)``, ``decode(parts) = inner.decode(parts) R^T``: attention over decoded blocks
    sees the original basis, so every reader of the store works unchanged. The inner codec's parts are stored
    as they are (same bytes); the sign vector adds ``head_dim`` bytes per layer (``state_tensors``).

    Attributes:
        inner: the codec used in the rotated basis (uniform, normal, Lloyd-Max, outliers, ...).
        seed: seed of the sign vector (one per layer and stream, see :func:`layer_seed`).
    """

    inner: Any
    seed: int = 0

    @property
    def token_block(self) -> int:
        return self.inner.token_block

    @property
    def row_independent(self) -> bool:
        return self.inner.row_independent

    def _signs(self, dim: int, device: torch.device) -> torch.Tensor:
        return rotation_signs(dim, self.seed, device)

    def encode(self, x: torch.Tensor, ignore: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``x: [B, H, T, D]`` -> the inner codec's parts of ``x R`` (``ignore`` is not supported: outliers
        of the rotated states are chosen by an inner outlier codec)."""
        if ignore is not None:
            raise LMCompressError("RotatedCodec does not take ignore=; wrap the outlier codec inside it instead")
        return self.inner.encode(rotate(x, self._signs(x.shape[-1], x.device)))

    def decode(self, parts: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        y = self.inner.decode(parts, head_dim, torch.float32)
        return unrotate(y, self._signs(head_dim, y.device)).to(dtype)

    def validate(self, head_dim: int) -> None:
        check_power_of_two(head_dim)
        self.inner.validate(head_dim)

    def bits_per_value(self, head_dim: int, num_heads: int = 1) -> float:
        return self.inner.bits_per_value(head_dim, num_heads)

    def state_tensors(self, head_dim: int, device: torch.device) -> list[torch.Tensor]:
        """Per-layer state this codec holds besides its parts: the int8 sign vector ``[head_dim]``."""
        return [self._signs(head_dim, device)]
