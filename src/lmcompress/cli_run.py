"""``lmcompress run GRID`` (a grid file or preset, see :mod:`lmcompress.runner.grid`) and ``lmcompress results``
(filter and export a result store).

``run`` checks the whole grid (file, names, parameters, model files, context lengths) before anything loads,
prints the plan (cells, how many are stored, failed or to run, a time estimate from stored durations of like
cells); with ``--dry-run`` that is all. Otherwise it runs the missing cells with a live progress bar, each cell
committed to the store as it ends; a cell whose task raises is stored as failed with its error and skipped by
later runs unless ``--retry-failed``. Exit status: 0 when every cell is finished, 1 when some are stored as
failed, 2 for bad input (nothing runs).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import LMCompressError

FORMATS = ("csv", "json", "md")
STATUSES = ("ok", "failed", "all")


# ------------------------------------------------------------------------------------------------ plan
def task_label(task: dict[str, Any]) -> str:
    """The label of a stored task dict (as :meth:`Task.label`)."""
    return f"{task['name']}({', '.join(f'{k}={v}' for k, v in task['params'].items())})"


def plan(grid, store, reuse_stale: bool, retry_failed: bool) -> list[dict[str, Any]]:
    """One entry per cell: ``run``, ``key``, ``state`` (``done``, ``stale``: stored by another code version,
    ``failed``: stored as failed, ``todo``) and ``action`` (``keep``, ``run``, ``skip``: a failed cell without
    ``--retry-failed``). ``store`` may be None (no store yet)."""
    from .runner.provenance import code_version

    current = code_version()
    out = []
    for run in grid.runs:
        key = run.key(grid.dtype, grid.device)
        rec = store.get(key) if store is not None else None
        if rec is None:
            state = "todo"
        elif rec["status"] != "ok":
            state = "failed"
        else:
            state = "done" if rec["code_version"] == current else "stale"
        if state == "done" or (state == "stale" and reuse_stale):
            action = "keep"
        elif state == "failed" and not retry_failed:
            action = "skip"
        else:
            action = "run"
        out.append({"run": run, "key": key, "state": state, "action": action})
    return out


def estimate_s(cells: Sequence[dict[str, Any]], stored: Sequence[dict[str, Any]]) -> tuple[float, int]:
    """``(seconds, cells without an estimate)`` for the cells to run: each takes the mean stored duration of
    finished cells of the same model and task (label, else name)."""
    by_label: dict[tuple, list[float]] = {}
    by_name: dict[tuple, list[float]] = {}
    for rec in stored:
        spec = rec["spec"]
        by_label.setdefault((spec["model"], task_label(spec["task"])), []).append(rec["duration_s"])
        by_name.setdefault((spec["model"], spec["task"]["name"]), []).append(rec["duration_s"])
    total, unknown = 0.0, 0
    for cell in cells:
        run = cell["run"]
        durations = by_label.get((run.model, run.task.label())) or by_name.get((run.model, run.task.name))
        if durations:
            total += sum(durations) / len(durations)
        else:
            unknown += 1
    return total, unknown


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plan_text(grid, cells: list[dict[str, Any]], stored: list[dict[str, Any]], store_path: Path,
              verbose: bool) -> str:
    from .runner.grid import describe

    d = describe(grid)
    counts = {s: sum(c["state"] == s for c in cells) for s in ("done", "stale", "failed", "todo")}
    to_run = [c for c in cells if c["action"] == "run"]
    lines = [f"grid {grid.name} ({grid.source}): {d['models']} models x {d['kv_specs']} KV specs x {d['tasks']} "
             f"tasks = {d['cells']} cells on {grid.device}/{grid.dtype}"
             + (f", each model spread over {', '.join(grid.placement.devices())}" if grid.placement else ""),
             f"store {store_path}: {counts['done']} done, {counts['stale']} stale (another code version), "
             f"{counts['failed']} failed, {counts['todo']} not run"]
    skipped = sum(c["action"] == "skip" for c in cells)
    if skipped:
        lines.append(f"{skipped} failed cells skipped (--retry-failed reruns them)")
    seconds, unknown = estimate_s(to_run, stored)
    est = f"~{_duration(seconds)} from stored durations of like cells" if len(to_run) > unknown else "unknown"
    if unknown and len(to_run) > unknown:
        est += f", plus {unknown} cells with no stored duration"
    lines.append(f"to run: {len(to_run)} cells; estimate: {est if to_run else '0 s'}")
    if verbose:
        for c in cells:
            run = c["run"]
            lines.append(f"  {c['action']:4s} {c['state']:6s} {run.model} | {run.kv.label()} | {run.task.label()}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ run
def check_run_inputs(grid, executor: str) -> None:
    """Device, model files and context lengths, before any model loads (one-line errors)."""
    from .devices import check_device
    from .models import check_model_source, known_max_positions
    from .runner.grid import GridError

    if executor != "ray":
        check_device(grid.device)
    if grid.placement is not None and executor == "local":
        raise GridError(f"{grid.source}: {next(iter(grid.placement.to_dict()))}: --executor local runs one model per "
                        "device; allowed: a grid spread over several devices runs inline or on Ray")
    for model in sorted({r.model for r in grid.runs}):
        if executor != "ray":
            try:
                check_model_source(model)
                if grid.placement is not None:
                    from .placement import check_model_placement

                    check_model_placement(model, grid.placement)
            except LMCompressError as exc:
                raise GridError(f"{grid.source}: models: {exc}") from None
        limit = known_max_positions(model)
        longest = max((r.task for r in grid.runs if r.model == model), key=lambda t: t.max_sequence_tokens())
        if limit and longest.max_sequence_tokens() > limit:
            raise GridError(f"{grid.source}: tasks: {longest.label()} needs {longest.max_sequence_tokens()} tokens, "
                            f"more than {model}'s {limit} positions; allowed: at most {limit}")


def make_run_executor(args: argparse.Namespace, grid):
    import torch

    from .runner.executors import InlineExecutor
    from .runner.parallel import LocalExecutor
    from .runner.ray_executor import RayExecutor

    progress = not args.quiet
    if args.executor == "inline":
        from .cli_tasks import longest_sequence
        from .eval.pipeline import check_context_fits
        from .models import load_model

        dtype = getattr(torch, grid.dtype)

        def loader(name: str):
            model, tok = load_model(name, dtype=dtype, device=grid.device, quiet=True, placement=grid.placement)
            check_context_fits(model, longest_sequence(r.task for r in grid.runs if r.model == name))
            return model, tok

        return InlineExecutor(grid.device, dtype, progress=progress, loader=loader, reuse_stale=args.reuse_stale,
                              keep_going=True)
    if args.executor == "local":
        devices = ([d.strip() for d in args.devices.split(",") if d.strip()] if args.devices
                   else [grid.device] * args.workers)
        return LocalExecutor(devices, grid.dtype, progress=progress, reuse_stale=args.reuse_stale, keep_going=True)
    from .sizes import parse_bytes

    gpus_needed = len([d for d in grid.placement.devices() if d.startswith("cuda")]) if grid.placement else 1
    gpus = args.ray_gpus if args.ray_gpus is not None else (0.0 if grid.device == "cpu" else float(gpus_needed))
    memory = parse_bytes(args.ray_memory, "--ray-memory") if args.ray_memory is not None else None
    return RayExecutor(args.ray_address, args.workers, gpus, grid.dtype, progress=progress,
                       cpus_per_task=args.ray_cpus, memory_per_task=memory, reuse_stale=args.reuse_stale,
                       keep_going=True, placement=grid.placement)


def cmd_run(args: argparse.Namespace) -> int:
    from .runner.grid import load_grid
    from .runner.store import ResultStore, check_output_dir

    if args.workers < 1:
        raise LMCompressError(f"--workers={args.workers} is not allowed; it must be >= 1")
    grid = load_grid(args.grid)  # every grid problem is reported before anything loads
    check_run_inputs(grid, args.executor)
    if args.executor == "ray":
        from .runner.ray_executor import check_ray_address

        check_ray_address(args.ray_address)  # before the store is touched
    executor = make_run_executor(args, grid)  # (its options are checked here, before the store is touched)
    out = check_output_dir(args.out or f"out/run/{grid.name}")
    store_path = Path(args.store) if args.store else out / "results.sqlite"
    if args.dry_run:
        from .runner.store import inspect_store

        store = ResultStore(store_path, readonly=True) if inspect_store(store_path) == "store" else None
        try:
            cells = plan(grid, store, args.reuse_stale, args.retry_failed)
            stored = store.records("ok") if store is not None else []
        finally:
            if store is not None:
                store.close()
        print(plan_text(grid, cells, stored, store_path, verbose=True))
        return 0
    with ResultStore(store_path) as store:
        cells = plan(grid, store, args.reuse_stale, args.retry_failed)
        print(plan_text(grid, cells, store.records("ok"), store_path, verbose=False), file=sys.stderr)
        runs = [c["run"] for c in cells if c["action"] != "skip"]
        records = executor.run(runs, store) if runs else []
    ok = [r for r in records if r["status"] == "ok"]
    failed = [c for c in cells if c["action"] == "skip"] + [r for r in records if r["status"] != "ok"]
    if ok:
        from .runner.report import markdown_table, summarize, write_outputs

        paths = write_outputs(ok, out)
        print(markdown_table(summarize(ok)))
        print(f"\nwrote {paths['json']}, {paths['markdown']}, {paths['leaderboard']} (store: {store_path})")
    if failed:
        print(f"lmcompress: {len(failed)} of {len(grid.runs)} cells failed (errors in the store: lmcompress results "
              f"--store {store_path} --status failed); --retry-failed reruns them", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ results
def flatten(rec: dict[str, Any], current: str) -> dict[str, Any]:
    """One record as flat columns: key, status, model, kv, task, ``task.PARAM``, ``metric.NAME``,
    ``cost.NAME``, code version, stale, device, dtype, duration, start time, error."""
    spec = rec["spec"]
    row: dict[str, Any] = {"key": rec["key"], "status": rec["status"], "model": spec["model"],
                           "kv": spec.get("kv_label", ""), "task": spec["task"]["name"]}
    row.update({f"task.{k}": v for k, v in spec["task"]["params"].items()})
    result = rec["result"] or {}
    row.update({f"metric.{k}": v for k, v in (result.get("metrics") or {}).items()})
    row.update({f"cost.{k}": v for k, v in (result.get("costs") or {}).items()})
    row.update({"code_version": rec["code_version"], "stale": rec["code_version"] != current,
                "device": rec["device"], "dtype": rec["dtype"], "duration_s": rec["duration_s"],
                "started": rec["started"], "error": (rec["error"] or "").splitlines()[0] if rec["error"] else ""})
    return row


def _matches(value: Any, pattern: str) -> bool:
    if isinstance(value, (list, tuple)):
        value = "/".join(map(str, value))
    if isinstance(value, bool):
        return pattern.lower() in (str(value).lower(), str(int(value)))
    if isinstance(value, (int, float)):
        try:
            return float(pattern) == float(value)
        except ValueError:
            pass
    return fnmatch.fnmatchcase(str(value), pattern)


def parse_where(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise LMCompressError(f"--where {item!r} is not COLUMN=VALUE; allowed: e.g. task=passkey, kv='snapkv*'")
        out.append((key.strip(), value.strip()))
    return out


def select(rows: list[dict[str, Any]], where: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The rows matching every ``(column, value)`` (``*`` / ``?`` wildcards; numbers compared as numbers). A column
    no row has is an error naming the columns there are."""
    columns = sorted({c for r in rows for c in r})
    for key, _ in where:
        if rows and key not in columns:
            raise LMCompressError(f"--where column {key!r} is in no stored row; allowed: {', '.join(columns)}")
    return [r for r in rows if all(k in r and _matches(r[k], v) for k, v in where)]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "/".join(map(str, value))
    return str(value)


def export(rows: list[dict[str, Any]], fmt: str) -> str:
    """``rows`` as csv, json (a list of objects) or a markdown table; columns in first-seen order."""
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    if fmt == "json":
        return json.dumps(rows, indent=1, default=str)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: _cell(r.get(c)) for c in columns})
        return buf.getvalue().rstrip("\n")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def cmd_results(args: argparse.Namespace) -> int:
    from .runner.provenance import code_version
    from .runner.store import ResultStore

    where = parse_where(args.where)
    with ResultStore(args.store, readonly=True) as store:
        records = store.records(None if args.status == "all" else args.status)
    current = code_version()
    rows = select([flatten(r, current) for r in records], where)
    if args.columns:
        wanted = [c.strip() for c in args.columns.split(",") if c.strip()]
        known = {c for r in rows for c in r}
        bad = [c for c in wanted if rows and c not in known]
        if bad:
            raise LMCompressError(f"--columns {bad[0]!r} is in no selected row; allowed: {', '.join(sorted(known))}")
        rows = [{c: r.get(c) for c in wanted} for r in rows]
    text = export(rows, args.format)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"wrote {len(rows)} rows to {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


# ------------------------------------------------------------------------------------------------ parser
def add_run_subcommands(sub) -> None:
    from .runner.grid import presets

    r = sub.add_parser("run", help="run an experiment grid file or preset (see docs/grids.md)")
    r.add_argument("grid", help=f"a YAML grid file, or a preset: {', '.join(presets())}")
    r.add_argument("--dry-run", action="store_true", help="print the plan (cells, stored, estimate); run nothing")
    r.add_argument("--retry-failed", action="store_true", help="rerun cells stored as failed")
    r.add_argument("--reuse-stale", action="store_true",
                   help="keep stored rows of another lmcompress code version instead of recomputing them")
    r.add_argument("--store", default=None, help="SQLite result store (default OUT/results.sqlite)")
    r.add_argument("--out", default=None, help="output folder (default out/run/GRID_NAME)")
    r.add_argument("--executor", default="inline", choices=("inline", "local", "ray"),
                   help="inline (default), local (worker processes) or ray")
    r.add_argument("--workers", type=int, default=1,
                   help="local: worker processes on the grid's device (default 1); ray: cells in flight at once")
    r.add_argument("--devices", default=None, help="local: one worker per device, e.g. cuda:0,cuda:1")
    r.add_argument("--ray-address", default=None, help="ray: cluster address (default: a local one)")
    r.add_argument("--ray-gpus", type=float, default=None,
                   help="ray: GPUs each cell's task requests (default 1 for a cuda grid, 0 for cpu)")
    r.add_argument("--ray-cpus", type=float, default=1.0, help="ray: CPUs each cell's task requests (default 1)")
    r.add_argument("--ray-memory", default=None,
                   help="ray: memory each cell's task requests, e.g. 16GiB (default: none requested)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)

    x = sub.add_parser("results", help="filter and export the rows of a result store")
    x.add_argument("--store", required=True, help="SQLite result store")
    x.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                   help="keep rows whose COLUMN matches VALUE (wildcards * ?); repeatable (all must match)")
    x.add_argument("--status", default="ok", choices=STATUSES, help="ok (default), failed or all rows")
    x.add_argument("--columns", default=None, help="comma-separated columns to export (default all)")
    x.add_argument("--format", default="md", choices=FORMATS, help="md (default), csv or json")
    x.add_argument("--output", default=None, help="write to this file instead of stdout")
    x.set_defaults(func=cmd_results)
