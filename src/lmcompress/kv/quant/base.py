"""Base class of KV-cache quantization methods.

A method is a frozen dataclass that gives each layer a key codec and a value codec (separate rules for keys
and values) and says how many recent tokens stay in full precision (``residual``). Its storage is a
:class:`~lmcompress.kv.quant.store.PackedStore` unless it overrides :meth:`KVQuantizer.new_store`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from ...errors import check_positive_int
from .codec import Codec
from .store import PackedStore


@dataclass(frozen=True)
class KVQuantizer:
    """Base of KV quantization methods.

    Attributes:
        residual: the most recent ``residual`` tokens of each layer are kept in full precision and quantized
            once they leave that window (0: every token is quantized right after the attention that created it).
    """

    name: ClassVar[str] = "base"
    residual: int = 0

    def __post_init__(self) -> None:
        check_positive_int("residual", self.residual, allow_zero=True)

    @property
    def commit_residual(self) -> int:
        """Full-precision tokens the layer keeps after each commit (``residual``, except for methods that flush
        their window whole, like KIVI, where it is 0 and the store's ``unit`` is the window)."""
        return self.residual

    def key_codec(self, layer_idx: int) -> Codec:
        raise NotImplementedError

    def value_codec(self, layer_idx: int) -> Codec:
        raise NotImplementedError

    def new_store(self, layer_idx: int, head_dim: int, dtype: torch.dtype) -> PackedStore:
        key_codec, value_codec = self.key_codec(layer_idx), self.value_codec(layer_idx)
        return PackedStore(key_codec, value_codec, head_dim, dtype)

    def validate(self, head_dim: int) -> None:
        """Raise ``LMCompressError`` if this method cannot store states of ``head_dim`` channels."""
        self.key_codec(0).validate(head_dim)
        self.value_codec(0).validate(head_dim)

    def to_dict(self) -> dict:
        return {"method": self.name, **asdict(self)}
