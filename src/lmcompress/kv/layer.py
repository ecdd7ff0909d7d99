"""One decoder layer's compressed KV storage (a ``transformers`` cache layer).

Storage, oldest tokens first:

* ``store``: a :class:`~lmcompress.kv.quant.store.PackedStore` of quantized tokens (only with a quantizer);
* ``fp_k`` / ``fp_v``: full-precision tokens ``[B, Hkv, m, D]`` — everything without a quantizer, otherwise the
  tokens not yet committed (the last forward's tokens and the quantizer's residual window);
* ``pos``: ``[B, Hkv, n]`` int32 logical positions of the held tokens (only with an eviction policy).

Flow of one forward through a layer: ``update`` appends the new states in full precision and returns a
:class:`KVHandle`; the registered attention function calls :meth:`CompressedLayer.attend`, then
:meth:`CompressedLayer.after_attention`, which evicts (on a prefill chunk, when a policy is set), trims
sliding windows and commits full-precision tokens to packed storage. Evicted and committed tokens are freed:
the buffers are reallocated at their new size.

``get_seq_length`` is the number of tokens *seen* (positions continue from it); the number *held* is smaller
after eviction, and ``get_mask_sizes`` reports it with an offset so transformers builds the right mask.
"""

from __future__ import annotations

import torch

from .._compat import CacheLayerMixin
from ..errors import LMCompressError
from .buffers import TokenBuffer
from .evict.base import EvictionPolicy, ScoreInputs
from .quant.base import KVQuantizer
from .quant.observation import AttentionObservation
from .quant.store import PackedStore
from .reference import attend_blocks

#: tokens per block when attention reads packed storage on the reference path.
REFERENCE_BLOCK_TOKENS = 1024
#: queries per tile on the reference path (bounds the score matrix for long chunks over packed storage).
REFERENCE_QUERY_TILE = 512


class KVHandle:
    """Returned by :meth:`CompressedLayer.update` in place of key/value tensors; the ``lmcompress`` attention
    function reads the layer's storage through it."""

    __slots__ = ("layer", "new_tokens")

    def __init__(self, layer: CompressedLayer, new_tokens: int) -> None:
        self.layer = layer
        self.new_tokens = new_tokens

    @property
    def shape(self) -> tuple[int, ...]:  # informative: [B, Hkv, held, D]
        return self.layer.shape


class CompressedLayer(CacheLayerMixin):
    """Compressed K/V of one attention layer.

    Args:
        layer_idx: index of the decoder layer.
        num_layers: number of decoder layers.
        evict: eviction policy or None.
        quant: KV quantizer or None.
        sliding_window: the model's window for sliding-window layers (None for full attention).
        reserve: spare token slots allocated with the first chunk and after each eviction, so that the tokens
            expected next (question, generated answer) are appended without reallocation. Counted in ``nbytes``.
    """

    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        layer_idx: int,
        num_layers: int,
        evict: EvictionPolicy | None = None,
        quant: KVQuantizer | None = None,
        sliding_window: int | None = None,
        reserve: int = 0,
    ) -> None:
        super().__init__()
        self.reserve = reserve
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        self.evict = None if evict is None or evict.is_noop else evict
        self.quant = quant
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.seen = 0
        self.fp_k: TokenBuffer | None = None
        self.fp_v: TokenBuffer | None = None
        self.store: PackedStore | None = None
        self.pos: TokenBuffer | None = None
        self.compression_enabled = True
        self.eviction_events = 0
        self.hidden_states: torch.Tensor | None = None  # set by scoring hooks
        self._evicted_any = False

    # ------------------------------------------------------------------------------------ cache layer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        if self.quant is not None:
            self.quant.validate(self.head_dim)
            self.store = self.quant.new_store(self.layer_idx, self.head_dim, self.dtype)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, Hkv, q, D]`` states in full precision; returns ``(handle, handle)``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        if self.fp_k is None:
            room = 0 if self.quant is not None else self.reserve
            self.fp_k = TokenBuffer(key_states, headroom=room)
            self.fp_v = TokenBuffer(value_states, headroom=room)
        else:
            self.fp_k.append(key_states)
            self.fp_v.append(value_states)
        if self.evict is not None:
            b, h = key_states.shape[:2]
            new_pos = torch.arange(self.seen, self.seen + q, device=key_states.device, dtype=torch.int32)
            new_pos = new_pos.expand(b, h, q)
            if self.pos is None:
                self.pos = TokenBuffer(new_pos.contiguous(), headroom=self.reserve)
            else:
                self.pos.append(new_pos)
        self.seen += q
        handle = KVHandle(self, q)
        return handle, handle

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.held
        return held + query_length, self.seen - held

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.num_layers, self.evict, self.quant, self.sliding_window, self.reserve)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise LMCompressError("beam search is not supported by CompressedCache; use greedy or sampling")

    # ------------------------------------------------------------------------------------ sizes
    @property
    def fp_length(self) -> int:
        return 0 if self.fp_k is None else self.fp_k.length

    @property
    def packed_length(self) -> int:
        return 0 if self.store is None else self.store.length

    @property
    def held(self) -> int:
        """Tokens held (per head)."""
        return self.packed_length + self.fp_length

    @property
    def shape(self) -> tuple[int, ...]:
        if not self.is_initialized:
            return (0, 0, 0, 0)
        return (self.batch_size, self.num_heads, self.held, self.head_dim)

    def tensors(self) -> list[torch.Tensor]:
        """Every storage tensor this layer holds (for byte accounting and tests)."""
        out = [] if self.store is None else self.store.tensors()
        for buf in (self.fp_k, self.fp_v, self.pos):
            if buf is not None:
                out.append(buf.data)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer's storage: packed codes, scales, zeros, full-precision tokens, positions,
        spare capacity included."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def positions(self) -> torch.Tensor:
        """``[B, Hkv, held]`` logical positions of the held tokens."""
        if self.pos is not None:
            return self.pos.view()
        start = self.seen - self.held
        ar = torch.arange(start, self.seen, device=self.device, dtype=torch.int32)
        return ar.expand(self.batch_size, self.num_heads, self.held)

    # ------------------------------------------------------------------------------------ attention
    def _layout_mask(self, q: int) -> torch.Tensor | None:
        """Mask for queries = the last ``q`` held tokens, when transformers' mask does not fit this layer:
        held past tokens visible (within the sliding window), new tokens causal."""
        if q == 1 and not self.is_sliding:
            return None
        held = self.held
        pos = self.positions()[:, :1]  # [B, 1, held]
        q_pos = pos[:, :, held - q :]  # [B, 1, q]
        mask = pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)  # [B, 1, q, held]
        if self.is_sliding:
            mask &= pos.unsqueeze(-2) > q_pos.unsqueeze(-1) - self.sliding_window
        return mask

    def _fit_mask(self, attention_mask: torch.Tensor | None, q: int) -> torch.Tensor | None:
        """A bool ``[B or 1, 1, q, held]`` mask (True = visible) for this layer, or None when the attention is
        plain causal (``held == q``) or fully visible (one query).

        transformers builds one mask per layer type from the first layer's sizes; it is used as is when it fits
        this layer (it then carries padding too), else the mask is rebuilt from the held tokens' positions.
        """
        held = self.held
        if attention_mask is not None:
            mask = attention_mask
            if mask.dtype != torch.bool:
                mask = mask > torch.finfo(mask.dtype).min / 2
            return mask if mask.shape[-1] == held else self._layout_mask(q)
        if q == 1 or (held == q and not (self.is_sliding and q > self.sliding_window)):
            return None
        return self._layout_mask(q)

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention of ``query: [B, Hq, q, D]`` over the held tokens (the last ``q`` of which are the query's own).

        Returns ``[B, q, Hq, D]`` (the layout transformers' attention functions return).
        """
        q = query.shape[2]
        mask = self._fit_mask(attention_mask, q)
        observe = self.store is not None and self.store.needs_attention
        lse = None
        if self.packed_length == 0:
            keys, values = self.fp_k.view(), self.fp_v.view()
            out = torch.nn.functional.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, is_causal=mask is None and q > 1,
                scale=scaling, enable_gqa=query.shape[1] != keys.shape[1],
            )
        else:
            out = None
            if query.is_cuda and q == 1 and not observe and (mask is None or bool(mask.all())):
                out = self._kernel_attention(query, scaling)
            if out is None:
                out, lse = self._reference_attention(query, mask, scaling, observe)
        if observe:
            self._observe_attention(query, mask, scaling, lse)
        return out.transpose(1, 2).contiguous()

    def _reference_attention(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                             want_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block-wise torch attention over packed + full-precision tokens: ``([B, Hq, q, D], lse or None)``."""
        q = query.shape[2]
        outs, lses = [], []
        for q0 in range(0, q, REFERENCE_QUERY_TILE):
            q1 = min(q, q0 + REFERENCE_QUERY_TILE)
            tile_mask = None if mask is None else mask[:, :, q0:q1]
            res = attend_blocks(query[:, :, q0:q1], self._blocks(tile_mask), scaling, return_lse=want_lse)
            out, lse = res if want_lse else (res, None)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs, dim=2), torch.cat(lses, dim=2) if want_lse else None

    def _kernel_attention(self, query: torch.Tensor, scaling: float) -> torch.Tensor | None:
        """Decode attention on CUDA with the Triton kernel reading packed K/V (None when the storage format has
        no kernel; the reference path then runs)."""
        from .kernels import dispatch

        return dispatch.decode_attention(self.store, self.fp_k.view(), self.fp_v.view(), query, scaling)

    def _blocks(self, mask: torch.Tensor | None):
        packed = self.packed_length
        yield from self.store.attention_blocks(REFERENCE_BLOCK_TOKENS, mask)
        yield self.fp_k.view(), self.fp_v.view(), None if mask is None else mask[..., packed:]

    def _observe_attention(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                           lse: torch.Tensor | None) -> None:
        """Hand attention-aware storage (QAQ) the last query rows of this forward (see ``AttentionObservation``)."""
        q = query.shape[2]
        w = min(q, self.store.attention_rows)
        rows_mask = mask[:, :, -w:] if mask is not None else self._layout_mask(w)
        self.store.observe_attention(AttentionObservation(
            query=query[:, :, -w:], scaling=scaling, mask=rows_mask,
            lse=None if lse is None else lse[:, :, -w:], fp_keys=self.fp_k.view(),
            full=self.evict is not None and self.compression_enabled and q > 1, all_queries=query,
        ))

    # ------------------------------------------------------------------------------------ compression
    def after_attention(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                        module: torch.nn.Module | None = None) -> None:
        """Evict (prefill chunks, when enabled), trim sliding windows, commit to packed storage."""
        q = query.shape[2]
        if self.evict is not None and self.compression_enabled and q > 1:
            if attention_mask is not None and self.held == q and not self.is_sliding:
                mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1
                if not bool(mask[:, :, -1].all()):
                    raise LMCompressError(
                        "eviction does not support padded batches; pass sequences of equal length"
                    )
            self._evict(query, scaling, module)
        if self.is_sliding:
            self._trim_window()
        if self.store is not None:
            self._commit()

    def _all_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.packed_length == 0:
            return self.fp_k.view(), self.fp_v.view()
        pk, pv = self.store.dequantize()
        return torch.cat([pk, self.fp_k.view()], dim=2), torch.cat([pv, self.fp_v.view()], dim=2)

    def _evict(self, query: torch.Tensor, scaling: float, module: torch.nn.Module | None) -> None:
        policy = self.evict
        if policy.needs_hidden_states and self.hidden_states is None:
            raise LMCompressError(
                f"{policy.name} needs the attention inputs; run the model inside "
                "`lmcompress.kv.scoring_hooks(model, cache)` (the pipeline does this)"
            )
        keys, values = self._all_tokens()
        inputs = ScoreInputs(
            keys=keys, values=values, queries=query, positions=self.positions(), scaling=scaling,
            layer_idx=self.layer_idx, num_layers=self.num_layers, module=module,
            hidden_states=self.hidden_states,
        )
        kept = policy.select(inputs)  # [B, Hkv, k] ascending
        self.hidden_states = None
        if kept.shape[-1] == keys.shape[2]:
            return
        self.eviction_events += 1
        self._evicted_any = True
        idx = kept.unsqueeze(-1).expand(*kept.shape, keys.shape[-1])
        new_k, new_v = torch.gather(keys, 2, idx), torch.gather(values, 2, idx)
        new_pos = torch.gather(self.positions(), 2, kept.to(torch.int64))
        if self.store is not None:
            self.store = self.store.emptied(kept)
        room = 0 if self.quant is not None else self.reserve
        self.fp_k.replace(new_k, headroom=room)
        self.fp_v.replace(new_v, headroom=room)
        self.pos.replace(new_pos.to(torch.int32).contiguous(), headroom=self.reserve)

    def _trim_window(self) -> None:
        keep = self.sliding_window - 1
        if self.held <= keep:
            return
        if self.packed_length:
            raise LMCompressError("quantized sliding-window layers are not supported yet (compress_sliding)")
        self.fp_k.truncate_front(keep)
        self.fp_v.truncate_front(keep)
        if self.pos is not None:
            self.pos.truncate_front(keep)

    def _commit(self) -> None:
        """Move full-precision tokens older than the residual window into packed storage."""
        movable = self.fp_length - self.quant.commit_residual
        movable -= movable % self.store.unit
        if movable <= 0:
            return
        fk, fv = self.fp_k.view(), self.fp_v.view()
        self.store.append(fk[:, :, :movable], fv[:, :, :movable])
        rest_k, rest_v = fk[:, :, movable:], fv[:, :, movable:]
        room = max(self.quant.commit_residual, 1)
        self.fp_k.replace(rest_k, headroom=room)
        self.fp_v.replace(rest_v, headroom=room)
