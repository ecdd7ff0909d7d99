"""Mixed-bit packed storage for QAQ: tokens bucketed by bit width, keys and values bucketed separately.

Layout of one layer's store (held order = append order):

* *final* tokens ``[0, F)``: for keys and for values, one bucket per width (1..8), each a set of packed
  parts ``[B, H, n_w, ...]`` holding its tokens in held order, and a ``uint8 [F]`` width per token (keys and
  values each) from which a token's bucket row is found (its rank among tokens of that width);
* *pending* tokens ``[F, F + P)``: the newest tokens, whose attention window is not complete yet, packed at
  ``max_bits`` with their running window-max attention ``[B, Hkv, P]`` float32.

After each commit, pending tokens that have seen ``attention_window`` query rows get their final widths (QAQ's
rules, :class:`~lmcompress.kv.quant.qaq.QAQ`) and move to the buckets: unchanged when the width is ``max_bits``,
else re-quantized from their ``max_bits`` codes. Attention reads the store block by block in held order (each
block gathered from the buckets), never dequantizing it whole.

Bytes held: every bucket's codes/scales/zeros/outliers, both width arrays, the pending store and its statistics,
and the query-norm estimate (``[B, Hkv]`` float32).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..buffers import TokenBuffer
from .observation import AttentionObservation, lse_over, window_probabilities
from .qaq import QAQ, QUERY_SAMPLE
from .store import PackedStore


class BitBuckets:
    """States of one kind (keys or values) at per-token widths."""

    def __init__(self, method: QAQ, head_dim: int, dtype: torch.dtype) -> None:
        self.method = method
        self.head_dim = head_dim
        self.dtype = dtype
        self.parts: dict[int, dict[str, TokenBuffer]] = {}
        self.widths: TokenBuffer | None = None  # [1, 1, F] uint8
        self.length = 0

    def _append(self, width: int, parts: dict[str, torch.Tensor]) -> None:
        bucket = self.parts.setdefault(width, {})
        for name, part in parts.items():
            if name in bucket:
                bucket[name].append(part)
            else:
                bucket[name] = TokenBuffer(part)

    def append(self, x: torch.Tensor, widths: torch.Tensor, raw: dict[str, torch.Tensor] | None = None) -> None:
        """Append tokens ``x: [B, H, t, D]`` at ``widths: [t]``. Tokens whose width is ``max_bits`` take their
        parts from ``raw`` (already packed at ``max_bits``) when given, so they are not re-quantized."""
        top = self.method.top_width
        for w in sorted(set(widths.tolist())):
            sel = (widths == w).nonzero().squeeze(-1)
            if raw is not None and w >= top:
                parts = {name: part.index_select(2, sel) for name, part in raw.items()}
            else:
                parts = self.method.codec(w).encode(x.index_select(2, sel))
            self._append(w, parts)
        w8 = widths.to(torch.uint8).reshape(1, 1, -1)
        if self.widths is None:
            self.widths = TokenBuffer(w8)
        else:
            self.widths.append(w8)
        self.length += x.shape[2]

    def decode_range(self, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``[start, end)`` dequantized, ``[B, H, end - start, D]``."""
        widths = self.widths.view()[0, 0]
        block = widths[start:end]
        for w, bucket in self.parts.items():
            local = (block == w).nonzero().squeeze(-1)
            if local.numel() == 0:
                continue
            first = int((widths[:start] == w).sum())
            parts = {name: buf.slice(first, first + local.numel()) for name, buf in bucket.items()}
            dec = self.method.codec(w).decode(parts, self.head_dim, self.dtype)
            if out is None:
                out = dec.new_empty((*dec.shape[:2], end - start, self.head_dim))
            out[:, :, local] = dec
        return out

    def tensors(self) -> list[torch.Tensor]:
        out = [buf.data for bucket in self.parts.values() for buf in bucket.values()]
        return out + ([self.widths.data] if self.widths is not None else [])

    def width_counts(self) -> dict[int, int]:
        if self.widths is None:
            return {}
        w = self.widths.view()[0, 0]
        return {int(v): int((w == v).sum()) for v in w.unique()}


class QAQStore:
    """QAQ's store for one layer (the store protocol of :class:`~lmcompress.kv.quant.store.PackedStore`)."""

    needs_attention = True
    unit = 1

    def __init__(self, method: QAQ, head_dim: int, dtype: torch.dtype) -> None:
        self.method = method
        self.head_dim = head_dim
        self.dtype = dtype
        self.attention_rows = method.attention_window
        top = method.codec(method.top_width)
        self.keys = BitBuckets(method, head_dim, dtype)
        self.values = BitBuckets(method, head_dim, dtype)
        self.pending = PackedStore(top, top, head_dim, dtype)
        self.pending_attention: TokenBuffer | None = None  # [B, Hkv, P] float32
        self.query_norm: torch.Tensor | None = None  # [B, Hkv] float32 squared-norm quantile
        self._incoming: torch.Tensor | None = None  # [B, Hkv, n] attention of tokens not yet appended
        self._all_held: torch.Tensor | None = None  # [B, Hkv, held] when an eviction follows

    # ---------------------------------------------------------------------------------------- sizes
    @property
    def final_length(self) -> int:
        return self.keys.length

    @property
    def length(self) -> int:
        return self.final_length + self.pending.length

    def tensors(self) -> list[torch.Tensor]:
        out = self.keys.tensors() + self.values.tensors() + self.pending.tensors()
        if self.pending_attention is not None:
            out.append(self.pending_attention.data)
        if self.query_norm is not None:
            out.append(self.query_norm)
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def width_histogram(self) -> dict[str, dict[int, int]]:
        """Final tokens per width, for keys and values (pending tokens are at ``max_bits``)."""
        return {"keys": self.keys.width_counts(), "values": self.values.width_counts(),
                "pending": {self.method.top_width: self.pending.length}}

    # ---------------------------------------------------------------------------------------- observation
    def _update_query_norm(self, query: torch.Tensor, scaling: float, hkv: int) -> None:
        """Re-estimate the squared-norm quantile from this forward's queries when it has ``QUERY_SAMPLE`` query
        vectors per KV head (or when there is no estimate yet)."""
        b, hq, q, _ = query.shape
        if self.query_norm is not None and q * (hq // hkv) < QUERY_SAMPLE:
            return
        norms = ((query.float() * scaling) ** 2).sum(-1).reshape(b, hkv, -1)  # [B, Hkv, G * q]
        self.query_norm = torch.quantile(norms, self.method.query_quantile, dim=-1)

    def query_sq_norm(self) -> torch.Tensor:
        """``[B, Hkv]`` the ``query_quantile`` quantile of the squared scaled query norms."""
        return self.query_norm

    def observe_attention(self, obs: AttentionObservation) -> None:
        """Record the window-max attention of pending and incoming tokens (and of all held tokens when an
        eviction follows) from the forward's last query rows."""
        self._all_held = None
        hkv = obs.fp_keys.shape[1]
        self._update_query_norm(obs.query if obs.all_queries is None else obs.all_queries, obs.scaling, hkv)
        if obs.lse is None:  # every held token is in full precision
            obs.lse = lse_over(obs, obs.fp_keys)
        packed = self.length
        held = packed + obs.fp_keys.shape[2]
        self._incoming = window_probabilities(obs, obs.fp_keys, slice(packed, held))
        if self.pending.length:
            pk, _ = self.pending.dequantize()
            probs = window_probabilities(obs, pk, slice(self.final_length, packed))
            current = self.pending_attention.view()
            self.pending_attention.replace(torch.maximum(current, probs))
        if obs.full:
            cols = [window_probabilities(obs, self.keys.decode_range(s, e), slice(s, e))
                    for s, e in self._ranges(1024)]
            if self.pending.length:
                cols.append(self.pending_attention.view())
            cols.append(self._incoming)
            self._all_held = torch.cat(cols, dim=2)

    def _ranges(self, block: int) -> Iterator[tuple[int, int]]:
        for s in range(0, self.final_length, block):
            yield s, min(s + block, self.final_length)

    # ---------------------------------------------------------------------------------------- writes
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add the committed tokens ``[B, H, t, D]`` as pending (``max_bits``), then finalize those whose window
        is complete."""
        t = keys.shape[2]
        if t == 0:
            return
        att = self._incoming
        if att is None or att.shape[2] != t:  # no statistics (e.g. re-committed after a head-wise split):
            att = keys.new_ones((keys.shape[0], keys.shape[1], t), dtype=torch.float32)  # assume the most
        self._incoming = None
        self.pending.append(keys, values)
        if self.pending_attention is None:
            self.pending_attention = TokenBuffer(att.contiguous())
        else:
            self.pending_attention.append(att)
        self._finalize()

    def _finalize(self) -> None:
        """Move pending tokens with ``attention_window`` observations to their width buckets."""
        n = self.attention_rows
        held = self.length
        ready = max(0, min(self.pending.length, held - (n - 1) - self.final_length))
        if ready == 0:
            return
        raw_k = {k: v[:, :, :ready] for k, v in self.pending.parts("keys").items()}
        raw_v = {k: v[:, :, :ready] for k, v in self.pending.parts("values").items()}
        pk, pv = self.pending.dequantize()
        pk, pv = pk[:, :, :ready], pv[:, :, :ready]
        att = self.pending_attention.view()[:, :, :ready]
        method = self.method
        if self.query_norm is None:  # no query seen by this store (per-head storage after a split): no rule
            key_w = torch.full((ready,), method.max_bits, dtype=torch.int64, device=pk.device)
        else:
            key_w = method.key_bits(pk, self.query_sq_norm(), held)
        value_w = method.value_bits(pv, att, held)
        self.keys.append(pk, key_w, raw_k)
        self.values.append(pv, value_w, raw_v)
        self.pending.drop_front(ready)
        rest = self.pending_attention.view()[:, :, ready:]
        if rest.shape[2]:
            self.pending_attention.replace(rest.clone())
        else:
            self.pending_attention = None

    def clear(self) -> None:
        self.__init__(self.method, self.head_dim, self.dtype)

    def emptied(self, kept: torch.Tensor) -> QAQStore:
        """A fresh store for the ``kept: [B, Hkv, k]`` tokens an eviction leaves (they are re-committed next):
        their attention is that of the compressing chunk's last rows; the query-norm sample carries over."""
        fresh = QAQStore(self.method, self.head_dim, self.dtype)
        fresh.query_norm = self.query_norm
        if self._all_held is not None:
            fresh._incoming = torch.gather(self._all_held, 2, kept.to(torch.int64))
        self._all_held = None
        return fresh

    # ---------------------------------------------------------------------------------------- reads
    def blocks(self, block_tokens: int) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """``(start, end, keys, values)`` dequantized blocks in held order (final tokens, then pending)."""
        for s, e in self._ranges(block_tokens):
            yield s, e, self.keys.decode_range(s, e), self.values.decode_range(s, e)
        if self.pending.length:
            pk, pv = self.pending.dequantize()
            yield self.final_length, self.length, pk, pv

    def attention_blocks(self, block_tokens: int, mask: torch.Tensor | None):
        for start, end, k, v in self.blocks(block_tokens):
            yield k, v, None if mask is None else mask[..., start:end]

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        ks, vs = [], []
        for _, _, k, v in self.blocks(1 << 30):
            ks.append(k)
            vs.append(v)
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)
