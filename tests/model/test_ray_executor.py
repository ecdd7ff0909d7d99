"""The Ray executor on a real local Ray (issue 14): ``ray.init(num_cpus=2)`` plus one stand-in GPU resource (Ray
assigns it like a real one: the task gets ``GPU: 1`` and ``CUDA_VISIBLE_DEVICES``; no CUDA is needed for that),
started once for this module in its own temporary folder and shut down after it. Skipped only when ``ray`` cannot
be imported (it is in the ``test`` extra)."""

from __future__ import annotations

import shutil
import tempfile

import pytest
import torch
from executor_grid import deterministic, grid_runs, inline_records

from lmcompress.errors import LMCompressError
from lmcompress.eval.tasks import DecodeCost
from lmcompress.kv.parse import parse_method
from lmcompress.runner.ray_executor import RayExecutor
from lmcompress.runner.spec import RunSpec
from lmcompress.runner.store import ResultStore

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'lmcompress[ray]')")

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def local_ray():
    temp = tempfile.mkdtemp(prefix="lmc-ray-")  # short: Ray's socket paths live under it
    ray.init(num_cpus=2, num_gpus=1, object_store_memory=80 << 20, include_dashboard=False, log_to_driver=False,
             _temp_dir=temp)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_inline_and_ray_store_identical_results(tmp_path, local_ray):
    inline = inline_records(tmp_path / "inline.sqlite")
    executor = RayExecutor(workers=2, gpus_per_task=0, dtype="float32", progress=False, cpus_per_task=1,
                           memory_per_task=256 << 20, keep_going=True)
    with ResultStore(tmp_path / "ray.sqlite") as store:
        records = executor.run(grid_runs(), store)
        assert store.claims() == []
        failed, resources = executor.failures, executor.resources
        again = executor.run(grid_runs()[:-1], store)  # all stored: nothing recomputed, no task submitted
        assert executor.resources == {}
    assert [deterministic(r) for r in inline] == [deterministic(r) for r in records]
    assert {r["device"] for r in records} == {"ray:cpu"}
    assert failed == 1
    # every cell ran as its own task with the requested resources, as Ray assigned them inside the task
    assert set(resources) == {r["key"] for r in records}
    assert all(res == {"CPU": 1.0, "memory": float(256 << 20)} for res in resources.values())
    assert [r["started_at"] for r in again] == [r["started_at"] for r in records[:-1]]
    assert local_ray.is_initialized()  # an executor that did not start Ray leaves it running


def test_gpus_and_memory_are_requested_per_task(tmp_path, local_ray):
    executor = RayExecutor(workers=1, gpus_per_task=1, dtype="float32", progress=False, cpus_per_task=1,
                           memory_per_task=128 << 20, keep_going=True)
    assert executor.task_options() == {"num_cpus": 1.0, "num_gpus": 1.0, "memory": 128 << 20}
    run = RunSpec("tiny-llama", parse_method("snapkv:ratio=0.5"), DecodeCost(length=64, new_tokens=2))
    with ResultStore(tmp_path / "gpu.sqlite") as store:
        [rec] = executor.run([run], store)
    key = run.key("float32", "cuda")
    assert rec["key"] == key  # a GPU task's rows are keyed as cuda rows
    assert executor.resources == {key: {"CPU": 1.0, "GPU": 1.0, "memory": float(128 << 20)}}
    if torch.cuda.is_available():
        assert rec["status"] == "ok" and rec["device"] == "ray:cuda"
    else:  # the stand-in GPU: the task refuses to run a cuda cell on a torch without CUDA, and says why
        assert rec["status"] == "failed"
        assert "Ray gave this task 1 GPU(s) (CUDA_VISIBLE_DEVICES='0') but torch sees no CUDA device" in rec["error"]


def test_a_request_no_node_holds_fails_at_once(tmp_path, local_ray):
    executor = RayExecutor(workers=1, gpus_per_task=0, dtype="float32", progress=False,
                           memory_per_task=1 << 50)  # 1 PiB
    run = RunSpec("tiny-llama", parse_method("none"), DecodeCost(length=64, new_tokens=2))
    with ResultStore(tmp_path / "big.sqlite") as store:
        with pytest.raises(LMCompressError, match=r"no node of the Ray cluster holds one task's request CPU=1, "
                                                  r"memory=1048576\.00GiB \(largest node: CPU=2, memory="):
            executor.run([run], store)
        assert store.records(None) == [] and store.claims() == []


def test_ray_tasks_load_the_model_over_the_grid_placement(tmp_path, local_ray):
    from lmcompress.placement import parse_placement

    layers = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(4)), "model.norm", "model.rotary_emb",
              "lm_head"]
    placement = parse_placement(device_map={name: "cpu" for name in layers})
    runs = grid_runs()[:2]
    with ResultStore(tmp_path / "inline.sqlite") as store:
        from lmcompress.runner.executors import InlineExecutor

        inline = InlineExecutor(progress=False).run(runs, store)
    executor = RayExecutor(workers=1, gpus_per_task=0, dtype="float32", progress=False, placement=placement)
    with ResultStore(tmp_path / "placed.sqlite") as store:
        placed = executor.run(runs, store)
    assert [deterministic(r) for r in inline] == [deterministic(r) for r in placed]
    assert all(r["status"] == "ok" for r in placed)
    # the placement really reaches the task: caps no model fits fail there, with accelerate's placement named
    tight = RayExecutor(workers=1, gpus_per_task=0, dtype="float32", progress=False, keep_going=True,
                        placement=parse_placement(devices={"cpu": "4KiB"}))
    with ResultStore(tmp_path / "tight.sqlite") as store:
        [rec] = tight.run(runs[:1], store)
    assert rec["status"] == "failed" and "the model does not fit these caps" in rec["error"]
