"""Static-shaped decode storage: fixed-capacity slots written by device-side index.

After the prompt is processed, :meth:`~lmcompress.kv.cache.CompressedCache.begin_static` turns every layer's
full-precision storage into :class:`StaticSlots`: the buffers keep a fixed capacity, a decode step writes its
key/value into slot ``slot`` (a device tensor) and attention reads all slots under the mask ``slot_index <
length`` (another device tensor). Every tensor shape is then the same at every step and nothing reads a device
value on the host, so a decode step can be captured in a CUDA graph (:mod:`lmcompress.eval.graph_decode`).

Two slot policies:

* append: capacity = held + new tokens; slots fill in order (no eviction during decoding);
* rolling: once full, a new token overwrites the oldest slot at or after ``ring_start`` — StreamingLLM's rolling
  window with its sinks in slots ``[0, ring_start)``, and the model's window for sliding-window layers
  (``ring_start = 0``, capacity = the window). Attention does not depend on slot order (keys carry RoPE).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .buffers import TokenBuffer
from .evict.base import EvictionPolicy

if TYPE_CHECKING:  # pragma: no cover
    from .spec import KVSpec


def _triton() -> bool:
    from ..triton_support import triton_available

    return triton_available()


#: decode attention over static slots on CUDA: "triton" (kv/kernels/slot_attention.py) or "sdpa"
_SLOT_ATTENTION = ["triton"]


def set_slot_attention(name: str) -> str:
    """Choose the decode attention of static slots on CUDA (``"triton"`` or ``"sdpa"``); returns the previous
    choice. Read when a step runs (or is captured into a CUDA graph), so set it before capturing."""
    if name not in ("triton", "sdpa"):
        raise ValueError(f"slot attention {name!r} is not one of 'triton', 'sdpa'")
    old, _SLOT_ATTENTION[0] = _SLOT_ATTENTION[0], name
    return old


def _policy_chain(policy: EvictionPolicy) -> list[EvictionPolicy]:
    """``policy`` and the policies it wraps (``base``, recursively)."""
    chain = [policy]
    while isinstance(getattr(chain[-1], "base", None), EvictionPolicy):
        chain.append(chain[-1].base)
    return chain


def static_decode_supported(spec: KVSpec) -> str | None:
    """None when the static path decodes ``spec`` exactly as the eager path does; else the reason it cannot.

    In static mode a decode step only writes its K/V into a slot and attends over the slots: the layer runs no
    policy hook (``observe`` / ``after_forward``) and holds one full-precision, uniform segment. So it refuses:
    quantized storage (packed K/V), head-wise policies (heads of different lengths, stored ragged), and every
    policy that runs code of its own on decoding steps (decoding compression, CAKE's decode-time eviction,
    threshold eviction, H2O's accumulated attention) — the eager path would evict or record what the static one
    skips. Prompt-time scorers (SnapKV, StreamingLLM, ...) change nothing while decoding and are supported.
    ``decode="static"`` raises with this reason; ``decode="auto"`` decodes eagerly.
    """
    if spec.quant is not None:
        return f"{spec.quant.name} stores K/V quantized (packed); static slots hold full-precision K/V only"
    if spec.evict is None:
        return None
    for policy in _policy_chain(spec.evict):
        if policy.headwise:
            return f"{policy.name} keeps different token counts per head (ragged storage)"
        cls = type(policy)
        if cls.after_forward is not EvictionPolicy.after_forward or cls.observe is not EvictionPolicy.observe:
            return f"{policy.name} acts on decoding steps (its cache hooks), which static slots skip"
    return None



class StaticClock:
    """The device-side counters of static slots, shared by every layer with the same slot layout (capacity,
    ring start, held tokens, next position), so that a decode step advances them once instead of once per layer.

    The first :class:`StaticSlots` bound to a clock owns it: its :meth:`StaticSlots.write` calls :meth:`tick`
    before writing, and the layers after it (later in the same step) read the slot, position and mask the tick
    set. Layers run in order, so the owner (the lowest layer) ticks first in every step.

    Args:
        held: tokens valid now (the first ``held`` slots).
        seen: the next token's logical position.
        capacity: number of slots.
        ring_start: None for append mode, else the first slot a rolling overwrite may use.
        device: where the counters live.
    """

    def __init__(self, held: int, seen: int, capacity: int, ring_start: int | None, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.capacity, self.ring_start = capacity, ring_start
        self.length = torch.tensor([held], device=device, dtype=torch.int64)
        self.slot = torch.tensor([held if held < capacity else (ring_start or 0)], device=device,
                                 dtype=torch.int64)
        self.next_pos = torch.tensor([seen], device=device, dtype=torch.int64)
        self.slot_ids = torch.arange(capacity, device=device)
        #: set by :meth:`tick`: the slot and position of this step's token, and the mask of valid slots.
        self.cur_slot = torch.zeros(1, device=device, dtype=torch.int64)
        self.cur_pos = torch.zeros((1, 1, 1), device=device, dtype=torch.int32)
        self.valid = torch.zeros(capacity, device=device, dtype=torch.bool)
        #: additive attention mask ``[1, 1, 1, capacity]`` in the KV dtype: 0 on valid slots, -inf elsewhere (SDPA
        #: takes it as is; a bool mask is converted on every call, i.e. in every layer)
        self.mask = torch.zeros((1, 1, 1, capacity), device=device, dtype=dtype)
        self._zero = torch.zeros((), device=device, dtype=dtype)
        self._neg_inf = torch.full((), float("-inf"), device=device, dtype=dtype)
        self.owner: object | None = None

    def tick(self) -> None:
        """Claim the next slot for this step's token (device-side only)."""
        self.cur_slot.copy_(self.slot)
        self.cur_pos.copy_(self.next_pos.view(1, 1, 1))
        self.next_pos.add_(1)
        self.length.copy_(torch.clamp(self.length + 1, max=self.capacity))
        torch.lt(self.slot_ids, self.length, out=self.valid)
        torch.where(self.valid, self._zero, self._neg_inf, out=self.mask.view(self.capacity))
        nxt = self.slot + 1
        if self.ring_start is None:
            self.slot.copy_(nxt)
        else:
            self.slot.copy_(torch.where(nxt < self.capacity, nxt, torch.full_like(nxt, self.ring_start)))

    def state(self) -> tuple[torch.Tensor, ...]:
        return (self.length.clone(), self.slot.clone(), self.next_pos.clone())

    def restore(self, state: tuple[torch.Tensor, ...]) -> None:
        for dst, src in zip((self.length, self.slot, self.next_pos), state):
            dst.copy_(src)


class StaticSlots:
    """Fixed-shape decode storage of one layer's ``[B, H]`` heads.

    Args:
        fp_k, fp_v: the segment's full-precision buffers (their storage is reused, grown once if needed).
        pos: the positions buffer, or None.
        held: tokens currently valid (the first ``held`` slots).
        seen: the next token's logical position.
        capacity: number of slots.
        ring_start: None for append mode, else the first slot a rolling overwrite may use.
        clocks: clocks of the layers set up before this one in the same cache, by slot layout; this layer
            shares the matching one (or adds its own). None: a private clock.
    """

    def __init__(self, fp_k: TokenBuffer, fp_v: TokenBuffer, pos: TokenBuffer | None, held: int, seen: int,
                 capacity: int, ring_start: int | None,
                 clocks: dict[tuple, StaticClock] | None = None) -> None:
        for buf in (fp_k, fp_v, pos):
            if buf is not None and buf.capacity != capacity:
                buf.replace(buf.view(), headroom=capacity - buf.length)
        self.bufs = (fp_k, fp_v, pos)
        self.k, self.v = fp_k.data, fp_v.data
        # Unused slots are read under a zero-weight mask; uninitialized memory may hold NaN and 0 * NaN = NaN.
        self.k[:, :, held:].zero_()
        self.v[:, :, held:].zero_()
        self.pos = None if pos is None else pos.data
        self.capacity = capacity
        self.ring_start = ring_start
        device = self.k.device
        key = (held, seen, capacity, ring_start, str(device), self.k.dtype)
        clocks = {} if clocks is None else clocks
        if key not in clocks:
            clocks[key] = StaticClock(held, seen, capacity, ring_start, device, self.k.dtype)
        self.clock = clocks[key]
        if self.clock.owner is None:
            self.clock.owner = self
        self.steps = 0

    @property
    def length(self) -> torch.Tensor:
        return self.clock.length

    @property
    def next_pos(self) -> torch.Tensor:
        return self.clock.next_pos

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one token's ``[B, H, 1, D]`` key and value into this step's slot (the owner of the clock
        advances it first; device-side only)."""
        clock = self.clock
        if clock.owner is self:
            clock.tick()
        if self.k.is_cuda and self.k.is_contiguous() and self.v.is_contiguous() and _triton():
            from .kernels.slot_write import slot_write

            pos = self.pos if self.pos is not None and self.pos.is_contiguous() else None
            if pos is not None or self.pos is None:
                slot_write(self.k, self.v, pos, clock.cur_slot, clock.cur_pos, keys, values)
                return
        self.k.index_copy_(2, clock.cur_slot, keys)
        self.v.index_copy_(2, clock.cur_slot, values)
        if self.pos is not None:
            b, h = self.pos.shape[:2]
            self.pos.index_copy_(2, clock.cur_slot, clock.cur_pos.expand(b, h, 1))

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """``query: [B, Hq, 1, D]`` over the valid slots -> ``[B, Hq, 1, D]``.

        On CUDA with Triton, 16-bit K/V (and :func:`set_slot_attention` left at ``"triton"``): the split-K kernel of
        :mod:`~lmcompress.kv.kernels.slot_attention`, which reads only the valid slots' K/V once per KV head;
        elsewhere SDPA under the slot mask. Both compute the same attention up to bf16 rounding.
        """
        d = query.shape[-1]
        if (query.is_cuda and query.shape[2] == 1 and _SLOT_ATTENTION[0] == "triton" and d >= 16
                and query.dtype in (torch.bfloat16, torch.float16) and self.k.dtype == query.dtype
                and not d & (d - 1) and self.k.is_contiguous() and self.v.is_contiguous() and _triton()):
            from .kernels.slot_attention import slot_attention

            return slot_attention(query, self.k, self.v, self.clock.length, scaling)
        return torch.nn.functional.scaled_dot_product_attention(
            query, self.k, self.v, attn_mask=self.clock.mask, scale=scaling,
            enable_gqa=query.shape[1] != self.k.shape[1])

    def release(self) -> tuple[int, int]:
        """Hand the storage back to the dynamic layout: returns ``(held, seen)`` and restores ascending
        position order if the ring wrapped."""
        held, seen = int(self.length), int(self.next_pos)
        pos = self.bufs[2]
        for buf in self.bufs:
            if buf is not None:
                buf.length = held
        if pos is not None and self.ring_start is not None:
            order = pos.view().to(torch.int64).argsort(dim=-1)
            for buf in self.bufs:
                if buf is not None:
                    buf.gather(order, headroom=0)
        return held, seen

    def state(self) -> tuple[torch.Tensor, ...]:
        return self.clock.state()

    def restore(self, state: tuple[torch.Tensor, ...]) -> None:
        self.clock.restore(state)
