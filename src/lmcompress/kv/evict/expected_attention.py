"""Expected Attention (Devoto et al., 2025): score each cached token by the attention that *future* queries are
expected to pay it, modelling those queries as a Gaussian fitted to the prompt's pre-RoPE queries and rotated
by the average RoPE of the next ``n_future_positions`` positions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import LMCompressError, check_positive_int
from ...registry import EVICTION_METHODS
from .attention_probs import query_positions
from .base import EvictionPolicy, ScoreInputs


@EVICTION_METHODS.register("expected_attention")
@dataclass(frozen=True)
class ExpectedAttention(EvictionPolicy):
    """score(j) = (mean over the G query heads of softmax_j(s mu.k_j + s^2/2 k_j' Sigma k_j) + epsilon) * ||v_j||.

    ``mu`` and ``Sigma`` (population covariance) are the mean and covariance of the pre-RoPE queries of the
    chunk, without the queries of the sink tokens, both rotated by the average RoPE matrix over positions
    ``seen .. seen + n_future_positions - 1``; ``s`` is the model's softmax scale; the softmax runs over the
    non-sink tokens; sink tokens (positions < ``n_sink``) get +inf.

    Pre-RoPE queries are obtained by inverting RoPE on the post-RoPE queries the attention function receives
    (exact up to float rounding), which spares re-projecting hidden states. kvpress uses ``1/sqrt(head_dim)``
    where we use the model's own scale (identical for every model but Gemma 3); it drops the first ``n_sink``
    queries of the chunk where we drop the queries at positions below ``n_sink`` (identical for a prompt).

    Attributes:
        n_future_positions: future positions the RoPE rotation is averaged over (default 512).
        n_sink: initial tokens always kept and left out of the statistics (default 4).
        use_covariance: include the covariance term (default True).
        use_vnorm: multiply by the value norm (default True).
        epsilon: added before the value-norm rescaling (default 0).
    """

    name = "expected_attention"
    display = "ExpectedAttention"
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("n_future_positions", self.n_future_positions)
        check_positive_int("n_sink", self.n_sink, allow_zero=True)
        if not isinstance(self.epsilon, (int, float)) or self.epsilon < 0 or self.epsilon != self.epsilon:
            raise LMCompressError(f"epsilon={self.epsilon!r} is not allowed; it must be a number >= 0")

    @property
    def query_window(self) -> None:
        return None

    def query_statistics(self, inputs: ScoreInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``mu: [B, Hq, D]`` and ``Sigma: [B, Hq, D, D]`` (or None) of the rotated pre-RoPE queries."""
        rope = inputs.rope
        if rope is None or not rope.available:
            raise LMCompressError(
                f"{self.display} needs the model's rotary embedding; build the cache with CompressedCache(model, ...)"
            )
        q = inputs.queries.shape[2]
        q_pos = query_positions(inputs, q)[0]
        pre = rope.unrotate(inputs.queries, q_pos, inputs.layer_idx)  # [B, Hq, q, D]
        pre = pre[:, :, q_pos >= self.n_sink]
        if pre.shape[2] == 0:
            raise LMCompressError(
                f"{self.display} needs queries beyond the n_sink={self.n_sink} sink tokens; got {q} queries"
            )
        mu = pre.mean(dim=2)
        cov = None
        if self.use_covariance:
            centered = pre - mu.unsqueeze(2)
            cov = torch.einsum("bhsi,bhsj->bhij", centered, centered) / pre.shape[2]
        seen = inputs.seen if inputs.seen is not None else int(inputs.positions.max()) + 1
        future = torch.arange(seen, seen + self.n_future_positions, device=inputs.keys.device)
        rot = rope.mean_rotation(future, inputs.layer_idx, pre.shape[-1], inputs.keys.device)
        mu = mu @ rot.T
        if cov is not None:
            cov = rot @ cov @ rot.T
        return mu, cov

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        mu, cov = self.query_statistics(inputs)
        keys = inputs.keys.float()
        b, hkv, _, d = keys.shape
        s = inputs.scaling
        mu_g = mu.view(b, hkv, -1, d)  # [B, Hkv, G, D]
        logits = s * torch.einsum("bhgd,bhnd->bhgn", mu_g, keys)
        if cov is not None:
            cov_g = cov.view(b, hkv, -1, d, d)
            logits = logits + (s * s / 2) * torch.einsum("bhnd,bhgde,bhne->bhgn", keys, cov_g, keys)
        sink = (inputs.positions < self.n_sink).unsqueeze(2)
        if inputs.valid is not None:
            sink = sink | ~inputs.valid.unsqueeze(2)
        if bool(sink.all()):
            raise LMCompressError(f"{self.display} needs more cached tokens than n_sink={self.n_sink}")
        scores = logits.masked_fill(sink, -math.inf).softmax(dim=-1).mean(dim=2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * torch.linalg.vector_norm(inputs.values.float(), dim=-1)
        return scores.masked_fill(inputs.positions < self.n_sink, math.inf)
