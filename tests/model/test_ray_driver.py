"""The Ray executor's driver loop (claims, store writes, keys) against an in-process stand-in for the ``ray``
module: actors are plain objects and ``.remote`` calls run at once. This checks the driver's claim path, not
Ray itself (Ray is not installed in CI; issue 14 adds a real local-cluster test)."""

from __future__ import annotations

import time
import types

import pytest

from lmcompress.eval.tasks import DecodeCost
from lmcompress.kv import KVSpec, StreamingLLM
from lmcompress.runner.parallel import RayExecutor
from lmcompress.runner.spec import RunSpec
from lmcompress.runner.store import ResultStore

pytestmark = pytest.mark.model


class _Ref:
    def __init__(self, value):
        self.value = value


def _fake_ray() -> types.ModuleType:
    ray = types.ModuleType("ray")
    state = {"init": False}

    def remote(**_resources):
        def wrap(cls):
            class Handle:
                def __init__(self, obj):
                    self._obj = obj

                def __getattr__(self, name):
                    method = getattr(self._obj, name)
                    return types.SimpleNamespace(remote=lambda *a: _Ref(method(*a)))

            return types.SimpleNamespace(remote=lambda *a: Handle(cls(*a)))

        return wrap

    ray.remote = remote
    ray.is_initialized = lambda: state["init"]
    ray.init = lambda **_kw: state.update(init=True)
    ray.wait = lambda refs, num_returns=1: (refs[:num_returns], refs[num_returns:])
    ray.get = lambda ref: ref.value
    return ray


def test_ray_driver_claims_skips_busy_cells_and_stores_results(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", _fake_ray())
    runs = [RunSpec("tiny-llama", KVSpec(evict=StreamingLLM(ratio=0.5)), DecodeCost(length=64, new_tokens=4, seed=s))
            for s in range(3)]
    executor = RayExecutor(workers=2, gpus_per_worker=0.0, dtype="float32", progress=False, claim_timeout_s=1.0,
                           heartbeat_s=0.2, warmup=True)
    keys = [r.key("float32", "cpu") for r in runs]
    with ResultStore(tmp_path / "s.sqlite") as store:
        now = time.time()  # another host's live claim on the first cell; it expires after 1 s
        store._db.execute("INSERT INTO claims VALUES (?, 'elsewhere:1:x', 'elsewhere', 1, ?, ?)", (keys[0], now, now))
        records = executor.run(runs, store)
        assert [r["key"] for r in records] == keys
        assert {r["device"] for r in records} == {"ray:cpu"}
        assert {r["dtype"] for r in records} == {"float32"}
        assert len({r["owner"] for r in records}) == 1
        assert records[0]["started_at"] >= now + 1.0  # taken over only once the other claim expired
        assert all(r["result"]["costs"]["kv_bytes"] > 0 for r in records)
        assert store.claims() == []
        again = executor.run(runs, store)  # all stored by this code version: nothing recomputed
        assert [r["started_at"] for r in again] == [r["started_at"] for r in records]
