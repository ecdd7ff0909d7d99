"""CAKE (Qin et al., ICLR 2025): Cascading and Adaptive KV cache Eviction with layer preferences.

Per layer, from the attention ``A`` of the last ``window_size`` prompt queries over the tokens before the window
(``[B, H, G, w, n - w]``):

* layer preference ``P = H^(1/tau1) * V^(1/tau2)``, with ``H = -sum A log(A + 1e-10)`` (spatial dispersion: the
  entropy summed over heads and queries) and ``V = sum var_queries(A)`` (temporal shift: the variance over the
  window's queries, summed over heads and tokens);
* eviction indicator ``I(j) = avg_pool_5(mean_q A(j) + gamma * var_q A(j))``, averaged over the group's query
  heads; the window tokens are always kept.

The cache budget (``budget`` tokens per layer on average, window included, or ``ratio`` of the prompt) is split
across layers in proportion to their preferences. In the cascading mode (the default) the split is redone after
each layer's prefill over the layers seen so far and every one of them is evicted to its new share at once, so the
memory held during prefill never exceeds the total budget; otherwise all layers are evicted after the last one.
During decoding each layer keeps evicting back to its budget plus window with the newest query's attention
(pooled, no variance term), as the reference implementation does.

An average layer size below the window (a high ``ratio`` on a short prompt) keeps only the newest ``size``
window tokens in every layer, the last token always (the reference code has no rule for it); decoding then
keeps that many newest tokens.

Differences from the reference code (github.com/antgroup/cakekv): budgets are split by proportional water-filling
with exact integer totals (the reference floors the shares, gives the excess above a layer's length evenly to
the others and fixes the total on the first layers); a layer is only evicted when its share is below what it
holds (the reference skips compression for prompts up to ``cache_size + window_size``).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from ...errors import LMCompressError, check_positive_int, check_range
from ...registry import EVICTION_METHODS
from .attention_probs import window_attention
from .base import EvictionPolicy, ScoreInputs, evicted_count, topk_mask
from .snapkv import pool_tokens

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer

#: name of the per-token eviction indicator kept by each layer during a prefill round.
CAKE_AUX = "cake"


def proportional_split(weights: list[float], total: int, caps: list[int]) -> list[int]:
    """Integers ``a_i <= caps[i]`` summing to ``min(total, sum(caps))``, proportional to ``weights`` where no cap
    binds (water-filling; the remainder goes to the largest fractional parts). Zero weights split evenly."""
    m = len(weights)
    alloc = [0] * m
    active = list(range(m))
    remaining = total
    shares: dict[int, float] = {}
    while active:
        wsum = sum(max(weights[i], 0.0) for i in active)
        if wsum > 0:
            shares = {i: remaining * max(weights[i], 0.0) / wsum for i in active}
        else:
            shares = {i: remaining / len(active) for i in active}
        capped = [i for i in active if shares[i] >= caps[i]]
        if not capped:
            break
        for i in capped:
            alloc[i] = caps[i]
            remaining -= caps[i]
            active.remove(i)
    if active:
        floors = {i: math.floor(shares[i]) for i in active}
        left = remaining - sum(floors.values())
        order = sorted(active, key=lambda i: shares[i] - floors[i], reverse=True)
        for i in active:
            alloc[i] = floors[i]
        for i in order[:left]:
            alloc[i] += 1
    return alloc


class CakeState:
    """Budgets of the layers one CAKE policy compresses in one cache.

    Attributes:
        layers: the managed layers, bottom to top.
        prefs: layer index -> preference score of the current prefill round.
        budgets: layer index -> tokens before the window kept during decoding (set when a round completes).
        total: tokens before the window the round splits across layers.
        window_keep: window tokens every layer keeps: the window, or the average layer size when that is smaller
            (then only the newest window tokens stay and nothing before the window).
    """

    def __init__(self, policy: CAKE, layers: list[CompressedLayer]) -> None:
        self.policy = policy
        # weak proxies: the layers hold this state, so strong references would make a cycle that keeps the
        # whole cache's storage alive after the cache is dropped (until the cyclic GC runs)
        ordered = sorted(layers, key=lambda layer: layer.layer_idx)
        self._refs = [weakref.ref(layer) for layer in ordered]
        self.layers = [weakref.proxy(layer) for layer in ordered]
        self.prefs: dict[int, float] = {}
        self.budgets: dict[int, int] = {}
        self.total = 0
        self.window_keep = policy.window_size

    def __deepcopy__(self, memo: dict) -> CakeState:
        """A copy managing the deep copies of its layers (a copied cache gets budgets over its own layers)."""
        import copy

        new = CakeState.__new__(CakeState)
        memo[id(self)] = new
        new.policy = self.policy
        new.prefs, new.budgets, new.total = dict(self.prefs), dict(self.budgets), self.total
        new.window_keep = self.window_keep
        layers = [copy.deepcopy(ref(), memo) for ref in self._refs]
        new._refs = [weakref.ref(layer) for layer in layers]
        new.layers = [weakref.proxy(layer) for layer in layers]
        return new

    def start_round(self, n: int) -> None:
        self.prefs = {}
        size = self.policy.layer_size(n)
        self.window_keep = min(self.policy.window_size, size)
        self.total = len(self.layers) * max(0, size - self.policy.window_size)

    def evict_seen(self) -> dict[int, int]:
        """Split the total over the layers of this round so far and evict each to its share."""
        w = self.window_keep
        seen = [layer for layer in self.layers if layer.layer_idx in self.prefs]
        caps = [max(0, layer.held - w) for layer in seen]
        shares = proportional_split([self.prefs[layer.layer_idx] for layer in seen], self.total, caps)
        for layer, share in zip(seen, shares):
            if share + w < layer.held:  # ties (the window's +inf) go to the newest tokens
                inputs_aux = layer.segments[0].aux_view(CAKE_AUX)
                layer.keep(topk_mask(inputs_aux, share + w))
        return {layer.layer_idx: share for layer, share in zip(seen, shares)}

    def finish_round(self, shares: dict[int, int]) -> None:
        self.budgets = dict(shares)
        for layer in self.layers:
            layer.drop_aux(CAKE_AUX)


@EVICTION_METHODS.register("cake")
@dataclass(frozen=True)
class CAKE(EvictionPolicy):
    """Cascading and adaptive KV eviction (see the module docstring).

    Attributes:
        ratio: each layer keeps ``n - floor(ratio * n)`` tokens on average (window included); or
        budget: average tokens per layer, window included (the paper's ``cache_size``). With neither, the paper's
            default ``cache_size`` of 1024 applies.
        window_size: recent tokens always kept, whose queries score the rest (default 32).
        tau1, tau2: temperatures of the entropy and variance terms of the preference, > 0 (default 1, 1).
        gamma: weight of the variance term of the indicator, >= 0 (default 200).
        kernel_size: pooling kernel of the indicator (default 5, odd).
        cascading: re-split and evict after every layer's prefill (default True).
    """

    name = "cake"
    display = "CAKE"
    is_scorer = False
    #: the paper's default cache size (tokens per layer on average, window included).
    PAPER_CACHE_SIZE: ClassVar[int] = 1024
    window_size: int = 32
    tau1: float = 1.0
    tau2: float = 1.0
    gamma: float = 200.0
    kernel_size: int = 5
    cascading: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("window_size", self.window_size)
        check_positive_int("kernel_size", self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise LMCompressError(f"kernel_size={self.kernel_size} must be odd (same-size pooling)")
        for name in ("tau1", "tau2", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise LMCompressError(f"{name}={value!r} is not a number")
        check_range("tau1", float(self.tau1), 0.0, math.inf, low_open=True)
        check_range("tau2", float(self.tau2), 0.0, math.inf, low_open=True)
        check_range("gamma", float(self.gamma), 0.0, math.inf)
        if self.budget is not None and self.budget <= self.window_size:
            raise LMCompressError(
                f"budget={self.budget} must exceed window_size={self.window_size} (it includes the window)"
            )
        if self.budget is None and not self.ratio and self.window_size >= self.PAPER_CACHE_SIZE:
            raise LMCompressError(f"window_size={self.window_size} must be below the default budget 1024")
        if self.protect_sinks or self.protect_recent:
            raise LMCompressError("CAKE keeps its own window; protect_sinks/protect_recent are not supported")

    @property
    def is_noop(self) -> bool:
        return False

    @property
    def query_window(self) -> int:
        return self.window_size

    def layer_size(self, n: int) -> int:
        """Average tokens per layer (window included) for a prompt of ``n`` tokens."""
        if self.budget is not None:
            return min(n, self.budget)
        if not self.ratio:
            return min(n, self.PAPER_CACHE_SIZE)
        return n - evicted_count(n, float(self.ratio))

    # ------------------------------------------------------------------------------------------ scores
    def preference_and_indicator(self, inputs: ScoreInputs) -> tuple[float, torch.Tensor]:
        """The layer preference and the indicator ``[B, Hkv, n]`` (+inf on the window)."""
        w = self.window_size
        n = inputs.num_tokens
        attn = window_attention(inputs, w, self.display)[..., : n - w]  # [B, Hkv, G, w, n-w]
        entropy = -(attn * torch.log(attn + 1e-10)).sum()
        var_q = attn.var(dim=-2)  # [B, Hkv, G, n-w] (unbiased, as torch.var in the reference)
        pref = float(entropy.clamp_min(0) ** (1 / self.tau1) * var_q.sum() ** (1 / self.tau2))
        indicator = attn.mean(dim=-2) + self.gamma * var_q
        indicator = pool_tokens(indicator, self.kernel_size).mean(dim=2)
        return pref, F.pad(indicator, (0, w), value=math.inf)

    def decode_indicator(self, inputs: ScoreInputs) -> torch.Tensor:
        """``[B, Hkv, n]``: pooled attention of the newest query, +inf on the window (all of it when the layer holds
        no more than the window)."""
        n = inputs.num_tokens
        w = min(self.window_size, n)
        if w == n:
            return torch.full(inputs.keys.shape[:3], math.inf, device=inputs.keys.device)
        attn = window_attention(inputs, 1, self.display)[..., 0, : n - w]  # [B, Hkv, G, n-w]
        return F.pad(pool_tokens(attn, self.kernel_size).mean(dim=2), (0, w), value=math.inf)

    # ------------------------------------------------------------------------------------------ cache hooks
    def new_shared_state(self, layers: list[CompressedLayer]) -> CakeState:
        return CakeState(self, layers)

    def after_forward(self, layer: CompressedLayer, query: torch.Tensor, scaling: float,
                      module: torch.nn.Module | None) -> None:
        state: CakeState = layer.shared
        if state is None:
            raise LMCompressError("CAKE runs inside a CompressedCache (it needs the cache's shared budgets)")
        if layer.ragged:
            raise LMCompressError("CAKE cannot compress a layer whose heads hold different lengths")
        if query.shape[2] > 1:
            self._prefill(state, layer, query, scaling, module)
        else:
            self._decode(state, layer, query, scaling, module)

    def _prefill(self, state: CakeState, layer: CompressedLayer, query: torch.Tensor, scaling: float,
                 module: torch.nn.Module | None) -> None:
        inputs = layer.score_inputs(query, scaling, module)
        pref, indicator = self.preference_and_indicator(inputs)
        if layer.layer_idx == state.layers[0].layer_idx:
            state.start_round(inputs.num_tokens)
        layer.set_aux(CAKE_AUX, indicator, fill=math.inf)
        state.prefs[layer.layer_idx] = pref
        last = layer.layer_idx == state.layers[-1].layer_idx
        if self.cascading or last:
            shares = state.evict_seen()
            if last:
                state.finish_round(shares)

    def _decode(self, state: CakeState, layer: CompressedLayer, query: torch.Tensor, scaling: float,
                module: torch.nn.Module | None) -> None:
        budget = state.budgets.get(layer.layer_idx)
        if budget is None or layer.held <= budget + state.window_keep:
            return
        size = budget + state.window_keep
        inputs = layer.score_inputs(query, scaling, module)
        layer.keep(topk_mask(self.decode_indicator(inputs), size), in_place=True)
