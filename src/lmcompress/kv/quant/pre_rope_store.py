"""Packed storage of keys *before* RoPE (KVQuant's pre-RoPE key quantization).

Transformers hands the cache post-RoPE keys. On commit this store un-rotates them exactly with the layer's
rotary ``cos``/``sin`` at the tokens' positions (:meth:`~lmcompress.kv.rope.RopeTable.unrotate`'s formula, per
token), quantizes the pre-RoPE keys with its key codec, and when attention (or scoring) reads a block it
dequantizes it and applies RoPE again at the stored positions. Values are stored as in :class:`PackedStore`.

Positions: while every appended token continues the previous one (no eviction), the store keeps only the first
position (a Python int, no tensor); otherwise it holds ``[B, H, n]`` int32 positions, counted in :attr:`nbytes`.
"""

from __future__ import annotations

import torch

from ...errors import LMCompressError
from ..buffers import TokenBuffer
from ..rope import rotate_half
from .codec import Codec
from .store import PackedStore


def _cos_sin(rope, positions: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[b, h, n, r]`` float32 for int ``positions: [b, h, n]``."""
    b, h, n = positions.shape
    cos, sin = rope.cos_sin(positions.reshape(-1), layer_idx, positions.device)
    return cos.reshape(b, h, n, -1), sin.reshape(b, h, n, -1)


def unrotate_keys(rope, keys: torch.Tensor, positions: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """Post-RoPE ``keys: [B, H, T, D]`` at ``positions: [B or 1, H or 1, T]`` -> pre-RoPE keys (float32)."""
    cos, sin = _cos_sin(rope, positions, layer_idx)
    r = cos.shape[-1]
    x = keys.float()
    rot, rest = x[..., :r], x[..., r:]
    back = (rot * cos - rotate_half(rot) * sin) / (cos * cos + sin * sin)
    return torch.cat((back, rest), dim=-1)


def rotate_keys(rope, keys: torch.Tensor, positions: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """Pre-RoPE ``keys: [B, H, T, D]`` -> post-RoPE keys at ``positions`` (float32); inverse of
    :func:`unrotate_keys`."""
    cos, sin = _cos_sin(rope, positions, layer_idx)
    r = cos.shape[-1]
    x = keys.float()
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class PreRopeStore(PackedStore):
    """A :class:`PackedStore` whose key codec sees pre-RoPE keys.

    Args:
        rope: the model's :class:`~lmcompress.kv.rope.RopeTable` (set by the segment through :meth:`bind_rope`
            when not given).
        layer_idx: the decoder layer (Gemma 3's RoPE differs between layers).
    """

    #: the segment passes the committed tokens' positions to :meth:`append`.
    needs_positions = True

    def __init__(self, key_codec: Codec, value_codec: Codec, head_dim: int, dtype: torch.dtype,
                 unit: int | None = None, *, layer_idx: int = 0, rope=None) -> None:
        super().__init__(key_codec, value_codec, head_dim, dtype, unit)
        self.layer_idx = layer_idx
        self.rope = rope
        self._pos_start: int | None = None
        self._pos: TokenBuffer | None = None

    def bind_rope(self, rope) -> None:
        if rope is None or not rope.available:
            raise LMCompressError("pre-RoPE key quantization needs a model with a rotary embedding module "
                                  "(Llama, Mistral, Qwen2/3, Phi-3, Gemma 3); this model has none")
        self.rope = rope

    # ---------------------------------------------------------------------------------------- writes
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Quantize and append post-RoPE ``keys`` and ``values`` ``[B, H, T, D]`` at int ``positions: [B, H, T]``."""
        t = keys.shape[2]
        if t == 0:
            return
        if positions is None:
            raise LMCompressError("pre-RoPE key storage needs the positions of the tokens it stores")
        if self.rope is None:
            raise LMCompressError("pre-RoPE key storage has no rotary table (bind_rope was not called)")
        positions = positions.to(torch.int32)
        pre = unrotate_keys(self.rope, keys, positions, self.layer_idx)
        super().append(pre, values)
        self._record_positions(positions, self.length - t)

    def _record_positions(self, positions: torch.Tensor, old: int) -> None:
        t = positions.shape[2]
        if self._pos is None:
            first = int(positions[0, 0, 0])
            start = first if old == 0 else self._pos_start
            expected = torch.arange(start + old, start + old + t, device=positions.device, dtype=torch.int32)
            if bool((positions == expected).all()):
                self._pos_start = start
                return
            b, h = positions.shape[:2]
            if old:
                earlier = torch.arange(start, start + old, device=positions.device, dtype=torch.int32)
                self._pos = TokenBuffer(earlier.expand(b, h, old).contiguous())
                self._pos.append(positions.expand(b, h, t))
            else:
                self._pos = TokenBuffer(positions.expand(b, h, t).contiguous())
            return
        self._pos.append(positions.expand(*self._pos.view().shape[:2], t))

    def clear(self) -> None:
        super().clear()
        self._pos_start, self._pos = None, None

    def drop_front(self, n: int) -> None:
        raise LMCompressError("pre-RoPE key storage does not support sliding windows (compress_sliding)")

    def emptied(self, kept: torch.Tensor) -> PreRopeStore:
        return PreRopeStore(self.key_codec, self.value_codec, self.head_dim, self.dtype, self.unit,
                            layer_idx=self.layer_idx, rope=self.rope)

    def gather(self, index: torch.Tensor):
        raise LMCompressError("pre-RoPE key storage re-commits kept tokens through the segment; gather is "
                              "not supported")

    # ---------------------------------------------------------------------------------------- reads
    def stored_positions(self, start: int, end: int) -> torch.Tensor:
        """int32 positions of stored tokens ``start:end``: ``[1, 1, n]`` (contiguous) or ``[B, H, n]``."""
        if self._pos is not None:
            return self._pos.view()[:, :, start:end]
        device = next(iter(self._k.values())).data.device
        s = self._pos_start
        return torch.arange(s + start, s + end, device=device, dtype=torch.int32).view(1, 1, -1)

    def _slice(self, codec: Codec, buffers, start: int, end: int) -> torch.Tensor:
        x = super()._slice(codec, buffers, start, end)
        if buffers is not self._k:
            return x
        return rotate_keys(self.rope, x, self.stored_positions(start, end), self.layer_idx).to(self.dtype)

    # ---------------------------------------------------------------------------------------- accounting
    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + ([] if self._pos is None else [self._pos.data])

    @property
    def nbytes(self) -> int:
        return super().nbytes + (0 if self._pos is None else self._pos.nbytes)
