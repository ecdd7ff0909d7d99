"""CurDKV (Sengupta et al., 2025, arXiv:2509.15038) as kvpress's CURPress scores it: approximate CUR leverage
scores of keys and values (their squared norms, normalised within local windows), combined per token."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import LMCompressError, check_choice, check_positive_int
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, ScoreInputs

LEVERAGE_TYPES = ("key", "value", "kv_avg", "kv_product")


def local_normalise(x: torch.Tensor, window: int) -> torch.Tensor:
    """``[B, H, n]`` -> each value divided by the sum over its window of ``window`` consecutive tokens (windows
    aligned at 0; the last one shorter)."""
    b, h, n = x.shape
    padded = F.pad(x, (0, (window - n % window) % window)).reshape(b, h, -1, window)
    return (padded / padded.sum(dim=-1, keepdim=True)).reshape(b, h, -1)[:, :, :n]


@EVICTION_METHODS.register("cur")
@dataclass(frozen=True)
class CUR(EvictionPolicy):
    """score(j) from ``k2_j = ||k_j||^2`` and ``v2_j = ||v_j||^2`` (post-RoPE keys, as in the cache).

    With ``use_local_approximation`` each of k2, v2 is divided by its sum over the window of
    ``local_window_size`` tokens holding j; then ``leverage_type`` picks k2, v2, (k2 + v2) / 2 or k2 * v2 (the
    default); the result is divided by its sum over the head's tokens; the first ``num_sinks`` tokens (by index)
    score 1. With ``use_random_leverage`` keys and values are first projected by one Gaussian ``[D, 20]`` matrix
    scaled by ``1/sqrt(20)``, drawn from a generator seeded with ``seed`` (kvpress draws from the global
    generator, so that variant cannot match it token for token). Float32 (kvpress: the cache dtype).

    Attributes:
        num_sinks: first tokens scored 1 (default 4).
        leverage_type: key, value, kv_avg or kv_product (default).
        use_random_leverage: random projection first (default False).
        use_local_approximation: window normalisation (default True).
        local_window_size: window length (default 16).
        seed: seed of the random projection (default 0).
    """

    name = "cur"
    display = "CUR"
    num_sinks: int = 4
    leverage_type: str = "kv_product"
    use_random_leverage: bool = False
    use_local_approximation: bool = True
    local_window_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("num_sinks", self.num_sinks, allow_zero=True)
        check_choice("leverage_type", self.leverage_type, LEVERAGE_TYPES)
        check_positive_int("local_window_size", self.local_window_size)
        for flag in ("use_random_leverage", "use_local_approximation"):
            if not isinstance(getattr(self, flag), bool):
                raise LMCompressError(f"{flag}={getattr(self, flag)!r} must be true or false")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        keys, values = inputs.keys.float(), inputs.values.float()
        if self.use_random_leverage:
            r = 20
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            g = (torch.randn(keys.shape[-1], r, generator=gen) / math.sqrt(r)).to(keys.device)
            keys, values = keys @ g, values @ g
        k2 = keys.square().sum(dim=-1)
        v2 = values.square().sum(dim=-1)
        if inputs.valid is not None:
            k2, v2 = k2 * inputs.valid, v2 * inputs.valid
        if self.use_local_approximation:
            k2 = local_normalise(k2, self.local_window_size)
            v2 = local_normalise(v2, self.local_window_size)
        scores = {"key": k2, "value": v2, "kv_avg": (k2 + v2) / 2, "kv_product": k2 * v2}[self.leverage_type]
        scores = scores / scores.sum(dim=-1, keepdim=True)
        scores[:, :, : self.num_sinks] = 1.0
        return torch.nan_to_num(scores, nan=0.0)
