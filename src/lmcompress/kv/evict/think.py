"""ThinK (Xu et al., 2024, https://arxiv.org/abs/2407.21018; kvpress 0.5.5's ThinKPress): prune key channels.

Rule (kvpress's scoring, read from ``think_press.py``): after a prefill forward, per batch row and KV head,

    channel score_d = mean over the window's queries and the group's query heads of q_d^2
                      x mean over the held keys of k_d^2,

with the post-RoPE queries of the forward's last ``window_size`` tokens (kvpress recomputes the same queries from
the hidden states) and every key the layer holds at that point (in a composition: what the earlier policies
kept). The ``floor(D * key_channel_compression_ratio)`` lowest-scored channels are pruned (``torch.topk(...,
largest=False)``, as kvpress), the others kept.

Deviation, the point of this module: kvpress only zeroes the pruned channels (the keys keep their shape, no
memory is saved). Here they are **not stored**: the layer keeps the kept channel indices per (layer, batch row,
KV head) and, for the pruned tokens, only those channels (:mod:`lmcompress.kv.pruned_keys`); ``cache.nbytes``
shows the saving. Values are untouched. For attention, a decoding step gathers the query's kept channels per
KV head (nothing is re-expanded); a prefill chunk over pruned keys and packed storage re-expand the keys
transiently to ``[B, Hkv, n, D]`` with zeros in the dropped channels (one layer's keys at full width for one
attention call; packed: block by block). Either way ``q . k`` is kvpress's over its zeroed keys, up to float
rounding.

Other deviations and details:

* Keys of tokens appended after the prefill (decoding steps, chunks fed with compression paused such as the
  question) are stored whole, as in kvpress (its hook prunes prefill forwards only).
* Chunked prefill: the channels are chosen at the layer's first compressing prefill forward and fixed; later
  prefill chunks prune their tokens (and any whole tokens held since) to the same channels. kvpress re-scores
  at every prefill forward over all held keys, zeroing a new set each time (whose union it then holds).
* With a quantizer the packed keys hold the kept channels only (the store's key codec quantizes ``Dk``
  channels: KIVI's per-channel key groups are unchanged per channel); tokens committed to packed storage are
  pruned, so with KIVI decoding keys are whole only while in its full-precision window. Pre-RoPE (kvquant) and
  attention-aware (qaq) storage are refused, as are codecs whose channel groups do not divide ``Dk``.
* The pruned count is ``floor(D * r)`` robust to binary rounding (kvpress: ``int(D * r)``).
* Composition: ``ThinK(base=SnapKV(ratio=0.5), ...)`` (CLI: ``think:base=snapkv,base.ratio=0.5,...``) or
  ``ComposedPolicy(policies=(SnapKV(...), ThinK(...)))`` prunes the channels of what SnapKV kept (kvpress's
  ``ComposedPress([SnapKVPress, ThinKPress])``); ThinK evicts no token itself. Key re-rotation of pruned keys is
  refused. ThinK takes no sweep ratio (its size is its channel ratio): give the base its own (``base.ratio``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ...errors import LMCompressError, check_positive_int, check_range
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, check_wrapper_sizes, evicted_count

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer


def think_channel_scores(keys: torch.Tensor, queries: torch.Tensor, valid: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """ThinK's channel scores.

    Args:
        keys: ``[B, Hkv, n, D]`` held keys (post-RoPE).
        queries: ``[B, Hq, w, D]`` the window's queries (post-RoPE).
        valid: ``[B, Hkv, n]`` bool (False on the left padding of ragged heads) or None.

    Returns:
        ``[B, Hkv, D]`` float32 scores (higher = kept).
    """
    b, hkv, _, d = keys.shape
    q_norm = queries.float().pow(2).mean(dim=2)  # [B, Hq, D]
    q_norm = q_norm.view(b, hkv, queries.shape[1] // hkv, d).mean(dim=2)
    k2 = keys.float().pow(2)
    if valid is None:
        k_norm = k2.mean(dim=2)
    else:
        k_norm = (k2 * valid[..., None]).sum(dim=2) / valid.sum(dim=-1, keepdim=True).clamp(min=1)
    return q_norm * k_norm


def kept_channels(scores: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """``[B, Hkv, D - n_pruned]`` int64 ascending indices of the channels not among the ``n_pruned`` lowest
    ``scores: [B, Hkv, D]`` (``torch.topk(largest=False)``, kvpress's choice)."""
    d = scores.shape[-1]
    drop = scores.topk(n_pruned, dim=-1, largest=False).indices
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, drop, False)
    return keep.nonzero()[:, -1].view(*scores.shape[:2], d - n_pruned)


@EVICTION_METHODS.register("think")
@dataclass(frozen=True)
class ThinK(EvictionPolicy):
    """Prune a fraction of every KV head's key channels after the prefill; the pruned ones are not stored.

    See the module docstring for the rule and the deviations from kvpress.

    Attributes:
        key_channel_compression_ratio: fraction of key channels pruned per head, in [0, 1).
        window_size: queries (the newest tokens of the prefill forward) that score the channels.
        base: an optional token-eviction policy run first on each prefill chunk (as ``ComposedPolicy`` would:
            one that compresses each prefill chunk, e.g. snapkv, adakv); ThinK then prunes what it kept.
    """

    name = "think"
    display = "ThinK"
    is_scorer = False
    #: ComposedPolicy may chain it: it runs its own ``after_forward`` on the chunk (it evicts no token).
    composes_in_chain = True
    #: alone it evicts no token: the layer keeps no position per token (the positions stay contiguous).
    #: the CLI's and grids' ratio sweep does not apply (``parse_method(..., ratio=)`` gives it to ``base``).
    takes_ratio: ClassVar[bool] = False

    @property
    def evicts_tokens(self) -> bool:  # alone: no position per token is kept (positions stay contiguous)
        return self.base is not None

    key_channel_compression_ratio: float = 0.0
    window_size: int = 32
    base: EvictionPolicy | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wrapper_sizes(self)
        if self.base is not None:
            from .composed import ComposedPolicy

            if not isinstance(self.base, EvictionPolicy) or isinstance(self.base, ThinK):
                raise LMCompressError(f"think: base={self.base!r} must be a token-eviction policy (snapkv, ...)")
            # the same rules as a composition (one that compresses each prefill chunk)
            try:
                chain = ComposedPolicy(policies=(self.base, dataclasses.replace(self, base=None)))
            except LMCompressError as err:
                raise LMCompressError(f"think cannot take base={self.base.name} ({err})") from None
            object.__setattr__(self, "_chain", chain)
        r = self.key_channel_compression_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise LMCompressError(f"key_channel_compression_ratio={r!r} is not a number; allowed: [0, 1)")
        check_range("key_channel_compression_ratio", float(r), 0.0, 1.0)
        check_positive_int("window_size", self.window_size)

    @property
    def is_noop(self) -> bool:
        return self.key_channel_compression_ratio == 0 and (self.base is None or self.base.is_noop)

    @property
    def query_window(self) -> int | None:
        if self.base is None:
            return self.window_size
        w = self.base.query_window
        return None if w is None else max(w, self.window_size)

    def n_keep(self, n: int, layer_idx: int = 0, num_layers: int = 1) -> int:
        return n if self.base is None else self.base.n_keep(n, layer_idx, num_layers)

    def with_budget(self, budget: int) -> ThinK:
        if self.base is None:
            raise LMCompressError("think takes no token budget (it prunes key channels); give it a base policy")
        return dataclasses.replace(self, base=self.base.with_budget(budget))

    def observe(self, layer: CompressedLayer, query: torch.Tensor, scaling: float) -> None:
        if self.base is not None:
            self.base.observe(layer, query, scaling)

    def n_pruned(self, head_dim: int) -> int:
        return evicted_count(head_dim, float(self.key_channel_compression_ratio))

    def channels_for(self, keys: torch.Tensor, queries: torch.Tensor, valid: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """``[B, Hkv, Dk]`` kept channels for ``keys: [B, Hkv, n, D]`` and ``queries: [B, Hq, q, D]`` (the last
        ``window_size`` queries are used)."""
        scores = think_channel_scores(keys, queries[:, :, -self.window_size :], valid)
        return kept_channels(scores, self.n_pruned(keys.shape[-1]))

    def after_forward(self, layer: CompressedLayer, query: torch.Tensor, scaling: float,
                      module: torch.nn.Module | None) -> None:
        """After a prefill forward (more than one query): the base's eviction, if any, then choose the channels
        (first time) and prune."""
        if self.base is not None:
            self._chain.after_forward(layer, query, scaling, module)
            return
        if query.shape[2] <= 1 or self.n_pruned(layer.head_dim) == 0:
            return
        if layer.key_channels() is not None:
            layer.prune_key_channels(layer.key_channels())  # fixed channels: prune the newer tokens
            return
        inputs = layer.score_inputs(query, scaling, module)
        layer.prune_key_channels(self.channels_for(inputs.keys, inputs.queries, inputs.valid))


def cache_key_channels(cache) -> list[torch.Tensor | None]:
    """Per layer of a :class:`~lmcompress.kv.cache.CompressedCache`, the ``[B, Hkv, Dk]`` kept key channels
    (None where the keys are whole)."""
    return [layer.key_channels() for layer in cache.layers]
