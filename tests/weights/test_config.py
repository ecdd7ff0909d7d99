"""Configs: validation with clear errors, serialisation, registry, and checks that run before weights change."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny
from lmcompress.errors import LMCompressError
from lmcompress.registry import WEIGHT_METHODS
from lmcompress.weights import AWQConfig, RTNConfig, WeightQuantConfig, quantize_


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 3}, "bits=3 is not supported; allowed: 4"),
        ({"bits": 8}, "bits=8 is not supported"),
        ({"group_size": 100}, "group_size=100 is not supported; allowed: 32, 64, 128, 256"),
        ({"zero_point": 1}, "zero_point=1"),
        ({"calib_source": "wiki"}, "calib_source='wiki' is not supported; allowed: lee"),
        ({"calib_samples": 0}, "calib_samples=0"),
        ({"clip_max_shrink": 1.0}, "clip_max_shrink=1.0 is out of range"),
        ({"n_grid": -1}, "n_grid=-1"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs, match):
    with pytest.raises(LMCompressError, match=match):
        AWQConfig(**kwargs)


def test_round_trip_and_registry():
    cfg = AWQConfig(group_size=64, calib_samples=8, duo_scaling=True)
    assert WeightQuantConfig.from_dict(cfg.to_dict()) == cfg
    assert WeightQuantConfig.from_dict(RTNConfig().to_dict()) == RTNConfig()
    assert WEIGHT_METHODS.get("awq") is AWQConfig and WEIGHT_METHODS.get("rtn") is RTNConfig
    assert hash(cfg) == hash(AWQConfig(group_size=64, calib_samples=8, duo_scaling=True))
    assert cfg.quantization_config() == {
        "quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": None,
    }  # fmt: skip


@pytest.mark.model
def test_group_not_dividing_in_features_fails_before_any_change():
    model = tiny("llama")  # hidden size 64
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        LMCompressError,
        match=r"group_size=128 does not divide in_features=64 of layers\.0\.self_attn\.q_proj; allowed for this model: 32, 64",
    ):
        quantize_(model, RTNConfig(group_size=128), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.model
def test_awq_on_unknown_architecture_lists_supported():
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=256, n_positions=64)
    )  # fmt: skip
    with pytest.raises(
        LMCompressError, match="architecture 'gpt2' is not supported by AWQ; supported: gemma3_text, llama"
    ):
        quantize_(
            model, AWQConfig(group_size=32), calibration=torch.zeros(1, 8, dtype=torch.long), progress=False
        )
