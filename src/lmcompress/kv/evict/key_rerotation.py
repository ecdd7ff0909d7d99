"""Key re-rotation (as in transformers' former SinkCache and FINCH; kvpress's KeyRerotationPress): after a
score-based selection, the kept keys get RoPE re-applied at contiguous positions, so the compressed cache looks
like a shorter, gap-free context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...errors import LMCompressError
from ...registry import EVICTION_METHODS
from .base import DelegatesToBase, EvictionPolicy, check_wraps_scorer

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer


@EVICTION_METHODS.register("key_rerotation")
@dataclass(frozen=True)
class KeyRerotation(DelegatesToBase, EvictionPolicy):
    """The base policy's selection, then the ``k`` kept keys of each head re-rotated to positions
    ``seen - k .. seen - 1`` in their order (RoPE undone at the old position, applied at the new one).

    kvpress moves them to ``0 .. k - 1`` and lets the next tokens continue at ``k``; here the next tokens keep
    their true position ``seen`` (what ``generate()`` and the layer's position tracking use) and the kept keys
    end right before it. RoPE attention depends only on position differences, so both give the same attention
    (up to float rounding). The layer's stored positions become the new ones. Needs the same count in every
    head (not AdaKV) and a rotary model; the re-rotated keys are stored in the cache dtype (quantized again when
    the cache quantizes).

    Attributes:
        base: a score-based policy (its ratio or budget sets ``k``).
    """

    name = "key_rerotation"
    display = "KeyRerotation"
    is_scorer = False
    base: EvictionPolicy | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wraps_scorer(self)

    def after_forward(self, layer: CompressedLayer, query: torch.Tensor, scaling: float,
                      module: torch.nn.Module | None) -> None:
        if query.shape[2] <= 1:
            return
        if layer.ragged:
            raise LMCompressError("key_rerotation needs the same tokens in every head (not a ragged layer)")
        inputs = layer.score_inputs(query, scaling, module)
        keep_rerotated(layer, inputs, self.base.select(inputs))


def keep_rerotated(layer: CompressedLayer, inputs, index: torch.Tensor) -> None:
    """Keep the tokens at ``index: [B, Hkv, k]`` (ascending, uniform layout) with their keys re-rotated to
    positions ``seen - k .. seen - 1``."""
    rope = inputs.rope
    if rope is None or not rope.available:
        raise LMCompressError("key re-rotation needs the model's rotary embedding; build the cache with "
                              "CompressedCache(model, ...)")
    b, h, k = index.shape
    if k == inputs.num_tokens:
        return
    pre = rope.unrotate(inputs.keys, inputs.positions[0, 0].long(), layer.layer_idx)  # [B, Hkv, n, D]
    pre = pre.gather(2, index.unsqueeze(-1).expand(b, h, k, pre.shape[-1]))
    target = torch.arange(layer.seen - k, layer.seen, device=pre.device)
    keys = rope.rotate(pre, target, layer.layer_idx)
    layer.keep(index)
    layer.rewrite_keys(keys, target.expand(b, h, k))
