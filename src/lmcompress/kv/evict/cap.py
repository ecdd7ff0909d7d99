"""CapKV (arXiv:2604.25975, as kvpress's CapPress computes it): a token's score is its query relevance times
its leverage in a relevance-weighted "capacity" matrix of the values, so tokens that add new value directions
for the queries the prompt asks are kept."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import LMCompressError, check_positive_int
from ...registry import EVICTION_METHODS
from .attention_probs import query_positions
from .base import EvictionPolicy, ScoreInputs


@EVICTION_METHODS.register("cap")
@dataclass(frozen=True)
class CapPress(EvictionPolicy):
    """score(j) = mean over the G query heads of ``w_j * v_j' A^-1 v_j`` with ``A = I + sum_i w_i v_i v_i'``
    (the sum over the non-sink tokens, ``w + epsilon`` inside A) and
    ``w_j = exp(tau * cos(k_j, mu_q) - max)``; ``mu_q`` is the mean of the chunk's pre-RoPE queries (tokens at
    positions >= ``n_sink``) rotated by the average RoPE of positions ``seen .. seen + n_future_positions - 1``.
    The first ``n_sink`` tokens get +inf (kvpress: max + 1, the same kept set).

    Pre-RoPE queries come from undoing RoPE on the attention's queries (kvpress re-projects the hidden states).
    Needs a rotary model; float32.

    Attributes:
        tau: temperature of the relevance weights (default 5).
        n_future_positions: positions the RoPE rotation is averaged over (default 512).
        n_sink: initial tokens always kept (default 4).
        epsilon: added to the weights inside A (default 1e-6).
    """

    name = "cap"
    display = "CapPress"
    tau: float = 5.0
    n_future_positions: int = 512
    n_sink: int = 4
    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("n_future_positions", self.n_future_positions)
        check_positive_int("n_sink", self.n_sink, allow_zero=True)
        for name in ("tau", "epsilon"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise LMCompressError(f"{name}={v!r} must be a finite number >= 0")

    @property
    def query_window(self) -> None:
        return None

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        rope = inputs.rope
        if rope is None or not rope.available:
            raise LMCompressError(f"{self.display} needs the model's rotary embedding; build the cache with "
                                  "CompressedCache(model, ...)")
        if inputs.valid is not None:
            raise LMCompressError(f"{self.display} needs the same tokens in every head (not a ragged layer)")
        n = inputs.num_tokens
        if n <= self.n_sink:
            raise LMCompressError(f"{self.display} needs more cached tokens than n_sink={self.n_sink}; got {n}")
        q = inputs.queries.shape[2]
        q_pos = query_positions(inputs, q)[0]
        pre = rope.unrotate(inputs.queries, q_pos, inputs.layer_idx)[:, :, q_pos >= self.n_sink]  # [B, Hq, q', D]
        if pre.shape[2] == 0:
            raise LMCompressError(f"{self.display} needs queries of tokens after the {self.n_sink} sinks")
        seen = inputs.seen if inputs.seen is not None else int(inputs.positions.max()) + 1
        future = torch.arange(seen, seen + self.n_future_positions, device=inputs.keys.device)
        rot = rope.mean_rotation(future, inputs.layer_idx, pre.shape[-1], inputs.keys.device)
        anchor = F.normalize(pre.mean(dim=2) @ rot.T, dim=-1)  # [B, Hq, D]
        keys = inputs.keys.float()[:, :, self.n_sink :]
        values = inputs.values.float()[:, :, self.n_sink :]
        b, hkv, m, d = keys.shape
        g = anchor.shape[1] // hkv
        anchor = anchor.view(b, hkv, g, d)
        stat = torch.einsum("bhgd,bhtd->bhgt", anchor, F.normalize(keys, dim=-1)).clamp(-1.0, 1.0)
        logits = self.tau * stat
        weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True))  # [B, Hkv, G, m]
        scaled = values.unsqueeze(2) * torch.sqrt(weights + self.epsilon).unsqueeze(-1)  # [B, Hkv, G, m, D]
        capacity = torch.eye(d, device=keys.device) + torch.einsum("bhgtd,bhgte->bhgde", scaled, scaled)
        vt = values.transpose(-2, -1).unsqueeze(2).expand(b, hkv, g, d, m)
        leverage = (vt * torch.linalg.solve(capacity, vt)).sum(dim=-2)  # [B, Hkv, G, m]
        scores = (weights * leverage).mean(dim=2)
        return F.pad(scores, (self.n_sink, 0), value=math.inf)
