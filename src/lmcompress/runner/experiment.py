"""Python experiments in the spirit of QAQ's ``Experiment``: a class that yields the cells to run and processes
their stored records, run by the same executors and result store as ``lmcompress run`` (so a rerun computes only
what is missing, and a killed experiment keeps every finished cell). Unlike ``lmcompress run`` (which skips
cells stored as failed unless ``--retry-failed``), a rerun of an experiment tries its failed cells again.

Example::

    class RatioSweep(Experiment):
        name = "ratio-sweep"

        def specs(self):
            for ratio in (0.25, 0.5, 0.75):
                yield RunSpec("smollm2-135m", parse_method("snapkv", ratio=ratio), Passkey(length=1024))

        def process(self, records):
            return {r["spec"]["kv_label"]: r["result"]["metrics"]["accuracy"] for r in records}

    summary = run_experiment(RatioSweep(), "out/sweep.sqlite")
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import LMCompressError
from .spec import RunSpec
from .store import ResultStore


class Experiment:
    """Subclass and override :meth:`specs` (and usually :meth:`process`).

    Attributes:
        name: a label (reports, messages).
        device: where models run (the device type is part of every cell's key).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    """

    name: str = "experiment"
    device: str = "cpu"
    dtype: str = "float32"

    def specs(self) -> Iterable[RunSpec]:
        """The cells to run, in the order :meth:`process` receives their records."""
        raise NotImplementedError(f"{type(self).__name__}.specs() must yield RunSpec cells")

    def process(self, records: list[dict[str, Any]]) -> Any:
        """Turn the stored records of :meth:`specs` (in order; each a
        :meth:`~lmcompress.runner.store.ResultStore.get` record with ``status`` ``ok`` or ``failed`` and
        ``stale``) into the experiment's result. Default: the records themselves."""
        return records


def run_experiment(experiment: Experiment, store: str | Path | ResultStore, executor: Any = None) -> Any:
    """Run what is missing of ``experiment`` in ``store`` and return ``experiment.process(records)``.

    Args:
        experiment: the experiment.
        store: a result store or its path (opened and closed here).
        executor: anything with ``run(runs, store) -> records`` (:class:`~lmcompress.runner.executors.InlineExecutor`,
            :class:`~lmcompress.runner.parallel.LocalExecutor`, :class:`~lmcompress.runner.ray_executor.RayExecutor`);
            default: an inline executor on ``experiment.device`` / ``dtype`` that stores failing cells as failed
            and goes on.
    """
    import torch

    runs = list(experiment.specs())
    if not runs:
        raise LMCompressError(f"experiment {experiment.name!r} yields no cells; allowed: at least one RunSpec")
    bad = next((r for r in runs if not isinstance(r, RunSpec)), None)
    if bad is not None:
        raise LMCompressError(f"experiment {experiment.name!r} yielded {type(bad).__name__}; allowed: RunSpec")
    if executor is None:
        from .executors import InlineExecutor

        executor = InlineExecutor(experiment.device, getattr(torch, experiment.dtype), keep_going=True)
    if isinstance(store, ResultStore):
        return experiment.process(executor.run(runs, store))
    with ResultStore(store) as opened:
        return experiment.process(executor.run(runs, opened))
