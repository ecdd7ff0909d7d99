"""CriticalKV / CriticalAdaKV: exact kept indices on hand-built tensors, the value-norm weighting, bad
parameters."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmcompress.errors import LMCompressError
from lmcompress.kv.evict import CriticalAdaKV, CriticalKV, Knorm
from lmcompress.kv.evict.base import EvictionPolicy
from lmcompress.kv.evict.critical_kv import projected_value_norms

from .helpers import kept_sets, make_inputs


@dataclasses.dataclass(frozen=True)
class FirstChannel(EvictionPolicy):
    """Test scorer: score = the key's first channel."""

    name = "first_channel"

    def score(self, inputs):
        return inputs.keys[..., 0].float()


class Attn(torch.nn.Module):
    """An attention module stand-in whose output projection is the identity (``hidden = Hq * D``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.o_proj = torch.nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.o_proj.weight.copy_(torch.eye(width))


def inputs_for(first: list[list[float]], l1: list[list[float]]):
    """Keys whose first channel is ``first[h]`` and values whose L1 norm is ``l1[h]`` (D = 2, G = 1)."""
    k = torch.tensor(first).unsqueeze(-1)
    keys = torch.cat([k, torch.zeros_like(k)], dim=-1).unsqueeze(0)  # [1, H, n, 2]
    v = torch.tensor(l1).unsqueeze(-1)
    values = torch.cat([v / 2, -v / 2], dim=-1).unsqueeze(0)
    h = keys.shape[1]
    inputs = make_inputs(keys, values=values, queries=torch.zeros(1, h, 1, 2))
    return dataclasses.replace(inputs, module=Attn(2 * h))


def test_projected_value_norms_are_l1_of_v_times_wo():
    inputs = inputs_for([[1.0, 2.0]], [[3.0, 5.0]])
    torch.testing.assert_close(projected_value_norms(inputs), torch.tensor([[[3.0, 5.0]]]))
    scaled = dataclasses.replace(inputs, module=Attn(2))
    with torch.no_grad():
        scaled.module.o_proj.weight.mul_(2.0)
    torch.testing.assert_close(projected_value_norms(scaled), torch.tensor([[[6.0, 10.0]]]))


def test_criticalkv_two_stages_exact_indices():
    inputs = inputs_for([[5, 4, 3, 2, 1, 0.5]], [[1, 1, 1, 10, 1, 100]])
    # k = 3: stage 1 keeps the best base score (index 0); stage 2 weights (s + eps) * ||v W_o||_1 =
    # [5, 4, 3, 20, 1, 50] and fills the two other slots with 5 and 3
    policy = CriticalKV(base=FirstChannel(ratio=0.5))
    assert kept_sets(policy.keep_mask(inputs))[0] == [[0, 3, 5]]
    # first_stage_ratio = 1: the base alone decides
    assert kept_sets(CriticalKV(base=FirstChannel(ratio=0.5), first_stage_ratio=1.0).keep_mask(inputs))[0] \
        == [[0, 1, 2]]


def test_criticaladakv_head_budgets_and_stages_exact_indices():
    inputs = inputs_for([[10, 9, 8, 7], [1, 0.5, 0.2, 0.1]], [[1, 1, 1, 100], [1, 1, 1, 1]])
    # k = 2 per head, 4 in the layer; safeguard floor(0.5 * 2) = 1 per head (index 0 of each);
    # the layer's 4 best: both safeguards, then 9 and 8 of head 0 -> budgets 3 and 1;
    # stage 1 keeps floor(1.5) = 1 of head 0 (index 0); stage 2: head 0 weighted [.., 9, 8, 700] -> 3 and 1
    policy = CriticalAdaKV(base=FirstChannel(ratio=0.5), alpha_safeguard=0.5)
    mask = policy.keep_mask(inputs)
    assert kept_sets(mask)[0] == [[0, 1, 3], [0]]
    assert int(mask.sum()) == 4


@pytest.mark.parametrize("cls", [CriticalKV, CriticalAdaKV])
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"epsilon": "x"}, "epsilon"), ({"epsilon": -1.0}, "epsilon"), ({"first_stage_ratio": 1.5}, "first_stage"),
    ({"first_stage_ratio": None}, "first_stage"), ({"base": None}, "score-based"), ({"ratio": 0.5}, "base"),
])
def test_bad_parameters(cls, kwargs, match):
    args = {"base": Knorm(ratio=0.5), **kwargs}
    with pytest.raises(LMCompressError, match=match):
        cls(**args)
