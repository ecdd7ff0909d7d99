"""CLI contract: bad input exits 2 with one line naming the value and what is allowed, no traceback."""

from __future__ import annotations

import json

import pytest

from lmcompress.cli import main


@pytest.mark.parametrize(("argv", "needle"), [
    (["bench", "--ratios", "1.5"], "ratio=1.5 is out of range; allowed: [0.0, 1.0)"),
    (["bench", "--methods", "streaming_llm:budget=0"], "budget=0 is not allowed"),
    (["bench", "--methods", "int9"], "bits=9 is not supported by int KV quantization; allowed: 2, 4, 8"),
    (["bench", "--methods", "h3o"], "unknown method 'h3o'"),
    (["bench", "--model", "no-such-model", "--no-ppl"], "unknown model 'no-such-model'"),
    (["bench", "--model", "/nonexistent/model.gguf", "--no-ppl"], "GGUF file '/nonexistent/model.gguf' does not exist"),
    (["bench", "--lengths", "9000", "--no-ppl"], "exceed smollm2-135m's 8192 positions"),
    (["bench", "--depths", "1.5"], "depth=1.5 is out of range"),
    (["bench", "--lengths", "abc"], "--lengths='abc' is not a comma-separated list of integers"),
    (["report", "--store", "/nonexistent.sqlite"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, capsys, tmp_path):
    argv = [*argv, "--out", str(tmp_path)] if argv[0] == "bench" else argv
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmcompress: error: ")
    assert needle in err[-1]
    assert not any("Traceback" in line for line in err)


def test_methods_json_lists_methods_by_kind(capsys):
    assert main(["methods", "--json"]) == 0
    catalog = json.loads(capsys.readouterr().out)
    assert {"eviction", "kv_quantization", "weights", "tasks"} <= set(catalog)
    assert {"streaming_llm", "snapkv"} <= set(catalog["eviction"])
    assert "int" in catalog["kv_quantization"]
    assert catalog["eviction"]["snapkv"]["params"]["window_size"] == 64
    assert {"passkey", "perplexity"} <= set(catalog["tasks"])
