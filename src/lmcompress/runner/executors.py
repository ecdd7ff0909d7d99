"""Executors run a list of ``RunSpec`` against a ``ResultStore``, skipping runs already stored.

``InlineExecutor`` runs in this process, loading each model once. By default it runs a grid task by task and
shares prefills (:mod:`lmcompress.eval.shared_prefill`): every method of the grid compresses from one recorded
uncompressed prefill per prompt, which gives the same answers and kept tokens as separate prefills; results so
produced carry ``costs["prefill"] = "shared"`` since their TTFT and peak memory do not cover a real prefill. Fan-out over local devices or a Ray cluster
(``lmcompress.runner.parallel``) keeps the same contract: every finished run is written to the store as soon as
it ends. All of them key runs by ``RunSpec.key(dtype, device)``, claim a cell before computing it
(:class:`~lmcompress.runner.claims.Claimer`: runners sharing a store compute each cell once), recompute a
*stale* row (another code version) unless ``reuse_stale``, set the process up for peak-memory measurement
(:func:`~lmcompress.eval.perf.prepare_measurement`) and warm a freshly loaded model up
(:func:`~lmcompress.eval.warmup.warm_up`) before its first measured cell.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..eval.perf import prepare_measurement
from ..eval.tasks.base import RunContext
from ..eval.warmup import warm_up
from ..models import load_model
from . import provenance
from .claims import Claimer
from .spec import RunSpec
from .store import ResultStore

Loader = Callable[[str], tuple[torch.nn.Module, Any]]


def warm_up_for(model: torch.nn.Module, run: RunSpec) -> None:
    """The warm-up of a freshly loaded ``model`` before ``run``: its KV spec and decode mode (never recorded
    into, or served from, the grid's shared prefills)."""
    from ..eval.shared_prefill import not_sharing

    with not_sharing():
        warm_up(model, run.kv, decode=getattr(run.task, "decode", "auto"))


def finished_records(store: ResultStore, keys: Sequence[str], code_version: str) -> list[dict[str, Any]]:
    """The stored records of ``keys`` in order, each with ``stale`` = computed by another code version."""
    records = []
    for key in keys:
        rec = store.get(key)
        if rec is None:
            raise RuntimeError(f"run {key} is missing from {store.path} after the grid finished")
        rec["stale"] = rec["code_version"] != code_version
        records.append(rec)
    return records


def pending_cells(runs: Sequence[RunSpec], keys: Sequence[str]) -> list[tuple[RunSpec, str]]:
    """``(run, key)`` pairs, grouped by model (one load per model), otherwise in grid order."""
    return sorted(zip(runs, keys), key=lambda rk: rk[0].model)


class InlineExecutor:
    """Args:
    device: where models run.
    dtype: model dtype.
    progress: show a tqdm progress bar.
    loader: ``name -> (model, tokenizer)``; defaults to :func:`lmcompress.models.load_model`.
    reuse_stale: keep rows computed by another code version (marked ``stale``) instead of recomputing them.
    warmup: warm each freshly loaded model up before its first measured cell (needs a transformers model).
    claim_timeout_s / heartbeat_s: see :class:`~lmcompress.runner.claims.Claimer`.
    share_prefill: share one uncompressed prefill per prompt across the grid's methods (exact; see above).
    prefill_cache_bytes: bound on the recorded prefills kept at once (least recently used dropped).
    keep_going: a cell whose task raises an ``Exception`` is stored as failed (its error text, see
        :meth:`~lmcompress.runner.store.ResultStore.put_failed`) and the grid goes on; without, the error
        propagates (finished cells stay stored either way).
    """

    def __init__(self, device: str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True,
                 loader: Loader | None = None, *, reuse_stale: bool = False, warmup: bool = True,
                 claim_timeout_s: float = 60.0, heartbeat_s: float = 5.0, share_prefill: bool = True,
                 prefill_cache_bytes: int = 4 << 30, keep_going: bool = False) -> None:
        self.device = device
        self.dtype = dtype
        self.progress = progress
        self.loader = loader or (lambda name: load_model(name, dtype=self.dtype, device=self.device))
        self.reuse_stale, self.warmup = reuse_stale, warmup
        self.claim_timeout_s, self.heartbeat_s = claim_timeout_s, heartbeat_s
        self.share_prefill = share_prefill
        self.prefill_cache_bytes = prefill_cache_bytes
        self.keep_going = keep_going
        #: after :meth:`run`: cells stored as failed by this run.
        self.failures = 0
        #: after :meth:`run`: prefills recorded and replays served (0, 0 when not sharing).
        self.prefill_stats: dict[str, float] = {"recorded": 0, "replayed": 0, "record_s": 0.0}

    def run(self, runs: Sequence[RunSpec], store: ResultStore) -> list[dict[str, Any]]:
        """Run what is missing (or stale) in ``store``; return the stored records of all ``runs``, in order."""
        from tqdm.auto import tqdm

        from ..eval.shared_prefill import sharing_prefills

        prepare_measurement(self.device)
        keys = [r.key(self.dtype, self.device) for r in runs]
        pending = pending_cells(runs, keys)
        if self.share_prefill:  # every method of one task back to back (same prompts), one load per model
            pending.sort(key=lambda rk: (rk[0].model, rk[0].task.label()))
        loaded: dict[str, tuple[torch.nn.Module, Any]] = {}
        bar = tqdm(total=len(runs), disable=not self.progress, desc="runs", unit="run", dynamic_ncols=True)
        claimer: Claimer[RunSpec] = Claimer(store, reuse_stale=self.reuse_stale, timeout_s=self.claim_timeout_s,
                                            heartbeat_s=self.heartbeat_s)
        sharing = sharing_prefills(self.prefill_cache_bytes) if self.share_prefill else contextlib.nullcontext()
        try:
            with claimer, sharing as shared:
                group = None
                while (cell := claimer.next_cell(pending, on_done=lambda _k: bar.update(1), wait=True)) is not None:
                    run, key = cell
                    if run.model not in loaded:
                        loaded.clear()
                        bar.set_postfix_str(f"loading {run.model}")
                        loaded[run.model] = self.loader(run.model)
                        if self.warmup:
                            warm_up_for(loaded[run.model][0], run)
                    model, tokenizer = loaded[run.model]
                    if shared is not None and group != (run.model, run.task.label()):
                        shared.clear()  # another task: other prompts
                        group = (run.model, run.task.label())
                    failed = f"{self.failures} failed " if self.failures else ""
                    bar.set_postfix_str(f"{failed}{run.kv.label()} {run.task.label()}"[:80])
                    replayed = shared.replayed if shared is not None else 0
                    started = time.time()
                    try:
                        result = run.task.run(RunContext(model, tokenizer, run.kv, run.model)).to_dict()
                    except Exception as exc:
                        if not self.keep_going:
                            raise
                        self._store_failure(store, run, key, exc, started, claimer)
                        bar.update(1)
                        continue
                    if shared is not None and shared.replayed > replayed:
                        result["costs"]["prefill"] = "shared"
                    spec = run.to_dict()
                    store.put(key, spec, result,
                              provenance=provenance.provenance(spec, self.dtype, self.device,
                                                               claimer.code_version).to_dict(),
                              device=str(self.device), started_at=started, duration_s=time.time() - started,
                              owner=claimer.owner)
                    bar.update(1)
                if shared is not None:
                    self.prefill_stats = {"recorded": shared.recorded, "replayed": shared.replayed,
                                          "record_s": shared.record_seconds}
        finally:
            bar.close()
        return finished_records(store, keys, claimer.code_version)

    def _store_failure(self, store: ResultStore, run: RunSpec, key: str, exc: Exception, started: float,
                       claimer: Claimer) -> None:
        spec = run.to_dict()
        store.put_failed(key, spec, failure_text(exc),
                         provenance=provenance.provenance(spec, self.dtype, self.device, claimer.code_version).to_dict(),
                         device=str(self.device), started_at=started, duration_s=time.time() - started,
                         owner=claimer.owner)
        self.failures += 1


def failure_text(exc: BaseException) -> str:
    """The stored error of a failed cell: the exception's type and message, then the last frames."""
    import traceback

    head = f"{type(exc).__name__}: {exc}"
    return head + "\n" + "".join(traceback.format_tb(exc.__traceback__, limit=-4))
