"""Separate prefill and decoding compression (kvpress's PrefillDecodingPress): one policy compresses the prompt,
a decoding-compression policy the generated tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ...errors import LMCompressError
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, check_wrapper_sizes
from .decoding import DecodingCompression

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer


@EVICTION_METHODS.register("prefill_decoding")
@dataclass(frozen=True)
class PrefillDecoding(EvictionPolicy):
    """``prefill`` compresses prefill chunks (more than one query); ``decoding`` (a
    :class:`~lmcompress.kv.evict.decoding.DecodingCompression`, or the ratio variant) handles decoding steps
    only: its base's own ratio is not applied to the prompt. Either may be None (no compression in that phase).

    Attributes:
        prefill: any policy that compresses prefill chunks, without per-layer state of its own, or None.
        decoding: a decoding-compression policy or None.
    """

    name = "prefill_decoding"
    display = "PrefillDecoding"
    is_scorer = False
    prefill: EvictionPolicy | None = None
    decoding: DecodingCompression | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wrapper_sizes(self)
        if self.prefill is None and self.decoding is None:
            raise LMCompressError("prefill_decoding needs a prefill policy, a decoding policy or both")
        if self.prefill is not None and (not isinstance(self.prefill, EvictionPolicy)
                                         or self.prefill.new_layer_state() is not None):
            raise LMCompressError(f"prefill={self.prefill!r} must be an eviction policy without per-layer state "
                                  "(snapkv, adakv, chunkkv, ...)")
        if self.decoding is not None and not isinstance(self.decoding, DecodingCompression):
            raise LMCompressError(f"decoding={self.decoding!r} must be a decoding or ratio_decoding policy")

    @property
    def is_noop(self) -> bool:
        return self.decoding is None and self.prefill.is_noop

    @property
    def query_window(self) -> int | None:
        return (self.prefill or self.decoding).query_window

    def new_layer_state(self) -> Any:
        return None if self.decoding is None else self.decoding.new_layer_state()

    def observe(self, layer: CompressedLayer, query: torch.Tensor, scaling: float) -> None:
        for p in (self.prefill, self.decoding):
            if p is not None:
                p.observe(layer, query, scaling)

    def after_forward(self, layer: CompressedLayer, query: torch.Tensor, scaling: float,
                      module: torch.nn.Module | None) -> None:
        if query.shape[2] > 1:
            if self.prefill is not None and not self.prefill.is_noop:
                self.prefill.after_forward(layer, query, scaling, module)
        elif self.decoding is not None:
            self.decoding.after_forward(layer, query, scaling, module)
