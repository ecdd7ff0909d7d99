"""The Ray executor: one Ray task per grid cell, with the GPUs, CPUs and memory each cell needs requested on
the task itself (``.options(num_gpus=..., num_cpus=..., memory=...)``), so Ray places every cell on a node that
has them and runs no more at once than the nodes hold.

The driver keeps the store contract of the other executors (:mod:`lmcompress.runner.parallel`): it claims each
cell before submitting it (:class:`~lmcompress.runner.claims.Claimer`), keeps at most ``workers`` cells in
flight, and commits each result (or, with ``keep_going``, each failure) as it arrives, so a killed driver loses
nothing finished. Ray reuses a worker process for later tasks of the same resource shape (``max_calls=0`` also
for GPU tasks), and each worker process keeps the model of its last cell, so a model loads once per worker
process, not once per cell. Needs ``pip install ray`` (the ``ray`` extra).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from ..errors import LMCompressError
from . import provenance
from .executors import failure_text, finished_records, pending_cells
from .parallel import _execute, _Options
from .spec import RunSpec
from .store import ResultStore

#: per Ray worker process: the model of its last cell (``{name: (model, tokenizer)}``).
_MODELS: dict = {}
#: per Ray worker process: devices already set up for peak-memory measurement.
_PREPARED: set[str] = set()


def run_cell(key: str, run_dict: dict[str, Any], device: str, dtype: str, warmup: bool,
             placement: dict[str, Any] | None = None) -> dict[str, Any]:
    """The body of one cell's Ray task. Returns ``key``, ``device``, ``resources`` (what Ray assigned to this task,
    read back inside it: ``{"CPU": 1.0, "GPU": 1.0, "memory": ...}``), ``started``, ``duration`` and either
    ``result`` (the task's result dict) or ``error`` (:func:`failure_text`), ``message`` (its first line) and
    ``bad_input`` (an :class:`LMCompressError`). ``placement``: a :meth:`Placement.to_dict` to spread the model
    over the task's devices (checked on the worker's node). Exceptions of the task are returned, not raised."""
    import ray
    import torch

    from ..eval.perf import prepare_measurement

    resources = {k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()}
    out: dict[str, Any] = {"key": key, "device": device, "resources": resources}
    started = time.time()
    try:
        if device == "cuda" and not torch.cuda.is_available():
            raise LMCompressError(
                f"Ray gave this task {resources.get('GPU', 0):g} GPU(s) (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}) but torch sees no CUDA device; allowed: a CUDA build "
                "of torch on the GPU nodes, or no GPUs per task for a CPU grid")
        if device not in _PREPARED:
            prepare_measurement(device)
            _PREPARED.add(device)
        from ..placement import parse_placement

        placed = parse_placement(**placement) if placement else None
        result, started, duration = _execute(run_dict, device, dtype, _MODELS, warmup, placed)
        out.update(result=result, started=started, duration=duration)
    except Exception as exc:
        out.update(error=failure_text(exc), message=str(exc), bad_input=isinstance(exc, LMCompressError),
                   started=started, duration=time.time() - started)
    return out


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


def check_fits(options: dict[str, float], nodes: Sequence[dict[str, float]]) -> None:
    """Raise a one-line error unless some node's resources (``ray.nodes()[i]["Resources"]``) hold one task's
    ``options`` (Ray would otherwise keep the task pending for ever)."""
    need = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0), "memory": options.get("memory", 0)}
    need = {k: v for k, v in need.items() if v}
    if any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
        return
    largest = {k: max((node.get(k, 0) for node in nodes), default=0) for k in need}
    raise LMCompressError(
        f"no node of the Ray cluster holds one task's request {_resources_text(need)} (largest node: "
        f"{_resources_text(largest)}); allowed: GPUs, CPUs and memory per task within one node's")


def _resources_text(res: dict[str, float]) -> str:
    return ", ".join(f"{k}={v / 2**30:.2f}GiB" if k == "memory" else f"{k}={v:g}" for k, v in res.items())


class RayExecutor(_Options):
    """Runs every cell as its own Ray task (see the module docstring); the driver claims cells and writes results
    to the store as they arrive.

    Args:
        address: Ray cluster address (None: start a local Ray for this run, shut down at its end, unless Ray is
            already initialized in this process).
        workers: cells in flight at once (Ray runs at most as many as the nodes' resources hold).
        gpus_per_task: GPUs each cell's task requests (0 for CPU cells; the runs' device type follows from it).
        dtype: model dtype name.
        cpus_per_task: CPUs each cell's task requests.
        memory_per_task: bytes of memory each cell's task requests (Ray's ``memory`` resource; None: none).
        init_kwargs: extra ``ray.init`` arguments for a local Ray started here (e.g. ``num_cpus=2``).
        placement: a :class:`~lmcompress.placement.Placement` spreading each model over the task's devices (its
            ``cuda:N`` are the task's GPUs, numbered within ``CUDA_VISIBLE_DEVICES``).
        reuse_stale, warmup, claim_timeout_s, heartbeat_s, keep_going: as for
            :class:`~lmcompress.runner.executors.InlineExecutor`.
    """

    def __init__(self, address: str | None = None, workers: int = 1, gpus_per_task: float = 0.0,
                 dtype: str = "bfloat16", progress: bool = True, *, cpus_per_task: float = 1.0,
                 memory_per_task: int | None = None, init_kwargs: dict[str, Any] | None = None,
                 reuse_stale: bool = False, warmup: bool = True, claim_timeout_s: float = 60.0,
                 heartbeat_s: float = 5.0, keep_going: bool = False, placement: Any = None) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise LMCompressError(f"--workers={workers!r} is not allowed; it must be an integer >= 1")
        for name, value in (("GPUs per task", gpus_per_task), ("CPUs per task", cpus_per_task)):
            if not value >= 0:
                raise LMCompressError(f"{name}={value!r} is not allowed; it must be >= 0")
        if memory_per_task is not None and memory_per_task <= 0:
            raise LMCompressError(f"memory per task={memory_per_task!r} is not allowed; it must be > 0 bytes")
        self.address, self.workers, self.gpus, self.dtype, self.progress = (
            address, workers, float(gpus_per_task), dtype, progress)
        self.cpus, self.memory = float(cpus_per_task), memory_per_task
        self.init_kwargs = dict(init_kwargs or {})
        self.keep_going = keep_going
        self.placement = placement.to_dict() if placement is not None else None
        #: after :meth:`run`: cells stored as failed by this run.
        self.failures = 0
        #: after :meth:`run`: per key run here, the resources Ray assigned to its task (read back inside it).
        self.resources: dict[str, dict[str, float]] = {}
        self._set_options(reuse_stale, warmup, claim_timeout_s, heartbeat_s)

    @property
    def device_kind(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"

    def task_options(self) -> dict[str, float]:
        """The ``.options(...)`` of every cell's task: ``num_cpus``, ``num_gpus`` and (if set) ``memory``."""
        options: dict[str, float] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory is not None:
            options["memory"] = self.memory
        return options

    def _init(self, ray) -> bool:
        """Start or join Ray; True when this call started it (so :meth:`run` shuts it down)."""
        if ray.is_initialized():
            return False
        kwargs: dict[str, Any] = {"log_to_driver": False}
        if self.address is None:
            kwargs.update(include_dashboard=False, **self.init_kwargs)
        ray.init(address=self.address, **kwargs)
        return True

    def run(self, runs: Sequence[RunSpec], store: ResultStore) -> list[dict[str, Any]]:
        check_ray_address(self.address)
        try:
            import ray
        except ImportError:
            raise LMCompressError("the ray executor needs Ray: pip install 'lmcompress[ray]' (or ray)") from None
        from tqdm.auto import tqdm

        keys = [r.key(self.dtype, self.device_kind) for r in runs]
        pending = pending_cells(runs, keys)
        claimer = self._claimer(store)
        self.failures, self.resources = 0, {}
        options = self.task_options()
        started_ray = False
        remote = None
        bar = tqdm(total=len(runs), disable=not self.progress, unit="run",
                   desc=f"runs as ray tasks ({self.workers} at once)", dynamic_ncols=True)
        try:
            with claimer:
                in_flight: dict = {}
                while pending or in_flight:
                    while len(in_flight) < self.workers:
                        cell = claimer.next_cell(pending, on_done=lambda _k: bar.update(1), wait=not in_flight)
                        if cell is None:
                            break
                        if remote is None:  # start Ray only once there is work
                            started_ray = self._init(ray)
                            check_fits(options, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
                            remote = ray.remote(max_calls=0)(run_cell)
                        run, key = cell
                        spec = run.to_dict()
                        ref = remote.options(**options).remote(key, spec, self.device_kind, self.dtype, self.warmup,
                                                              self.placement)
                        in_flight[ref] = (key, spec)
                    if not in_flight:
                        continue
                    ready, _ = ray.wait(list(in_flight), num_returns=1)
                    key, spec = in_flight.pop(ready[0])
                    self._store(ray, ready[0], key, spec, store, claimer)
                    bar.update(1)
                    if self.failures:
                        bar.set_postfix_str(f"{self.failures} failed")
        finally:
            bar.close()
            if started_ray:
                ray.shutdown()
        return finished_records(store, keys, claimer.code_version)

    def _store(self, ray, ref, key: str, spec: dict[str, Any], store: ResultStore, claimer) -> None:
        prov = provenance.provenance(spec, self.dtype, self.device_kind, claimer.code_version).to_dict()
        try:
            out = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the worker process died (killed, out of memory, ...)
            out = {"key": key, "device": self.device_kind, "resources": {}, "started": time.time(),
                   "duration": 0.0, "error": f"{type(exc).__name__}: {exc}", "message": str(exc).splitlines()[0],
                   "bad_input": False}
        self.resources[key] = out["resources"]
        device = f"ray:{out['device']}"
        if "result" in out:
            store.put(key, spec, out["result"], provenance=prov, device=device, started_at=out["started"],
                      duration_s=out["duration"], owner=claimer.owner)
            return
        if not self.keep_going:
            claimer.release(key)
            if out["bad_input"]:
                raise LMCompressError(out["message"])
            raise RuntimeError(f"run {key} failed in a Ray task:\n{out['error']}")
        store.put_failed(key, spec, out["error"], provenance=prov, device=device, started_at=out["started"],
                         duration_s=out["duration"], owner=claimer.owner)
        self.failures += 1
