"""Store key and provenance (issue 9, item 1): a change of dtype, device type, model file, weight config or code
version recomputes a cell; a stale row is kept only with reuse_stale and marked; an old or foreign store is
refused and left untouched."""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from lmcompress.eval.tasks.base import Task, TaskResult
from lmcompress.kv import KVSpec, SnapKV
from lmcompress.runner import provenance
from lmcompress.runner.executors import InlineExecutor
from lmcompress.runner.report import markdown_table, summarize, write_outputs
from lmcompress.runner.spec import RunSpec
from lmcompress.runner.store import ResultStore, StoreError

CALLS: list[str] = []


@dataclass(frozen=True)
class CountingTask(Task):
    name: ClassVar[str] = "passkey"  # reuse the report's pass-key columns
    length: int = 1024
    depth: float = 0.5

    def run(self, ctx):
        CALLS.append(f"{ctx.spec.label()}:{self.depth}")
        return TaskResult({"accuracy": 1.0}, {"kv_bytes": 1000.0, "ttft_s": 0.1, "decode_tok_s": 10.0,
                                              "peak_mem_bytes": 5, "mem_source": "test"})


def loader(name):
    return torch.nn.Linear(1, 1), None


def grid(model: str = "tiny-llama") -> list[RunSpec]:
    return [RunSpec(model, s, CountingTask(depth=d)) for s in (KVSpec(), KVSpec(evict=SnapKV(ratio=0.5)))
            for d in (0.1, 0.9)]


def run_grid(store_path, model: str = "tiny-llama", **kw) -> list[dict]:
    CALLS.clear()
    with ResultStore(store_path) as store:
        return InlineExecutor(progress=False, loader=loader, warmup=False, **kw).run(grid(model), store)


def test_same_grid_is_reused(tmp_path):
    run_grid(tmp_path / "s.sqlite")
    assert len(CALLS) == 4
    records = run_grid(tmp_path / "s.sqlite")
    assert CALLS == []
    assert all(r["dtype"] == "float32" and r["device"] == "cpu" and not r["stale"] for r in records)
    assert all(r["code_version"] == provenance.code_version() for r in records)


@pytest.mark.parametrize("change", [{"dtype": torch.bfloat16}, {"device": "cuda"}, {"device": "meta"}])
def test_other_dtype_or_device_type_is_recomputed(tmp_path, change):
    path = tmp_path / "s.sqlite"
    run_grid(path)
    records = run_grid(path, **change)
    assert len(CALLS) == 4
    run_grid(path, **change)
    assert CALLS == []  # now stored for that setting too
    with ResultStore(path) as store:
        assert len(store) == 8  # the first setting's rows are kept
    want = provenance.dtype_name(change.get("dtype", torch.float32)), change.get("device", "cpu")
    assert {(r["dtype"], r["device"]) for r in records} == {want}


def test_other_device_of_the_same_type_is_reused(tmp_path):
    path = tmp_path / "s.sqlite"
    run_grid(path, device="cuda:0")
    run_grid(path, device="cuda:1")
    assert CALLS == []


def _model_folder(path, quant: dict | None = None, weights: bytes = b"w" * 64):
    path.mkdir(exist_ok=True)
    config = {"model_type": "llama", **({"quantization_config": quant} if quant else {})}
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(weights)
    return str(path)


def test_other_model_file_is_recomputed(tmp_path):
    folder = _model_folder(tmp_path / "m")
    path = tmp_path / "s.sqlite"
    run_grid(path, model=folder)
    assert len(CALLS) == 4
    run_grid(path, model=folder)
    assert CALLS == []
    (tmp_path / "m" / "model.safetensors").write_bytes(b"v" * 65)  # other weights
    run_grid(path, model=folder)
    assert len(CALLS) == 4
    st = (tmp_path / "m" / "model.safetensors").stat()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"u" * 65)  # same size, new mtime
    os.utime(tmp_path / "m" / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    run_grid(path, model=folder)
    assert len(CALLS) == 4


def test_files_not_loaded_do_not_change_the_key(tmp_path):
    folder = _model_folder(tmp_path / "m")
    path = tmp_path / "s.sqlite"
    run_grid(path, model=folder)
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"ignored: safetensors are loaded")
    (tmp_path / "m" / "notes.txt").write_text("readme")
    run_grid(path, model=folder)
    assert CALLS == []


def test_other_weight_quantization_config_is_recomputed(tmp_path):
    """Only the quantization config differs: same file sizes, same mtimes."""
    folder = _model_folder(tmp_path / "m", quant={"quant_method": "awq", "bits": 4})
    path = tmp_path / "s.sqlite"
    run_grid(path, model=folder)
    cfg = tmp_path / "m" / "config.json"
    st = cfg.stat()
    cfg.write_text(cfg.read_text().replace('"bits": 4', '"bits": 3'))
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cfg.stat().st_size == st.st_size and cfg.stat().st_mtime_ns == st.st_mtime_ns
    records = run_grid(path, model=folder)
    assert len(CALLS) == 4
    assert records[0]["provenance"]["model"]["quantization_config"] == {"quant_method": "awq", "bits": 3}


def test_other_code_version_is_stale_recomputed_by_default_kept_with_reuse_stale(tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite"
    first = run_grid(path)
    old = first[0]["code_version"]
    monkeypatch.setattr(provenance, "code_version", lambda: "9.9.9+src.newcode00000")
    kept = run_grid(path, reuse_stale=True)
    assert CALLS == []
    assert all(r["stale"] and r["code_version"] == old for r in kept)
    rows = summarize(kept)
    assert all(r["stale"] and r["code_version"] == f"{old} (stale)" for r in rows)
    table = markdown_table(rows)
    assert f"| float32 | cpu | {old} (stale) |" in table and "reused with --reuse-stale" in table
    redone = run_grid(path)
    assert len(CALLS) == 4
    assert all(not r["stale"] and r["code_version"] == "9.9.9+src.newcode00000" for r in redone)
    run_grid(path)
    assert CALLS == []
    with ResultStore(path) as store:
        assert len(store) == 4  # replaced, not duplicated


def test_every_report_shows_dtype_device_and_code_version(tmp_path):
    records = run_grid(tmp_path / "s.sqlite", dtype=torch.bfloat16)
    code = provenance.code_version()
    table = markdown_table(summarize(records))
    assert table.splitlines()[0].endswith("| dtype | device | code |")
    assert table.count(f"| bfloat16 | cpu | {code} |") == 2
    paths = write_outputs(records, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert {(r["dtype"], r["device"], r["code_version"]) for r in data["summary"]} == {("bfloat16", "cpu", code)}
    assert {(r["dtype"], r["device"], r["code_version"]) for r in data["runs"]} == {("bfloat16", "cpu", code)}
    assert f"| bfloat16 | cpu | {code} |" in paths["markdown"].read_text()


def test_code_version_hashes_the_package_sources():
    v = provenance.code_version()
    assert v.startswith(provenance.library_versions()["lmcompress"] + "+src.")
    assert len(v.rsplit(".", 1)[1]) == 12
    provenance._source_hash.cache_clear()
    assert provenance.code_version() == v  # deterministic


# The version-1 schema, as src/lmcompress/runner/store.py defined it before the store key held dtype, device and
# the code version (copied here verbatim so the test builds a real old store).
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


def _old_store(path):
    db = sqlite3.connect(path)
    db.execute(OLD_SCHEMA)
    spec = grid()[0].to_dict()
    db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               ("0123456789abcdef01234567", spec["model"], spec["kv_label"], "passkey", json.dumps(spec),
                json.dumps({"metrics": {"accuracy": 1.0}, "costs": {}, "details": {}}),
                json.dumps({"lmcompress": "0.1.0"}), "cpu", 0.0, 1.0))
    db.commit()
    db.close()


def test_old_store_is_refused_with_one_line_and_left_untouched(tmp_path):
    path = tmp_path / "old.sqlite"
    _old_store(path)
    before = path.read_bytes()
    for readonly in (False, True):
        with pytest.raises(StoreError, match="written by an older lmcompress") as exc:
            ResultStore(path, readonly=readonly)
        assert "\n" not in str(exc.value) and str(path) in str(exc.value)
    assert path.read_bytes() == before
    assert not (tmp_path / "old.sqlite-wal").exists()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1
    db.close()


def test_foreign_sqlite_is_refused_and_not_switched_to_wal(tmp_path):
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    db.execute("INSERT INTO notes (text) VALUES ('keep me')")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="another schema"):
        ResultStore(path)
    assert path.read_bytes() == before
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    db.close()


def test_new_store_records_its_schema(tmp_path):
    path = tmp_path / "new.sqlite"
    ResultStore(path).close()
    db = sqlite3.connect(path)
    assert dict(db.execute("SELECT name, value FROM store_meta")) == {"schema": "lmcompress-results", "version": "2"}
    db.close()
    ResultStore(path, readonly=True).close()


def test_bench_says_how_many_rows_are_stale(tmp_path, monkeypatch):
    from lmcompress.cli import stored_summary

    path = tmp_path / "s.sqlite"
    run_grid(path)
    with ResultStore(path) as store:
        assert stored_summary(store, grid(), torch.float32, "cpu", False, path) == f"4 runs, 4 already in {path}"
        monkeypatch.setattr(provenance, "code_version", lambda: "9.9.9+src.newcode00000")
        text = stored_summary(store, grid(), torch.float32, "cpu", False, path)
        assert text == (f"4 runs, 0 already in {path}; 4 stored by another lmcompress code version: recomputed "
                        "(--reuse-stale keeps them)")
        assert "reused, marked stale" in stored_summary(store, grid(), torch.float32, "cpu", True, path)
        assert stored_summary(store, grid(), torch.bfloat16, "cpu", False, path) == f"4 runs, 0 already in {path}"


@pytest.mark.parametrize(("version", "needle"), [("3", "newer than this lmcompress reads"),
                                                 ("two", "another schema")])
def test_store_of_a_newer_or_unreadable_schema_version_is_refused(tmp_path, version, needle):
    path = tmp_path / "s.sqlite"
    ResultStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE store_meta SET value = ? WHERE name = 'version'", (version,))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match=needle):
        ResultStore(path)
