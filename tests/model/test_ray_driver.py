"""The Ray executor's driver loop (claims, store writes, keys) against an in-process stand-in for the ``ray``
module: ``.options(...).remote(...)`` runs the task at once, in this process. This checks the driver's claim path
(another host's live claim is waited out) without starting Ray; tests/model/test_ray_executor.py runs the same
executor on a real local Ray."""

from __future__ import annotations

import time
import types

import pytest

from lmcompress.eval.tasks import DecodeCost
from lmcompress.kv import KVSpec, StreamingLLM
from lmcompress.runner.ray_executor import RayExecutor
from lmcompress.runner.spec import RunSpec
from lmcompress.runner.store import ResultStore

pytestmark = pytest.mark.model


class _Ref:
    def __init__(self, value):
        self.value = value


def _fake_ray(submitted: list) -> types.ModuleType:
    ray = types.ModuleType("ray")
    state = {"init": False, "options": {}}

    def remote(**_decorator_options):
        def wrap(fn):
            def options(**opts):
                def call(*args):
                    submitted.append(opts)
                    state["options"] = opts
                    return _Ref(fn(*args))

                return types.SimpleNamespace(remote=call)

            return types.SimpleNamespace(options=options)

        return wrap

    def assigned():
        o = state["options"]
        return {"CPU": o["num_cpus"], **({"memory": o["memory"]} if "memory" in o else {})}

    ray.remote = remote
    ray.is_initialized = lambda: state["init"]
    ray.init = lambda **_kw: state.update(init=True)
    ray.shutdown = lambda: state.update(init=False)
    ray.nodes = lambda: [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 8.0 * 2**30}}]
    ray.get_runtime_context = lambda: types.SimpleNamespace(get_assigned_resources=assigned)
    ray.wait = lambda refs, num_returns=1: (refs[:num_returns], refs[num_returns:])
    ray.get = lambda ref: ref.value
    ray.exceptions = types.SimpleNamespace(RayError=RuntimeError)
    return ray


def test_ray_driver_claims_skips_busy_cells_and_stores_results(tmp_path, monkeypatch):
    submitted: list = []
    monkeypatch.setitem(__import__("sys").modules, "ray", _fake_ray(submitted))
    runs = [RunSpec("tiny-llama", KVSpec(evict=StreamingLLM(ratio=0.5)), DecodeCost(length=64, new_tokens=4, seed=s))
            for s in range(3)]
    executor = RayExecutor(workers=2, gpus_per_task=0.0, dtype="float32", progress=False, claim_timeout_s=1.0,
                           heartbeat_s=0.2, warmup=True, memory_per_task=2**28)
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
        assert submitted == [{"num_cpus": 1.0, "num_gpus": 0.0, "memory": 2**28}] * 3  # one task per cell
        again = executor.run(runs, store)  # all stored by this code version: nothing recomputed
        assert [r["started_at"] for r in again] == [r["started_at"] for r in records]
