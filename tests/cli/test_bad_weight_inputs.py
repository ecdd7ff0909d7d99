"""A compressed-tensors checkpoint with a scheme lmcompress cannot run (8-bit weights, activation quantization,
channel strategy, a KV-cache scheme) exits 2 through the CLI with one line naming the scheme and what is supported,
no traceback, and no output written."""

from __future__ import annotations

import json

import pytest

from lmcompress.cli import main
from lmcompress.models import tiny_model

pytestmark = pytest.mark.model


def _folder(tmp_path, weights, *, input_activations=None, kv_cache_scheme=None, fmt="pack-quantized"):
    """A config-only checkpoint folder: the error must come from the config, before any tensor is read."""
    config = tiny_model("llama").config.to_dict()
    group = {"format": fmt, "targets": ["Linear"], "weights": weights, "input_activations": input_activations,
             "output_activations": None}  # fmt: skip
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": group},
        "ignore": ["lm_head"], "kv_cache_scheme": kv_cache_scheme, "quantization_status": "compressed",
    }  # fmt: skip
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


W4 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": False, "dynamic": False}
CASES = {
    "w8a16": (dict(weights={**W4, "num_bits": 8}), "scheme W8A16 int group", "num_bits=8"),
    "w4a8": (
        dict(weights=W4, input_activations={"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}),
        "scheme W4A8 int group (activations quantized: int 8-bit)", "activation quantization",
    ),
    "fp8": (dict(weights={**W4, "num_bits": 8, "type": "float", "strategy": "channel"}, fmt="float-quantized"),
            "scheme W8A16 float channel", "format='float-quantized'"),
    "channel": (dict(weights={**W4, "strategy": "channel", "group_size": None}), "scheme W4A16 int channel",
                "strategy='channel'"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", ["eval", "bench"])
def test_unsupported_scheme_exits_2_naming_it(case, command, tmp_path, capsys):
    kwargs, scheme, detail = CASES[case]
    folder = _folder(tmp_path, **kwargs)
    out = tmp_path / "out"
    if command == "eval":
        argv = ["awq", "eval", str(folder), "--device", "cpu"]
    else:
        argv = ["bench", "--model", str(folder), "--methods", "snapkv+kivi2", "--ratios", "0.5",
                "--lengths", "256", "--no-ppl", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    assert err[-1].startswith("lmcompress: error: ")
    assert scheme in err[-1] and detail in err[-1]
    assert "supported: W4A16" in err[-1] and "pack-quantized" in err[-1]
    assert not out.exists() or not any(out.iterdir())


def test_kv_cache_scheme_is_refused_with_the_alternative(tmp_path, capsys):
    folder = _folder(tmp_path, W4, kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor"})
    assert main(["awq", "eval", str(folder), "--device", "cpu"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "kv_cache_scheme is not supported" in line and "kivi2" in line
