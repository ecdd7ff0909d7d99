"""Normal-quantile codebook KV quantization (QAQ's ``normal`` method) with fixed bits, separate for keys and
values."""

from __future__ import annotations

from dataclasses import InitVar, dataclass

from ...registry import KV_QUANTIZERS
from .base import KVQuantizer
from .normal import NormalCodec
from .outliers import check_alpha
from .uniform import check_bits
from .uniform_kv import with_outliers


@KV_QUANTIZERS.register("normal")
@dataclass(frozen=True)
class NormalKV(KVQuantizer):
    """Codebook quantization with normal quantiles (see :class:`~.normal.NormalCodec`).

    Attributes:
        key_bits, value_bits: 1..8.
        key_granularity, value_granularity: ``token``, ``head``, ``layer`` or ``channel`` (default ``head``:
            the standardization needs groups large enough to look normal).
        group_size: channels per group (``token``) or tokens per group (``channel``).
        symmetric: assume zero mean.
        outliers: fraction in [0, 0.5) of each token vector kept exactly.
        residual: recent tokens kept in full precision.
        bits: (init only) sets both ``key_bits`` and ``value_bits``.
    """

    name = "normal"
    key_bits: int = 4
    value_bits: int = 4
    key_granularity: str = "head"
    value_granularity: str = "head"
    group_size: int = 32
    symmetric: bool = False
    outliers: float = 0.0
    bits: InitVar[int | None] = None

    def __post_init__(self, bits: int | None) -> None:
        if bits is not None:  # shorthand for key_bits = value_bits = bits (``uniform4`` on the command line)
            check_bits(bits)
            object.__setattr__(self, "key_bits", bits)
            object.__setattr__(self, "value_bits", bits)
        super().__post_init__()
        check_alpha(self.outliers)
        check_bits(self.key_bits, what="key_bits")
        check_bits(self.value_bits, what="value_bits")
        self.key_codec(0)
        self.value_codec(0)

    def key_codec(self, layer_idx: int):
        codec = NormalCodec(self.key_bits, self.group_size, self.symmetric, self.key_granularity)
        return with_outliers(codec, self.outliers)

    def value_codec(self, layer_idx: int):
        codec = NormalCodec(self.value_bits, self.group_size, self.symmetric, self.value_granularity)
        return with_outliers(codec, self.outliers)
