"""Composition of eviction policies (kvpress's ComposedPress): after each prefill chunk the policies compress the
layer one after the other, each one scoring what the previous ones kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...errors import LMCompressError
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, check_wrapper_sizes

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer


def held_query_suffix(layer: CompressedLayer, q: int) -> int:
    """How many of the chunk's newest ``q`` tokens are still held, as an unbroken run up to the newest token, in
    every head: their queries are the ones a later policy may read."""
    pos = layer.positions()[..., -q:]  # [B, Hkv, m]
    m = pos.shape[-1]
    expected = torch.arange(layer.seen - m, layer.seen, device=pos.device, dtype=pos.dtype)
    match = (pos == expected).flip(-1).int().cumprod(dim=-1)  # 1 while the run from the end is unbroken
    return int(match.sum(dim=-1).min())


@EVICTION_METHODS.register("composed")
@dataclass(frozen=True)
class ComposedPolicy(EvictionPolicy):
    """Apply ``policies`` in order after every prefill chunk.

    Each policy compresses the layer as it would alone, but sees only the tokens its predecessors kept; the kept
    fraction is the product of the policies' kept fractions (with our exact counts at each step). Query-based
    policies later in the chain read the chunk's queries of the newest tokens that are still held (an earlier
    policy that evicted one of the newest tokens shortens that run; SnapKV and StreamingLLM keep it). Policies
    with their own cache hooks (CAKE, decoding compression, threshold eviction, composition itself) are not
    accepted, as in kvpress, which also refuses AdaKV and KVzip (AdaKV works here: the later policies score its
    ragged heads). ThinK (key channel pruning, no token evicted) may sit anywhere in the chain.

    Attributes:
        policies: two or more eviction policies (a tuple or list).
    """

    name = "composed"
    display = "ComposedPress"
    is_scorer = False
    policies: tuple = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wrapper_sizes(self)
        policies = tuple(self.policies) if isinstance(self.policies, (list, tuple)) else None
        if policies is None or len(policies) < 2:
            raise LMCompressError(f"composed needs a list of two or more eviction policies; got {self.policies!r}")
        for p in policies:
            if not isinstance(p, EvictionPolicy):
                raise LMCompressError(f"composed: {p!r} is not an eviction policy")
            chained = getattr(p, "composes_in_chain", False)  # ThinK: its own after_forward, no token evicted
            if not chained and (type(p).after_forward is not EvictionPolicy.after_forward
                                or p.new_layer_state() is not None):
                raise LMCompressError(
                    f"composed cannot contain {p.name} (it compresses through its own cache hooks); "
                    "allowed: policies that compress each prefill chunk (scorers, adakv, chunkkv, block, ...)"
                )
        object.__setattr__(self, "policies", policies)

    @property
    def is_noop(self) -> bool:
        return all(p.is_noop for p in self.policies)

    @property
    def query_window(self) -> int | None:
        windows = [p.query_window for p in self.policies]
        return None if None in windows else max(windows)

    def n_keep(self, n: int, layer_idx: int = 0, num_layers: int = 1) -> int:
        for p in self.policies:
            if not p.is_noop:
                n = p.n_keep(n, layer_idx, num_layers)
        return n

    def observe(self, layer: CompressedLayer, query: torch.Tensor, scaling: float) -> None:
        for p in self.policies:
            p.observe(layer, query, scaling)

    def after_forward(self, layer: CompressedLayer, query: torch.Tensor, scaling: float,
                      module: torch.nn.Module | None) -> None:
        q = query.shape[2]
        if q <= 1:
            return
        for p in self.policies:
            if p.is_noop:
                continue
            t = held_query_suffix(layer, q)
            if getattr(p, "composes_in_chain", False):
                p.after_forward(layer, query[:, :, q - t :], scaling, module)
                continue
            layer.keep(p.keep_mask(layer.score_inputs(query[:, :, q - t :], scaling, module)))

    def to_dict(self) -> dict:
        return {"method": self.name, "policies": [p.to_dict() for p in self.policies]}

    @classmethod
    def from_dict(cls, data: dict) -> ComposedPolicy:
        from ...registry import EVICTION_METHODS as methods

        policies = []
        for entry in data.get("policies", []):
            entry = dict(entry)
            policies.append(methods.get(entry.pop("method")).from_dict(entry))
        return cls(policies=tuple(policies))
