"""Non-causal chunked attention scores (the query-aware half of Compactor, Chari & Van Durme, 2025,
arXiv:2507.08143, as kvpress's NonCausalAttnPress computes it): the prompt is cut into chunks, every query of a
chunk attends to every key of that chunk (no causal mask), and a key's score is the attention it receives,
summed over the chunk's queries, times its value norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import LMCompressError, check_positive_int
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, ScoreInputs, group_queries
from .leverage import zscore
from .snapkv import pool_tokens


def non_causal_chunk_attention(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Column sums of within-chunk softmax attention.

    Args:
        queries: ``[B, Hkv, G, n, D]`` float32 (the query heads of each KV head).
        keys: ``[B, Hkv, n, D]`` float32.
        chunk_size: chunk length; the last chunk holds the remainder.

    Returns:
        ``[B, Hkv, G, n]``: for key j in chunk c, ``sum over queries i in c of softmax_c(q_i . k)_j`` (unscaled
        dot products, as kvpress).
    """
    b, h, g, n, _ = queries.shape
    out = torch.empty((b, h, g, n), dtype=torch.float32, device=keys.device)
    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        dots = torch.einsum("bhgqd,bhkd->bhgqk", queries[:, :, :, start:end], keys[:, :, start:end])
        out[..., start:end] = dots.softmax(dim=-1).sum(dim=-2)
    return out


@EVICTION_METHODS.register("non_causal_attn")
@dataclass(frozen=True)
class NonCausalAttn(EvictionPolicy):
    """score = z-score over the layer of ``avg_pool_3( mean_G(non-causal chunk attention) * ||v_j|| )``.

    Needs the queries of every cached token (a prompt prefilled in one chunk), post-RoPE as the attention saw
    them. Deviation: kvpress zero-pads the last chunk and gives the padded keys logit ``-1e-9`` (and the padded
    queries a uniform row), so its last-chunk scores differ from ours when ``n`` is not a multiple of
    ``chunk_size``; here the last chunk is simply shorter. Like kvpress the dot products are not scaled by the
    softmax scale. The pooling is average pooling over 3 tokens with zero padding (edges divided by 3).

    Attributes:
        chunk_size: chunk length (default 256).
    """

    name = "non_causal_attn"
    display = "NonCausalAttn"
    chunk_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("chunk_size", self.chunk_size)

    @property
    def query_window(self) -> None:
        return None

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        n, q = inputs.num_tokens, inputs.queries.shape[2]
        if q != n or inputs.valid is not None:
            raise LMCompressError(
                f"{self.display} needs the queries of every cached token (a one-chunk prefill); "
                f"got {q} queries for {n} tokens"
            )
        hkv = inputs.keys.shape[1]
        queries = group_queries(inputs.queries, hkv).float()
        attn = non_causal_chunk_attention(queries, inputs.keys.float(), self.chunk_size).mean(dim=2)
        scores = attn * torch.linalg.vector_norm(inputs.values.float(), dim=-1)
        return zscore(pool_tokens(scores, 3))


