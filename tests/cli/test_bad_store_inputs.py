"""Bad ``--out`` / ``--store`` through the CLI (issue 9, item 5, store and output cases): each exits 2 with one
line on stderr and no traceback, before any model loads or any run is computed; the file given is left
byte-for-byte as it was (never switched to WAL) and a store's rows are all still there.

The subprocesses of all cases start together (one module fixture), so the suite pays for one interpreter start,
not one per case.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from lmcompress.runner.store import ResultStore

SRC = str(Path(__file__).resolve().parents[2] / "src")
BENCH = ["bench", "--model", "tiny-llama", "--methods", "none", "--lengths", "64", "--depths", "0.5", "--no-ppl",
         "--quiet"]

# The version-1 runs table (before the store key held dtype, device and code version), verbatim.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    kv_label TEXT NOT NULL,
    task TEXT NOT NULL,
    spec TEXT NOT NULL,
    result TEXT NOT NULL,
    versions TEXT NOT NULL,
    device TEXT NOT NULL,
    started_at REAL NOT NULL,
    duration_s REAL NOT NULL
)
"""


def _sqlite(path: Path, *sql: str) -> Path:
    db = sqlite3.connect(path)
    for s in sql:
        db.execute(s)
    db.commit()
    db.close()
    return path


def _store_with_rows(path: Path) -> Path:
    with ResultStore(path) as store:
        for i in range(3):
            store.put(f"key{i}", {"model": "tiny-llama", "kv_label": "none", "task": {"name": "passkey"}},
                      {"metrics": {}, "costs": {}, "details": {}},
                      provenance={"code_version": "0.1.0+src.000000000000", "dtype": "float32"}, device="cpu",
                      started_at=float(i), duration_s=1.0)
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return path


def _cases(root: Path) -> dict[str, tuple[list[str], str, Path | None]]:
    """name -> (argv, expected text of the error line, file that must be left unchanged)."""
    root.mkdir()
    plain = root / "plain.txt"
    plain.write_text("not a database\n")
    ro_dir = root / "ro-dir"
    ro_dir.mkdir()
    ro_dir.chmod(0o555)
    ro_store = _store_with_rows(root / "ro.sqlite")
    ro_store.chmod(0o444)
    foreign = _sqlite(root / "foreign.db", "CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)",
                      "INSERT INTO notes (text) VALUES ('keep me')")
    old = _sqlite(root / "old.sqlite", OLD_SCHEMA)
    good = _store_with_rows(root / "good.sqlite")
    (root / "a-folder").mkdir()
    out = str(root / "out")
    return {
        "out-is-file": ([*BENCH, "--out", str(plain)], "is a file; allowed: a folder", plain),
        "out-under-file": ([*BENCH, "--out", str(plain / "sub")], "is a file, not a folder", plain),
        "out-read-only": ([*BENCH, "--out", str(ro_dir / "out")], "is not writable", None),
        "out-bad-store-kept": ([*BENCH, "--out", str(plain), "--store", str(good)], "is a file", good),
        "store-not-sqlite": ([*BENCH, "--out", out, "--store", str(plain)], "is not an SQLite file", plain),
        "store-read-only": ([*BENCH, "--out", out, "--store", str(ro_store)], "is read-only", ro_store),
        "store-foreign": ([*BENCH, "--out", out, "--store", str(foreign)], "SQLite file of another schema", foreign),
        "store-old-schema": ([*BENCH, "--out", out, "--store", str(old)], "written by an older lmcompress", old),
        "store-is-folder": ([*BENCH, "--out", out, "--store", str(root / "a-folder")], "is a folder", None),
        "store-in-read-only-dir": ([*BENCH, "--out", out, "--store", str(ro_dir / "s.sqlite")], "is not writable",
                                   None),
        "report-foreign": (["report", "--store", str(foreign), "--out", out], "another schema", foreign),
        "report-not-sqlite": (["report", "--store", str(plain), "--out", out], "not an SQLite file", plain),
        "report-out-is-file": (["report", "--store", str(good), "--out", str(plain)], "is a file", good),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-store") / "cases"
    cases = _cases(root)
    before = {name: (keep.read_bytes() if keep else None) for name, (_, _, keep) in cases.items()}
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "lmcompress.cli", *argv], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (argv, _, _) in cases.items()}
    done = {name: (p.wait(timeout=600), *p.communicate()) for name, p in procs.items()}
    yield cases, before, done
    for p in (root / "ro-dir", root / "ro.sqlite"):
        p.chmod(0o755)


CASE_NAMES = ["out-is-file", "out-under-file", "out-read-only", "out-bad-store-kept", "store-not-sqlite",
              "store-read-only", "store-foreign", "store-old-schema", "store-is-folder", "store-in-read-only-dir",
              "report-foreign", "report-not-sqlite", "report-out-is-file"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_store_or_out_exits_2_with_one_line(results, name):
    cases, before, done = results
    _, needle, keep = cases[name]
    rc, _out, err = done[name]
    lines = err.strip().splitlines()
    assert rc == 2, err[-2000:]
    assert len(lines) == 1, err
    assert lines[0].startswith("lmcompress: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert "runs," not in err  # failed before the grid was looked at, let alone computed
    if keep is not None:
        assert keep.read_bytes() == before[name]  # untouched, byte for byte
        if keep.name in ("plain.txt", "foreign.db", "old.sqlite"):
            assert not Path(str(keep) + "-wal").exists()  # never opened for writing


def test_foreign_and_old_files_stay_out_of_wal_and_keep_their_rows(results):
    cases, _, _ = results
    for name, table, rows in (("store-foreign", "notes", 1), ("store-old-schema", "runs", 0)):
        path = cases[name][2]
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == rows
        db.close()
    with ResultStore(cases["out-bad-store-kept"][2], readonly=True) as store:
        assert len(store) == 3  # nothing already in the store was lost


def test_bad_out_fails_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """In process: loading a model or running the grid would raise AssertionError, not exit 2."""
    import lmcompress.models
    from lmcompress.cli import main
    from lmcompress.runner.executors import InlineExecutor

    def boom(*a, **k):
        raise AssertionError("a model was loaded / a run started before --out was checked")

    monkeypatch.setattr(lmcompress.models, "load_model", boom)
    monkeypatch.setattr(InlineExecutor, "run", boom)
    plain = tmp_path / "f"
    plain.write_text("x")
    assert main([*BENCH, "--out", str(plain)]) == 2
    assert "is a file" in capsys.readouterr().err
