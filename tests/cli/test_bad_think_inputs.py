"""ThinK's bad parameters through the CLI: exit 2 with one line naming the value and what is allowed, no
traceback; ``lmcompress methods --json`` lists it with its parameters."""

from __future__ import annotations

import json

import pytest

from lmcompress.cli import main


@pytest.mark.parametrize(("method", "needle"), [
    ("think:key_channel_compression_ratio=abc", "key_channel_compression_ratio='abc' is not a number"),
    ("think:key_channel_compression_ratio=1.5", "key_channel_compression_ratio"),
    ("think:key_channel_compression_ratio=0.5,window_size=0", "window_size=0 is not allowed"),
    ("think:key_channel_compression_ratio=0.5,ratio=0.5", "leave ratio/budget unset"),
    ("think:base=cake,base.budget=64,key_channel_compression_ratio=0.5", "think cannot take base=cake"),
])
def test_bad_think_parameter_exits_2_with_one_line(method, needle, capsys, tmp_path):
    assert main(["bench", "--methods", method, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmcompress: error: ")
    assert needle in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)


def test_methods_json_lists_think(capsys):
    assert main(["methods", "--json"]) == 0
    params = json.loads(capsys.readouterr().out)["eviction"]["think"]["params"]
    assert {"key_channel_compression_ratio", "window_size", "base"} <= set(params)
