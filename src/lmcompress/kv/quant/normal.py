"""Normal-quantile codebook quantization (QAQ's ``normal`` method).

Each parameter group is standardized with its mean and standard deviation (mean 0 when symmetric); the
standardized value is coded by the bucket of the standard normal distribution it falls in: ``2**bits``
equiprobable buckets with boundaries ``Phi^-1(i / 2**bits)`` and reconstruction values at the bucket centres
``Phi^-1((i + 0.5) / 2**bits)`` (QAQ uses the same centres). Mean and std are stored in fp16, codes packed like
the uniform codec's.

Unlike the uniform codec there is no worst-case bound: values beyond the outermost centres are clipped to them,
so this codec suits bell-shaped groups (large groups: ``head``, ``layer`` or wide ``token`` groups).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import granularity as gr
from .packing import container_bits, packed_size
from .uniform import check_bits, check_finite, pack_codes, unpack_codes


@functools.cache
def _codebook_cpu(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = 1 << bits
    probs = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    centres = torch.special.ndtri(probs).float()
    inner = torch.special.ndtri(torch.arange(1, n, dtype=torch.float64) / n).float()
    return centres, inner


def normal_codebook(bits: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(centres [2**bits], boundaries [2**bits - 1])`` of the standard normal codebook, ascending."""
    centres, inner = _codebook_cpu(bits)
    return centres.to(device), inner.to(device)


@dataclass(frozen=True)
class NormalCodec:
    """Codebook quantization with normal quantiles.

    Attributes:
        bits: code width, 1..8.
        group_size: channels per group (``token``) or tokens per group (``channel``).
        symmetric: assume zero mean (store only the std).
        granularity: ``token``, ``head``, ``layer`` or ``channel``.

    Parts: ``codes`` (packed like :class:`~.uniform.UniformCodec`), ``std`` fp16 and, unless symmetric, ``mean``
    fp16, shaped like the granularity's parameters.
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    granularity: str = "head"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        gr.check_granularity(self.granularity, self.group_size)

    @property
    def token_block(self) -> int:
        return gr.token_block(self.granularity, self.group_size)

    @property
    def row_independent(self) -> bool:
        return self.granularity in ("token", "head")

    def encode(self, x: torch.Tensor, ignore: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        check_finite(x)
        xg = gr.groups(x.float(), self.granularity, self.group_size)
        ig = None if ignore is None else gr.groups(ignore, self.granularity, self.group_size)
        mean, std = gr.masked_mean_std(xg, ig)
        std16 = std.to(torch.float16)
        std16 = torch.where(std16 > 0, std16, torch.ones_like(std16))
        parts = {"std": std16}
        shape = x.shape
        z = x.float()
        if not self.symmetric:
            mean16 = mean.to(torch.float16)
            parts["mean"] = mean16
            z = z - gr.expand(mean16.float(), self.granularity, self.group_size, shape)
        z = z / gr.expand(std16.float(), self.granularity, self.group_size, shape)
        _, bounds = normal_codebook(self.bits, x.device)
        codes = torch.bucketize(z.contiguous(), bounds, right=False)
        parts["codes"] = pack_codes(codes.to(torch.uint8), self.bits, self.token_block)
        return parts

    def decode(self, parts: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack_codes(parts["codes"], self.bits, head_dim).long()
        centres, _ = normal_codebook(self.bits, codes.device)
        shape = codes.shape
        x = centres[codes] * gr.expand(parts["std"].float(), self.granularity, self.group_size, shape)
        if not self.symmetric:
            x = x + gr.expand(parts["mean"].float(), self.granularity, self.group_size, shape)
        return x.to(dtype)

    def validate(self, head_dim: int) -> None:
        gr.check_head_dim(self.granularity, self.group_size, head_dim)

    @property
    def storage_bits(self) -> int:
        return container_bits(self.bits)

    def bits_per_value(self, head_dim: int, num_heads: int = 1) -> float:
        self.validate(head_dim)
        kinds = 1 if self.symmetric else 2
        meta = 16 * kinds * gr.param_count(self.granularity, self.group_size, num_heads, head_dim)
        return packed_size(head_dim, self.bits) * 8 / head_dim + meta
