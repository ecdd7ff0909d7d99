"""Inline and local-process executors store identical results for the same small grid (issue 14; the grid and
the compared fields are in executor_grid.py): every deterministic field (status or a failed cell's error, KV
bytes, prompt tokens, held tokens, generated token ids) is equal; only timings, memory readings and the
shared-prefill marker may differ. tests/model/test_ray_executor.py checks Ray against the same inline rows."""

from __future__ import annotations

import pytest
from executor_grid import deterministic, grid_runs, inline_records

from lmcompress.runner.parallel import LocalExecutor
from lmcompress.runner.store import ResultStore

pytestmark = pytest.mark.model


def test_inline_and_local_processes_store_identical_results(tmp_path):
    inline = inline_records(tmp_path / "inline.sqlite")
    with ResultStore(tmp_path / "local.sqlite") as store:
        local = LocalExecutor(["cpu", "cpu"], progress=False, keep_going=True).run(grid_runs(), store)
    assert [deterministic(r) for r in inline] == [deterministic(r) for r in local]
