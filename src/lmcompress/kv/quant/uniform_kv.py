"""Configurable uniform KV quantization: separate bits and granularity for keys and values, asymmetric or
symmetric, optional full-precision outliers.

``UniformKV(key_bits=4, value_bits=2, key_granularity="channel", value_granularity="token", group_size=32)`` is
KIVI's layout without its residual rule; ``granularity`` ``head``/``layer`` are QAQ's levels with fixed bits.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass

from ...registry import KV_QUANTIZERS
from .base import KVQuantizer
from .outliers import OutlierCodec, check_alpha
from .uniform import UniformCodec, check_bits


def with_outliers(codec, alpha: float):
    """``codec`` wrapped to keep the top ``alpha`` magnitudes exact (``alpha == 0``: unchanged)."""
    return OutlierCodec(codec, alpha) if alpha else codec


@KV_QUANTIZERS.register("uniform")
@dataclass(frozen=True)
class UniformKV(KVQuantizer):
    """Uniform integer quantization with separate rules for keys and values.

    Attributes:
        key_bits, value_bits: 1..8 (2..8 when symmetric), all packed exactly (3 bits: 8 codes in 3 bytes).
        key_granularity, value_granularity: ``token``, ``head``, ``layer`` or ``channel``.
        group_size: channels per group (``token``; must divide head_dim) or tokens per group (``channel``).
        symmetric: scale only (no zero point).
        outliers: fraction in [0, 0.5) of each token vector kept exactly (largest magnitudes).
        residual: recent tokens kept in full precision.
        bits: (init only) sets both ``key_bits`` and ``value_bits``.
    """

    name = "uniform"
    key_bits: int = 4
    value_bits: int = 4
    key_granularity: str = "token"
    value_granularity: str = "token"
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
        codec = UniformCodec(self.key_bits, self.group_size, self.symmetric, self.key_granularity)
        return with_outliers(codec, self.outliers)

    def value_codec(self, layer_idx: int):
        codec = UniformCodec(self.value_bits, self.group_size, self.symmetric, self.value_granularity)
        return with_outliers(codec, self.outliers)
