"""Fan-out executors: runs spread over local devices (one worker process per device) or a Ray cluster.

Both keep the store contract of :class:`~lmcompress.runner.executors.InlineExecutor`: a run is skipped when its
key is stored, and each finished run is committed as soon as it ends (workers write to the same SQLite file;
WAL mode and a busy timeout make concurrent writers safe), so a killed grid loses nothing finished.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Sequence
from typing import Any

from ..errors import LMCompressError
from .spec import RunSpec, library_versions
from .store import ResultStore


def _execute(run_dict: dict[str, Any], device: str, dtype_name: str, models: dict) -> tuple[dict, float, float]:
    """Run one spec (models cached per worker); returns (result dict, started_at, duration)."""
    import torch

    from ..eval.tasks.base import RunContext
    from ..models import load_model

    run = RunSpec.from_dict(run_dict)
    if run.model not in models:
        models.clear()
        models[run.model] = load_model(run.model, dtype=getattr(torch, dtype_name), device=device, quiet=True)
    model, tokenizer = models[run.model]
    started = time.time()
    result = run.task.run(RunContext(model, tokenizer, run.kv, run.model))
    return result.to_dict(), started, time.time() - started


def _worker(device: str, dtype_name: str, store_path: str, jobs, events) -> None:
    models: dict = {}
    store = ResultStore(store_path)
    try:
        while True:
            item = jobs.get()
            if item is None:
                return
            key, run_dict = item
            try:
                result, started, duration = _execute(run_dict, device, dtype_name, models)
                store.put(key, run_dict, result, versions=library_versions(), device=device,
                          started_at=started, duration_s=duration)
                events.put(("done", key, device))
            except LMCompressError as exc:
                events.put(("error", key, str(exc)))
                return
            except Exception:  # report, then stop this worker
                events.put(("crash", key, traceback.format_exc(limit=8)))
                return
    finally:
        store.close()


class LocalExecutor:
    """One worker process per device (``["cuda:0", "cuda:1"]``, or ``["cpu", "cpu"]``), runs grouped by model so
    each worker loads a model once.

    Args:
        devices: one entry per worker.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        progress: show a tqdm bar.
    """

    def __init__(self, devices: Sequence[str], dtype: str = "float32", progress: bool = True) -> None:
        if not devices:
            raise LMCompressError("LocalExecutor needs at least one device")
        self.devices = list(devices)
        self.dtype = dtype
        self.progress = progress

    def run(self, runs: Sequence[RunSpec], store: ResultStore) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        keys = [r.key() for r in runs]
        todo = sorted(((r, k) for r, k in zip(runs, keys) if not store.has(k)), key=lambda rk: rk[0].model)
        if todo:
            ctx = mp.get_context("spawn")
            jobs, events = ctx.Queue(), ctx.Queue()
            for run, key in todo:
                jobs.put((key, run.to_dict()))
            for _ in self.devices:
                jobs.put(None)
            workers = [ctx.Process(target=_worker, args=(d, self.dtype, str(store.path), jobs, events), daemon=True)
                       for d in self.devices]
            for w in workers:
                w.start()
            bar = tqdm(total=len(runs), initial=len(runs) - len(todo), disable=not self.progress, unit="run",
                       desc=f"runs on {len(self.devices)} workers", dynamic_ncols=True)
            try:
                self._drain(events, workers, len(todo), bar)
            finally:
                bar.close()
                for w in workers:
                    if w.is_alive():
                        w.terminate()
                    w.join(timeout=10)
                for q in (jobs, events):
                    q.close()
                    q.join_thread()
        return [store.get(k) for k in keys]

    @staticmethod
    def _drain(events, workers, expected: int, bar) -> None:
        done = 0
        while done < expected:
            try:
                kind, key, info = events.get(timeout=1.0)
            except queue.Empty:
                if not any(w.is_alive() for w in workers):
                    raise RuntimeError("all workers exited before the grid finished") from None
                continue
            if kind == "done":
                done += 1
                bar.update(1)
            elif kind == "error":
                raise LMCompressError(info)
            else:
                raise RuntimeError(f"run {key} crashed in a worker:\n{info}")


class RayExecutor:
    """Runs on a Ray cluster: one actor per GPU (or per CPU worker), each caching its model; the driver writes
    results to the store as they arrive. Needs ``pip install ray``.

    Args:
        address: Ray cluster address (None: start or join a local one).
        workers: number of actors.
        gpus_per_worker: GPUs each actor reserves (0 for CPU actors).
        dtype: model dtype name.
    """

    def __init__(self, address: str | None = None, workers: int = 1, gpus_per_worker: float = 1.0,
                 dtype: str = "bfloat16", progress: bool = True) -> None:
        self.address, self.workers, self.gpus, self.dtype, self.progress = (
            address, workers, gpus_per_worker, dtype, progress)

    def run(self, runs: Sequence[RunSpec], store: ResultStore) -> list[dict[str, Any]]:
        try:
            import ray
        except ImportError:
            raise LMCompressError("the ray executor needs Ray: pip install ray") from None
        from tqdm.auto import tqdm

        keys = [r.key() for r in runs]
        todo = sorted(((r, k) for r, k in zip(runs, keys) if not store.has(k)), key=lambda rk: rk[0].model)
        if not todo:
            return [store.get(k) for k in keys]
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False)

        @ray.remote(num_gpus=self.gpus)
        class Worker:
            def __init__(self, dtype: str) -> None:
                self.models: dict = {}
                self.dtype = dtype

            def run(self, key: str, run_dict: dict) -> tuple[str, dict, dict, float, float, str]:
                device = "cuda" if self.gpus_visible() else "cpu"
                result, started, duration = _execute(run_dict, device, self.dtype, self.models)
                return key, run_dict, result, started, duration, device

            @staticmethod
            def gpus_visible() -> bool:
                import torch

                return torch.cuda.is_available()

        actors = [Worker.remote(self.dtype) for _ in range(self.workers)]
        pending, queue_ = {}, list(todo)
        bar = tqdm(total=len(runs), initial=len(runs) - len(todo), disable=not self.progress, unit="run",
                   desc=f"runs on {self.workers} ray workers", dynamic_ncols=True)
        try:
            for actor in actors:
                if queue_:
                    run, key = queue_.pop(0)
                    pending[actor.run.remote(key, run.to_dict())] = actor
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                actor = pending.pop(ready[0])
                key, run_dict, result, started, duration, device = ray.get(ready[0])
                store.put(key, run_dict, result, versions=library_versions(), device=f"ray:{device}",
                          started_at=started, duration_s=duration)
                bar.update(1)
                if queue_:
                    run, key = queue_.pop(0)
                    pending[actor.run.remote(key, run.to_dict())] = actor
        finally:
            bar.close()
        return [store.get(k) for k in keys]
