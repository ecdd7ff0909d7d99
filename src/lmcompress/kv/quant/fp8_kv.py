"""FP8 (e4m3) KV storage, one byte per element plus an fp16 scale per group."""

from __future__ import annotations

from dataclasses import dataclass

from ...registry import KV_QUANTIZERS
from .base import KVQuantizer
from .fp8 import FP8Codec
from .outliers import check_alpha
from .uniform_kv import with_outliers


@KV_QUANTIZERS.register("fp8")
@dataclass(frozen=True)
class FP8KV(KVQuantizer):
    """e4m3 storage of keys and values (see :class:`~.fp8.FP8Codec`).

    Attributes:
        granularity: scale groups, ``token``, ``head``, ``layer`` or ``channel``.
        group_size: channels (``token``) or tokens (``channel``) per scale.
        scaled: store a per-group fp16 scale (False: plain cast, |x| <= 448).
        outliers: fraction in [0, 0.5) of each token vector kept exactly.
        residual: recent tokens kept in full precision.
    """

    name = "fp8"
    granularity: str = "token"
    group_size: int = 32
    scaled: bool = True
    outliers: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha(self.outliers)
        self.key_codec(0)

    def key_codec(self, layer_idx: int):
        return with_outliers(FP8Codec(self.group_size, self.granularity, self.scaled), self.outliers)

    def value_codec(self, layer_idx: int):
        return self.key_codec(layer_idx)
