"""Attention probabilities that attention-based policies score with (SnapKV, PyramidKV, TOVA, CAKE, H2O).

The layer hands policies the post-RoPE queries of the newest tokens and every held key, so the probabilities are
recomputed here (fused attention kernels do not return them). Visibility follows positions, not indices: a key
is visible to a query when it is real (not padding) and not in the query's future, so the same code serves the
uniform and the left-padded ragged layout.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ...errors import LMCompressError
from .base import ScoreInputs, group_queries

#: queries per tile when summing attention over a long chunk (bounds the [G, tile, n] score block).
QUERY_TILE = 256


def _visible(inputs: ScoreInputs, q_pos: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, 1, t, n]`` bool: key j visible to the query at ``q_pos: [B, t]``."""
    k_pos = inputs.positions.unsqueeze(-2)  # [B, Hkv, 1, n]
    vis = k_pos <= q_pos[:, None, :, None]  # [B, Hkv, t, n]
    if inputs.valid is not None:
        vis &= inputs.valid.unsqueeze(-2)
    return vis.unsqueeze(2)


def query_positions(inputs: ScoreInputs, count: int) -> torch.Tensor:
    """``[B, count]`` positions of the newest ``count`` queries (the last tokens, identical across heads)."""
    return inputs.positions[:, 0, -count:]


def window_attention(inputs: ScoreInputs, window: int, method: str = "this method") -> torch.Tensor:
    """Softmax attention of the newest ``window`` queries over every held key (causal among the newest).

    Args:
        inputs: the layer's score inputs; ``inputs.queries`` must hold at least ``window`` queries.
        window: number of queries.
        method: name used in the error message.

    Returns:
        ``[B, Hkv, G, window, n]`` float32 probabilities (0 on padding and on future keys).

    Raises:
        LMCompressError: fewer than ``window`` queries, or no more held tokens than ``window``.
    """
    q_avail = inputs.queries.shape[2]
    # uniform layout: every head holds all n tokens, known from the shape (no device read)
    n = inputs.num_tokens if inputs.valid is None else int(inputs.valid_counts().min())
    if window > q_avail or window >= n:
        raise LMCompressError(
            f"{method} needs window_size={window} queries and more than {window} cached tokens per head; "
            f"got {q_avail} queries and {n} tokens: lower window_size or compress a longer context"
        )
    hkv = inputs.keys.shape[1]
    logits = _window_logits(inputs.queries[:, :, -window:], inputs.keys, hkv)  # [B, Hkv, G, w, n] float32
    logits.mul_(inputs.scaling)  # in place: the [B, Hkv, G, w, n] block is the largest tensor here
    logits.masked_fill_(~_visible(inputs, query_positions(inputs, window)), -math.inf)
    return logits.softmax(dim=-1)


def _window_logits(queries: torch.Tensor, keys: torch.Tensor, hkv: int) -> torch.Tensor:
    """``queries: [B, Hq, w, D]`` . ``keys: [B, Hkv, n, D]`` -> ``[B, Hkv, G, w, n]`` float32 dot products.

    On CUDA with bf16/fp16 inputs: one batched GEMM on the 16-bit inputs with float32 accumulation and output
    (the products of 16-bit values are exact in float32, so this is the float32 GEMM of the same values up to the
    order of the sums); elsewhere: the float32 einsum of the upcast inputs.
    """
    b, hq, w, d = queries.shape
    n = keys.shape[2]
    g = hq // hkv
    if keys.is_cuda and keys.dtype in (torch.bfloat16, torch.float16) and queries.dtype == keys.dtype:
        q = queries.reshape(b * hkv, g * w, d)
        k = keys.reshape(b * hkv, n, d)
        try:
            out = torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
        except (TypeError, NotImplementedError, RuntimeError):  # torch without bmm(out_dtype=): float32 below
            out = None
        if out is not None:
            return out.view(b, hkv, g, w, n)
    q = group_queries(queries, hkv).float()  # [B, Hkv, G, w, D]
    return torch.einsum("bhgqd,bhkd->bhgqk", q, keys.float())


#: bytes of float32 probabilities a scorer holds at once: longer prompts are scored a few KV heads at a time
#: (:func:`head_tiles`; a 32k prompt's 64-query window is 32 MiB per KV head of an 8B model)
TILE_BYTES = 128 << 20


def head_tiles(inputs: ScoreInputs, window: int) -> list[tuple[int, int]]:
    """``[(h0, h1), ...]`` ranges of KV heads whose ``[B, h1 - h0, G, window, n]`` float32 probabilities fit
    :data:`TILE_BYTES` (one range covering every head when they all fit)."""
    b, hkv, n = inputs.keys.shape[:3]
    per_head = b * inputs.num_kv_groups * window * n * 4
    step = max(1, min(hkv, TILE_BYTES // max(per_head, 1)))
    return [(h, min(hkv, h + step)) for h in range(0, hkv, step)]


def head_slice(inputs: ScoreInputs, h0: int, h1: int) -> ScoreInputs:
    """The score inputs of KV heads ``[h0, h1)`` (and their query heads)."""
    g = inputs.num_kv_groups
    return dataclasses.replace(
        inputs, keys=inputs.keys[:, h0:h1], values=inputs.values[:, h0:h1],
        queries=inputs.queries[:, h0 * g : h1 * g], positions=inputs.positions[:, h0:h1],
        valid=None if inputs.valid is None else inputs.valid[:, h0:h1],
        aux={k: v[:, h0:h1] for k, v in inputs.aux.items()})


def summed_attention(inputs: ScoreInputs, tile: int = QUERY_TILE) -> torch.Tensor:
    """Attention every held key receives from all of ``inputs.queries``, summed over queries and averaged over
    the query heads of each KV group (the accumulated attention of H2O / kvpress's ObservedAttention).

    Returns:
        ``[B, Hkv, n]`` float32.
    """
    hkv = inputs.keys.shape[1]
    q_all = inputs.queries.shape[2]
    keys = inputs.keys.float()
    q_pos_all = query_positions(inputs, q_all)
    total = torch.zeros(inputs.keys.shape[:3], dtype=torch.float32, device=keys.device)
    for t0 in range(0, q_all, tile):
        t1 = min(q_all, t0 + tile)
        q = group_queries(inputs.queries[:, :, t0:t1], hkv).float()
        logits = torch.einsum("bhgqd,bhkd->bhgqk", q, keys) * inputs.scaling
        logits = logits.masked_fill(~_visible(inputs, q_pos_all[:, t0:t1]), -math.inf)
        total += logits.softmax(dim=-1).sum(dim=3).mean(dim=2)
    return total
