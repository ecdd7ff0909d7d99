"""LagKV (Liang et al., 2025, arXiv:2504.04704): score the tokens of each partition by how much they stand out from
the *next* partition (the "lag" reference): keys and values are min-max normalised with the next partition's
per-channel range, and a token whose normalised channels spread widely (large standard deviation) carries
information the reference does not. Query-agnostic and attention-free."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import LMCompressError, check_positive_int
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, ScoreInputs


def lag_scores(states: torch.Tensor, lag: int) -> torch.Tensor:
    """``states: [B, H, P, lag, D]`` partitions (P >= 2) -> ``[B, H, P - 1, lag]`` softmax-normalised lag scores of
    the first ``P - 1`` partitions: ``softmax_lag(std_D((x - min_ref) / (max_ref - min_ref)))`` with the next
    partition as reference."""
    ref, cur = states[:, :, 1:], states[:, :, :-1]
    low = ref.amin(dim=-2, keepdim=True)
    high = ref.amax(dim=-2, keepdim=True)
    return ((cur - low) / (high - low)).std(dim=-1).softmax(dim=-1)


@EVICTION_METHODS.register("lagkv")
@dataclass(frozen=True)
class LagKV(EvictionPolicy):
    """LagKV scores (kvpress's LagKVPress).

    Tokens ``n_sink .. end`` (``end = n_sink + floor((n - n_sink) / lag_size) * lag_size``) form partitions of
    ``lag_size``; every partition but the last is scored against the next one (:func:`lag_scores`, keys and
    values averaged); without ``cross_scoring`` the scores become within-partition ranks ``rank / lag_size``
    (so every partition keeps about the same share); the sinks and the last ``lag_size + (n - end)`` tokens
    score 1 (kept first). Below ``n_sink + 2 * lag_size`` tokens the sinks score 1 and the rest ``i / (n -
    n_sink)`` (the newest kept), as in kvpress.

    Computed in float32 (kvpress: the cache dtype). Heads of a ragged layer (padding) are not supported.

    Attributes:
        n_sink: initial tokens always kept (default 4).
        lag_size: partition length (default 128).
        cross_scoring: keep the raw softmax scores, comparable across partitions (for AdaKV) (default False).
    """

    name = "lagkv"
    display = "LagKV"
    n_sink: int = 4
    lag_size: int = 128
    cross_scoring: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("n_sink", self.n_sink, allow_zero=True)
        check_positive_int("lag_size", self.lag_size)
        if not isinstance(self.cross_scoring, bool):
            raise LMCompressError(f"cross_scoring={self.cross_scoring!r} must be true or false")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        if inputs.valid is not None:
            raise LMCompressError("lagkv scores contiguous partitions and does not support ragged heads")
        keys, values = inputs.keys.float(), inputs.values.float()
        b, h, n, d = keys.shape
        s, lag = self.n_sink, self.lag_size
        score = torch.ones((b, h, n), device=keys.device)
        if n < s + 2 * lag:
            if n > s:
                score[:, :, s:] = torch.arange(n - s, device=keys.device) / (n - s)
            return score
        end = s + ((n - s) // lag) * lag
        parts = (end - s) // lag
        k = lag_scores(keys[:, :, s:end].reshape(b, h, parts, lag, d), lag)
        v = lag_scores(values[:, :, s:end].reshape(b, h, parts, lag, d), lag)
        lagged = (k + v) / 2  # [B, H, parts - 1, lag]
        if not self.cross_scoring:
            lagged = lagged.argsort(dim=-1).argsort(dim=-1).float() / lag
        score[:, :, s : end - lag] = lagged.reshape(b, h, -1)
        return score
