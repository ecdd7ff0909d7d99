"""Score inputs restricted to a subset of the cached tokens, for wrappers that score parts of the prompt on their
own (BlockPress, ChunkPress) or re-score after a first selection (composition)."""

from __future__ import annotations

import dataclasses

import torch

from ...errors import LMCompressError
from .base import EvictionPolicy, ScoreInputs, group_queries


def gather_tokens(inputs: ScoreInputs, index: torch.Tensor, queries: torch.Tensor) -> ScoreInputs:
    """``inputs`` restricted to the tokens at ``index: [B, Hkv, m]`` (ascending per head).

    Keys, values, positions, ``valid`` and ``aux`` are gathered; ``queries: [B, Hq, q, D]`` replace the queries
    and must belong to the last ``q`` of the ``m`` tokens (the scorer reads them as such). Hidden states are
    dropped (a part's tokens differ per head), so scorers that need them cannot score parts.
    """
    d = inputs.keys.shape[-1]
    idx_d = index.unsqueeze(-1).expand(*index.shape, d)
    return dataclasses.replace(
        inputs,
        keys=inputs.keys.gather(2, idx_d),
        values=inputs.values.gather(2, idx_d),
        positions=inputs.positions.gather(2, index.to(torch.int64)),
        valid=None if inputs.valid is None else inputs.valid.gather(2, index),
        aux={k: v.gather(2, index) for k, v in inputs.aux.items()},
        queries=queries,
        hidden_states=None,
    )


def token_queries(inputs: ScoreInputs, index: torch.Tensor) -> torch.Tensor:
    """Queries ``[B, Hq, m, D]`` of the tokens at ``index: [B, Hkv, m]`` (each KV head's group gathers its own).

    Needs the queries of every indexed token: ``inputs.queries`` must cover the chunk's newest
    ``n - min(index)`` tokens.
    """
    n, q = inputs.num_tokens, inputs.queries.shape[2]
    first = n - q
    if bool((index < first).any()):
        raise LMCompressError(
            f"scoring a part of the prompt needs its queries: {q} queries cover tokens {first}..{n - 1} only; "
            "prefill the part in one chunk"
        )
    hkv = inputs.keys.shape[1]
    grouped = group_queries(inputs.queries, hkv)  # [B, Hkv, G, q, D]
    b, _, g, _, d = grouped.shape
    local = (index - first).to(torch.int64)  # [B, Hkv, m]
    idx = local[:, :, None, :, None].expand(b, hkv, g, local.shape[-1], d)
    return grouped.gather(3, idx).reshape(b, hkv * g, local.shape[-1], d)


def part_scores(base: EvictionPolicy, inputs: ScoreInputs, index: torch.Tensor) -> torch.Tensor:
    """``base.score`` on the tokens at ``index: [B, Hkv, m]`` with their own queries, as ``[B, Hkv, m]`` float32.

    Query-agnostic scorers (``query_window == 0``) need no queries; the others get the queries of the indexed
    tokens, which therefore must lie in the forward chunk (see :func:`token_queries`).
    """
    if base.query_window == 0:
        queries = inputs.queries[:, :, :0]
    else:
        queries = token_queries(inputs, index)
    return base.score(gather_tokens(inputs, index, queries)).float()


def check_part_length(owner: str, base: EvictionPolicy, length: int, name: str) -> None:
    """A part must hold more tokens than the queries ``base`` reads (SnapKV's window scores older tokens), and
    ``base`` must not score from hidden states (parts do not carry them)."""
    if base.needs_hidden_states:
        raise LMCompressError(f"{owner} scores parts of the prompt, which carry no hidden states; "
                              f"{base.name} needs them: use a scorer that reads keys, values or queries")
    need = base.query_window
    if need and length <= need:
        raise LMCompressError(
            f"{owner} scores parts of {name}={length} tokens but {base.name} reads the last {need} queries of "
            f"each part; raise {name} above {need} or lower the scorer's window"
        )
