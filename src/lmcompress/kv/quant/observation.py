"""What a layer hands to attention-aware storage (QAQ) after each attention: the last query rows and enough to
turn their scores into the softmax probabilities the model actually used.

Built only for stores with ``needs_attention`` (nothing is computed otherwise). The probability of held token
``j`` for query row ``i`` is ``exp(scaling * q_i . k_j - lse_i)``: ``lse`` comes from the attention pass itself
(block path) or, when every held token is in full precision, from the keys given here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionObservation:
    """Attributes:
    query: ``[B, Hq, w, D]`` the last ``w`` query rows of the forward (after RoPE).
    scaling: the softmax scale.
    mask: bool ``[B or 1, 1, w, held]`` (True = visible) or None (all visible).
    lse: ``[B, Hq, w]`` float32 log-sum-exp of each row over all held tokens, or None when ``fp_keys`` are all
        the held tokens (the store normalizes over them).
    fp_keys: ``[B, Hkv, n_fp, D]`` the full-precision (not yet committed) keys, the last ``n_fp`` held tokens.
    full: probabilities over every held token are wanted (an eviction follows), not only the recent ones.
    all_queries: ``[B, Hq, q, D]`` every query row of the forward (``query`` is its tail), or None.
    """

    query: torch.Tensor
    scaling: float
    mask: torch.Tensor | None
    lse: torch.Tensor | None
    fp_keys: torch.Tensor
    full: bool = False
    all_queries: torch.Tensor | None = None


def window_probabilities(obs: AttentionObservation, keys: torch.Tensor, columns: slice) -> torch.Tensor:
    """Max over the observed rows and the query heads of each KV group of the softmax probability of ``keys``.

    Args:
        obs: the observation (``lse`` must be set).
        keys: ``[B, Hkv, n, D]`` the held tokens at ``columns`` (a slice of the held axis).

    Returns:
        ``[B, Hkv, n]`` float32.
    """
    b, hq, w, d = obs.query.shape
    hkv = keys.shape[1]
    qg = obs.query.reshape(b, hkv, hq // hkv, w, d).float()
    s = torch.einsum("bhgwd,bhnd->bhgwn", qg, keys.float()) * obs.scaling
    lse = obs.lse.reshape(b, hkv, hq // hkv, w, 1)
    p = torch.exp(s - lse)
    if obs.mask is not None:
        p = p.masked_fill(~obs.mask[..., columns].unsqueeze(2), 0.0)
    return p.amax(dim=(2, 3))


def lse_over(obs: AttentionObservation, keys: torch.Tensor) -> torch.Tensor:
    """``[B, Hq, w]`` log-sum-exp of the observed rows over ``keys: [B, Hkv, n, D]`` (all held tokens)."""
    b, hq, w, d = obs.query.shape
    hkv = keys.shape[1]
    qg = obs.query.reshape(b, hkv, hq // hkv, w, d).float()
    s = torch.einsum("bhgwd,bhnd->bhgwn", qg, keys.float()) * obs.scaling
    if obs.mask is not None:
        s = s.masked_fill(~obs.mask.unsqueeze(2), -torch.inf)
    return torch.logsumexp(s, dim=-1).reshape(b, hq, w)
