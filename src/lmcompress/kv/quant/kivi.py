"""KIVI (Liu et al., 2024): asymmetric 2-/4-bit KV quantization, keys per channel and values per token, with a
full-precision window of recent tokens.

Rules (following the paper and its reference implementation):

* keys: per channel, each channel's min/max over a group of ``group_size`` consecutive tokens (default 32);
* values: per token, channels in groups of ``group_size``;
* asymmetric (scale + zero point, fp16 here), codes packed;
* keys: the newest keys are kept in full precision; when that window holds ``residual`` tokens (R, a multiple
  of ``group_size``, default 128) it is quantized whole and emptied. A prefill of ``n`` tokens quantizes the
  largest multiple of R and keeps the rest in full precision;
* values: the newest R values are kept in full precision (a sliding window: each older value is quantized as
  it leaves it), as in the reference implementation (:class:`~.kivi_store.KIVIStore`).

Deviation: codes are packed along the channel axis of each token for both keys and values (the reference packs
keys along tokens); the bytes are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import LMCompressError, check_positive_int
from ...registry import KV_QUANTIZERS
from .base import KVQuantizer
from .kivi_store import KIVIStore
from .store import PackedStore
from .uniform import UniformCodec, check_bits


@KV_QUANTIZERS.register("kivi")
@dataclass(frozen=True)
class KIVI(KVQuantizer):
    """KIVI KV quantization.

    Attributes:
        bits: 2 or 4 as in the paper (3 and 8 are accepted too).
        group_size: tokens per key group and channels per value group (default 32; must divide head_dim).
        residual: full-precision window R, a multiple of ``group_size`` (default 128).
    """

    name = "kivi"
    residual: int = 128
    bits: int = 2
    group_size: int = 32

    ALLOWED_BITS = (2, 3, 4, 8)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits(self.bits)
        if self.bits not in self.ALLOWED_BITS:
            raise LMCompressError(f"bits={self.bits!r} is not supported by KIVI; allowed: 2, 3, 4, 8")
        check_positive_int("group_size", self.group_size)
        check_positive_int("residual", self.residual)
        if self.residual % self.group_size:
            raise LMCompressError(
                f"residual={self.residual} must be a multiple of group_size={self.group_size} "
                "(the window is flushed in whole key groups)"
            )

    def key_codec(self, layer_idx: int) -> UniformCodec:
        return UniformCodec(self.bits, self.group_size, granularity="channel")

    def value_codec(self, layer_idx: int) -> UniformCodec:
        return UniformCodec(self.bits, self.group_size, granularity="token")

    @property
    def commit_residual(self) -> int:
        return 0

    def new_store(self, layer_idx: int, head_dim: int, dtype: torch.dtype) -> PackedStore:
        return KIVIStore(self.key_codec(layer_idx), self.value_codec(layer_idx), head_dim, dtype,
                         unit=self.residual, value_window=self.residual)

    def validate(self, head_dim: int) -> None:
        self.value_codec(0).validate(head_dim)
