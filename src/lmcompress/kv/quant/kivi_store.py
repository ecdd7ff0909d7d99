"""KIVI's storage: keys packed per channel in whole groups, values packed per token except the newest ``R``.

The layer keeps the newest tokens in full precision and commits them ``R`` (``unit``) at a time, so keys are
quantized when their window is full (KIVI's keys). Values go on in full precision here until ``R`` newer values
exist, then are quantized one token at a time (KIVI's sliding value window): at any time the newest ``R`` values
of the packed region are held in full precision. Held order: tokens ``[0, length)``; values ``[0,
value_packed)`` packed, ``[value_packed, length)`` in the full-precision window.
"""

from __future__ import annotations

import torch

from ..buffers import TokenBuffer
from .codec import Codec
from .store import PackedStore


class KIVIStore(PackedStore):
    """A :class:`PackedStore` whose newest ``value_window`` values stay in full precision.

    Args:
        key_codec, value_codec, head_dim, dtype, unit: as for :class:`PackedStore` (``unit`` = KIVI's ``R``).
        value_window: values kept in full precision (KIVI: ``R``).
    """

    def __init__(self, key_codec: Codec, value_codec: Codec, head_dim: int, dtype: torch.dtype, unit: int,
                 value_window: int) -> None:
        super().__init__(key_codec, value_codec, head_dim, dtype, unit)
        self.value_window = value_window
        self._vfp: TokenBuffer | None = None  # [B, H, <= value_window, D] in the states' dtype
        self.value_packed = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize ``keys`` (a multiple of ``unit`` tokens); queue ``values`` in the window and quantize the
        values that leave it."""
        t = keys.shape[2]
        if t == 0:
            return
        if t % self.unit:
            raise ValueError(f"KIVIStore.append needs a multiple of {self.unit} tokens, got {t}")
        self._append_parts(self._k, self.key_codec.encode(keys))
        self.length += t
        window = values if self._vfp is None else torch.cat([self._vfp.view(), values], dim=2)
        leaving = max(0, window.shape[2] - self.value_window)
        if leaving:
            self._append_parts(self._v, self.value_codec.encode(window[:, :, :leaving]))
            self.value_packed += leaving
        kept = window[:, :, leaving:]
        if self._vfp is None:
            self._vfp = TokenBuffer(kept.contiguous(), headroom=self.value_window - kept.shape[2])
        else:
            self._vfp.replace(kept, headroom=self.value_window - kept.shape[2])

    def clear(self) -> None:
        super().clear()
        self._vfp, self.value_packed = None, 0

    def emptied(self, kept: torch.Tensor) -> KIVIStore:
        return KIVIStore(self.key_codec, self.value_codec, self.head_dim, self.dtype, self.unit,
                         self.value_window)

    # ---------------------------------------------------------------------------------------- reads
    def _values(self, start: int, end: int) -> torch.Tensor:
        vp = self.value_packed
        pieces = []
        if start < vp:
            pieces.append(self._slice(self.value_codec, self._v, start, min(end, vp)))
        if end > vp:
            pieces.append(self._vfp.view()[:, :, max(start, vp) - vp : end - vp].to(self.dtype))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)

    def blocks(self, block_tokens: int):
        step = max(self.unit, block_tokens - block_tokens % self.unit)
        for start in range(0, self.length, step):
            end = min(start + step, self.length)
            yield start, end, self._slice(self.key_codec, self._k, start, end), self._values(start, end)

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.length == 0:
            raise ValueError("empty store")
        return self._slice(self.key_codec, self._k, 0, self.length), self._values(0, self.length)

    def parts(self, which: str) -> dict[str, torch.Tensor]:
        if which == "keys":
            return super().parts("keys")
        return {name: buf.slice(0, self.value_packed) for name, buf in self._v.items()}

    def value_window_view(self) -> torch.Tensor | None:
        """The full-precision values of tokens ``[value_packed, length)``, ``[B, H, length - value_packed, D]``
        (a view), or None before the first append."""
        return None if self._vfp is None else self._vfp.view()

    def kernel_view(self) -> tuple[dict, dict, int, torch.Tensor | None, torch.Tensor | None]:
        """For the decode kernel: packed key parts, packed value parts, the tokens both cover
        (``value_packed``), and the rest of the store as full-precision ``(keys, values)`` (keys dequantized)."""
        vp = self.value_packed
        if vp == self.length:
            return self.parts("keys"), self.parts("values"), vp, None, None
        first = vp - vp % self.key_codec.token_block  # start of the key group holding token vp
        tail_k = self._slice(self.key_codec, self._k, first, self.length)[:, :, vp - first :]
        return self.parts("keys"), self.parts("values"), vp, tail_k, self._vfp.view()

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + ([self._vfp.data] if self._vfp is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
