"""Bad parameters of the kvpress presses of issue 11 (part b) through the CLI: exit 2, one line naming the value
and what is allowed, no traceback; and ``lmcompress methods --json`` lists every press with its parameters."""

from __future__ import annotations

import json

import pytest

from lmcompress.cli import main

PRESSES = {
    "chunkkv": {"base", "chunk_length"},
    "block": {"base", "block_size"},
    "chunk": {"base", "chunk_length"},
    "per_layer": {"base", "ratios"},
    "composed": {"policies"},
    "lagkv": {"n_sink", "lag_size", "cross_scoring"},
    "cur": {"num_sinks", "leverage_type", "use_random_leverage", "use_local_approximation", "local_window_size"},
    "leverage": {"sketch_dimension", "seed"},
    "non_causal_attn": {"chunk_size"},
    "key_rerotation": {"base"},
    "ratio_decoding": {"base", "interval", "target_ratio"},
    "prefill_decoding": {"prefill", "decoding"},
    "compactor": {"sink_size_start", "sink_size_end", "chunk_size", "sketch_dimension", "blending"},
    "cap": {"tau", "n_future_positions", "n_sink", "epsilon"},
    "entropy_chunkkv": {"base", "chunk_length", "low_entropy_chunk_length"},
    "finch": {"window_size", "chunk_length", "normalize_scores", "rerotate_keys"},
}


@pytest.mark.parametrize(("method", "needle"), [
    ("chunkkv:base=knorm,chunk_length=0", "chunk_length=0 is not allowed; it must be an integer >= 1"),
    ("chunkkv:base=knorm,chunk_length=abc", "chunk_length='abc' is not allowed"),
    ("chunkkv:chunk_length=8", "chunkkv needs a score-based eviction policy as base"),
    ("block:base=knorm,block_size=0", "block_size=0 is not allowed"),
    ("block:base=snapkv,block_size=32", "raise block_size above 64"),
    ("chunk:base=knorm,chunk_length=0", "chunk_length=0 is not allowed"),
    ("per_layer:base=knorm,ratios=0.2/1.5", "ratios entry=1.5 is out of range; allowed: [0.0, 1.0)"),
    ("per_layer:base=knorm,ratios=0.2/abc", "ratios entry 'abc' is not a number"),
    ("lagkv:lag_size=0", "lag_size=0 is not allowed"),
    ("finch", "finch needs window_size"),
    ("finch:window_size=0", "window_size=0 is not allowed"),
    ("entropy_chunkkv:base=knorm,chunk_length=4,low_entropy_chunk_length=4",
     "low_entropy_chunk_length=4 must be < chunk_length=4"),
    ("lagkv:cross_scoring=maybe", "cross_scoring='maybe' must be true or false"),
    ("cur:leverage_type=foo", "leverage_type='foo' is not supported; allowed: key, value, kv_avg, kv_product"),
    ("leverage:sketch_dimension=0", "sketch_dimension=0 is not allowed"),
    ("non_causal_attn:chunk_size=0", "chunk_size=0 is not allowed"),
    ("key_rerotation:base=knorm,ratio=0.5", "leave ratio/budget unset"),
    ("ratio_decoding:base=knorm,target_ratio=1.5", "target_ratio=1.5 is out of range"),
    ("ratio_decoding:base=knorm,target_ratio=x", "target_ratio='x' is not a number"),
    ("chunkkv:base=knorm,chunk_size=4", "allowed: ratio, budget, protect_sinks, protect_recent, base, chunk_length"),
])
def test_bad_press_parameter_exits_2_with_one_line(method, needle, capsys, tmp_path):
    assert main(["bench", "--methods", method, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmcompress: error: ")
    assert needle in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)


def test_methods_json_lists_every_press_with_parameters(capsys):
    assert main(["methods", "--json"]) == 0
    eviction = json.loads(capsys.readouterr().out)["eviction"]
    for name, params in PRESSES.items():
        assert name in eviction, name
        assert params <= set(eviction[name]["params"]), (name, eviction[name]["params"])
        assert eviction[name]["summary"]
    assert eviction["chunkkv"]["params"]["chunk_length"] == 20
    assert eviction["block"]["params"]["block_size"] == 128
    assert eviction["lagkv"]["params"]["lag_size"] == 128


def test_method_list_keeps_arguments_and_gives_the_sweep_ratio_to_the_base():
    from lmcompress.kv.evict import ChunkKV, Knorm, PerLayerCompression, SnapKV
    from lmcompress.kv.parse import parse_method, split_methods

    text = "knorm,chunkkv:base=snapkv,chunk_length=8,base.window_size=4,per_layer:base=knorm,ratios=0.2/0.4,int4"
    assert split_methods(text) == ["knorm", "chunkkv:base=snapkv,chunk_length=8,base.window_size=4",
                                   "per_layer:base=knorm,ratios=0.2/0.4", "int4"]
    spec = parse_method(split_methods(text)[1], ratio=0.5)
    assert spec.evict == ChunkKV(base=SnapKV(ratio=0.5, window_size=4), chunk_length=8)
    spec = parse_method(split_methods(text)[2], ratio=0.5)  # the per-layer ratios replace the sweep's ratio
    assert spec.evict == PerLayerCompression(base=Knorm(), ratios=(0.2, 0.4))
