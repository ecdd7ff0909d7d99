"""Keys stored without their pruned channels (ThinK, :mod:`lmcompress.kv.evict.think`).

A segment whose keys were channel-pruned holds, per batch row and KV head, the indices of the ``Dk`` kept
channels (``channels: [B, H, Dk]`` int64, ascending) and, for the pruned tokens, only those channels: the
dropped ``D - Dk`` channels are not stored at all, so ``nbytes`` shows the saving. Tokens appended after the
pruning (decoding steps) are stored whole, as in kvpress.

* :class:`PrunedKeyBuffer` replaces a segment's full-precision key :class:`~lmcompress.kv.buffers.TokenBuffer`:
  ``[B, H, p, Dk]`` pruned tokens (the oldest ``p``), then a ``[B, H, w, D]`` buffer of whole tokens.
* :class:`GatheredKeyCodec` wraps a key codec of a packed store so that it quantizes the kept channels only.

Attention of one query (a decoding step) over full-precision pruned keys gathers the query's kept channels
instead (:meth:`PrunedKeyBuffer.attend_one`: nothing is re-expanded). Other readers get the keys re-expanded
to ``[B, H, n, D]`` with zeros in the dropped channels (:meth:`PrunedKeyBuffer.view`, the store's dequantized
blocks): a transient tensor built for one attention call (a prefill chunk) or one scoring event, never held.
Either way ``q . k`` is kvpress's ``q . k`` over its zeroed keys (up to float rounding).

Token eviction keeps the split "pruned tokens first, then whole tokens" per head. When it would leave the heads
of one segment with different numbers of pruned tokens (an eviction over pruned and whole tokens at once), the
kept whole tokens are pruned too (they lose their dropped channels): in a composed policy this happens only in
a prefill chunk, after which ThinK prunes those tokens anyway.
"""

from __future__ import annotations

import torch

from .buffers import TokenBuffer, gather_tokens


def gather_channels(x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """``x: [B, H, T, D]``, ``channels: [B, H, Dk]`` -> ``[B, H, T, Dk]`` (the kept channels of every token)."""
    b, h, t, _ = x.shape
    return x.gather(-1, channels[:, :, None, :].expand(b, h, t, channels.shape[-1]))


def expand_channels(x: torch.Tensor, channels: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`gather_channels`: ``[B, H, T, Dk]`` -> ``[B, H, T, D]`` with zeros in dropped channels."""
    b, h, t, dk = x.shape
    out = x.new_zeros((b, h, t, head_dim))
    return out.scatter_(-1, channels[:, :, None, :].expand(b, h, t, dk), x)


class PrunedKeyBuffer:
    """Full-precision keys of one segment: ``p`` pruned tokens (kept channels only), then whole tokens.

    Duck-types the parts of :class:`~lmcompress.kv.buffers.TokenBuffer` that a segment uses for its keys.

    Args:
        channels: ``[B, H, Dk]`` int64 kept channel indices (shared with the segment, counted there).
        head_dim: D.
        pruned: ``[B, H, p, Dk]`` kept channels of the oldest ``p`` tokens.
        whole: the newer tokens ``[B, H, w, D]`` or None.
    """

    def __init__(self, channels: torch.Tensor, head_dim: int, pruned: torch.Tensor,
                 whole: TokenBuffer | None = None) -> None:
        self.channels = channels
        self.head_dim = head_dim
        self.pruned = pruned
        self.whole = whole

    @classmethod
    def from_keys(cls, keys: torch.Tensor, channels: torch.Tensor, pruned_count: torch.Tensor | int,
                  headroom: int = 0) -> PrunedKeyBuffer:
        """Hold ``keys: [B, H, m, D]`` of which the oldest ``pruned_count`` (an int, or ``[B, H]`` counts: where
        heads differ, every token is pruned) are stored pruned."""
        m = keys.shape[2]
        if isinstance(pruned_count, torch.Tensor):
            flat = pruned_count.flatten()
            same = flat.numel() == 0 or bool((flat == flat[0]).all())
            pruned_count = int(flat[0]) if same and flat.numel() else m
        pruned = gather_channels(keys[:, :, :pruned_count], channels).contiguous()
        rest = keys[:, :, pruned_count:]
        whole = TokenBuffer(rest.contiguous(), headroom=headroom) if rest.shape[2] or headroom else None
        return cls(channels, head_dim=keys.shape[-1], pruned=pruned, whole=whole)

    # ------------------------------------------------------------------------------------ sizes
    @property
    def pruned_length(self) -> int:
        return self.pruned.shape[2]

    @property
    def length(self) -> int:
        return self.pruned_length + (0 if self.whole is None else self.whole.length)

    @length.setter
    def length(self, value: int) -> None:  # drop_newest: only whole (uncommitted, newest) tokens go
        p = self.pruned_length
        if value < p or (self.whole is None and value != p):
            raise RuntimeError(f"cannot shorten channel-pruned keys to {value} tokens ({p} are pruned)")
        if self.whole is not None:
            self.whole.length = value - p

    def tensors(self) -> list[torch.Tensor]:
        return [self.pruned] + ([] if self.whole is None else [self.whole.data])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # ------------------------------------------------------------------------------------ reads
    def view(self) -> torch.Tensor:
        """``[B, H, length, D]`` keys, zeros in the dropped channels of pruned tokens (a new tensor)."""
        full = expand_channels(self.pruned, self.channels, self.head_dim)
        if self.whole is None or self.whole.length == 0:
            return full
        return torch.cat([full, self.whole.view()], dim=2)

    def attend_one(self, query: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                   scaling: float) -> torch.Tensor:
        """Attention of one query per head over these keys without re-expanding them: the pruned tokens are
        scored with the query's kept channels (gathered per KV head), the whole tokens with all of it.

        Args:
            query: ``[B, Hq, 1, D]`` (``Hq`` a multiple of the KV heads).
            values: ``[B, H, length, D]``.
            mask: bool ``[B or 1, 1 or H, 1, length]`` (True = visible) or None.

        Returns:
            ``[B, Hq, 1, D]``; equal to attention over :meth:`view` up to float rounding.
        """
        b, hq, q, d = query.shape
        h = self.channels.shape[1]
        g = hq // h
        qv = query.reshape(b, h, g, q, d)
        dk = self.channels.shape[-1]
        qk = qv.gather(-1, self.channels[:, :, None, None, :].expand(b, h, g, q, dk))
        scores = [torch.einsum("bhgqd,bhnd->bhgqn", qk, self.pruned)]
        if self.whole is not None and self.whole.length:
            scores.append(torch.einsum("bhgqd,bhnd->bhgqn", qv, self.whole.view()))
        s = torch.cat(scores, dim=-1).float() * scaling  # [B, H, G, q, n]
        if mask is not None:
            s = s.masked_fill(~mask[:, :, None], float("-inf"))
        p = s.softmax(dim=-1).to(values.dtype)
        return torch.einsum("bhgqn,bhnd->bhgqd", p, values).reshape(b, hq, q, values.shape[-1])

    # ------------------------------------------------------------------------------------ writes
    def append(self, x: torch.Tensor) -> None:
        """Append whole ``[B, H, T, D]`` keys."""
        if self.whole is None:
            self.whole = TokenBuffer(x)
        else:
            self.whole.append(x)

    def prune_all(self) -> None:
        """Prune the whole tokens too (ThinK on a later prefill chunk)."""
        if self.whole is None or self.whole.length == 0:
            self.whole = None
            return
        rest = gather_channels(self.whole.view(), self.channels)
        self.pruned = torch.cat([self.pruned, rest], dim=2)
        self.whole = None

    def gather(self, index: torch.Tensor, headroom: int = 0) -> None:
        """Keep tokens ``index: [B, H, k]`` (ascending); frees the rest (see the module note on mixed counts)."""
        index = index.to(torch.int64)
        p = self.pruned_length
        counts = (index < p).sum(dim=-1).flatten()
        if counts.numel() and bool((counts == counts[0]).all()):
            c = int(counts[0])
            self.pruned = gather_tokens(self.pruned, index[..., :c]).contiguous()
            rest = index[..., c:] - p
            if self.whole is not None and (rest.shape[-1] or headroom):
                self.whole = TokenBuffer(gather_tokens(self.whole.view(), rest), headroom=headroom)
            else:
                self.whole = None
            return
        kept = gather_tokens(self.view(), index)
        self.pruned = gather_channels(kept, self.channels).contiguous()
        self.whole = None

    def compact(self, index: torch.Tensor) -> None:
        """As :meth:`gather` (reallocated at the kept size: no capacity is kept for the next tokens)."""
        self.gather(index)

    def drop_front(self, n: int, headroom: int = 0) -> None:
        """Free the oldest ``n`` tokens (they were committed to packed storage)."""
        p = self.pruned_length
        self.pruned = self.pruned[:, :, min(n, p):].contiguous()
        if n > p and self.whole is not None:
            self.whole.drop_front(n - p, headroom)

    def truncate_front(self, keep_last: int) -> None:
        if self.length > keep_last:
            self.drop_front(self.length - keep_last)


class GatheredKeyCodec:
    """A key codec that quantizes only the kept channels ``channels: [B, H, Dk]`` of ``[B, H, T, D]`` keys
    (with ``inner``, a codec of the packed store) and decodes to ``[B, H, T, D]`` with zeros in the dropped
    channels. The store's parts then hold ``Dk`` channels per token."""

    def __init__(self, inner, channels: torch.Tensor) -> None:
        self.inner = inner
        self.channels = channels
        self.token_block = inner.token_block
        self.row_independent = inner.row_independent

    @property
    def kept(self) -> int:
        return self.channels.shape[-1]

    def _for(self, x: torch.Tensor) -> torch.Tensor:
        ch = self.channels
        return ch if ch.shape[:2] == x.shape[:2] else ch.expand(*x.shape[:2], ch.shape[-1])

    def encode(self, x: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        return self.inner.encode(gather_channels(x, self._for(x)), **kwargs)

    def decode(self, parts: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        x = self.inner.decode(parts, self.kept, dtype)
        return expand_channels(x, self._for(x), head_dim)

    def validate(self, head_dim: int) -> None:
        self.inner.validate(self.kept)

    def bits_per_value(self, head_dim: int) -> float:
        return self.inner.bits_per_value(self.kept) * self.kept / head_dim

    def state_tensors(self, head_dim: int, device: torch.device) -> list[torch.Tensor]:
        state = getattr(self.inner, "state_tensors", None)
        return [] if state is None else state(self.kept, device)
