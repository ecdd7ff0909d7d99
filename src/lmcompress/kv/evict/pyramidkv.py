"""PyramidKV (Cai et al., 2024): SnapKV scores with per-layer budgets that shrink linearly from the bottom layer
to the top one, the total matching the uniform budget."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import check_positive_int
from ...registry import EVICTION_METHODS
from .base import evicted_count
from .snapkv import SnapKV


@EVICTION_METHODS.register("pyramidkv")
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV scoring; layer ``l`` of ``L`` keeps ``round(max_num - l * (max_num - min_num) / (L - 1))`` tokens.

    With ``c`` = the uniform keep count (``n - floor(r * n)`` at ratio r, or ``budget``) and ``w`` = window_size:
    ``min_num = c / beta``, ``max_num = 2 c - min_num`` (so the layers average ``c``); if ``max_num`` exceeds
    ``n - w`` it is capped there and ``min_num = 2 c - max_num``. When the pyramid is not well formed
    (``n >= max_num >= min_num >= w`` fails) every layer keeps ``c``. This is kvpress's formula (taken from
    KVCache-Factory) with our uniform count in place of kvpress's ``n * (1 - r)``; Python's ``round`` (half to
    even) as there.

    Attributes:
        beta: steepness (default 20): the top layer keeps about ``1/beta`` of the average.
    """

    name = "pyramidkv"
    display = "PyramidKV"
    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("beta", self.beta)

    def n_keep(self, n: int, layer_idx: int = 0, num_layers: int = 1) -> int:
        w = self.window_size
        uniform = min(n, self.budget) if self.budget is not None else n - evicted_count(n, float(self.ratio))
        if uniform >= n:
            return n
        min_num = uniform / self.beta
        max_num = 2 * uniform - min_num
        if max_num >= n - w:
            max_num = n - w
            min_num = 2 * uniform - max_num
        if not (n >= max_num >= min_num >= w):
            return max(1, uniform)
        steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
        return max(1, min(n, round(max_num - layer_idx * steps)))
