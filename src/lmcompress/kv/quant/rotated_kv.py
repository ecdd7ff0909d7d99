"""Rotation wrapper: any KV quantizer applied to Hadamard-rotated keys and/or values.

``Rotated(base=KIVI(bits=2), keys=False, values=True)`` quantizes values in a randomised Hadamard basis
(KVLinC's value rotation) and leaves KIVI's per-channel keys as they are; ``Rotated(base=IntKV(bits=2))`` is
QuaRot-style rotated INT2. The base's storage (its store class, residual rule, bytes) is unchanged; only its
codecs are wrapped in :class:`~.rotation.RotatedCodec` (``head_dim`` bytes of signs per layer and stream).

Rotating channel-grouped keys (KIVI's per-channel keys) mixes the outlier channels that per-channel scales
absorb, so it usually hurts: the flags exist to measure that. QAQ's mixed-bit store cannot be wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import LMCompressError, check_positive_int
from ...registry import KV_QUANTIZERS
from .base import KVQuantizer
from .rotation import RotatedCodec, check_power_of_two, layer_seed
from .store import PackedStore


@KV_QUANTIZERS.register("rotated")
@dataclass(frozen=True)
class Rotated(KVQuantizer):
    """A KV quantizer in a rotated basis.

    Attributes:
        base: the quantizer to wrap (any registered one except ``qaq`` and another ``rotated``).
        keys, values: which of the two are rotated (at least one).
        seed: seed of the sign vectors (per layer and stream).
    """

    name = "rotated"
    base: KVQuantizer | None = None
    keys: bool = True
    values: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.base, KVQuantizer):
            raise LMCompressError(
                f"base={self.base!r} is not a KV quantizer; allowed: {', '.join(self._allowed_bases())}"
            )
        if self.base.name in ("qaq", "rotated"):
            raise LMCompressError(
                f"base={self.base.name!r} cannot be rotated; allowed: {', '.join(self._allowed_bases())}"
            )
        if not (self.keys or self.values):
            raise LMCompressError("keys=False and values=False rotate nothing; allowed: at least one True")
        check_positive_int("seed", self.seed, allow_zero=True)
        object.__setattr__(self, "residual", self.base.residual)

    @staticmethod
    def _allowed_bases() -> list[str]:
        return [n for n in KV_QUANTIZERS.names() if n not in ("qaq", "rotated")]

    @property
    def commit_residual(self) -> int:
        return self.base.commit_residual

    def key_codec(self, layer_idx: int):
        codec = self.base.key_codec(layer_idx)
        return RotatedCodec(codec, layer_seed(self.seed, layer_idx, 0)) if self.keys else codec

    def value_codec(self, layer_idx: int):
        codec = self.base.value_codec(layer_idx)
        return RotatedCodec(codec, layer_seed(self.seed, layer_idx, 1)) if self.values else codec

    def new_store(self, layer_idx: int, head_dim: int, dtype: torch.dtype) -> PackedStore:
        store = self.base.new_store(layer_idx, head_dim, dtype)
        # the base's store with its codecs swapped for rotated ones: every store method goes through them
        store.key_codec = self.key_codec(layer_idx)
        store.value_codec = self.value_codec(layer_idx)
        return store

    def validate(self, head_dim: int) -> None:
        check_power_of_two(head_dim)
        self.base.validate(head_dim)

    def to_dict(self) -> dict:
        return {"method": self.name, "base": self.base.to_dict(), "keys": self.keys, "values": self.values,
                "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rotated:
        entry = dict(data["base"])
        base_cls = KV_QUANTIZERS.get(entry.pop("method"))
        from_dict = getattr(base_cls, "from_dict", None)
        base = from_dict(entry) if from_dict is not None else base_cls(**entry)
        return cls(base=base, keys=data.get("keys", True), values=data.get("values", True),
                   seed=data.get("seed", 0))
