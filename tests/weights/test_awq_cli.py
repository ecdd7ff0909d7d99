"""`awq quantize` / `awq eval` through the standalone entry point, on tiny models."""

from __future__ import annotations

import json

import pytest

from lmcompress.weights.cli import PROVENANCE_FILE, main

pytestmark = pytest.mark.model


def test_quantize_writes_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "rtn"
    code = main(["awq", "quantize", "tiny-llama", str(out), "--method", "rtn", "--group-size", "32",
                 "--device", "cpu", "--quiet"])  # fmt: skip
    assert code == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["source_model"] == "tiny-llama" and provenance["linears"] == 28
    assert "rtn: 4 layers, 28 linears" in capsys.readouterr().out


def test_awq_with_random_calibration(tmp_path):
    out = tmp_path / "awq"
    code = main(["awq", "quantize", "tiny-qwen3", str(out), "--group-size", "32", "--calib-source", "random",
                 "--calib-samples", "2", "--calib-seq-len", "16", "--device", "cpu", "--quiet", "--dtype", "keep"])  # fmt: skip
    assert code == 0 and (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--group-size", "128"], "--group-size=128 does not divide tiny-llama's hidden_size=64"),
        (["--bits", "3"], "bits=3 is not supported"),
        (["--group-size", "32", "--calib-source", "lee"], "needs a tokenizer"),  # tiny models have none
    ],
)
def test_failures_leave_no_output(tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    code = main(["awq", "quantize", "tiny-llama", str(out), "--device", "cpu", "--quiet", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_is_refused(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["awq", "quantize", "tiny-llama", str(tmp_path / "taken"), "--quiet"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_eval_needs_a_tokenizer(tmp_path, capsys):
    out = tmp_path / "rtn"
    main(["awq", "quantize", "tiny-llama", str(out), "--method", "rtn", "--group-size", "32", "--quiet"])
    assert main(["awq", "eval", str(out), "--device", "cpu"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
