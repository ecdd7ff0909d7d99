"""One decoder layer's compressed KV storage (a ``transformers`` cache layer).

The tokens live in :class:`~lmcompress.kv.segment.KVSegment` objects: one for all ``[B, Hkv]`` heads while every
head holds the same tokens (the *uniform* layout), or one per batch row and KV head once a head-wise eviction
(AdaKV, threshold eviction) left heads with different lengths (the *ragged* layout). Each segment is sized to
what it holds, so evicted entries are freed for real in both layouts.

Flow of one forward through a layer: ``update`` appends the new states in full precision and returns a
:class:`KVHandle`; the registered attention function calls :meth:`CompressedLayer.attend`, then
:meth:`CompressedLayer.after_attention`, which lets the eviction policy observe the step (H2O accumulates
attention) and compress (``policy.after_forward``: prefill chunks for most policies, decoding steps for CAKE,
decoding compression and threshold eviction), trims sliding windows and commits full-precision tokens to
packed storage.

``get_seq_length`` is the number of tokens *seen* (positions continue from it); the number *held* is smaller
after eviction, and ``get_mask_sizes`` reports it with an offset so transformers builds the right mask. In the
ragged layout ``held`` is the longest head and :meth:`CompressedLayer.held_per_head` gives every head's count.
"""

from __future__ import annotations

from typing import Any

import torch

from .._compat import CacheLayerMixin
from ..errors import LMCompressError
from .buffers import TokenBuffer
from .evict.base import EvictionPolicy, ScoreInputs
from .quant.base import KVQuantizer
from .segment import REFERENCE_BLOCK_TOKENS, REFERENCE_QUERY_TILE, KVSegment
from .static import StaticSlots

__all__ = ["REFERENCE_BLOCK_TOKENS", "REFERENCE_QUERY_TILE", "CompressedLayer", "KVHandle"]


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
        reserve: spare token slots allocated with the first chunk and after each eviction (per head in the
            ragged layout), so that the tokens expected next are appended without reallocation. Counted in
            ``nbytes``.
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
        self.segments: list[KVSegment] = []
        self.ragged = False
        self.compression_enabled = True
        self.eviction_events = 0
        self.hidden_states: torch.Tensor | None = None  # set by scoring hooks
        #: per-layer mutable state of the eviction policy (step counters, query buffers), or None.
        self.evict_state: Any = None if self.evict is None else self.evict.new_layer_state()
        #: cache-level state shared by the layers of one policy (CAKE's budgets), set by the cache.
        self.shared: Any = None
        #: the model's rotary embedding as a :class:`~lmcompress.kv.rope.RopeTable`, set by the cache.
        self.rope: Any = None
        self._inputs_cache: tuple[int, ScoreInputs] | None = None
        #: fixed-shape decode storage while the cache is in static mode (see kv/static.py), else None.
        self.static: StaticSlots | None = None
        #: ``fn(layer, query, attention_mask, scaling, module)`` called before each compression step, or None
        #: (the shared-prefill recorder, :mod:`lmcompress.eval.shared_prefill`).
        self.recorder: Any = None

    # ------------------------------------------------------------------------------------ cache layer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        if self.quant is not None:
            self.quant.validate(self.head_dim)
        self.segments = [self._new_segment()]
        self.is_initialized = True

    def _new_segment(self) -> KVSegment:
        evicts = self.evict is not None and getattr(self.evict, "evicts_tokens", True)  # not ThinK alone
        return KVSegment(self.quant, self.layer_idx, self.head_dim, self.dtype,
                         track_positions=evicts, reserve=self.reserve, rope=self.rope)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, Hkv, q, D]`` states in full precision; returns ``(handle, handle)``."""
        if self.static is not None:  # device-side only: capturable in a CUDA graph
            self.static.write(key_states, value_states)
            handle = KVHandle(self, 1)
            return handle, handle
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        pos = torch.arange(self.seen, self.seen + q, device=key_states.device, dtype=torch.int32)
        if self.ragged:
            for i, seg in enumerate(self.segments):
                bi, hi = divmod(i, h)
                seg.append(key_states[bi : bi + 1, hi : hi + 1], value_states[bi : bi + 1, hi : hi + 1],
                           pos.expand(1, 1, q), last_position=self.seen + q - 1)
        else:
            self.segments[0].append(key_states, value_states, pos.expand(b, h, q), last_position=self.seen + q - 1)
        self.seen += q
        self._inputs_cache = None
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
        shared, rope = self.shared, self.rope
        self.__init__(self.layer_idx, self.num_layers, self.evict, self.quant, self.sliding_window, self.reserve)
        self.shared, self.rope = shared, rope

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise LMCompressError("beam search is not supported by CompressedCache; use greedy or sampling")

    # ------------------------------------------------------------------------------------ sizes
    @property
    def _uniform(self) -> KVSegment | None:
        return None if self.ragged or not self.segments else self.segments[0]

    @property
    def fp_k(self) -> TokenBuffer | None:
        seg = self._uniform
        return None if seg is None else seg.fp_k

    @property
    def fp_v(self) -> TokenBuffer | None:
        seg = self._uniform
        return None if seg is None else seg.fp_v

    @property
    def store(self):
        seg = self._uniform
        return None if seg is None else seg.store

    @property
    def pos(self) -> TokenBuffer | None:
        seg = self._uniform
        return None if seg is None else seg.pos

    @property
    def fp_length(self) -> int:
        return max((s.fp_length for s in self.segments), default=0)

    @property
    def packed_length(self) -> int:
        return max((s.packed_length for s in self.segments), default=0)

    @property
    def held(self) -> int:
        """Tokens held per head (the longest head in the ragged layout; the slot count in static mode)."""
        if self.static is not None:
            return self.static.capacity
        return max((s.held for s in self.segments), default=0)

    def held_per_head(self) -> torch.Tensor:
        """``[B, Hkv]`` int64 tokens held by every batch row and KV head."""
        if not self.is_initialized:
            return torch.zeros(0, 0, dtype=torch.int64)
        if not self.ragged:
            return torch.full((self.batch_size, self.num_heads), self.segments[0].held, dtype=torch.int64)
        counts = torch.tensor([s.held for s in self.segments], dtype=torch.int64)
        return counts.view(self.batch_size, self.num_heads)

    @property
    def shape(self) -> tuple[int, ...]:
        if not self.is_initialized:
            return (0, 0, 0, 0)
        return (self.batch_size, self.num_heads, self.held, self.head_dim)

    def tensors(self) -> list[torch.Tensor]:
        """Every storage tensor this layer holds (for byte accounting and tests): tokens, metadata, positions,
        per-token policy values and the policy's per-layer buffers."""
        out = [t for seg in self.segments for t in seg.tensors()]
        state_tensors = getattr(self.evict_state, "tensors", None)
        if state_tensors is not None:
            out.extend(state_tensors())
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer's storage: packed codes, scales, zeros, full-precision tokens, positions,
        policy buffers and spare capacity included."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def positions(self) -> torch.Tensor:
        """``[B, Hkv, held]`` logical positions of the held tokens (ragged: left-padded with -1)."""
        if not self.ragged:
            return self.segments[0].positions(self.batch_size, self.num_heads, self.device)
        return self._padded(lambda s: s.positions(1, 1, self.device), fill=-1, dtype=torch.int32)

    def _padded(self, get, fill: float, dtype: torch.dtype, trailing: tuple[int, ...] = ()) -> torch.Tensor:
        """Stack per-head tensors ``[1, 1, n_bh, *trailing]`` into ``[B, Hkv, n, *trailing]``, left-padded."""
        n = self.held
        out = torch.full((self.batch_size, self.num_heads, n, *trailing), fill, dtype=dtype, device=self.device)
        for i, seg in enumerate(self.segments):
            b, h = divmod(i, self.num_heads)
            m = seg.held
            if m:
                out[b, h, n - m :] = get(seg)[0, 0]
        return out

    # ------------------------------------------------------------------------------------ attention
    def _layout_mask(self, pos: torch.Tensor, q: int) -> torch.Tensor | None:
        """Mask for queries = the last ``q`` of the tokens at ``pos: [B, 1, held]``: held past tokens visible
        (within the sliding window), new tokens causal."""
        if q == 1 and not self.is_sliding:
            return None
        held = pos.shape[-1]
        q_pos = pos[:, :, held - q :]  # [B, 1, q]
        mask = pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)  # [B, 1, q, held]
        if self.is_sliding:
            mask &= pos.unsqueeze(-2) > q_pos.unsqueeze(-1) - self.sliding_window
        return mask

    def _fit_mask(self, attention_mask: torch.Tensor | None, q: int) -> torch.Tensor | None:
        """A bool ``[B or 1, 1, q, held]`` mask (True = visible) for the uniform layout, or None when the
        attention is plain causal (``held == q``) or fully visible (one query).

        transformers builds one mask per layer type from the first layer's sizes; it is used as is when it fits
        this layer (it then carries padding too), else the mask is rebuilt from the held tokens' positions.
        """
        held = self.held
        if attention_mask is not None:
            mask = attention_mask
            if mask.dtype != torch.bool:
                mask = mask > torch.finfo(mask.dtype).min / 2
            return mask if mask.shape[-1] == held else self._layout_mask(self.positions()[:, :1], q)
        if q == 1 or (held == q and not (self.is_sliding and q > self.sliding_window)):
            return None
        return self._layout_mask(self.positions()[:, :1], q)

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention of ``query: [B, Hq, q, D]`` over the held tokens (the last ``q`` of which are the query's own).

        Returns ``[B, q, Hq, D]`` (the layout transformers' attention functions return).
        """
        q = query.shape[2]
        if self.static is not None:
            return self.static.attend(query, scaling).transpose(1, 2).contiguous()
        evicting = self.evict is not None and self.compression_enabled  # (only attention-aware stores care)
        visibility = getattr(self.evict, "visibility", None)
        policy_mask = None if visibility is None else visibility(self, q)  # [B, Hkv, q, held] (DMS)
        if not self.ragged:
            mask = self._fit_mask(attention_mask, q)
            if policy_mask is not None:
                base = mask if mask is not None else self._layout_mask(self.positions()[:, :1], q)
                mask = policy_mask if base is None else base & policy_mask
            out = self.segments[0].attend(query, mask, scaling, causal=q > 1, evicting=evicting)
            return out.transpose(1, 2).contiguous()
        groups = query.shape[1] // self.num_heads
        out = torch.empty_like(query)
        for i, seg in enumerate(self.segments):
            b, h = divmod(i, self.num_heads)
            qs = query[b : b + 1, h * groups : (h + 1) * groups]
            mask = None
            if q > 1 or self.is_sliding:
                mask = self._layout_mask(seg.positions(1, 1, self.device), q)
            if policy_mask is not None:
                part = policy_mask[b : b + 1, h : h + 1, :, policy_mask.shape[-1] - seg.held :]
                mask = part if mask is None else mask & part
            out[b : b + 1, h * groups : (h + 1) * groups] = seg.attend(qs, mask, scaling, causal=False,
                                                                       evicting=evicting)
        return out.transpose(1, 2).contiguous()

    # ------------------------------------------------------------------------------------ compression
    def after_attention(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                        module: torch.nn.Module | None = None) -> None:
        """Let the policy observe and compress, trim sliding windows, commit to packed storage."""
        if self.static is not None:
            return
        if self.recorder is not None:
            self.recorder(self, query, attention_mask, scaling, module)
        q = query.shape[2]
        if self.evict is not None:
            if q > 1 and attention_mask is not None and self.held == q and not self.is_sliding:
                mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1
                if not bool(mask[:, :, -1].all()):
                    raise LMCompressError(
                        "eviction does not support padded batches; pass sequences of equal length"
                    )
            self.evict.observe(self, query, scaling)
            if self.compression_enabled:
                self.evict.after_forward(self, query, scaling, module)
            self.hidden_states = None
        elif self.quant is not None and q > 1 and attention_mask is not None and not self.is_sliding \
                and not self.ragged and self.held == q:
            self._drop_padding(attention_mask)
        if self.is_sliding:
            for seg in self.segments:
                seg.trim_front(self.sliding_window - 1)
            self._inputs_cache = None
        for seg in self.segments:
            seg.commit()

    def _drop_padding(self, attention_mask: torch.Tensor) -> None:
        """Free the pad tokens of a padded first chunk before anything is quantized.

        ``attention_mask``: the ``[B or 1, 1, q, q]`` mask of the chunk (bool, True = visible, or additive). The
        tokens the last query cannot see are padding (left padding). Without them every row is stored as it
        would be alone: quantization groups (KIVI's per-channel key groups, per-token groups) and the
        full-precision residual window start at the row's first real token. Rows with different pad counts
        switch the layer to the ragged layout (one segment per row and head).
        """
        mask = attention_mask if attention_mask.dtype == torch.bool else \
            attention_mask > torch.finfo(attention_mask.dtype).min / 2
        if mask.shape[0] != self.batch_size or mask.shape[-1] != self.held:
            return
        real = mask[:, 0, -1, :]  # [B, q]
        if bool(real.all()):
            return
        self.keep(real.unsqueeze(1).expand(self.batch_size, self.num_heads, -1))

    def score_inputs(self, query: torch.Tensor, scaling: float, module: torch.nn.Module | None = None
                     ) -> ScoreInputs:
        """What a policy scores: every held token of this layer (dequantized when packed; left-padded with a
        ``valid`` mask in the ragged layout) and ``query``, the queries of the last ``query.shape[2]`` tokens.

        Cached until the storage changes, so a policy's ``observe`` and ``after_forward`` share one build.
        """
        key = id(query)
        if self._inputs_cache is not None and self._inputs_cache[0] == key:
            return self._inputs_cache[1]
        policy = self.evict
        if policy is not None and policy.needs_hidden_states and self.hidden_states is None:
            raise LMCompressError(
                f"{policy.name} needs the attention inputs; run the model inside "
                "`lmcompress.kv.scoring_hooks(model, cache)` (the pipeline does this)"
            )
        if not self.ragged:
            seg = self.segments[0]
            keys, values = seg.all_tokens()
            positions = self.positions()
            aux = {name: buf.view() for name, buf in seg.aux.items()}
            valid = None
        else:
            d = self.head_dim
            keys = self._padded(lambda s: s.all_tokens()[0], 0.0, self.dtype, (d,))
            values = self._padded(lambda s: s.all_tokens()[1], 0.0, self.dtype, (d,))
            positions = self.positions()
            valid = positions >= 0
            names = {name for s in self.segments for name in s.aux}
            aux = {name: self._padded(lambda s, nm=name: s.aux_view(nm), 0.0, torch.float32) for name in names}
        inputs = ScoreInputs(
            keys=keys, values=values, queries=query, positions=positions, scaling=scaling,
            layer_idx=self.layer_idx, num_layers=self.num_layers, module=module,
            hidden_states=self.hidden_states, valid=valid, aux=aux, seen=self.seen, rope=self.rope,
        )
        self._inputs_cache = (key, inputs)
        return inputs

    def keep_uniform(self, index: torch.Tensor) -> None:
        """Keep the tokens ``index: [B, Hkv, k]`` (ascending, the same ``k < held`` for every head) of a uniform
        layer: what :meth:`keep` does with such indices, without its checks that read device values on the host
        (the prefill path of windowed scorers, so that a layer's compression does not stall the next layer)."""
        if self.ragged:
            raise LMCompressError("keep_uniform needs a uniform layer (every head the same tokens); use keep()")
        self.eviction_events += 1
        self._inputs_cache = None
        self.segments[0].keep(index)
        for seg in self.segments:
            seg.commit()

    def keep(self, kept: torch.Tensor, in_place: bool = False) -> None:
        """Keep only ``kept`` tokens and free the rest.

        Args:
            kept: either ascending indices ``[B, Hkv, k]`` or a bool mask ``[B, Hkv, n]``, both in the layout of
                :meth:`score_inputs` (``n`` = :attr:`held`; ragged rows are left-padded, padding is never kept).
                Different counts per head switch the layer to the ragged layout.
            in_place: keep the buffers' capacity for the tokens that follow instead of reallocating (for
                eviction during decoding); the spare slots stay counted in ``nbytes``.
        """
        b, h, n = self.batch_size, self.num_heads, self.held
        if kept.dtype == torch.bool:
            mask = kept
        else:
            mask = torch.zeros((b, h, n), dtype=torch.bool, device=kept.device)
            mask.scatter_(-1, kept.to(torch.int64), True)
        if self.ragged:
            mask = mask & (self.positions() >= 0)
        counts = mask.sum(dim=-1)
        if bool((counts == self.held_per_head().to(counts.device)).all()):
            return
        self.eviction_events += 1
        self._inputs_cache = None
        if not self.ragged and bool((counts == counts.flatten()[0]).all()):
            k = int(counts.flatten()[0])
            index = mask.nonzero()[:, 2].view(b, h, k)
            self.segments[0].keep(index, in_place)
        elif not self.ragged:
            lists = [[mask[bi, hi].nonzero().squeeze(-1) for hi in range(h)] for bi in range(b)]
            self.segments = self.segments[0].split(lists)
            self.ragged = True
        else:
            for i, seg in enumerate(self.segments):
                bi, hi = divmod(i, h)
                pad = n - seg.held
                idx = mask[bi, hi].nonzero().squeeze(-1) - pad
                if idx.numel() != seg.held:
                    seg.keep(idx.view(1, 1, -1), in_place)
        for seg in self.segments:  # kept packed tokens come back in full precision: store them packed again
            seg.commit()

    def drop_newest(self, q: int) -> None:
        """Forget the newest ``q`` tokens of every head (not yet committed), as if they had never been fed:
        ``seen`` goes back by ``q`` (KVzip's repeat prompt is scored and then dropped this way)."""
        for seg in self.segments:
            seg.drop_newest(q)
        self.seen -= q
        self._inputs_cache = None

    def rewrite_keys(self, keys: torch.Tensor, positions: torch.Tensor) -> None:
        """Uniform layout only: replace every held key by ``keys: [B, Hkv, held, D]`` and the positions by
        ``positions: [B, Hkv, held]`` (values stay); the tokens are committed to packed storage again."""
        if self.ragged or self.static is not None:
            raise LMCompressError("rewriting keys needs the uniform dynamic layout (same tokens in every head)")
        self._inputs_cache = None
        seg = self.segments[0]
        seg.rewrite_keys(keys, positions)
        seg.commit()

    def prune_key_channels(self, channels: torch.Tensor) -> None:
        """Store only the key channels ``channels: [B, Hkv, Dk]`` (int64) of every held token (ThinK; see
        :meth:`KVSegment.prune_key_channels`: the first call fixes the channels, later calls prune the newer
        tokens with them)."""
        if self.static is not None:
            raise LMCompressError("key channels cannot be pruned in static decode mode")
        self._inputs_cache = None
        if not self.ragged:
            self.segments[0].prune_key_channels(channels)
            return
        for i, seg in enumerate(self.segments):
            b, h = divmod(i, self.num_heads)
            seg.prune_key_channels(channels[b : b + 1, h : h + 1])

    def key_channels(self) -> torch.Tensor | None:
        """``[B, Hkv, Dk]`` int64 kept key channels after ThinK's pruning, or None (keys stored whole)."""
        if not self.segments or self.segments[0].key_channels is None:
            return None
        if not self.ragged:
            return self.segments[0].key_channels
        return torch.cat([s.key_channels for s in self.segments], dim=0).view(
            self.batch_size, self.num_heads, -1)

    # ------------------------------------------------------------------------------------ static mode
    def begin_static(self, new_tokens: int, ring_start: int | None, clocks: dict | None = None) -> None:
        """Switch to fixed-shape decode storage (see :mod:`lmcompress.kv.static`).

        Args:
            new_tokens: decode steps to make room for (append mode).
            ring_start: None for append mode; else rolling mode with fixed capacity, overwriting from this slot.
            clocks: the slot counters of the cache's earlier layers, shared where the slot layout matches.
        """
        seg = self._uniform
        if seg is None or seg.fp_k is None or seg.store is not None or seg.aux:
            raise LMCompressError(
                f"static decode needs full-precision storage with the same tokens in every head (layer "
                f"{self.layer_idx}: {'ragged' if self.ragged else 'quantized or policy-tracked'}); "
                "use the eager decode path for this spec"
            )
        if self.is_sliding:
            capacity, ring_start = self.sliding_window, 0
        elif ring_start is not None:
            capacity = seg.held
        else:
            capacity = seg.held + new_tokens
        self.static = StaticSlots(seg.fp_k, seg.fp_v, seg.pos, seg.held, self.seen, capacity, ring_start,
                                  clocks)

    def end_static(self) -> None:
        """Back to the dynamic layout, with the tokens written while static."""
        if self.static is None:
            return
        _, seen = self.static.release()
        seg = self.segments[0]
        seg.last_position = seen - 1
        self.seen = seen
        self.static = None
        self._inputs_cache = None
        if self.is_sliding:
            seg.trim_front(self.sliding_window - 1)

    def add_aux(self, name: str, values: torch.Tensor) -> None:
        """Add ``values: [B, Hkv, n]`` (layout of :meth:`score_inputs`) to the per-token values ``name``
        (created at zero if absent; tokens appended later start at zero)."""
        self._inputs_cache = None
        for i, seg in enumerate(self.segments):
            part = values if not self.ragged else self._row(values, i, seg)
            view = seg.aux_view(name)
            if view is None:
                seg.set_aux(name, part, fill=0.0)
            else:
                view += part.to(view.dtype)

    def set_aux(self, name: str, values: torch.Tensor, fill: float) -> None:
        """Set the per-token values ``name`` to ``values: [B, Hkv, n]`` (layout of :meth:`score_inputs`);
        tokens appended later get ``fill``."""
        self._inputs_cache = None
        for i, seg in enumerate(self.segments):
            part = values if not self.ragged else self._row(values, i, seg)
            seg.set_aux(name, part, fill=fill)

    def drop_aux(self, name: str) -> None:
        self._inputs_cache = None
        for seg in self.segments:
            seg.drop_aux(name)

    def _row(self, values: torch.Tensor, i: int, seg: KVSegment) -> torch.Tensor:
        b, h = divmod(i, self.num_heads)
        m = seg.held
        return values[b : b + 1, h : h + 1, values.shape[-1] - m :]
