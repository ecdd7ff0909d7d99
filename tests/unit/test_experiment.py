"""Python experiments (``lmcompress.runner.experiment``): cells from ``specs()``, records to ``process()`` in
order, the same store contract as the grid runner (a rerun computes nothing), failures stored and passed on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from lmcompress.errors import LMCompressError
from lmcompress.eval.tasks.base import Task, TaskResult
from lmcompress.kv import KVSpec, SnapKV
from lmcompress.runner.executors import InlineExecutor
from lmcompress.runner.experiment import Experiment, run_experiment
from lmcompress.runner.spec import RunSpec

CALLS: list[str] = []


@dataclass(frozen=True)
class Counted(Task):
    name: ClassVar[str] = "passkey"
    length: int = 1024
    depth: float = 0.5

    def run(self, ctx):
        CALLS.append(f"{ctx.spec.label()}:{self.depth}")
        if self.depth > 0.8 and ctx.spec.evict is not None:
            raise RuntimeError("this cell breaks")
        return TaskResult({"accuracy": 1.0 if ctx.spec.evict is None else self.depth}, {"kv_bytes": 1.0})


class Sweep(Experiment):
    name = "sweep"

    def specs(self):
        for spec in (KVSpec(), KVSpec(evict=SnapKV(ratio=0.5))):
            for depth in (0.1, 0.9):
                yield RunSpec("tiny-llama", spec, Counted(depth=depth))

    def process(self, records):
        return [(r["spec"]["kv_label"], r["spec"]["task"]["params"]["depth"], r["status"],
                 r["result"]["metrics"]["accuracy"] if r["result"] else None) for r in records]


def executor():
    import torch

    return InlineExecutor(progress=False, loader=lambda name: (torch.nn.Linear(1, 1), None), warmup=False,
                          share_prefill=False, keep_going=True)


def test_experiment_runs_specs_processes_records_in_order_and_reruns_nothing(tmp_path):
    CALLS.clear()
    store = tmp_path / "s.sqlite"
    expected = [("none", 0.1, "ok", 1.0), ("none", 0.9, "ok", 1.0), ("snapkv(ratio=0.5)", 0.1, "ok", 0.1),
                ("snapkv(ratio=0.5)", 0.9, "failed", None)]
    assert run_experiment(Sweep(), store, executor()) == expected
    assert len(CALLS) == 4
    CALLS.clear()
    # a rerun keeps the finished cells; the failed one is tried again (the store path is the executor's)
    assert run_experiment(Sweep(), store, executor()) == expected
    assert CALLS == ["snapkv(ratio=0.5):0.9"]


def test_experiment_errors(tmp_path):
    class Empty(Experiment):
        def specs(self):
            return []

    class Wrong(Experiment):
        def specs(self):
            yield "snapkv"

    with pytest.raises(LMCompressError, match="yields no cells"):
        run_experiment(Empty(), tmp_path / "a.sqlite", executor())
    with pytest.raises(LMCompressError, match="yielded str; allowed: RunSpec"):
        run_experiment(Wrong(), tmp_path / "b.sqlite", executor())
    with pytest.raises(NotImplementedError):
        list(Experiment().specs())
