"""Which elements of cached states ``x: [B, H, T, D]`` share quantization parameters (scale, zero point, ...).

Granularities (all within one layer: a layer's cache is written before the next layer's states exist, so QAQ's
cross-layer "token" level cannot be built here):

* ``token``: each token and head, with the ``D`` channels split into groups of ``group_size`` (must divide
  ``D``); parameters ``[B, H, T, D / group_size]``.
* ``head``: each token and head, all ``D`` channels together (QAQ's "head" level); parameters ``[B, H, T, 1]``.
* ``layer``: each token, all heads and channels of the layer together (QAQ's "layer" level); parameters
  ``[B, 1, T, 1]``.
* ``channel``: each channel and head over a block of ``group_size`` consecutive tokens (KIVI's keys);
  parameters ``[B, H, T / group_size, D]``; tokens are quantized in whole blocks (``token_block = group_size``).

Functions here reshape states into ``[..., E]`` groups (statistics reduce over the last dim) and broadcast the
parameters back to ``[B, H, T, D]``.
"""

from __future__ import annotations

import torch

from ...errors import LMCompressError, check_choice, check_positive_int

GRANULARITIES = ("token", "head", "layer", "channel")


def check_granularity(granularity: str, group_size: int) -> None:
    """Validate a granularity name and group size (not yet against a head_dim)."""
    check_choice("granularity", granularity, GRANULARITIES)
    check_positive_int("group_size", group_size)


def token_block(granularity: str, group_size: int) -> int:
    """Tokens that share parameters: ``group_size`` for ``channel``, else 1."""
    return group_size if granularity == "channel" else 1


def check_head_dim(granularity: str, group_size: int, head_dim: int) -> None:
    """Raise ``LMCompressError`` when ``group_size`` does not divide ``head_dim`` (token granularity)."""
    if granularity == "token" and head_dim % group_size:
        raise LMCompressError(
            f"group_size={group_size} does not divide head_dim={head_dim}; allowed: divisors of {head_dim}"
        )


def groups(x: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """``x: [B, H, T, D]`` -> grouped view ``[*param_shape_without_trailing_1, E]`` (a copy for ``layer`` and
    ``channel``). Reducing the last dim gives one statistic per parameter."""
    b, h, t, d = x.shape
    if granularity == "token":
        check_head_dim(granularity, group_size, d)
        return x.reshape(b, h, t, d // group_size, group_size)
    if granularity == "head":
        return x.reshape(b, h, t, 1, d)
    if granularity == "layer":
        return x.transpose(1, 2).reshape(b, 1, t, 1, h * d)
    if t % group_size:
        raise LMCompressError(f"channel granularity needs a multiple of {group_size} tokens, got {t}")
    return x.reshape(b, h, t // group_size, group_size, d).transpose(-1, -2)


def expand(param: torch.Tensor, granularity: str, group_size: int, shape: torch.Size) -> torch.Tensor:
    """Broadcast parameters (shape ``groups(...).shape[:-1]``) to ``shape = [B, H, T, D]``."""
    b, h, t, d = shape
    if granularity == "token":
        return param.unsqueeze(-1).expand(*param.shape, group_size).reshape(b, h, t, d)
    if granularity in ("head", "layer"):
        return param.expand(b, h, t, d)
    return param.unsqueeze(3).expand(b, h, t // group_size, group_size, d).reshape(b, h, t, d)


def param_count(granularity: str, group_size: int, num_heads: int, head_dim: int) -> float:
    """Parameters (per kind: scale, zero, ...) per cached element, for reporting."""
    if granularity == "token":
        return 1.0 / group_size
    if granularity == "head":
        return 1.0 / head_dim
    if granularity == "layer":
        return 1.0 / (num_heads * head_dim)
    return 1.0 / group_size


def masked_min_max(xg: torch.Tensor, ignore: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over the last dim, skipping ``ignore`` (True) elements; all-ignored groups give 0, 0."""
    if ignore is None:
        return xg.amin(dim=-1), xg.amax(dim=-1)
    lo = xg.masked_fill(ignore, torch.inf).amin(dim=-1)
    hi = xg.masked_fill(ignore, -torch.inf).amax(dim=-1)
    empty = torch.isinf(lo)
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)


def masked_mean_std(xg: torch.Tensor, ignore: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) standard deviation over the last dim, skipping ``ignore`` elements."""
    if ignore is None:
        mean = xg.mean(dim=-1)
        std = xg.std(dim=-1, correction=0)
        return mean, std
    keep = (~ignore).to(xg.dtype)
    n = keep.sum(dim=-1).clamp_min(1.0)
    mean = (xg * keep).sum(dim=-1) / n
    var = (((xg - mean.unsqueeze(-1)) ** 2) * keep).sum(dim=-1) / n
    return mean, var.sqrt()
