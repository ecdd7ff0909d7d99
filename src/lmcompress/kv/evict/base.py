"""Base class of KV eviction policies.

A policy is a small frozen dataclass. :meth:`EvictionPolicy.score` returns one score per cached token and KV head
(higher = keep); :meth:`EvictionPolicy.keep_mask` turns scores into the kept entries, honouring the ratio or
token budget and the protected sink and recent tokens. Policies that need more than per-token scores (layer
budgets, cascades, decoding-time rules) override :meth:`EvictionPolicy.n_keep`, :meth:`EvictionPolicy.keep_mask`
or the cache hooks :meth:`EvictionPolicy.observe` / :meth:`EvictionPolicy.after_forward`.

Kept counts: at ratio ``r`` a head holding ``n`` tokens keeps exactly ``n - floor(r * n)``; with a budget ``b``
it keeps ``min(n, b)``. (kvpress keeps ``max(1, int(n * (1 - r)))``: one fewer when ``r * n`` is not whole, and
also when it is but ``1 - r`` rounds down in binary: n = 3000, r = 0.9 keeps 299 there, 300 here.)

Ties: among tokens with equal scores the newest are kept first (:func:`topk_mask`). Windowed scorers (SnapKV,
PyramidKV, CAKE, TOVA, and AdaKV or decoding compression around them) give their observation window ``+inf``, so
a budget smaller than the window keeps the newest window tokens, the last prompt token always: a 300-token
prompt with a 64-token window at ratio 0.99 keeps positions 297-299.

How a layer drives a policy (see :class:`~lmcompress.kv.layer.CompressedLayer`): after every attention call it
runs ``policy.observe(layer, query, scaling)`` and, unless compression is paused,
``policy.after_forward(layer, query, scaling, module)``. The default ``after_forward`` compresses prefill chunks
(more than one query): ``layer.keep(policy.keep_mask(layer.score_inputs(...)))``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ...errors import LMCompressError, check_positive_int, check_range

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer


@dataclass
class ScoreInputs:
    """What a policy sees when a layer is compressed.

    Attributes:
        keys: ``[B, Hkv, n, D]`` every cached key of the layer, after RoPE (dequantized if stored packed).
        values: ``[B, Hkv, n, D]`` the matching values.
        queries: ``[B, Hq, q, D]`` queries (after RoPE) of the last ``q`` of the ``n`` tokens: the forward chunk
            that triggered compression, or buffered decoding queries.
        positions: ``[B, Hkv, n]`` logical positions of the cached tokens (-1 on padding).
        scaling: the attention's softmax scale.
        layer_idx, num_layers: where this layer sits.
        module: the attention module (read-only use: config, head counts).
        hidden_states: ``[B, q, hidden]`` input of the attention module, when a scoring hook captured it.
        valid: ``[B, Hkv, n]`` bool, False on padding, or None when every entry is real. Heads of a ragged layer
            (different lengths per head) are left-padded, so the newest tokens are aligned at the end.
        aux: per-token values the layer keeps for the policy (``[B, Hkv, n]`` float32 each), e.g. ``"h2o"``.
        seen: tokens seen by the layer (the position the next token gets).
        rope: the model's rotary embedding (:class:`~lmcompress.kv.rope.RopeTable`) or None.
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
    valid: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: int | None = None
    rope: Any = None

    @property
    def num_kv_groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    def valid_counts(self) -> torch.Tensor:
        """``[B, Hkv]`` int64 real tokens per head."""
        if self.valid is None:
            b, h, n = self.keys.shape[:3]
            return torch.full((b, h), n, dtype=torch.int64, device=self.keys.device)
        return self.valid.sum(dim=-1)

    def tail(self, q: int) -> ScoreInputs:
        """The same inputs restricted to the newest ``q`` tokens (keys, values, positions, aux, valid)."""
        return dataclasses.replace(
            self,
            keys=self.keys[:, :, -q:],
            values=self.values[:, :, -q:],
            positions=self.positions[:, :, -q:],
            valid=None if self.valid is None else self.valid[:, :, -q:],
            aux={k: v[:, :, -q:] for k, v in self.aux.items()},
        )


def evicted_count(n: int, ratio: float) -> int:
    """``floor(ratio * n)``, robust to binary rounding of decimal ratios (0.29 * 100 is 28.999...)."""
    return math.floor(ratio * n + 1e-9)


def topk_mask(scores: torch.Tensor, k: torch.Tensor | int, order: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``k`` highest scores along the last dim; ties go to the newest token.

    Ties matter where a policy gives several tokens the same score, above all the ``+inf`` of protected tokens
    (SnapKV's observation window, sinks, ``protect_recent``): when fewer tokens are kept than are protected, the
    newest of them are kept (the last token first). ``torch.topk`` alone leaves tie order unspecified (on CPU it
    took the oldest).

    Args:
        scores: ``[..., n]`` float; entries at ``-inf`` are never selected.
        k: an int or an int64 tensor of shape ``scores.shape[:-1]`` (a count per row).
        order: ``[..., n]`` tie-break key, higher = kept first among equal scores (e.g. token positions when
            one row mixes the tokens of several heads); default: the index (the newest token is last).

    Returns:
        ``[..., n]`` bool with exactly ``min(k, entries above -inf)`` True per row.
    """
    n = scores.shape[-1]
    if isinstance(k, int):
        k = torch.full(scores.shape[:-1], k, dtype=torch.int64, device=scores.device)
    k = k.clamp(0, n)
    kmax = int(k.max()) if k.numel() else 0
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if kmax == 0:
        return mask
    if order is None:  # stable descending sort of the reversed row: equal scores come newest first
        idx = (n - 1) - scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :kmax]
    else:  # lexicographic (score, order), both descending: sort by order, then stably by score
        by_order = order.sort(dim=-1, descending=True, stable=True).indices
        by_score = scores.gather(-1, by_order).sort(dim=-1, descending=True, stable=True).indices
        idx = by_order.gather(-1, by_score[..., :kmax])
    take = torch.arange(kmax, device=scores.device) < k.unsqueeze(-1)
    take &= scores.gather(-1, idx) > -math.inf
    mask.scatter_(-1, idx, take)
    return mask


def topk_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices ``[..., k]`` of the ``k`` highest of ``scores: [..., n]`` per row, ties to the newest:
    the entries :func:`topk_mask` selects, for scores without NaN and without ``-inf`` (which ``topk_mask``
    never selects, so its rows could keep fewer), computed with no read of a device value on the host.

    Each score is mapped to an int64 key that orders like the float (its bits, the negative ones flipped;
    ``-0.0`` first made ``+0.0``, which sorts equal to it) times ``n`` plus its index, so that equal scores order
    by index, newest highest; every key is distinct and ``torch.topk`` picks exactly the ``k`` largest.
    """
    n = scores.shape[-1]
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = bits * n + torch.arange(n, device=scores.device)
    return key.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


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
    #: how messages name the method (the paper's spelling).
    display: ClassVar[str] = "base"
    #: whether :meth:`score` needs ``ScoreInputs.hidden_states`` (a scoring hook must be active).
    needs_hidden_states: ClassVar[bool] = False
    #: whether this is a per-token scorer that wrappers (AdaKV, decoding compression, threshold) can use.
    is_scorer: ClassVar[bool] = True
    #: whether heads may keep different numbers of tokens (the layer then stores them ragged).
    headwise: ClassVar[bool] = False
    #: whether :meth:`score` never gives NaN or ``-inf``, so that the default :meth:`after_forward` may pick a
    #: uniform layer's kept tokens with :func:`topk_index` (same tokens as :meth:`keep_mask`, no host sync).
    #: Only read where the class keeps the default ``keep_mask`` / ``keep_counts``.
    finite_scores: ClassVar[bool] = False

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

    @property
    def query_window(self) -> int | None:
        """How many of the newest queries :meth:`score` reads (0: none; None: all it is given)."""
        return 0

    def n_keep(self, n: int, layer_idx: int = 0, num_layers: int = 1) -> int:
        """Tokens kept per head out of ``n`` in layer ``layer_idx``."""
        if self.budget is not None:
            return min(n, self.budget)
        return n - evicted_count(n, float(self.ratio))

    def keep_counts(self, counts: torch.Tensor, layer_idx: int, num_layers: int) -> torch.Tensor:
        """:meth:`n_keep` applied to every entry of an int64 tensor of per-head token counts."""
        out = counts.clone()
        for n in torch.unique(counts).tolist():
            out[counts == n] = self.n_keep(int(n), layer_idx, num_layers)
        return out

    def with_budget(self, budget: int) -> EvictionPolicy:
        """This policy, keeping ``budget`` tokens per head (decoding compression uses it)."""
        return dataclasses.replace(self, ratio=0.0, budget=budget)

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
            scores = scores.masked_fill((positions >= 0) & (positions < self.protect_sinks), math.inf)
        if self.protect_recent:
            newest = positions.amax(dim=-1, keepdim=True)
            scores = scores.masked_fill(positions > newest - self.protect_recent, math.inf)
        return scores

    def final_scores(self, inputs: ScoreInputs) -> torch.Tensor:
        """:meth:`score` in float32 with protection applied and padding at ``-inf``; shape checked."""
        scores = self.score(inputs)
        if scores.shape != inputs.keys.shape[:3]:
            raise RuntimeError(f"{self.name}.score returned shape {tuple(scores.shape)}, "
                               f"expected {tuple(inputs.keys.shape[:3])}")
        scores = self.protect(scores.float(), inputs.positions)
        if inputs.valid is not None:
            scores = scores.masked_fill(~inputs.valid, -math.inf)
        return scores

    def keep_mask(self, inputs: ScoreInputs) -> torch.Tensor:
        """``[B, Hkv, n]`` bool: the entries to keep (per head the ``n_keep`` best-scored real tokens)."""
        counts = inputs.valid_counts()
        k = self.keep_counts(counts, inputs.layer_idx, inputs.num_layers)
        if bool((k >= counts).all()):
            if inputs.valid is not None:
                return inputs.valid.clone()
            return torch.ones(inputs.keys.shape[:3], dtype=torch.bool, device=inputs.keys.device)
        return topk_mask(self.final_scores(inputs), k)

    def select(self, inputs: ScoreInputs) -> torch.Tensor:
        """Kept token indices ``[B, Hkv, k]``, ascending, for inputs where every head keeps the same count."""
        mask = self.keep_mask(inputs)
        counts = mask.sum(dim=-1)
        k = int(counts.flatten()[0])
        if not bool((counts == k).all()):
            raise LMCompressError(f"{self.name} keeps different counts per head; use keep_mask()")
        return mask.nonzero()[:, 2].view(*mask.shape[:2], k)

    # ------------------------------------------------------------------------------------------ cache hooks
    def new_layer_state(self) -> Any:
        """Per-layer mutable state (counters, buffers) or None; it may expose ``tensors()`` for byte counts."""
        return None

    def new_shared_state(self, layers: list[CompressedLayer]) -> Any:
        """State shared by the ``layers`` this policy compresses in one cache (CAKE's budgets), or None."""
        return None

    def observe(self, layer: CompressedLayer, query: torch.Tensor, scaling: float) -> None:
        """Called after every attention call of ``layer`` (compression paused or not)."""

    def after_forward(self, layer: CompressedLayer, query: torch.Tensor, scaling: float,
                      module: torch.nn.Module | None) -> None:
        """Compress ``layer`` after an attention call; by default prefill chunks (more than one query) only."""
        if query.shape[2] <= 1:
            return
        inputs = layer.score_inputs(query, scaling, module)
        if self._uniform_fast_path(inputs):
            n = inputs.num_tokens
            k = self.n_keep(n, inputs.layer_idx, inputs.num_layers)
            if k < n:
                layer.keep_uniform(topk_index(self.final_scores(inputs), k))
            return
        layer.keep(self.keep_mask(inputs))

    def _uniform_fast_path(self, inputs: ScoreInputs) -> bool:
        """Whether :meth:`after_forward` may select with :func:`topk_index`: every head holds the same tokens
        (no padding) and the class keeps the default count and mask rules with finite scores."""
        cls = type(self)
        return (cls.finite_scores and inputs.valid is None and cls.keep_mask is EvictionPolicy.keep_mask
                and cls.keep_counts is EvictionPolicy.keep_counts)

    # ------------------------------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        out: dict[str, Any] = {"method": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, EvictionPolicy) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> EvictionPolicy:
        """Inverse of :meth:`to_dict` without the ``method`` key (nested policies are rebuilt by name)."""
        from ...registry import EVICTION_METHODS

        kwargs = {}
        for key, value in data.items():
            if isinstance(value, dict) and "method" in value:
                entry = dict(value)
                value = EVICTION_METHODS.get(entry.pop("method")).from_dict(entry)
            kwargs[key] = value
        return cls(**kwargs)


def group_queries(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[B, Hq, q, D]`` -> ``[B, Hkv, G, q, D]`` with the G query heads that share each KV head."""
    b, hq, q, d = queries.shape
    return queries.reshape(b, num_kv_heads, hq // num_kv_heads, q, d)


def check_wrapper_sizes(policy: EvictionPolicy) -> None:
    """Wrappers take their sizes from the wrapped policy or their own rule: their ratio/budget must stay unset."""
    if policy.ratio or policy.budget is not None:
        raise LMCompressError(
            f"{policy.name} takes its size from its base policy or its own parameters; "
            f"leave ratio/budget unset (got ratio={policy.ratio}, budget={policy.budget})"
        )


def require_scorer(owner: str, base: object) -> EvictionPolicy:
    """Check that ``base`` is a per-token scoring policy usable inside ``owner``."""
    if not isinstance(base, EvictionPolicy) or not base.is_scorer:
        raise LMCompressError(
            f"{owner} needs a score-based eviction policy as base (knorm, snapkv, ...); got {base!r}"
        )
    return base


def check_wraps_scorer(policy: EvictionPolicy) -> EvictionPolicy:
    """The checks every wrapper around a score-based ``base`` makes first: the base scores tokens
    (:func:`require_scorer`) and the wrapper's own ratio/budget stay unset (:func:`check_wrapper_sizes`); returns
    the base."""
    base = require_scorer(policy.name, policy.base)
    check_wrapper_sizes(policy)
    return base


class DelegatesToBase:
    """Mixin of the wrappers around a score-based ``base`` policy (AdaKV, CriticalKV, ChunkKV, ...): their
    no-op test, observation window, budget and query observation are the base's. Put it before
    :class:`EvictionPolicy` in the bases; a wrapper overrides what it does differently."""

    base: EvictionPolicy | None

    @property
    def is_noop(self) -> bool:
        return self.base.is_noop

    @property
    def query_window(self) -> int | None:
        return self.base.query_window

    def with_budget(self, budget: int):
        """The same wrapper around ``base.with_budget(budget)``."""
        return dataclasses.replace(self, base=self.base.with_budget(budget))

    def observe(self, layer: CompressedLayer, query: torch.Tensor, scaling: float) -> None:
        self.base.observe(layer, query, scaling)
