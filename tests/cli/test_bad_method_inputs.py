"""Bad parameters of the issue-11 methods exit 2 through the CLI with one line naming the value and what is
allowed (no traceback), and ``lmcompress methods --json`` lists the methods with their parameters."""

from __future__ import annotations

import json

import pytest

from lmcompress.cli import main

# (the CLI splits --methods on commas, so each case sets one parameter)
# ---------------------------------------------------------------- h11a: KVzip, KVzip+, CriticalKV, CriticalAdaKV
H11A_CASES = [
    ("kvzip:chunk_size=0", "chunk_size=0 is not allowed; it must be an integer >= 1"),
    ("kvzip_plus:chunk_size=1.5", "chunk_size=1.5 is not allowed; it must be an integer >= 1"),
    ("kvzip:n_sink=-1", "n_sink=-1 is not allowed; it must be an integer >= 0"),
    ("kvzip:layerwise=sometimes", "layerwise='sometimes' is not allowed; it must be true or false"),
    ("kvzip:ratio=abc", "ratio='abc' is not a number; allowed: [0, 1)"),
    ("criticalkv", "criticalkv needs a score-based eviction policy as base"),
    ("criticalkv:base=snapkv,first_stage_ratio=2", "first_stage_ratio=2.0 is out of range; allowed: [0.0, 1.0]"),
    ("criticalkv:base=snapkv,epsilon=abc", "epsilon='abc' is not a number"),
    ("criticaladakv:base=kvzip", "criticaladakv needs a score-based eviction policy as base"),
    ("criticaladakv:base=snapkv,alpha_safeguard=x", "alpha_safeguard='x' is not a number; allowed: [0, 1]"),
    ("duo_attention", "DuoAttention needs a calibration file (pattern=PATH)"),
    ("duo_attention:pattern=/nonexistent/duo.json", "calibration file '/nonexistent/duo.json' does not exist"),
    ("kvzap", "KVzap needs surrogate=PATH"),
    ("kvzap:surrogate=/nonexistent/kvzap.safetensors", "surrogate file '/nonexistent/kvzap.safetensors' does not exist"),
    ("duo_attention:sink_size=-1", "sink_size=-1 is not allowed; it must be an integer >= 0"),
]
H11A_METHODS = {"kvzip": "chunk_size", "kvzip_plus": "layerwise", "criticalkv": "first_stage_ratio",
                "criticaladakv": "alpha_safeguard", "duo_attention": "pattern", "kvzap": "surrogate"}


@pytest.mark.parametrize(("method", "needle"), H11A_CASES)
def test_h11a_bad_method_parameters_exit_2(method, needle, capsys, tmp_path):
    assert main(["bench", "--methods", method, "--no-ppl", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmcompress: error: ")
    assert needle in err[0], err[0]


def test_h11a_methods_listed_with_parameters(capsys):
    assert main(["methods", "--json"]) == 0
    eviction = json.loads(capsys.readouterr().out)["eviction"]
    for name, param in H11A_METHODS.items():
        assert param in eviction[name]["params"], name


# ---------------------------------------------------------------- s1: QFilter, SimLayerKV
S1_CASES = [
    ("qfilter", "QFilter needs filters=PATH"),
    ("qfilter:filters=/nonexistent/q.safetensors", "QFilter filters file '/nonexistent/q.safetensors' does not exist"),
    ("simlayerkv:lazy_threshold=2", "lazy_threshold=2.0 is out of range; allowed: [0.0, 1.0]"),
    ("simlayerkv:lazy_threshold=abc", "lazy_threshold='abc' is not a number; allowed: [0, 1]"),
    ("simlayerkv:n_recent=0", "n_recent=0 is not allowed; it must be an integer >= 1"),
    ("simlayerkv:n_last=1.5", "n_last=1.5 is not allowed; it must be an integer >= 1"),
    ("simlayerkv:ratio=0.5", "SimLayerKV takes no ratio or budget (got ratio=0.5, budget=None)"),
]


@pytest.mark.parametrize(("method", "needle"), S1_CASES)
def test_s1_bad_method_parameters_exit_2(method, needle, capsys, tmp_path):
    assert main(["bench", "--methods", method, "--no-ppl", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmcompress: error: ")
    assert needle in err[0], err[0]
