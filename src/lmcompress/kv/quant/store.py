"""Packed storage of quantized keys and values for one layer.

Keys and values are encoded by their own codecs (so key and value rules differ, as in KIVI and QAQ) and kept
packed at rest in growable buffers. Nothing here ever dequantizes the whole cache for attention: readers
iterate over blocks (:meth:`PackedStore.blocks`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..buffers import TokenBuffer, gather_tokens
from .codec import Codec


class PackedStore:
    """Quantized ``[B, H, length, D]`` keys and values, packed.

    Args:
        key_codec, value_codec: codecs for keys and values.
        head_dim: D.
        dtype: the dtype blocks are dequantized to (the model's compute dtype).
        unit: tokens are appended in multiples of this (default: the codecs' token blocks' lcm; KIVI uses its
            residual window so that the window is flushed whole).
    """

    #: whether the layer must hand this store attention statistics (:meth:`observe_attention`); only QAQ.
    needs_attention = False

    def __init__(self, key_codec: Codec, value_codec: Codec, head_dim: int, dtype: torch.dtype,
                 unit: int | None = None) -> None:
        self.key_codec = key_codec
        self.value_codec = value_codec
        self.head_dim = head_dim
        self.dtype = dtype
        blocks = math.lcm(key_codec.token_block, value_codec.token_block)
        if unit is not None and unit % blocks:
            raise ValueError(f"PackedStore unit={unit} must be a multiple of the codecs' token block {blocks}")
        self.unit = unit or blocks
        self._k: dict[str, TokenBuffer] = {}
        self._v: dict[str, TokenBuffer] = {}
        self.length = 0

    # ---------------------------------------------------------------------------------------- writes
    @staticmethod
    def _append_parts(buffers: dict[str, TokenBuffer], parts: dict[str, torch.Tensor]) -> None:
        for name, part in parts.items():
            if name in buffers:
                buffers[name].append(part)
            else:
                buffers[name] = TokenBuffer(part)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize and append ``[B, H, T, D]`` keys and values; ``T`` must be a multiple of :attr:`unit`."""
        t = keys.shape[2]
        if t == 0:
            return
        if t % self.unit:
            raise ValueError(f"PackedStore.append needs a multiple of {self.unit} tokens, got {t}")
        self._append_parts(self._k, self.key_codec.encode(keys))
        self._append_parts(self._v, self.value_codec.encode(values))
        self.length += t

    def clear(self) -> None:
        self._k, self._v, self.length = {}, {}, 0

    def drop_front(self, n: int) -> None:
        """Free the oldest ``n`` tokens (codecs with one token per block only)."""
        if self.unit != 1:
            raise ValueError("drop_front needs codecs that quantize each token on its own")
        keep = self.length - n
        for buf in (*self._k.values(), *self._v.values()):
            buf.truncate_front(keep)
        self.length = keep
        if keep == 0:
            self.clear()

    def emptied(self, kept: torch.Tensor) -> PackedStore:
        """A fresh empty store of the same kind, for a layer that evicted and keeps tokens ``kept: [B, H, k]``
        (indices into the held tokens) to re-commit them. Stores with per-token state carry it over."""
        return PackedStore(self.key_codec, self.value_codec, self.head_dim, self.dtype, self.unit)

    def observe_attention(self, obs) -> None:
        """Attention statistics from the layer (only stores with ``needs_attention`` use them)."""

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keep tokens ``index: [B, H, k]`` (sorted ascending).

        Row-independent codecs gather packed rows exactly. Codecs that group along tokens dequantize the kept
        tokens and re-encode them (an approximation: it adds one more rounding); kept tokens that do not fill a
        whole token block are returned in full precision as ``(keys, values)`` for the caller to hold.
        """
        k = index.shape[-1]
        if self.key_codec.row_independent and self.value_codec.row_independent:
            for buf in (*self._k.values(), *self._v.values()):
                buf.gather(index)
            self.length = k
            return None
        keys, values = self.dequantize()
        self.clear()
        keys, values = gather_tokens(keys, index), gather_tokens(values, index)
        usable = k - k % self.unit
        self.append(keys[:, :, :usable], values[:, :, :usable])
        if usable == k:
            return None
        return keys[:, :, usable:], values[:, :, usable:]

    # ---------------------------------------------------------------------------------------- reads
    def _slice(self, codec: Codec, buffers: dict[str, TokenBuffer], start: int, end: int) -> torch.Tensor:
        tb = codec.token_block
        parts = {name: buf.slice(start // tb, end // tb) for name, buf in buffers.items()}
        return codec.decode(parts, self.head_dim, self.dtype)

    def blocks(self, block_tokens: int) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Yield ``(start, end, keys, values)`` dequantized blocks of about ``block_tokens`` tokens."""
        step = max(self.unit, block_tokens - block_tokens % self.unit)
        for start in range(0, self.length, step):
            end = min(start + step, self.length)
            yield (
                start,
                end,
                self._slice(self.key_codec, self._k, start, end),
                self._slice(self.value_codec, self._v, start, end),
            )

    def attention_blocks(
        self, block_tokens: int, mask: torch.Tensor | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """``(keys, values, mask)`` blocks for :func:`~lmcompress.kv.reference.attend_blocks`; ``mask`` is the
        layer's ``[B or 1, 1, q, held]`` mask (packed tokens first) or None."""
        for start, end, k, v in self.blocks(block_tokens):
            yield k, v, None if mask is None else mask[..., start:end]

    def parts(self, which: str) -> dict[str, torch.Tensor]:
        """The valid packed parts of ``"keys"`` or ``"values"`` (views, for kernels)."""
        codec, buffers = (self.key_codec, self._k) if which == "keys" else (self.value_codec, self._v)
        n = self.length // codec.token_block
        return {name: buf.slice(0, n) for name, buf in buffers.items()}

    def kernel_view(self) -> tuple[dict, dict, int, torch.Tensor | None, torch.Tensor | None]:
        """For the decode kernel: packed key parts, packed value parts, the tokens they cover, and the store's
        other tokens as full-precision ``(keys, values)`` (None here: every token is packed)."""
        return self.parts("keys"), self.parts("values"), self.length, None, None

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All tokens dequantized, ``[B, H, length, D]`` each. Used only at compression events (scoring),
        never for attention."""
        return (
            self._slice(self.key_codec, self._k, 0, self.length),
            self._slice(self.value_codec, self._v, 0, self.length),
        )

    # ---------------------------------------------------------------------------------------- accounting
    def codec_state(self) -> list[torch.Tensor]:
        """Per-layer tensors the codecs hold besides their parts (e.g. a rotation's sign vector), on the
        store's device; counted once the store holds tokens."""
        if not self._k:
            return []
        device = next(iter(self._k.values())).data.device
        out = []
        for codec in (self.key_codec, self.value_codec):
            state = getattr(codec, "state_tensors", None)
            if state is not None:
                out.extend(state(self.head_dim, device))
        return out

    def tensors(self) -> list[torch.Tensor]:
        return [buf.data for buf in (*self._k.values(), *self._v.values())] + self.codec_state()

    @property
    def nbytes(self) -> int:
        return sum(buf.nbytes for buf in (*self._k.values(), *self._v.values())) + sum(
            t.numel() * t.element_size() for t in self.codec_state()
        )

