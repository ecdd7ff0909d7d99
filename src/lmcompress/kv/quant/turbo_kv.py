"""TurboQuant-style KV quantization: a randomised Hadamard rotation per layer, then Lloyd-Max scalar codes.

Rule (Zandieh et al., 2025, "TurboQuant", its MSE-optimal variant): each key/value vector of a head is rotated by
``R = diag(s) H / sqrt(D)`` (:mod:`.rotation`; seeded signs, one vector per layer and for keys and values each),
split into groups of ``group_size`` channels, and each group coded with the ``bits``-bit Lloyd-Max codebook of the
rotated coordinates' distribution (:mod:`.lloyd_max`) times one fp16 scale. Attention dequantizes blocks and
rotates them back, so dot products are those of the dequantized vectors in the original basis.

Deviations from the paper: the per-group scale is refitted by least squares for the chosen codes (the paper
stores the norm); the optional 1-bit QJL residual of keys (TurboQuant's inner-product variant) is not
implemented; recent tokens may be kept in full precision (``residual``), as KIVI does, which the paper does not.
Storage: ``bits`` per element + 16 / ``group_size`` bits of scale, plus ``head_dim`` bytes of signs per layer.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass

from ...errors import check_positive_int
from ...registry import KV_QUANTIZERS
from .base import KVQuantizer
from .lloyd_max import LloydMaxCodec
from .rotation import RotatedCodec, check_power_of_two, layer_seed
from .uniform import check_bits


@KV_QUANTIZERS.register("turbo")
@dataclass(frozen=True)
class TurboKV(KVQuantizer):
    """Rotated Lloyd-Max KV quantization (``turbo2`` = 2-bit keys and values).

    Attributes:
        key_bits, value_bits: code widths 1..8.
        group_size: channels per scale (must divide head_dim; None: one scale per head vector); head_dim must
            be a power of two.
        seed: seed of the rotations' sign vectors.
        residual: recent tokens kept in full precision (quantized as they leave the window).
        bits: (init only) sets both widths.
    """

    name = "turbo"
    key_bits: int = 2
    value_bits: int = 2
    group_size: int | None = None
    seed: int = 0
    residual: int = 0
    bits: InitVar[int | None] = None

    def __post_init__(self, bits: int | None) -> None:
        if bits is not None:
            check_bits(bits)
            object.__setattr__(self, "key_bits", bits)
            object.__setattr__(self, "value_bits", bits)
        super().__post_init__()
        check_bits(self.key_bits, what="key_bits")
        check_bits(self.value_bits, what="value_bits")
        check_positive_int("seed", self.seed, allow_zero=True)
        self.key_codec(0)

    def key_codec(self, layer_idx: int) -> RotatedCodec:
        return RotatedCodec(LloydMaxCodec(self.key_bits, self.group_size), layer_seed(self.seed, layer_idx, 0))

    def value_codec(self, layer_idx: int) -> RotatedCodec:
        return RotatedCodec(LloydMaxCodec(self.value_bits, self.group_size), layer_seed(self.seed, layer_idx, 1))

    def validate(self, head_dim: int) -> None:
        check_power_of_two(head_dim)
        super().validate(head_dim)
