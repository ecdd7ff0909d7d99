"""``lmcompress run`` end to end on the tiny random Llama: SIGKILL mid-grid and rerun (finished cells kept, none
recomputed, the rest completed), failed cells stored and retried only with ``--retry-failed``, the dry-run plan,
and ``lmcompress results`` filters and exports."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmcompress.cli import main

pytestmark = pytest.mark.model

SRC = str(Path(__file__).resolve().parents[2] / "src")

KILL_GRID = """\
name: kill
models: [tiny-llama]
ratios: [0.5]
kv: [none, snapkv, streaming_llm]
tasks:
  - decode_cost: {length: 256, new_tokens: 24, sweep: {seed: [0, 1, 2, 3, 4, 5]}}
"""


def ok_rows(store: Path) -> dict[str, tuple[float, str]]:
    """``key -> (started_at, owner)`` of the finished rows (read-only, safe while a runner writes)."""
    if not store.exists():
        return {}
    try:
        db = sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
        try:
            rows = db.execute("SELECT key, started_at, owner FROM runs WHERE status = 'ok'").fetchall()
        finally:
            db.close()
    except sqlite3.OperationalError:  # tables not created yet
        return {}
    return {k: (s, o) for k, s, o in rows}


def run_cli(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmcompress.cli", "run", *argv, "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_grid_then_rerun_keeps_finished_cells_and_completes_the_rest(tmp_path):
    grid = tmp_path / "kill.yaml"
    grid.write_text(KILL_GRID)
    store = tmp_path / "s.sqlite"
    args = (str(grid), "--store", str(store), "--out", str(tmp_path / "out"))
    proc = run_cli(*args)
    deadline = time.time() + 300
    while len(ok_rows(store)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    before = ok_rows(store)
    assert proc.returncode == -signal.SIGKILL
    assert 3 <= len(before) < 18, f"the kill came too late to test anything ({len(before)} of 18 cells finished)"
    assert len({o for _, o in before.values()}) == 1

    rerun = run_cli(*args)
    _out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    assert f"{len(before)} done" in err and f"{18 - len(before)} not run" in err, err
    after = ok_rows(store)
    assert len(after) == 18
    assert {k: after[k] for k in before} == before  # every finished cell kept, none recomputed
    new_owners = {after[k][1] for k in set(after) - set(before)}
    assert len(new_owners) == 1 and new_owners.isdisjoint({o for _, o in before.values()})
    with sqlite3.connect(store) as db:  # the killed runner's claim was taken over and released
        assert db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0


FAIL_GRID = """\
name: fails
models: [tiny-llama]
kv: [none, int4]          # int4's default group of 64 does not divide the tiny model's 16-wide heads
tasks:
  - decode_cost: {length: 64, new_tokens: 2}
"""


def test_failed_cell_is_stored_with_its_error_and_retried_only_on_request(tmp_path, capsys):
    grid = tmp_path / "fails.yaml"
    grid.write_text(FAIL_GRID)
    store = tmp_path / "s.sqlite"
    args = ["run", str(grid), "--store", str(store), "--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 1
    assert "1 of 2 cells failed" in capsys.readouterr().err

    def failed():
        with sqlite3.connect(store) as db:
            return db.execute("SELECT kv_label, error, started_at FROM runs WHERE status = 'failed'").fetchall()

    (label, error, started), = failed()
    assert label == "int(bits=4)" and error.startswith("LMCompressError: group_size=64 does not divide head_dim=16")
    assert main(["results", "--store", str(store), "--status", "failed", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["kv"], r["status"]) for r in rows] == [("int(bits=4)", "failed")] and "group_size=64" in rows[0]["error"]

    assert main(args) == 1  # not retried: the stored failure is untouched
    assert "1 failed cells skipped (--retry-failed reruns them)" in capsys.readouterr().err
    assert failed()[0][2] == started
    assert main([*args[:-1], "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "1 done, 0 stale (another code version), 1 failed, 0 not run" in plan
    assert "to run: 0 cells" in plan and "skip failed tiny-llama | int(bits=4)" in plan

    assert main([*args, "--retry-failed"]) == 1  # retried (and fails again: a new row)
    assert failed()[0][2] > started
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT COUNT(*) FROM runs WHERE status = 'ok'").fetchone()[0] == 1


def test_dry_run_estimates_from_stored_durations_and_results_filter_export(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text("models: [tiny-llama]\nratios: [0.5]\nkv: [none, snapkv]\n"
                    "tasks:\n  - decode_cost: {length: 160, new_tokens: 2}\n")
    store = tmp_path / "s.sqlite"
    base = ["run", str(grid), "--store", str(store), "--out", str(tmp_path / "out")]
    assert main([*base, "--dry-run"]) == 0
    assert "to run: 2 cells; estimate: unknown" in capsys.readouterr().out
    assert not store.exists()  # a dry run creates nothing
    assert main([*base, "--quiet"]) == 0
    capsys.readouterr()
    grid.write_text(grid.read_text().replace("[none, snapkv]", "[none, snapkv, streaming_llm]"))
    assert main([*base, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    with sqlite3.connect(store) as db:
        mean = db.execute("SELECT AVG(duration_s) FROM runs").fetchone()[0]
    assert "2 done, 0 stale (another code version), 0 failed, 1 not run" in plan
    shown = f"~{mean:.0f} s from stored durations of like cells"
    assert f"to run: 1 cells; estimate: {shown}" in plan, plan

    assert main(["results", "--store", str(store), "--where", "kv=snap*", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["kv"], r["task"], r["task.length"]) for r in rows] == [("snapkv(ratio=0.5)", "decode_cost", "160")]
    assert float(rows[0]["cost.kv_bytes"]) > 0
    assert main(["results", "--store", str(store), "--where", "task.length=160", "--where", "kv=none",
                 "--columns", "kv,cost.kv_bytes", "--format", "md"]) == 0
    md = capsys.readouterr().out.strip().splitlines()
    assert md[0] == "| kv | cost.kv_bytes |" and len(md) == 3 and md[2].startswith("| none | ")
    assert main(["results", "--store", str(store), "--where", "task.length=65", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["results", "--store", str(store), "--where", "modle=x"]) == 2
    assert "--where column 'modle' is in no stored row; allowed: " in capsys.readouterr().err
