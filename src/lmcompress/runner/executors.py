"""Executors run a list of ``RunSpec`` against a ``ResultStore``, skipping runs already stored.

``InlineExecutor`` runs in this process, loading each model once. Fan-out over local devices or a Ray cluster
(``lmcompress.runner.parallel``) keeps the same contract: every finished run is written to the store as soon as
it ends.
"""

from __future__ import annotations

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
    """

    def __init__(self, device: str = "cpu", dtype: torch.dtype = torch.float32, progress: bool = True,
                 loader: Loader | None = None) -> None:
        self.device = device
        self.dtype = dtype
        self.progress = progress
        self.loader = loader or (lambda name: load_model(name, dtype=self.dtype, device=self.device))

    def run(self, runs: Sequence[RunSpec], store: ResultStore) -> list[dict[str, Any]]:
        """Run what is missing from ``store``; return the stored records of all ``runs``, in order."""
        from tqdm.auto import tqdm

        keys = [r.key() for r in runs]
        todo = [(r, k) for r, k in zip(runs, keys) if not store.has(k)]
        todo.sort(key=lambda rk: rk[0].model)  # one model load per model
        loaded: dict[str, tuple[torch.nn.Module, Any]] = {}
        bar = tqdm(total=len(runs), initial=len(runs) - len(todo), disable=not self.progress,
                   desc="runs", unit="run", dynamic_ncols=True)
        try:
            for run, key in todo:
                if run.model not in loaded:
                    loaded.clear()
                    bar.set_postfix_str(f"loading {run.model}")
                    loaded[run.model] = self.loader(run.model)
                model, tokenizer = loaded[run.model]
                bar.set_postfix_str(f"{run.kv.label()} {run.task.label()}"[:80])
                started = time.time()
                result = run.task.run(RunContext(model, tokenizer, run.kv, run.model))
                store.put(key, run.to_dict(), result.to_dict(), versions=library_versions(),
                          device=str(self.device), started_at=started, duration_s=time.time() - started)
                bar.update(1)
        finally:
            bar.close()
        return [store.get(k) for k in keys]
