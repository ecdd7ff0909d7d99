from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from lmcompress.eval.tasks.base import Task, TaskResult
from lmcompress.kv import KVSpec, SnapKV
from lmcompress.runner.executors import InlineExecutor
from lmcompress.runner.report import markdown_table, summarize, write_outputs
from lmcompress.runner.spec import RunSpec
from lmcompress.runner.store import ResultStore

CALLS: list[str] = []


@dataclass(frozen=True)
class CountingTask(Task):
    name: ClassVar[str] = "passkey"  # reuse the report's pass-key columns
    length: int = 1024
    depth: float = 0.5
    fail: bool = False

    def run(self, ctx):
        CALLS.append(f"{ctx.spec.label()}:{self.depth}")
        if self.fail:
            raise KeyboardInterrupt  # as if the grid were killed here
        acc = 1.0 if ctx.spec.evict is None else 0.5
        return TaskResult({"accuracy": acc}, {"kv_bytes": 1000.0 * (1 if acc == 1 else 0.5), "ttft_s": 0.1,
                                              "decode_tok_s": 10.0, "peak_mem_bytes": 5, "mem_source": "test"})


def loader(name):
    import torch

    return torch.nn.Linear(1, 1), None


def grid(fail_at: float | None = None):
    specs = [KVSpec(), KVSpec(evict=SnapKV(ratio=0.5))]
    return [RunSpec("tiny-llama", s, CountingTask(depth=d, fail=(d == fail_at))) for s in specs
            for d in (0.1, 0.5, 0.9)]


def test_keys_are_stable_and_distinct():
    a, b = grid(), grid()
    assert [r.key() for r in a] == [r.key() for r in b]
    assert len({r.key() for r in a}) == len(a)


def test_killed_grid_keeps_finished_runs_and_rerun_skips_them(tmp_path):
    CALLS.clear()  # (spec-major order: shared prefills reorder a grid task by task, tested elsewhere)
    path = tmp_path / "store.sqlite"
    with ResultStore(path) as store, pytest.raises(KeyboardInterrupt):
        InlineExecutor(progress=False, loader=loader, warmup=False, share_prefill=False).run(grid(fail_at=0.9), store)
    with ResultStore(path) as store:
        assert len(store) == 2  # the two runs before the kill
    CALLS.clear()
    with ResultStore(path) as store:
        records = InlineExecutor(progress=False, loader=loader, warmup=False, share_prefill=False).run(grid(), store)
        assert len(store) == 6
    assert CALLS == ["none:0.9", "snapkv(ratio=0.5):0.1", "snapkv(ratio=0.5):0.5", "snapkv(ratio=0.5):0.9"]
    assert [r["spec"]["task"]["params"]["depth"] for r in records] == [0.1, 0.5, 0.9] * 2
    CALLS.clear()
    with ResultStore(path) as store:
        InlineExecutor(progress=False, loader=loader, warmup=False, share_prefill=False).run(grid(), store)
    assert CALLS == []


def test_report_outputs(tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        records = InlineExecutor(progress=False, loader=loader, warmup=False).run(grid(), store)
    rows = summarize(records)
    assert [r["label"] for r in rows] == ["none", "snapkv(ratio=0.5)"]
    assert rows[0]["accuracy"] == 1.0 and rows[1]["accuracy"] == 0.5
    assert rows[1]["kv_fraction"] == pytest.approx(0.5)
    table = markdown_table(rows)
    assert "| tiny-llama | snapkv | 0.50 | none | 0.50 (3) |" in table
    paths = write_outputs(records, tmp_path / "out")
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"summary"' in paths["json"].read_text()


def test_shared_prefill_runs_a_grid_task_by_task(tmp_path):
    CALLS.clear()
    with ResultStore(tmp_path / "s.sqlite") as store:
        records = InlineExecutor(progress=False, loader=loader, warmup=False).run(grid(), store)
    assert [f"{label}:{d}" for d in (0.1, 0.5, 0.9) for label in ("none", "snapkv(ratio=0.5)")] == CALLS
    assert [r["spec"]["task"]["params"]["depth"] for r in records] == [0.1, 0.5, 0.9] * 2  # stored order kept
