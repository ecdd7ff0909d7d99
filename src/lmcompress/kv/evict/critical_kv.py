"""CriticalKV (Feng et al., 2025, "Identify Critical KV Cache in LLM Inference from an Output Perturbation
Perspective"): two-stage selection that weights a base policy's scores by how much each value moves the
attention output, ``||W_o,h v_j||_1``.

Rule, per KV head keeping ``k`` of ``n`` tokens (``k`` from the base policy's ratio or budget): stage 1 keeps the
``floor(first_stage_ratio * k)`` best tokens by the base score ``s_j``; stage 2 fills the remaining ``k`` slots
with the best of ``(s_j + epsilon) * mean over the head's G query heads of ||v_j W_o,h||_1`` (``W_o,h``: the
query head's ``[D, hidden]`` slice of the output projection).

Source: kvpress 0.5.5 ``criticalkv_press.py`` (read, not copied). Deviations: the stage-1 count is
``floor(first_stage_ratio * k)`` with our ``k = n - floor(r n)`` (kvpress ``int((1 - r) n * first_stage_ratio)``,
one less at some ratios); the base's protected tokens stay protected. As kvpress advises, give
ExpectedAttention ``use_vnorm=False`` as base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ... import _compat
from ...errors import LMCompressError, check_range
from ...registry import EVICTION_METHODS
from .base import (
    DelegatesToBase,
    EvictionPolicy,
    ScoreInputs,
    check_wraps_scorer,
    topk_mask,
)


def projected_value_norms(inputs: ScoreInputs) -> torch.Tensor:
    """``[B, Hkv, n]`` float32: per KV head, the mean over its G query heads of ``||v_j W_o,h||_1``."""
    if inputs.module is None:
        raise LMCompressError("CriticalKV needs the attention module (its output projection) to score")
    weight = _compat.output_projection_weight(inputs.module).float()  # [hidden, Hq * D]
    b, hkv, n, d = inputs.values.shape
    hq = weight.shape[1] // d
    w = weight.view(-1, hq, d).permute(1, 2, 0).reshape(hkv, hq // hkv, d, -1)  # [Hkv, G, D, hidden]
    out = torch.zeros(b, hkv, n, dtype=torch.float32, device=inputs.values.device)
    values = inputs.values.float()
    for h in range(hkv):  # one KV head at a time bounds the [B, G, n, hidden] product
        out[:, h] = torch.einsum("bnd,gde->bgne", values[:, h], w[h]).abs().sum(-1).mean(1)
    return out


def check_critical_params(name: str, epsilon: object, first_stage_ratio: object) -> None:
    for key, value in (("epsilon", epsilon), ("first_stage_ratio", first_stage_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise LMCompressError(f"{name}: {key}={value!r} is not a number")
    if epsilon < 0:
        raise LMCompressError(f"{name}: epsilon={epsilon!r} is not allowed; it must be >= 0")
    check_range("first_stage_ratio", float(first_stage_ratio), 0.0, 1.0, high_open=False)


@EVICTION_METHODS.register("criticalkv")
@dataclass(frozen=True)
class CriticalKV(DelegatesToBase, EvictionPolicy):
    """Two-stage CriticalKV selection around a score-based policy (see the module docstring).

    Attributes:
        base: the score-based policy (its ratio or budget sets ``k``).
        epsilon: added to the base score before the value-norm weighting (default 1e-4).
        first_stage_ratio: fraction of ``k`` chosen by the base score alone, in [0, 1] (default 0.5).
    """

    name = "criticalkv"
    display = "CriticalKV"
    is_scorer = False
    base: EvictionPolicy | None = None
    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wraps_scorer(self)
        check_critical_params(self.display, self.epsilon, self.first_stage_ratio)

    def n_keep(self, n: int, layer_idx: int = 0, num_layers: int = 1) -> int:
        return self.base.n_keep(n, layer_idx, num_layers)

    def keep_mask(self, inputs: ScoreInputs) -> torch.Tensor:
        counts = inputs.valid_counts()
        k = self.base.keep_counts(counts, inputs.layer_idx, inputs.num_layers)
        if bool((k >= counts).all()):
            return self.base.keep_mask(inputs)
        scores = self.base.final_scores(inputs)
        first = torch.floor(k.double() * float(self.first_stage_ratio) + 1e-9).long()
        stage1 = topk_mask(scores, first)
        weighted = (scores + self.epsilon) * projected_value_norms(inputs)
        weighted = weighted.masked_fill(stage1 | (scores == math.inf), math.inf)
        weighted = weighted.masked_fill(scores == -math.inf, -math.inf)
        return topk_mask(weighted, k)
