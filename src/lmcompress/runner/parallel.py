"""Fan-out executors: runs spread over local devices (one worker process per device) or a Ray cluster.

Both keep the store contract of :class:`~lmcompress.runner.executors.InlineExecutor`: the driver claims each
cell before handing it to a worker (the same :class:`~lmcompress.runner.claims.Claimer` path, so runners sharing
a store compute each cell once) and keeps at most one cell per worker in flight; a run is skipped when its key is
stored by the current code version (or any, with ``reuse_stale``), and each finished run is committed as soon as
it ends (workers write to the same SQLite file; WAL mode and a busy timeout make concurrent writers safe), so a
killed grid loses nothing finished. Workers set up peak-memory measurement as the inline path does
(:func:`~lmcompress.eval.perf.prepare_measurement`) and warm each freshly loaded model up before its first cell.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Sequence
from typing import Any

from ..errors import LMCompressError
from . import provenance
from .claims import Claimer
from .executors import finished_records, pending_cells, warm_up_for
from .spec import RunSpec
from .store import ResultStore


def _execute(run_dict: dict[str, Any], device: str, dtype_name: str, models: dict,
             warmup: bool = True) -> tuple[dict, float, float]:
    """Run one spec (models cached per worker, each warmed up after its load); returns (result dict,
    started_at, duration)."""
    import torch

    from ..eval.tasks.base import RunContext
    from ..models import load_model

    run = RunSpec.from_dict(run_dict)
    if run.model not in models:
        models.clear()
        models[run.model] = load_model(run.model, dtype=getattr(torch, dtype_name), device=device, quiet=True)
        if warmup:
            warm_up_for(models[run.model][0], run)
    model, tokenizer = models[run.model]
    started = time.time()
    result = run.task.run(RunContext(model, tokenizer, run.kv, run.model))
    return result.to_dict(), started, time.time() - started


def _worker(device: str, dtype_name: str, store_path: str, jobs, events, warmup: bool = True,
            keep_going: bool = False) -> None:
    from ..eval.perf import prepare_measurement

    prepare_measurement(device)
    models: dict = {}
    store = ResultStore(store_path)
    try:
        while True:
            item = jobs.get()
            if item is None:
                return
            key, run_dict, prov, owner = item
            started = time.time()
            try:
                result, started, duration = _execute(run_dict, device, dtype_name, models, warmup)
                store.put(key, run_dict, result, provenance=prov, device=device, started_at=started,
                          duration_s=duration, owner=owner)
                events.put(("done", key, device))
            except Exception as exc:
                if not keep_going:  # report, then stop this worker
                    events.put(("error", key, str(exc)) if isinstance(exc, LMCompressError)
                               else ("crash", key, traceback.format_exc(limit=8)))
                    return
                from .executors import failure_text

                store.put_failed(key, run_dict, failure_text(exc), provenance=prov, device=device,
                                 started_at=started, duration_s=time.time() - started, owner=owner)
                events.put(("failed", key, str(exc)))
                continue
    finally:
        store.close()


class _Options:
    """Claim and stale options shared by the fan-out executors."""

    def _claimer(self, store: ResultStore) -> Claimer[RunSpec]:
        return Claimer(store, reuse_stale=self.reuse_stale, timeout_s=self.claim_timeout_s,
                       heartbeat_s=self.heartbeat_s)

    def _set_options(self, reuse_stale: bool, warmup: bool, claim_timeout_s: float, heartbeat_s: float) -> None:
        self.reuse_stale, self.warmup = reuse_stale, warmup
        self.claim_timeout_s, self.heartbeat_s = claim_timeout_s, heartbeat_s


class LocalExecutor(_Options):
    """One worker process per device (``["cuda:0", "cuda:1"]``, or ``["cpu", "cpu"]``), runs grouped by model so
    each worker loads a model once.

    Args:
        devices: one entry per worker, all of one device type (the type is part of every run's key).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        progress: show a tqdm bar.
        reuse_stale, warmup, claim_timeout_s, heartbeat_s, keep_going: as for
            :class:`~lmcompress.runner.executors.InlineExecutor`.
    """

    def __init__(self, devices: Sequence[str], dtype: str = "float32", progress: bool = True, *,
                 reuse_stale: bool = False, warmup: bool = True, claim_timeout_s: float = 60.0,
                 heartbeat_s: float = 5.0, keep_going: bool = False) -> None:
        if not devices:
            raise LMCompressError("LocalExecutor needs at least one device")
        types = sorted({provenance.device_type(d) for d in devices})
        if len(types) > 1:
            raise LMCompressError(f"--devices {','.join(devices)} mixes device types ({', '.join(types)}); "
                                  "allowed: devices of one type")
        self.devices = list(devices)
        self.dtype = dtype
        self.progress = progress
        self.keep_going = keep_going
        #: after :meth:`run`: cells stored as failed by this run.
        self.failures = 0
        self._set_options(reuse_stale, warmup, claim_timeout_s, heartbeat_s)

    def run(self, runs: Sequence[RunSpec], store: ResultStore) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        keys = [r.key(self.dtype, self.devices[0]) for r in runs]
        pending = pending_cells(runs, keys)
        ctx = mp.get_context("spawn")
        jobs, events = ctx.Queue(), ctx.Queue()
        workers: list = []
        bar = tqdm(total=len(runs), disable=not self.progress, unit="run",
                   desc=f"runs on {len(self.devices)} workers", dynamic_ncols=True)
        claimer = self._claimer(store)
        try:
            with claimer:
                in_flight = 0
                while pending or in_flight:
                    while in_flight < len(self.devices):
                        cell = claimer.next_cell(pending, on_done=lambda _k: bar.update(1), wait=not in_flight)
                        if cell is None:
                            break
                        run, key = cell
                        spec = run.to_dict()
                        prov = provenance.provenance(spec, self.dtype, self.devices[0], claimer.code_version)
                        if not workers:  # start workers only once there is work
                            workers = [ctx.Process(target=_worker, daemon=True,
                                                   args=(d, self.dtype, str(store.path), jobs, events, self.warmup,
                                                         self.keep_going))
                                       for d in self.devices]
                            for w in workers:
                                w.start()
                        jobs.put((key, spec, prov.to_dict(), claimer.owner))
                        in_flight += 1
                    if in_flight:
                        if self._next_event(events, workers) == "failed":
                            self.failures += 1
                            bar.set_postfix_str(f"{self.failures} failed")
                        in_flight -= 1
                        bar.update(1)
        finally:
            bar.close()
            for _ in workers:
                jobs.put(None)
            for w in workers:
                w.join(timeout=10)
                if w.is_alive():
                    w.terminate()
                    w.join(timeout=10)
            for q in (jobs, events):
                q.close()
                q.join_thread()
        return finished_records(store, keys, claimer.code_version)

    @staticmethod
    def _next_event(events, workers) -> str:
        while True:
            try:
                kind, key, info = events.get(timeout=1.0)
            except queue.Empty:
                if not any(w.is_alive() for w in workers):
                    raise RuntimeError("all workers exited before the grid finished") from None
                continue
            if kind in ("done", "failed"):
                return kind
            if kind == "error":
                raise LMCompressError(info)
            raise RuntimeError(f"run {key} crashed in a worker:\n{info}")


def check_ray_address(address: str | None, timeout_s: float = 3.0) -> None:
    """Fail fast, with one line, on a Ray address that cannot be reached: ``HOST:PORT`` or ``ray://HOST:PORT``
    must accept a TCP connection within ``timeout_s`` (``None``, ``auto`` and ``local`` are left to Ray)."""
    import socket

    if address is None or address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LMCompressError(f"--ray-address={address!r} is not HOST:PORT or ray://HOST:PORT; allowed: e.g. "
                              "10.0.0.5:6379, ray://head:10001, auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise LMCompressError(f"Ray cluster at --ray-address={address!r} cannot be reached ({exc.strerror or exc}); "
                              "start it (ray start --head) or pass another address") from None


class RayExecutor(_Options):
    """Runs on a Ray cluster: one actor per GPU (or per CPU worker), each caching its model; the driver claims
    cells and writes results to the store as they arrive. Needs ``pip install ray``.

    Args:
        address: Ray cluster address (None: start or join a local one).
        workers: number of actors.
        gpus_per_worker: GPUs each actor reserves (0 for CPU actors; the runs' device type follows from it).
        dtype: model dtype name.
        reuse_stale, warmup, claim_timeout_s, heartbeat_s: as for
            :class:`~lmcompress.runner.executors.InlineExecutor`.
    """

    def __init__(self, address: str | None = None, workers: int = 1, gpus_per_worker: float = 1.0,
                 dtype: str = "bfloat16", progress: bool = True, *, reuse_stale: bool = False,
                 warmup: bool = True, claim_timeout_s: float = 60.0, heartbeat_s: float = 5.0) -> None:
        self.address, self.workers, self.gpus, self.dtype, self.progress = (
            address, workers, gpus_per_worker, dtype, progress)
        self._set_options(reuse_stale, warmup, claim_timeout_s, heartbeat_s)

    def run(self, runs: Sequence[RunSpec], store: ResultStore) -> list[dict[str, Any]]:
        check_ray_address(self.address)
        try:
            import ray
        except ImportError:
            raise LMCompressError("the ray executor needs Ray: pip install ray") from None
        from tqdm.auto import tqdm

        device_kind = "cuda" if self.gpus > 0 else "cpu"
        keys = [r.key(self.dtype, device_kind) for r in runs]
        pending = pending_cells(runs, keys)
        claimer = self._claimer(store)

        @ray.remote(num_gpus=self.gpus)
        class Worker:
            def __init__(self, dtype: str, warmup: bool) -> None:
                import torch

                from ..eval.perf import prepare_measurement

                self.models: dict = {}
                self.dtype, self.warmup = dtype, warmup
                self.device = "cuda" if torch.cuda.is_available() else "cpu"
                prepare_measurement(self.device)

            def run(self, key: str, run_dict: dict) -> tuple[str, dict, dict, float, float, str]:
                result, started, duration = _execute(run_dict, self.device, self.dtype, self.models, self.warmup)
                return key, run_dict, result, started, duration, self.device

        bar = tqdm(total=len(runs), disable=not self.progress, unit="run",
                   desc=f"runs on {self.workers} ray workers", dynamic_ncols=True)
        try:
            with claimer:
                actors: list = []
                idle: list = []
                in_flight: dict = {}
                while pending or in_flight:
                    while pending and (idle or len(actors) < self.workers):
                        cell = claimer.next_cell(pending, on_done=lambda _k: bar.update(1), wait=not in_flight)
                        if cell is None:
                            break
                        if not actors:
                            if not ray.is_initialized():
                                ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False)
                            actors = [Worker.remote(self.dtype, self.warmup) for _ in range(self.workers)]
                            idle = list(actors)
                        actor = idle.pop()
                        run, key = cell
                        in_flight[actor.run.remote(key, run.to_dict())] = actor
                    if not in_flight:
                        continue
                    ready, _ = ray.wait(list(in_flight), num_returns=1)
                    idle.append(in_flight.pop(ready[0]))
                    key, run_dict, result, started, duration, device = ray.get(ready[0])
                    prov = provenance.provenance(run_dict, self.dtype, device_kind, claimer.code_version)
                    store.put(key, run_dict, result, provenance=prov.to_dict(), device=f"ray:{device}",
                              started_at=started, duration_s=duration, owner=claimer.owner)
                    bar.update(1)
        finally:
            bar.close()
        return finished_records(store, keys, claimer.code_version)
