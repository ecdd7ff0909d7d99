"""Bad DMS checkpoint folders and retrofit options through the CLI: exit 2, one line naming the value and what
is allowed, no traceback."""

from __future__ import annotations

import json

import pytest

from lmcompress.cli import main

GOOD = {"dms_window_size": 16, "dms_alpha_scale": 100.0, "dms_initial_alpha_offset": 5.0,
        "dms_separate_alpha": False, "dms_alpha_per": "head"}


def folder(tmp_path, **changes):
    config = {"model_type": "qwen3", **GOOD, **changes}
    config = {k: v for k, v in config.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("lmcompress: error: ")
    return err


def test_good_folder_prints_settings(tmp_path, capsys):
    assert main(["dms", "info", folder(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == GOOD


@pytest.mark.parametrize(("changes", "expect"), [
    ({"dms_window_size": None}, "lacks dms_window_size"),
    ({"dms_window_size": None, "dms_alpha_scale": None, "dms_initial_alpha_offset": None},
     "lacks dms_window_size, dms_alpha_scale, dms_initial_alpha_offset"),
    ({"dms_window_size": 0}, "dms_window_size=0 is not allowed; it must be an integer >= 1"),
    ({"dms_window_size": 2.5}, "dms_window_size=2.5 is not allowed"),
    ({"dms_alpha_scale": 0}, "dms_alpha_scale=0 is not allowed"),
    ({"dms_alpha_scale": "big"}, "dms_alpha_scale='big' is not allowed; it must be a finite number"),
    ({"dms_alpha_per": "token"}, "dms_alpha_per='token' is not supported; allowed: head, layer"),
    ({"dms_separate_alpha": "yes"}, "dms_separate_alpha='yes' is not allowed"),
])
def test_bad_folder(tmp_path, capsys, changes, expect):
    assert expect in one_line_error(capsys, ["dms", "info", folder(tmp_path, **changes)])


def test_missing_folder(tmp_path, capsys):
    assert "has no config.json" in one_line_error(capsys, ["dms", "info", str(tmp_path / "nope")])


def test_not_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert "is not readable JSON" in one_line_error(capsys, ["dms", "info", str(tmp_path)])


@pytest.mark.parametrize(("argv", "expect"), [
    (["--ratio", "0.5"], "--ratio=0.5 is not allowed; it must be a number >= 1"),
    (["--steps", "0"], "--steps=0 is not allowed"),
    (["--window", "0"], "dms_window_size=0 is not allowed"),
    (["--alpha-scale", "0"], "dms_alpha_scale=0 is not allowed"),
])
def test_bad_retrofit_options(tmp_path, capsys, argv, expect):
    err = one_line_error(capsys, ["dms", "retrofit", "tiny-llama", str(tmp_path / "out"), "--quiet", *argv])
    assert expect in err
    assert not (tmp_path / "out").exists()
