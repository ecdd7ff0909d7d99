"""Grid files (``lmcompress run``): expansion, presets, and malformed files reported with file, line and key
before anything runs."""

from __future__ import annotations

import textwrap

import pytest

from lmcompress.cli import main
from lmcompress.runner.grid import GridError, load_grid, presets

GOOD = """\
name: t
models: [tiny-llama]
ratios: [0.25, 0.5]
kv:
  - none
  - snapkv
  - {method: streaming_llm, ratios: [0.75]}
  - "int4:group_size=16"
tasks:
  - decode_cost: {length: 64, new_tokens: 2, sweep: {seed: [0, 1]}}
  - {name: needle_grid, lengths: [256, 512], depths: [0.5]}
"""


def write(tmp_path, text: str, name: str = "grid.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_grid_expands_models_ratio_sweeps_task_sweeps_and_tuples(tmp_path):
    grid = load_grid(write(tmp_path, GOOD))
    assert grid.name == "t" and grid.device == "cpu" and grid.dtype == "float32"
    labels = sorted({r.kv.label() for r in grid.runs})
    assert labels == sorted(["none", "snapkv(ratio=0.25)", "snapkv(ratio=0.5)", "streaming_llm(ratio=0.75)",
                             "int(bits=4, group_size=16)"]), labels
    tasks = [r.task for r in grid.runs[::5]]
    assert [(t.name, getattr(t, "seed", None)) for t in tasks] == [("decode_cost", 0), ("decode_cost", 1),
                                                                   ("needle_grid", 0)]
    assert tasks[2].lengths == (256, 512) and tasks[2].depths == (0.5,)
    assert len(grid.runs) == 5 * 3
    # every KV spec of one task back to back
    assert [r.task.label() for r in grid.runs[:5]] == [tasks[0].label()] * 5


def test_presets_are_shipped_and_valid():
    assert {"smoke", "needle", "ruler-4k"} <= set(presets())
    for name in presets():
        assert load_grid(name).runs


BAD = [
    # (grid text, expected "file:line: key: message" pieces)
    ("models: [tiny-llama]\nkv: [none\ntasks: [decode_cost]\n", r"grid\.yaml:3: bad YAML"),
    ("models: [tiny-llama]\nkv:\n  - none\n  - snapkvv\ntasks: [decode_cost]\n",
     r"grid\.yaml:4: kv\[1\]: .*snapkvv"),
    ("models: [tiny-llama]\nkv: [none]\ntasks:\n  - decode_cost\n  - passkee: {length: 64}\n",
     r"grid\.yaml:5: tasks\[1\]\.passkee: unknown task 'passkee'; allowed: .*passkey"),
    ("models: [tiny-llama]\nkv: [none]\ntasks:\n  - passkey:\n      length: 256\n      depth: 1.5\n",
     r"grid\.yaml:6: tasks\[0\]\.passkey\.depth: depth=1\.5 is out of range"),
    ("models: [tiny-llama]\nkv: [none]\ntasks:\n  - passkey: {sweep: {depth: [0.5, 2.0]}}\n",
     r"grid\.yaml:4: tasks\[0\]\.passkey\.sweep\.depth: depth=2\.0 is out of range"),
    ("models: [tiny-llama]\nkv: [none]\ntasks:\n  - {name: decode_cost, lenght: 64}\n",
     r"grid\.yaml:4: tasks\[0\]\.lenght: unknown parameter 'lenght' for task 'decode_cost'"),
    ("models: [tiny-llama]\nkv: [none]\ntasks:\n  - decode_cost: {length: many}\n",
     r"grid\.yaml:4: tasks\[0\]\.decode_cost\.length: length='many' is not a int"),
    ("models: [tiny-llama]\nratios: [0.5, 1.5]\nkv: [snapkv]\ntasks: [decode_cost]\n",
     r"grid\.yaml:2: ratios\[1\]: ratio 1\.5 is out of range"),
    ("models: [tiny-llama]\nkv:\n  - snapkv:ratio=0.5,windw=4\ntasks: [decode_cost]\n",
     r"grid\.yaml:3: kv\[0\]: .*windw"),
    ("model: [tiny-llama]\nkv: [none]\ntasks: [decode_cost]\n", r"grid\.yaml:1: model: unknown key 'model'"),
    ("models: [tiny-llama]\nkv: [none]\n", r"grid\.yaml:1: tasks: missing or empty 'tasks'"),
    ("models: [tiny-llama]\ndtype: fp8\nkv: [none]\ntasks: [decode_cost]\n", r"grid\.yaml:2: dtype: dtype='fp8'"),
    ("models: [tiny-llama]\nkv: [none, none]\ntasks: [decode_cost]\n", r"lists the cell .* twice"),
]


@pytest.mark.parametrize(("text", "pattern"), BAD)
def test_malformed_grid_names_file_line_and_key(tmp_path, text, pattern):
    with pytest.raises(GridError, match=pattern):
        load_grid(write(tmp_path, text))


@pytest.mark.parametrize(("text", "pattern"), [BAD[1], BAD[3], (BAD[0][0], BAD[0][1])])
def test_cli_run_malformed_grid_exits_2_with_one_line_and_runs_nothing(tmp_path, capsys, text, pattern):
    import re

    grid = write(tmp_path, text)
    store = tmp_path / "out" / "s.sqlite"
    assert main(["run", str(grid), "--store", str(store), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmcompress: error: ") and re.search(pattern, err[0]), err
    assert not store.exists() and not (tmp_path / "out").exists()


def test_cli_run_unknown_model_and_unknown_grid(tmp_path, capsys):
    grid = write(tmp_path, "models: [no-such-model]\nkv: [none]\ntasks: [decode_cost]\n")
    assert main(["run", str(grid), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["run", "nope-preset"]) == 2
    assert "neither a file nor a preset; allowed: a YAML grid file or one of" in capsys.readouterr().err


def test_unreachable_ray_address_fails_fast_with_one_line(tmp_path, capsys):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    grid = write(tmp_path, "models: [tiny-llama]\nkv: [none]\ntasks: [decode_cost]\n")
    started = time.time()
    code = main(["run", str(grid), "--out", str(tmp_path / "out"), "--executor", "ray",
                 "--ray-address", f"127.0.0.1:{port}", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and time.time() - started < 30
    assert not (tmp_path / "out").exists()  # nothing was created
    assert err[-1].startswith(f"lmcompress: error: Ray cluster at --ray-address='127.0.0.1:{port}' cannot be reached")
    assert main(["run", str(grid), "--out", str(tmp_path / "out"), "--executor", "ray", "--ray-address", "nohost"]) == 2
    assert "is not HOST:PORT or ray://HOST:PORT" in capsys.readouterr().err


def test_ray_options_reach_the_executor_and_bad_ones_fail_before_the_store(tmp_path, capsys):
    import argparse

    from lmcompress.cli_run import make_run_executor

    grid = load_grid(write(tmp_path, "models: [tiny-llama]\nkv: [none]\ntasks: [decode_cost]\n"))
    args = argparse.Namespace(executor="ray", quiet=True, reuse_stale=False, ray_address=None, workers=3,
                              ray_gpus=None, ray_cpus=2.0, ray_memory="1.5GiB")
    ex = make_run_executor(args, grid)
    assert ex.task_options() == {"num_cpus": 2.0, "num_gpus": 0.0, "memory": 3 << 29}  # cpu grid: no GPUs
    assert ex.workers == 3 and ex.keep_going and ex.device_kind == "cpu"
    path = str(write(tmp_path, "models: [tiny-llama]\nkv: [none]\ntasks: [decode_cost]\n"))
    for flags, message in ((["--ray-memory", "20 gigs"], "--ray-memory='20 gigs' is not a size; allowed:"),
                           (["--ray-memory", "0GiB"], "--ray-memory='0GiB' is not a size > 0"),
                           (["--ray-gpus", "-1"], "GPUs per task=-1.0 is not allowed; it must be >= 0")):
        assert main(["run", path, "--out", str(tmp_path / "out"), "--executor", "ray", "--quiet", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
        assert not (tmp_path / "out").exists()  # nothing was created
