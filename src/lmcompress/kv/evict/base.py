"""Base class of KV eviction policies.

A policy is a small frozen dataclass. :meth:`EvictionPolicy.score` returns one score per cached token and KV head
(higher = keep); :meth:`EvictionPolicy.select` turns scores into the kept token indices, honouring the ratio or
token budget and the protected sink and recent tokens. Policies that need more than per-token scores (layer
budgets, cascades) override :meth:`EvictionPolicy.n_keep` or :meth:`EvictionPolicy.select`.

Kept counts: at ratio ``r`` a layer holding ``n`` tokens keeps exactly ``n - floor(r * n)`` per head; with a
budget ``b`` it keeps ``min(n, b)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from ...errors import LMCompressError, check_positive_int, check_range


@dataclass
class ScoreInputs:
    """What a policy sees when a layer is compressed.

    Attributes:
        keys: ``[B, Hkv, n, D]`` every cached key of the layer, after RoPE (dequantized if stored packed).
        values: ``[B, Hkv, n, D]`` the matching values.
        queries: ``[B, Hq, q, D]`` the queries of the forward chunk that triggered compression (after RoPE);
            they belong to the last ``q`` of the ``n`` tokens.
        positions: ``[B, Hkv, n]`` logical positions of the cached tokens.
        scaling: the attention's softmax scale.
        layer_idx, num_layers: where this layer sits.
        module: the attention module (read-only use: config, head counts).
        hidden_states: ``[B, q, hidden]`` input of the attention module, when a scoring hook captured it.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    positions: torch.Tensor
    scaling: float
    layer_idx: int
    num_layers: int
    module: torch.nn.Module | None = None
    hidden_states: torch.Tensor | None = None

    @property
    def num_kv_groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]


def evicted_count(n: int, ratio: float) -> int:
    """``floor(ratio * n)``, robust to binary rounding of decimal ratios (0.29 * 100 is 28.999...)."""
    return math.floor(ratio * n + 1e-9)


@dataclass(frozen=True)
class EvictionPolicy:
    """Base of eviction policies.

    Attributes:
        ratio: fraction of tokens to evict, in [0, 1).
        budget: if set, keep this many tokens per head instead of using ``ratio`` (ratio must stay 0).
        protect_sinks: the first tokens (by position) that are never evicted.
        protect_recent: the most recent tokens that are never evicted.
    """

    name: ClassVar[str] = "base"
    #: whether :meth:`score` needs ``ScoreInputs.hidden_states`` (a scoring hook must be active).
    needs_hidden_states: ClassVar[bool] = False

    ratio: float = 0.0
    budget: int | None = None
    protect_sinks: int = 0
    protect_recent: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise LMCompressError(f"ratio={self.ratio!r} is not a number; allowed: [0, 1)")
        check_range("ratio", float(self.ratio), 0.0, 1.0)
        if self.budget is not None:
            check_positive_int("budget", self.budget)
            if self.ratio:
                raise LMCompressError(
                    f"give either ratio or budget, not both (ratio={self.ratio}, budget={self.budget})"
                )
        check_positive_int("protect_sinks", self.protect_sinks, allow_zero=True)
        check_positive_int("protect_recent", self.protect_recent, allow_zero=True)

    # ------------------------------------------------------------------------------------------ sizes
    @property
    def is_noop(self) -> bool:
        return self.budget is None and self.ratio == 0

    def n_keep(self, n: int, layer_idx: int = 0, num_layers: int = 1) -> int:
        """Tokens kept per head out of ``n`` in layer ``layer_idx``."""
        if self.budget is not None:
            return min(n, self.budget)
        return n - evicted_count(n, float(self.ratio))

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """``[B, Hkv, n]`` scores, higher = more worth keeping."""
        raise NotImplementedError

    def protect(self, scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Give protected sink and recent tokens an infinite score."""
        if not (self.protect_sinks or self.protect_recent):
            return scores
        scores = scores.clone()
        if self.protect_sinks:
            scores = scores.masked_fill(positions < self.protect_sinks, math.inf)
        if self.protect_recent:
            newest = positions.amax(dim=-1, keepdim=True)
            scores = scores.masked_fill(positions > newest - self.protect_recent, math.inf)
        return scores

    def select(self, inputs: ScoreInputs) -> torch.Tensor:
        """Kept token indices ``[B, Hkv, k]``, ascending (so storage stays in position order)."""
        n = inputs.keys.shape[2]
        k = self.n_keep(n, inputs.layer_idx, inputs.num_layers)
        if k >= n:
            return torch.arange(n, device=inputs.keys.device).expand(*inputs.keys.shape[:2], n)
        scores = self.protect(self.score(inputs).float(), inputs.positions)
        if scores.shape != inputs.keys.shape[:3]:
            raise RuntimeError(f"{self.name}.score returned shape {tuple(scores.shape)}, "
                               f"expected {tuple(inputs.keys.shape[:3])}")
        kept = scores.topk(k, dim=-1).indices
        return kept.sort(dim=-1).values

    def to_dict(self) -> dict:
        return {"method": self.name, **asdict(self)}


def group_queries(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[B, Hq, q, D]`` -> ``[B, Hkv, G, q, D]`` with the G query heads that share each KV head."""
    b, hq, q, d = queries.shape
    return queries.reshape(b, num_kv_heads, hq // num_kv_heads, q, d)
