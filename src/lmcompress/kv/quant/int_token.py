"""Plain per-token integer KV quantization (INT8 / INT4 / INT2), asymmetric, stored packed.

Every cached token's key and value vectors are quantized on their own, with one fp16 scale and zero point per
``group_size`` channels. This is the simple baseline that KIVI and QAQ refine.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import LMCompressError
from ...registry import KV_QUANTIZERS
from .base import KVQuantizer
from .uniform import UniformCodec


@KV_QUANTIZERS.register("int")
@dataclass(frozen=True)
class IntKV(KVQuantizer):
    """Per-token asymmetric uniform quantization of keys and values.

    Attributes:
        bits: 2, 4 or 8.
        group_size: channels sharing one scale/zero; must divide head_dim (checked when the cache is built).
        residual: recent tokens kept in full precision (default 0).
    """

    name = "int"
    bits: int = 4
    group_size: int = 64

    ALLOWED_BITS = (2, 4, 8)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in self.ALLOWED_BITS or isinstance(self.bits, bool):
            raise LMCompressError(
                f"bits={self.bits!r} is not supported by int KV quantization; allowed: 2, 4, 8"
            )
        UniformCodec(self.bits, self.group_size)  # validates group_size

    def key_codec(self, layer_idx: int) -> UniformCodec:
        return UniformCodec(self.bits, self.group_size)

    def value_codec(self, layer_idx: int) -> UniformCodec:
        return UniformCodec(self.bits, self.group_size)
