"""SnapKV (Li et al., 2024): score each cached token by the attention it receives from the last ``window_size``
queries of the prompt, smoothed by average pooling; the observation window itself is always kept."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import LMCompressError, check_positive_int
from ...registry import EVICTION_METHODS
from .attention_probs import head_slice, head_tiles, window_attention
from .base import EvictionPolicy, ScoreInputs


def pool_tokens(scores: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Average pooling along the last dim with zero padding at the edges (same length): ``[..., m] -> [..., m]``."""
    shape = scores.shape
    pooled = F.avg_pool1d(scores.reshape(-1, 1, shape[-1]), kernel_size, stride=1, padding=kernel_size // 2)
    return pooled.reshape(shape)


@EVICTION_METHODS.register("snapkv")
@dataclass(frozen=True)
class SnapKV(EvictionPolicy):
    """SnapKV scores.

    score(j) = avg_pool_k( mean over the last ``window_size`` queries of softmax attention to token j ), pooled per
    query head and then averaged over the query heads of each KV group (as kvpress and the SnapKV authors do);
    the window tokens get +inf (always kept; kvpress gives them max + 1, the same kept set).
    Needs the compressed chunk to hold at least ``window_size`` queries and more than ``window_size`` tokens.

    Attributes:
        window_size: observation window (default 64).
        kernel_size: average-pooling kernel (default 5, odd).
    """

    name = "snapkv"
    display = "SnapKV"
    #: pooled probabilities are >= 0 and the window +inf: the prefill path selects without host syncs
    finite_scores = True
    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("window_size", self.window_size)
        check_positive_int("kernel_size", self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise LMCompressError(f"kernel_size={self.kernel_size} must be odd (same-size pooling)")

    @property
    def query_window(self) -> int:
        return self.window_size

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        w = self.window_size
        n = inputs.num_tokens
        tiles = head_tiles(inputs, w)
        if len(tiles) == 1:
            scores = self._window_scores(inputs)
        else:  # long prompts: a few KV heads at a time (heads are scored independently: same scores)
            b, hkv = inputs.keys.shape[:2]
            scores = torch.empty((b, hkv, n - w), dtype=torch.float32, device=inputs.keys.device)
            for h0, h1 in tiles:
                scores[:, h0:h1] = self._window_scores(head_slice(inputs, h0, h1))
        return F.pad(scores, (0, w), value=math.inf)

    def _window_scores(self, inputs: ScoreInputs) -> torch.Tensor:
        """``[B, Hkv, n - w]`` pooled window attention of the tokens before the window."""
        n = inputs.num_tokens
        attn = window_attention(inputs, self.window_size, self.display)[..., : n - self.window_size]
        return pool_tokens(attn.mean(dim=-2), self.kernel_size).mean(dim=2)  # [B, Hkv, G, w, n-w] -> [B, Hkv, n-w]
