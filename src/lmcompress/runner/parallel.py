"""Fan-out over local devices: one worker process per device (the Ray executor, which shares this module's
per-cell function, is :mod:`lmcompress.runner.ray_executor`).

It keeps the store contract of :class:`~lmcompress.runner.executors.InlineExecutor`: the driver claims each
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
             warmup: bool = True, placement: Any = None) -> tuple[dict, float, float]:
    """Run one spec (models cached per worker, each warmed up after its load; ``placement``: see
    :func:`lmcompress.models.load_model`); returns (result dict, started_at, duration)."""
    import torch

    from ..eval.tasks.base import RunContext
    from ..models import load_model

    run = RunSpec.from_dict(run_dict)
    loaded = (run.model, repr(placement))  # (a model placed over devices is another load)
    if loaded not in models:
        models.clear()
        models[loaded] = load_model(run.model, dtype=getattr(torch, dtype_name), device=device, quiet=True,
                                    placement=placement)
        if warmup:
            warm_up_for(models[loaded][0], run)
    model, tokenizer = models[loaded]
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
