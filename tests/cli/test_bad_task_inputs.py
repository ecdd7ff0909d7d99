"""Bad task input through the real command line (a subprocess): exit 2, one line naming the bad value and what
is allowed, no traceback, and a result store given with ``--store`` keeps what it held."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from lmcompress.runner.store import ResultStore

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _lmcompress(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmcompress.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture
def store(tmp_path):
    """A store holding one finished run."""
    path = tmp_path / "results.sqlite"
    with ResultStore(path) as s:
        s.put("k1", {"model": "m", "kv_label": "none", "task": {"name": "passkey", "params": {}}},
              {"metrics": {"accuracy": 1.0}, "costs": {}, "details": {}}, provenance={"code_version": "test", "dtype": "float32"}, device="cpu",
              started_at=1.0, duration_s=2.0)
    return path


def _rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT key, result FROM runs").fetchall()


def _longbench_missing_field(tmp_path: Path) -> str:
    path = tmp_path / "lb.jsonl"
    path.write_text(json.dumps({"input": "q", "context": "c", "all_classes": None, "length": 1,
                                "dataset": "hotpotqa"}) + "\n")
    return f"longbench:path={path}"


def _empty_haystack(tmp_path: Path) -> str:
    path = tmp_path / "empty.txt"
    path.write_text("\n")
    return f"niah_single_2:haystack_source={path}"


CASES = [
    (_longbench_missing_field, "lacks field 'answers'; allowed: LongBench records with input, context, answers"),
    (lambda _: "niah_single_1:length=9000", "needs 9000 tokens, which would exceed smollm2-135m's 8192 positions"),
    (lambda _: "needle_grid:depths=0.05/1.5", "depth=1.5 is out of range; allowed: [0.0, 1.0]"),
    (_empty_haystack, "is empty; allowed: lee, lee-test, jargon or a non-empty text file"),
    (lambda _: "no_such_task", "unknown task 'no_such_task'; available: "),
    (lambda _: "vt:hops=3", "unknown parameter 'hops' for task 'vt'; allowed: length, samples"),
    (lambda _: "ruler:samples=many", "ruler: samples='many' is not a valid int"),
]


@pytest.mark.slow  # a fresh interpreter per case (imports torch and transformers)
@pytest.mark.parametrize(("make", "needle"), CASES, ids=["longbench-field", "ruler-length", "depth", "haystack",
                                                          "unknown-task", "unknown-param", "bad-value"])
def test_bad_task_input_exits_2_with_one_line(make, needle, tmp_path, store):
    before = _rows(store)
    proc = _lmcompress("bench", "--model", "smollm2-135m", "--methods", "none", "--tasks", make(tmp_path),
                       "--out", str(tmp_path / "out"), "--store", str(store))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("lmcompress: error: "), proc.stderr
    assert needle in lines[0]
    assert _rows(store) == before


def test_tasks_command_lists_every_task_with_defaults():
    proc = _lmcompress("tasks", "--json")
    assert proc.returncode == 0, proc.stderr
    catalog = json.loads(proc.stdout)
    expected = {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2", "ruler",
                "longbench", "needle_grid", "passkey", "perplexity", "kv_error", "multiple_choice"}
    assert expected <= set(catalog)
    assert catalog["vt"]["params"]["num_hops"] == 4 and catalog["vt"]["group"] == "ruler"
    assert catalog["niah_multikey_3"]["params"]["key_type"] == "uuids"
    assert catalog["needle_grid"]["params"]["depths"] == [0.05, 0.5, 0.95]
    assert catalog["kv_error"]["primary_metric"] == "logit_kl" and not catalog["kv_error"]["higher_is_better"]
