"""AWQ's clip search: per output row and quantization group, shrink the clipping range ``[-m, m]`` of the
weights (``m = max|w| * (1 - i / grid)``, ``i = 0 .. max_shrink * grid - 1``) to the value whose quantized group
minimizes the mean squared error of the group's partial dot products on calibration tokens (as llm-awq does,
with a symmetric range even for zero-point quantization).
"""

from __future__ import annotations

import torch

from .quantizer import fake_quantize

# Bound on the float32 [groups, tokens, rows] error tensor of one chunk of output rows.
_CHUNK_BYTES = 512 * 2**20


@torch.no_grad()
def search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    zero_point: bool,
    grid: int = 20,
    max_shrink: float = 0.5,
    n_tokens: int = 512,
) -> torch.Tensor:
    """Best clipping bound per (row, group).

    Args:
        weight: ``[N, K]`` weight (already smoothed).
        x: ``[T, K]`` (or ``[..., K]``) calibration inputs of this linear (already divided by the smoothing scales).
        n_tokens: every ``max(1, T // n_tokens)``-th token is used.

    Returns:
        ``[N, K // group_size]`` float32 bounds ``m``; clamp each group's weights to ``[-m, m]``.
    """
    n, k = weight.shape
    groups = k // group_size
    x = x.reshape(-1, k)
    step = max(1, x.shape[0] // n_tokens)
    xs = x[::step].float().reshape(-1, groups, group_size).permute(1, 0, 2).contiguous()  # [G, T', gs]
    tokens = xs.shape[1]
    rows_per_chunk = max(1, min(n, _CHUNK_BYTES // (4 * groups * tokens)))
    steps = int(max_shrink * grid)
    best_all = []
    for start in range(0, n, rows_per_chunk):
        w = weight[start : start + rows_per_chunk].float().reshape(-1, groups, group_size)  # [n', G, gs]
        org_max = w.abs().amax(dim=-1)  # [n', G]
        best = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i in range(steps):
            bound = org_max * (1 - i / grid)
            clipped = torch.maximum(torch.minimum(w, bound[..., None]), -bound[..., None])
            delta = fake_quantize(clipped, bits, group_size, zero_point) - w  # [n', G, gs]
            err = torch.bmm(xs, delta.permute(1, 2, 0)).pow_(2).mean(dim=1).t()  # [n', G]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better, bound, best)
        best_all.append(best)
    return torch.cat(best_all, dim=0)


@torch.no_grad()
def apply_clip(linear: torch.nn.Linear, bounds: torch.Tensor) -> None:
    """Clamp ``linear.weight`` (``[N, K]``) group-wise to ``[-bounds, bounds]`` (``bounds``: ``[N, G]``)."""
    w = linear.weight.data
    n, k = w.shape
    b = bounds.to(device=w.device, dtype=torch.float32)[..., None]
    grouped = w.float().reshape(n, b.shape[1], -1)
    linear.weight.data = torch.maximum(torch.minimum(grouped, b), -b).reshape(n, k).to(w.dtype)
