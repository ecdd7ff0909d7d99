"""SnapKV (Li et al., 2024): score each cached token by the attention it receives from the last ``window_size``
queries of the prompt, smoothed by average pooling; the observation window itself is always kept."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import LMCompressError, check_positive_int
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, ScoreInputs, group_queries


def window_attention(inputs: ScoreInputs, window: int) -> torch.Tensor:
    """Softmax attention of the last ``window`` queries over all ``n`` keys, with the causal mask inside the window.

    Returns:
        ``[B, Hkv, G, window, n]`` float32 probabilities.
    """
    keys = inputs.keys
    _, hkv, n, _ = keys.shape
    q = group_queries(inputs.queries[:, :, -window:], hkv).float()
    logits = torch.einsum("bhgqd,bhkd->bhgqk", q, keys.float()) * inputs.scaling
    q_pos = torch.arange(n - window, n, device=keys.device)
    future = torch.arange(n, device=keys.device)[None, :] > q_pos[:, None]
    logits = logits.masked_fill(future, -math.inf)
    return logits.softmax(dim=-1)


@EVICTION_METHODS.register("snapkv")
@dataclass(frozen=True)
class SnapKV(EvictionPolicy):
    """SnapKV scores.

    score(j) = avg_pool_k( mean over the last ``window_size`` queries of softmax attention to token j ), averaged
    over the query heads of each KV group; the window tokens get +inf (always kept).
    Needs the compressed chunk to hold more than ``window_size`` tokens.

    Attributes:
        window_size: observation window (default 64).
        kernel_size: average-pooling kernel (default 5, odd).
    """

    name = "snapkv"
    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("window_size", self.window_size)
        check_positive_int("kernel_size", self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise LMCompressError(f"kernel_size={self.kernel_size} must be odd (same-size pooling)")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        w = self.window_size
        n = inputs.keys.shape[2]
        q = inputs.queries.shape[2]
        if q < w or n <= w:
            raise LMCompressError(
                f"SnapKV needs window_size={w} queries in the compressed chunk and more than {w} cached tokens; "
                f"got {q} queries and {n} tokens: lower window_size or compress a longer prompt"
            )
        attn = window_attention(inputs, w)[..., : n - w]  # [B, Hkv, G, w, n-w]
        scores = attn.mean(dim=-2)  # [B, Hkv, G, n-w]
        b, hkv, g, m = scores.shape
        pooled = F.avg_pool1d(scores.reshape(-1, 1, m), self.kernel_size, stride=1, padding=self.kernel_size // 2)
        scores = pooled.reshape(b, hkv, g, m).mean(dim=2)
        return F.pad(scores, (0, w), value=math.inf)
