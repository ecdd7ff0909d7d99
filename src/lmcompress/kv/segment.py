"""Storage of one block of KV heads in which every head holds the same number of tokens.

A :class:`~lmcompress.kv.layer.CompressedLayer` holds either one segment for all its ``[B, Hkv]`` heads (the
uniform layout) or one segment per batch row and KV head (the ragged layout, after a head-wise eviction such as
AdaKV or a threshold rule left heads with different lengths). Either way every tensor is sized to the tokens
actually kept, so bytes drop in proportion to what is evicted.

Contents, oldest tokens first (all along dim 2):

* ``store``: a :class:`~lmcompress.kv.quant.store.PackedStore` of quantized tokens (only with a quantizer);
* ``fp_k`` / ``fp_v``: ``[B, H, m, D]`` full-precision tokens (everything without a quantizer, otherwise the
  tokens not yet committed);
* ``pos``: ``[B, H, n]`` int32 logical positions (only when the layer evicts);
* ``aux``: named ``[B, H, n]`` float32 per-token values that eviction policies keep beside the tokens
  (accumulated attention for H2O, arrival scores for threshold eviction, CAKE's indicator); they are gathered
  with the tokens on eviction;
* ``key_channels``: ``[B, H, Dk]`` int64 kept key channels once ThinK pruned the keys (then ``fp_k`` is a
  :class:`~lmcompress.kv.pruned_keys.PrunedKeyBuffer` and the store's key codec a
  :class:`~lmcompress.kv.pruned_keys.GatheredKeyCodec`: the dropped channels are not stored).
"""

from __future__ import annotations

import torch

from .buffers import TokenBuffer, gather_tokens
from .pruned_keys import GatheredKeyCodec, PrunedKeyBuffer
from .quant.base import KVQuantizer
from .quant.observation import AttentionObservation
from .quant.store import PackedStore
from .reference import attend_blocks

#: tokens per block when attention reads packed storage on the reference path.
REFERENCE_BLOCK_TOKENS = 1024
#: queries per tile on the reference path (bounds the score matrix for long chunks over packed storage).
REFERENCE_QUERY_TILE = 512
#: spare full-precision slots kept after a commit to packed storage (at most the residual window)
RESIDUAL_HEADROOM = 16


class KVSegment:
    """K/V storage for ``[B, H]`` heads of equal length.

    Args:
        quant: KV quantizer or None.
        layer_idx: decoder layer (the quantizer may use per-layer codecs).
        head_dim: D.
        dtype: compute dtype of the states.
        track_positions: keep a ``pos`` buffer (needed once tokens can be evicted).
        reserve: spare token slots allocated with the first chunk and after each eviction.
    """

    def __init__(self, quant: KVQuantizer | None, layer_idx: int, head_dim: int, dtype: torch.dtype,
                 *, track_positions: bool, reserve: int = 0, rope=None) -> None:
        self.quant = quant
        self.rope = rope  # the model's RopeTable (stores of pre-RoPE keys need it)
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.dtype = dtype
        self.track_positions = track_positions
        self.reserve = reserve
        self.store: PackedStore | None = None if quant is None else quant.new_store(layer_idx, head_dim, dtype)
        if getattr(self.store, "needs_positions", False):
            self.store.bind_rope(rope)
        self.fp_k: TokenBuffer | None = None
        self.fp_v: TokenBuffer | None = None
        self.pos: TokenBuffer | None = None
        self.aux: dict[str, TokenBuffer] = {}
        self.aux_fill: dict[str, float] = {}
        self.last_position = -1  # position of the newest token (for untracked positions)
        #: ``[B, H, Dk]`` int64 kept key channels after ThinK's pruning, else None.
        self.key_channels: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------ sizes
    @property
    def fp_length(self) -> int:
        return 0 if self.fp_k is None else self.fp_k.length

    @property
    def packed_length(self) -> int:
        return 0 if self.store is None else self.store.length

    @property
    def held(self) -> int:
        return self.packed_length + self.fp_length

    def tensors(self) -> list[torch.Tensor]:
        out = [] if self.store is None else self.store.tensors()
        for buf in (self.fp_k, self.fp_v, self.pos, *self.aux.values()):
            if isinstance(buf, PrunedKeyBuffer):
                out.extend(buf.tensors())
            elif buf is not None:
                out.append(buf.data)
        if self.key_channels is not None:
            out.append(self.key_channels)
        return out

    @property
    def pruned_prefix(self) -> int:
        """How many of the oldest held tokens have channel-pruned keys (0 without ThinK): every packed token and
        the pruned part of the full-precision keys."""
        if self.key_channels is None:
            return 0
        fp = self.fp_k.pruned_length if isinstance(self.fp_k, PrunedKeyBuffer) else 0
        return self.packed_length + fp

    def prune_key_channels(self, channels: torch.Tensor) -> None:
        """Store only the key channels ``channels: [B, H, Dk]`` (int64, ascending) of every held token (ThinK).

        The first call fixes the channels (packed keys are re-encoded with the kept channels only); later calls
        prune the tokens appended since with the same channels (``channels`` is then ignored).

        Raises:
            LMCompressError: the quantizer's storage cannot hold pruned keys (pre-RoPE or attention-aware
                stores), or its key codec cannot quantize ``Dk`` channels.
        """
        from ..errors import LMCompressError
        from .quant.kivi_store import KIVIStore
        from .quant.store import PackedStore

        if self.key_channels is not None:
            if isinstance(self.fp_k, PrunedKeyBuffer):
                self.fp_k.prune_all()
            elif self.fp_k is not None:
                self.fp_k = PrunedKeyBuffer.from_keys(self.fp_k.view(), self.key_channels, self.fp_length)
            return
        channels = channels.to(torch.int64).contiguous()
        if self.store is not None:
            if type(self.store) not in (PackedStore, KIVIStore):
                raise LMCompressError(
                    f"think cannot store pruned key channels in {type(self.quant).__name__}'s storage; allowed "
                    "quantizers: int, uniform, kivi, normal, fp8, rotated, turbo (codec-based storage)")
            codec = GatheredKeyCodec(self.store.key_codec, channels)
            try:
                codec.validate(self.head_dim)
            except LMCompressError as err:
                raise LMCompressError(f"think keeps {channels.shape[-1]} of {self.head_dim} key channels, which "
                                      f"the quantizer's key codec cannot store: {err}") from None
            old = self.store.dequantize()[0] if self.store.length else None
            self.store.key_codec = codec
            if old is not None:
                self.store._k = {}
                self.store._append_parts(self.store._k, codec.encode(old))
        self.key_channels = channels
        if self.fp_k is not None:
            self.fp_k = PrunedKeyBuffer.from_keys(self.fp_k.view(), channels, self.fp_length)

    def positions(self, batch: int, heads: int, device: torch.device) -> torch.Tensor:
        """``[B, H, held]`` int32 logical positions (oldest first)."""
        if self.pos is not None:
            return self.pos.view()
        held = self.held
        start = self.last_position + 1 - held
        ar = torch.arange(start, start + held, device=device, dtype=torch.int32)
        return ar.expand(batch, heads, held)

    # ------------------------------------------------------------------------------------ writes
    def _fp_headroom(self) -> int:
        return 0 if self.quant is not None else self.reserve

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               last_position: int | None = None) -> None:
        """Append ``[B, H, q, D]`` states at int32 ``positions: [B, H, q]`` in full precision.

        ``last_position``: ``positions[0, 0, -1]`` when the caller knows it (saves reading it off the device)."""
        if self.fp_k is None:
            self.fp_k = TokenBuffer(keys, headroom=self._fp_headroom())
            self.fp_v = TokenBuffer(values, headroom=self._fp_headroom())
        else:
            self.fp_k.append(keys)
            self.fp_v.append(values)
        if self.track_positions:
            if self.pos is None:
                self.pos = TokenBuffer(positions.contiguous(), headroom=self.reserve)
            else:
                self.pos.append(positions)
        for name, buf in self.aux.items():
            buf.append(torch.full(positions.shape, self.aux_fill[name], device=positions.device))
        self.last_position = int(positions[0, 0, -1]) if last_position is None else last_position

    def set_aux(self, name: str, values: torch.Tensor, fill: float = 0.0) -> None:
        """Attach (or overwrite) the per-token values ``values: [B, H, held]``; tokens appended later get
        ``fill``."""
        self.aux[name] = TokenBuffer(values.float().contiguous(), headroom=self.reserve)
        self.aux_fill[name] = fill

    def drop_aux(self, name: str) -> None:
        self.aux.pop(name, None)
        self.aux_fill.pop(name, None)

    def aux_view(self, name: str) -> torch.Tensor | None:
        buf = self.aux.get(name)
        return None if buf is None else buf.view()

    # ------------------------------------------------------------------------------------ reads
    def all_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held key and value, ``[B, H, held, D]`` (packed tokens dequantized: for scoring only)."""
        if self.packed_length == 0:
            return self.fp_k.view(), self.fp_v.view()
        pk, pv = self.store.dequantize()
        return torch.cat([pk, self.fp_k.view()], dim=2), torch.cat([pv, self.fp_v.view()], dim=2)

    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, causal: bool,
               evicting: bool = False) -> torch.Tensor:
        """Attention of ``query: [B, H*G, q, D]`` over this segment.

        Packed storage is read block by block by the torch reference, or, for one query, by the Triton decode
        kernel on CUDA (``kv/kernels/dispatch.py``) or the codes-level CPU path (``kv/kernels/cpu_decode.py``)
        when the storage format has one.

        Args:
            mask: bool ``[B or 1, 1 or H, q, held]`` (True = visible; per KV head for DMS) or None.
            causal: with ``mask=None``, apply a causal mask (queries are the last q tokens, held == q).
            evicting: an eviction may follow this forward (attention-aware stores then record every held
                token's attention, not only the newest tokens').

        Returns:
            ``[B, H*G, q, D]``.
        """
        q = query.shape[2]
        observe = self.store is not None and self.store.needs_attention
        lse = None
        if self.packed_length == 0 and q == 1 and isinstance(self.fp_k, PrunedKeyBuffer):
            out = self.fp_k.attend_one(query, self.fp_v.view(), mask, scaling)  # ThinK: gathered queries
        elif self.packed_length == 0:
            keys, values = self.fp_k.view(), self.fp_v.view()
            sdpa_mask = mask
            if mask is not None and mask.shape[1] not in (1, query.shape[1]):  # per KV head -> per query head
                sdpa_mask = mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)
            out = torch.nn.functional.scaled_dot_product_attention(
                query, keys, values, attn_mask=sdpa_mask, is_causal=mask is None and causal,
                scale=scaling, enable_gqa=query.shape[1] != keys.shape[1],
            )
        else:
            out = None
            if q == 1 and not observe and (mask is None or bool(mask.all())):
                if query.is_cuda:
                    from .kernels import dispatch

                    out = dispatch.decode_attention(self.store, self.fp_k.view(), self.fp_v.view(), query, scaling)
                else:
                    from .kernels import cpu_decode

                    out = cpu_decode.decode_attention(self.store, self.fp_k.view(), self.fp_v.view(), query,
                                                      scaling)
            if out is None:
                out, lse = self._reference_attention(query, mask, scaling, observe)
        if observe:
            self._observe_attention(query, mask, scaling, lse, causal, evicting)
        return out

    def _reference_attention(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                             want_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block-wise torch attention over packed + full-precision tokens: ``(out, lse or None)``."""
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

    def _blocks(self, mask: torch.Tensor | None):
        packed = self.packed_length
        yield from self.store.attention_blocks(REFERENCE_BLOCK_TOKENS, mask)
        yield self.fp_k.view(), self.fp_v.view(), None if mask is None else mask[..., packed:]

    def _observe_attention(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                           lse: torch.Tensor | None, causal: bool, evicting: bool) -> None:
        """Hand attention-aware storage (QAQ) the last query rows of this forward (``AttentionObservation``)."""
        q = query.shape[2]
        w = min(q, self.store.attention_rows)
        held = self.held
        if mask is not None:
            rows_mask = mask[:, :, -w:]
        elif causal and q > 1:  # the last w queries are the last w held tokens
            rows_mask = torch.ones(w, held, dtype=torch.bool, device=query.device).tril(held - w)[None, None]
        else:
            rows_mask = None
        self.store.observe_attention(AttentionObservation(
            query=query[:, :, -w:], scaling=scaling, mask=rows_mask,
            lse=None if lse is None else lse[:, :, -w:], fp_keys=self.fp_k.view(), full=evicting,
            all_queries=query,
        ))

    # ------------------------------------------------------------------------------------ eviction
    def keep(self, index: torch.Tensor, in_place: bool = False) -> None:
        """Keep the tokens ``index: [B, H, k]`` (ascending, same k for every head); frees the rest.

        Full-precision tokens are gathered exactly. Packed tokens are dequantized, gathered and re-quantized by
        the next :meth:`commit` (for per-token codecs re-quantizing a dequantized token reproduces its codes up
        to float rounding of the fp16 scale; token-block codecs round once more).

        Args:
            in_place: keep the buffers' capacity (the freed slots hold the next tokens) instead of reallocating
                at the kept size; for decoding-time eviction of a few tokens per step. Full precision only.
        """
        index = index.to(torch.int64)
        if in_place and self.packed_length == 0:
            for buf in (self.fp_k, self.fp_v, self.pos, *self.aux.values()):
                if buf is not None:
                    buf.compact(index)
            return
        packed = self.packed_length
        if packed and index.shape[-1] >= packed and bool(
                (index[..., :packed] == torch.arange(packed, device=index.device)).all()):
            # only full-precision tokens go (DMS releases inside the residual window): packed storage stays as is
            tail = index[..., packed:] - packed
            for buf in (self.fp_k, self.fp_v):
                if in_place:
                    buf.compact(tail)
                else:
                    buf.gather(tail, headroom=self._fp_headroom())
            for buf in (self.pos, *self.aux.values()):
                if buf is not None and in_place:
                    buf.compact(index)
                elif buf is not None:
                    buf.gather(index, headroom=self.reserve)
            return
        keys, values = self.all_tokens()
        pruned = (index < self.pruned_prefix).sum(dim=-1)
        if self.store is not None:  # a fresh store (carrying per-token statistics of the kept tokens, if any)
            self.store = self.store.emptied(index)
        self._replace_fp(gather_tokens(keys, index), gather_tokens(values, index), pruned)
        if self.pos is not None:
            self.pos.gather(index, headroom=self.reserve)
        for buf in self.aux.values():
            buf.gather(index, headroom=self.reserve)

    def rewrite_keys(self, keys: torch.Tensor, positions: torch.Tensor) -> None:
        """Replace every held key by ``keys: [B, H, held, D]`` and its position by ``positions: [B, H, held]``;
        values stay (packed ones come back in full precision until the next :meth:`commit`). For key
        re-rotation (not of channel-pruned keys: RoPE would mix a dropped channel back in)."""
        if self.key_channels is not None:
            from ..errors import LMCompressError

            raise LMCompressError("key re-rotation cannot rewrite channel-pruned keys (think); "
                                  "compose think with policies that keep keys as they are")
        _, values = self.all_tokens()
        if self.store is not None:
            index = torch.arange(self.held, device=keys.device).expand(*keys.shape[:2], self.held)
            self.store = self.store.emptied(index)
        self._replace_fp(keys.to(self.dtype).contiguous(), values.contiguous())
        if self.pos is not None:
            self.pos.replace(positions.to(torch.int32).contiguous(), headroom=self.reserve)
        self.last_position = int(positions[0, 0, -1])

    def _replace_fp(self, keys: torch.Tensor, values: torch.Tensor,
                    pruned: torch.Tensor | int | None = None) -> None:
        """Hold exactly ``keys`` / ``values: [B, H, m, D]`` in full precision; with pruned key channels the
        oldest ``pruned`` tokens (an int or ``[B, H]`` counts) are stored pruned."""
        if self.key_channels is not None:
            self.fp_k = PrunedKeyBuffer.from_keys(keys, self.key_channels, 0 if pruned is None else pruned,
                                                  headroom=self._fp_headroom())
            if self.fp_v is None:
                self.fp_v = TokenBuffer(values, headroom=self._fp_headroom())
            else:
                self.fp_v.replace(values, headroom=self._fp_headroom())
            return
        if self.fp_k is None:
            self.fp_k = TokenBuffer(keys, headroom=self._fp_headroom())
            self.fp_v = TokenBuffer(values, headroom=self._fp_headroom())
        else:
            self.fp_k.replace(keys, headroom=self._fp_headroom())
            self.fp_v.replace(values, headroom=self._fp_headroom())

    def split(self, kept: list[list[torch.Tensor]]) -> list[KVSegment]:
        """Split into one ``[1, 1]`` segment per batch row and head.

        Args:
            kept: ``kept[b][h]`` = ascending int64 indices ``[k_bh]`` of the tokens head ``h`` of row ``b`` keeps.

        Returns:
            ``B * H`` segments in row-major order (``b * H + h``); this segment's storage is released.
        """
        keys, values = self.all_tokens()
        b_count, h_count = keys.shape[:2]
        pos = self.positions(b_count, h_count, keys.device)
        prefix = self.pruned_prefix
        out = []
        for b in range(b_count):
            for h in range(h_count):
                idx = kept[b][h].to(device=keys.device, dtype=torch.int64)
                seg = KVSegment(self.quant, self.layer_idx, self.head_dim, self.dtype,
                                track_positions=True, reserve=self.reserve, rope=self.rope)
                if self.key_channels is not None:  # this head's channels; its store quantizes only those
                    seg.key_channels = self.key_channels[b : b + 1, h : h + 1].contiguous()
                    if seg.store is not None:
                        seg.store.key_codec = GatheredKeyCodec(seg.store.key_codec, seg.key_channels)
                seg._replace_fp(keys[b : b + 1, h : h + 1, idx].contiguous(),
                                values[b : b + 1, h : h + 1, idx].contiguous(), int((idx < prefix).sum()))
                seg.pos = TokenBuffer(pos[b : b + 1, h : h + 1, idx].to(torch.int32).contiguous(),
                                      headroom=self.reserve)
                for name, buf in self.aux.items():
                    seg.aux[name] = TokenBuffer(buf.view()[b : b + 1, h : h + 1, idx].contiguous(),
                                                headroom=self.reserve)
                    seg.aux_fill[name] = self.aux_fill[name]
                seg.last_position = self.last_position
                out.append(seg)
        self.fp_k = self.fp_v = self.pos = None
        self.store = None
        self.aux = {}
        self.key_channels = None
        return out

    def drop_newest(self, q: int) -> None:
        """Forget the newest ``q`` tokens, which must still be in full precision (not yet committed); the
        buffers keep their capacity (counted in ``nbytes``) for the tokens that follow."""
        if q > self.fp_length:
            raise RuntimeError(f"cannot drop {q} tokens: only {self.fp_length} are uncommitted")
        for buf in (self.fp_k, self.fp_v, self.pos, *self.aux.values()):
            if buf is not None:
                buf.length -= q
        self.last_position -= q

    def trim_front(self, keep_last: int) -> None:
        """Keep only the newest ``keep_last`` tokens (sliding windows)."""
        if self.held <= keep_last:
            return
        if self.packed_length:
            from ..errors import LMCompressError

            raise LMCompressError("quantized sliding-window layers are not supported yet (compress_sliding)")
        for buf in (self.fp_k, self.fp_v, self.pos, *self.aux.values()):
            if buf is not None:
                buf.truncate_front(keep_last)

    def commit(self) -> None:
        """Move full-precision tokens older than the quantizer's residual window into packed storage."""
        if self.store is None or self.fp_k is None:
            return
        residual = self.quant.commit_residual
        movable = self.fp_length - residual
        movable -= movable % self.store.unit
        if movable <= 0:
            return
        fk, fv = self.fp_k.view(), self.fp_v.view()
        if getattr(self.store, "needs_positions", False):  # pre-RoPE keys: the store un-rotates them
            packed = self.packed_length
            pos = self.positions(fk.shape[0], fk.shape[1], fk.device)[:, :, packed : packed + movable]
            self.store.append(fk[:, :, :movable], fv[:, :, :movable], positions=pos)
        else:
            self.store.append(fk[:, :, :movable], fv[:, :, :movable])
        # spare slots for the next tokens: a few, not a second window (they are held and counted in nbytes)
        headroom = max(1, min(residual, RESIDUAL_HEADROOM))
        self.fp_k.drop_front(movable, headroom=headroom)
        self.fp_v.drop_front(movable, headroom=headroom)
