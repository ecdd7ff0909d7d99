"""Smoothing: move a per-channel scale ``s`` from a scale group's linears into the operator before them.

``prev``'s output channels are divided by ``s`` and the linears' input columns multiplied by ``s``, so the float
function of the layer is unchanged (up to rounding) while the linears' salient input channels get larger
weights, which the 4-bit grid then represents more precisely.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import LMCompressError
from .mappings import ArchMapping, ScaleGroup, prev_part_rows


def group_modules(layer: nn.Module, group: ScaleGroup) -> tuple[nn.Module, list[nn.Linear]]:
    """``(prev, linears)`` of ``group`` inside one decoder layer."""
    try:
        prev = layer.get_submodule(group.prev)
        linears = [layer.get_submodule(name) for name in group.linears]
    except AttributeError as exc:
        raise LMCompressError(
            f"scale group {group.prev} -> {group.linears} does not match the layer: {exc}"
        ) from exc
    return prev, linears


def group_applies(layer: nn.Module, group: ScaleGroup, config: Any) -> bool:
    """Whether the group's shapes allow smoothing (``prev``'s feeding channels = the linears' inputs)."""
    prev, linears = group_modules(layer, group)
    width = linears[0].in_features
    if any(fc.in_features != width for fc in linears):
        return False
    if isinstance(prev, nn.Linear):
        rows = prev_part_rows(group, prev.out_features, config)
        return rows == width and rows <= prev.out_features
    weight = getattr(prev, "weight", None)
    return weight is not None and weight.dim() == 1 and weight.numel() == width


@torch.no_grad()
def apply_group_scale(
    layer: nn.Module, group: ScaleGroup, scales: torch.Tensor, mapping: ArchMapping, config: Any
) -> None:
    """Divide ``prev``'s feeding output channels by ``scales`` and multiply the linears' inputs by them.

    Args:
        scales: ``[in_features]`` positive scales (any float dtype; applied in float32).
    """
    prev, linears = group_modules(layer, group)
    s = scales.to(device=linears[0].weight.device, dtype=torch.float32)
    if isinstance(prev, nn.Linear):
        rows = prev_part_rows(group, prev.out_features, config)
        w = prev.weight.data
        w[-rows:] = (w[-rows:].float() / s[:, None]).to(w.dtype)
        if prev.bias is not None:
            b = prev.bias.data
            b[-rows:] = (b[-rows:].float() / s).to(b.dtype)
    else:
        w = prev.weight.data
        offset = mapping.norm_offset
        w.copy_(((offset + w.float()) / s - offset).to(w.dtype))
        bias = getattr(prev, "bias", None)
        if bias is not None:
            bias.data.copy_((bias.data.float() / s).to(bias.dtype))
    for fc in linears:
        fc.weight.data = (fc.weight.data.float() * s[None, :]).to(fc.weight.dtype)
