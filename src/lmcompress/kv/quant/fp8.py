"""FP8 (e4m3) storage of cached states, with an optional fp16 scale per parameter group.

``scaled=True``: each group is divided by ``max|x| / 448`` (stored in fp16) before the cast, so the group's
largest magnitude maps to e4m3's largest finite value and small groups keep their resolution; the relative error
of each element is then at most 2**-4 (3 mantissa bits, round to nearest) above e4m3's subnormal range.
``scaled=False``: a plain cast (values beyond ±448 are rejected).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import LMCompressError
from . import granularity as gr
from .uniform import check_finite, fp16_up

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)


@dataclass(frozen=True)
class FP8Codec:
    """e4m3 codes ``[B, H, T, D]`` (``[B, H, T/g, g, D]`` for ``channel``) and, when scaled, fp16 ``scale``."""

    group_size: int = 64
    granularity: str = "token"
    scaled: bool = True

    bits = 8

    def __post_init__(self) -> None:
        gr.check_granularity(self.granularity, self.group_size)

    @property
    def token_block(self) -> int:
        return gr.token_block(self.granularity, self.group_size)

    @property
    def row_independent(self) -> bool:
        return self.granularity in ("token", "head")

    def encode(self, x: torch.Tensor, ignore: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        check_finite(x)
        xf = x.float()
        parts: dict[str, torch.Tensor] = {}
        if self.scaled:
            xg = gr.groups(xf.abs(), self.granularity, self.group_size)
            if ignore is not None:
                xg = xg.masked_fill(gr.groups(ignore, self.granularity, self.group_size), 0.0)
            scale = fp16_up(xg.amax(dim=-1) / E4M3_MAX)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            parts["scale"] = scale
            xf = xf / gr.expand(scale.float(), self.granularity, self.group_size, x.shape)
            xf = xf.clamp(-E4M3_MAX, E4M3_MAX)  # only ignored (outlier) elements can exceed
        elif float(xf.abs().max()) > E4M3_MAX:
            raise LMCompressError(f"unscaled FP8 storage holds |x| <= {E4M3_MAX:g}; use scaled=True")
        codes = xf.to(E4M3)
        if self.token_block > 1:
            b, h, t, d = codes.shape
            codes = codes.reshape(b, h, t // self.token_block, self.token_block, d)
        parts["codes"] = codes
        return parts

    def decode(self, parts: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        codes = parts["codes"]
        if codes.dim() == 5:
            b, h, n, tb, d = codes.shape
            codes = codes.reshape(b, h, n * tb, d)
        x = codes.float()
        if self.scaled:
            x = x * gr.expand(parts["scale"].float(), self.granularity, self.group_size, x.shape)
        return x.to(dtype)

    def validate(self, head_dim: int) -> None:
        gr.check_head_dim(self.granularity, self.group_size, head_dim)

    def bits_per_value(self, head_dim: int, num_heads: int = 1) -> float:
        self.validate(head_dim)
        meta = 16 * gr.param_count(self.granularity, self.group_size, num_heads, head_dim) if self.scaled else 0
        return 8 + meta
