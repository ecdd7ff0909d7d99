"""Shared builders for eviction tests: hand-made ScoreInputs."""

from __future__ import annotations

import torch

from lmcompress.kv.evict.base import ScoreInputs


def make_inputs(keys: torch.Tensor, queries: torch.Tensor | None = None, values: torch.Tensor | None = None,
                *, scaling: float = 1.0, layer_idx: int = 0, num_layers: int = 1, aux=None,
                positions: torch.Tensor | None = None, rope=None) -> ScoreInputs:
    """``keys: [B, Hkv, n, D]``; queries default to one query per KV head equal to the last key."""
    b, h, n, _ = keys.shape
    if queries is None:
        queries = keys[:, :, -1:].clone()
    if values is None:
        values = torch.ones_like(keys)
    if positions is None:
        positions = torch.arange(n, dtype=torch.int32).expand(b, h, n)
    return ScoreInputs(keys=keys, values=values, queries=queries, positions=positions, scaling=scaling,
                       layer_idx=layer_idx, num_layers=num_layers, aux=aux or {}, seen=int(positions.max()) + 1,
                       rope=rope)


def kept_sets(mask: torch.Tensor) -> list[list[list[int]]]:
    """``[B, H, n]`` bool -> nested lists of kept indices."""
    return [[row.nonzero().flatten().tolist() for row in head] for head in mask]
