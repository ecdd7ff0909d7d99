"""Approximate leverage scores of the pre-RoPE keys (Chari & Van Durme, 2025, "Compactor", arXiv:2507.08143, as
kvpress's LeverageScorePress computes them): keys that are outliers of the head's key geometry (high statistical
leverage) are kept. Query-agnostic; approximate (a random Gaussian sketch of the key channels)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import LMCompressError, check_positive_int
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, ScoreInputs


def pre_rope_keys(inputs: ScoreInputs, owner: str) -> torch.Tensor:
    """``[B, Hkv, n, D]`` float32 keys with RoPE undone (exact up to rounding; uniform layout only)."""
    if inputs.rope is None or not inputs.rope.available:
        raise LMCompressError(f"{owner} needs the model's rotary embedding; build the cache with "
                              "CompressedCache(model, ...)")
    if inputs.valid is not None:
        raise LMCompressError(f"{owner} needs the same tokens in every head (not a ragged layer)")
    return inputs.rope.unrotate(inputs.keys, inputs.positions[0, 0].long(), inputs.layer_idx)


def cholesky_with_jitter(gram: torch.Tensor, jitter: float = 1e-2, tries: int = 5) -> torch.Tensor:
    """Lower Cholesky factor of ``gram + eps I`` (``[..., k, k]``), raising ``eps`` tenfold until it succeeds."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    eps = jitter
    for _ in range(tries):
        factor, info = torch.linalg.cholesky_ex(gram + eps * eye)
        if bool((info == 0).all()):
            return factor
        eps = max(1e-8, 10.0 * eps)
    raise LMCompressError(f"Cholesky factorisation of the sketched key Gram matrix failed after {tries} tries")


def leverage_scores(keys: torch.Tensor, sketch: torch.Tensor) -> torch.Tensor:
    """Leverage ``diag(X (X'X + eps I)^-1 X')`` of ``X = (keys - mean over tokens) @ sketch``.

    Args:
        keys: ``[B, H, n, D]`` float32.
        sketch: ``[B, H, D, k]`` float32 right sketch.

    Returns:
        ``[B, H, n]`` float32, clamped at 0.
    """
    x = (keys - keys.mean(dim=-2, keepdim=True)) @ sketch  # [B, H, n, k]
    gram = x.transpose(-2, -1) @ x
    factor = cholesky_with_jitter(0.5 * (gram + gram.transpose(-2, -1)))
    solved = torch.cholesky_solve(x.transpose(-2, -1), factor)  # [B, H, k, n]
    return (x * solved.transpose(-2, -1)).sum(dim=-1).clamp_min(0)


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """``(s - mean) / max(std, 1e-6)`` over the whole tensor (every head alike, as kvpress)."""
    return (scores - scores.mean()) / scores.std().clamp_min(1e-6)


@EVICTION_METHODS.register("leverage")
@dataclass(frozen=True)
class LeverageScore(EvictionPolicy):
    """score(j) = z-score of the sketched leverage of pre-RoPE key j (:func:`leverage_scores`).

    The sketch is ``[D, sketch_dimension]`` Gaussian scaled by ``1/sqrt(sketch_dimension)``, one per batch row
    and head, drawn from a generator seeded with ``seed`` (kvpress draws from the global generator, so kept sets
    agree with it only in distribution). Pre-RoPE keys come from undoing RoPE on the cached keys (kvpress
    re-projects the hidden states: the same keys up to rounding), so this also works on a cache compressed
    before. The z-score is over all heads of the layer, which only matters inside AdaKV.

    Attributes:
        sketch_dimension: sketch columns (default 48).
        seed: sketch seed (default 0).
    """

    name = "leverage"
    display = "LeverageScore"
    sketch_dimension: int = 48
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("sketch_dimension", self.sketch_dimension)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        keys = pre_rope_keys(inputs, self.display)
        b, h, _, d = keys.shape
        k = self.sketch_dimension
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        sketch = (torch.randn(b, h, d, k, generator=gen) / math.sqrt(k)).to(keys.device)
        return zscore(leverage_scores(keys, sketch))
