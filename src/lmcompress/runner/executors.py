"""Executors run a list of ``RunSpec`` against a ``ResultStore``, skipping runs already stored.

``InlineExecutor`` runs in this process, loading each model once. By default it runs a grid task by task and
shares prefills (:mod:`lmcompress.eval.shared_prefill`): every method of the grid compresses from one recorded
uncompressed prefill per prompt, which gives the same answers and kept tokens as separate prefills; results so
produced carry ``costs["prefill"] = "shared"`` since their TTFT and peak memory do not cover a real prefill. Fan-out over local devices or a Ray cluster
(``lmcompress.runner.parallel``) keeps the same contract: every finished run is written to the store as soon as
it ends.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..eval.tasks.base import RunContext
from ..models import load_model
from .spec import RunSpec, library_versions
from .store import ResultStore

Loader = Callable[[str], tuple[torch.nn.Module, Any]]


class InlineExecutor:
    """Args:
    device: where models run.
    dtype: model dtype.
    progress: show a tqdm progress bar.
    loader: ``name -> (model, tokenizer)``; defaults to :func:`lmcompress.models.load_model`.
    share_prefill: share one uncompressed prefill per prompt across the grid's methods (exact; see above).
    prefill_cache_bytes: bound on the recorded prefills kept at once (least recently used dropped).
    """

    def __init__(self, device: str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True,
                 loader: Loader | None = None, share_prefill: bool = True,
                 prefill_cache_bytes: int = 4 << 30) -> None:
        self.device = device
        self.dtype = dtype
        self.progress = progress
        self.loader = loader or (lambda name: load_model(name, dtype=self.dtype, device=self.device))
        self.share_prefill = share_prefill
        self.prefill_cache_bytes = prefill_cache_bytes
        #: after :meth:`run`: prefills recorded and replays served (0, 0 when not sharing).
        self.prefill_stats: dict[str, float] = {"recorded": 0, "replayed": 0, "record_s": 0.0}

    def run(self, runs: Sequence[RunSpec], store: ResultStore) -> list[dict[str, Any]]:
        """Run what is missing from ``store``; return the stored records of all ``runs``, in order."""
        from tqdm.auto import tqdm

        from ..eval.shared_prefill import sharing_prefills

        keys = [r.key() for r in runs]
        todo = [(r, k) for r, k in zip(runs, keys) if not store.has(k)]
        # one model load per model; with shared prefills, every method of one task back to back (same prompts)
        todo.sort(key=lambda rk: (rk[0].model, rk[0].task.label()) if self.share_prefill else rk[0].model)
        loaded: dict[str, tuple[torch.nn.Module, Any]] = {}
        bar = tqdm(total=len(runs), initial=len(runs) - len(todo), disable=not self.progress,
                   desc="runs", unit="run", dynamic_ncols=True)
        sharing = sharing_prefills(self.prefill_cache_bytes) if self.share_prefill else contextlib.nullcontext()
        try:
            with sharing as shared:
                group = None
                for run, key in todo:
                    if run.model not in loaded:
                        loaded.clear()
                        bar.set_postfix_str(f"loading {run.model}")
                        loaded[run.model] = self.loader(run.model)
                    model, tokenizer = loaded[run.model]
                    if shared is not None and group != (run.model, run.task.label()):
                        shared.clear()  # another task: other prompts
                        group = (run.model, run.task.label())
                    bar.set_postfix_str(f"{run.kv.label()} {run.task.label()}"[:80])
                    replayed = shared.replayed if shared is not None else 0
                    started = time.time()
                    result = run.task.run(RunContext(model, tokenizer, run.kv, run.model)).to_dict()
                    if shared is not None and shared.replayed > replayed:
                        result["costs"]["prefill"] = "shared"
                    store.put(key, run.to_dict(), result, versions=library_versions(),
                              device=str(self.device), started_at=started, duration_s=time.time() - started)
                    bar.update(1)
                if shared is not None:
                    self.prefill_stats = {"recorded": shared.recorded, "replayed": shared.replayed,
                                          "record_s": shared.record_seconds}
        finally:
            bar.close()
        return [store.get(k) for k in keys]
