"""Grid files: a YAML experiment grid (models x KV specs x tasks) expanded into :class:`RunSpec` cells.

Format (every key but ``models``, ``kv`` and ``tasks`` optional)::

    name: smoke                        # a label (default: the file name)
    device: cpu                        # where models run (default cpu)
    dtype: float32                     # float32 | bfloat16 | float16
    devices: {cuda:0: 20GiB, cuda:1: 20GiB}   # optional: one model over several devices, a cap per device
    # device_map: {model.embed_tokens: cuda:0, ..., lm_head: cuda:1}  # or an explicit map (not both); see
    #                                                                  # lmcompress.placement
    models:                            # names, paths (an AWQ / compressed-tensors folder), or {path: ...}
      - smollm2-135m
    ratios: [0.5, 0.75]                # swept for eviction methods without their own ratio / budget
    kv:                                # method strings (see ``lmcompress methods``), or {method, ratios}
      - none
      - snapkv                         # -> snapkv at every ratio above
      - {method: snapkv+int4, ratios: [0.25]}
      - "streaming_llm:budget=256"
    tasks:                             # a name, {NAME: {params}}, or {name: NAME, PARAM: value, ...}
      - passkey: {length: 1024, sweep: {depth: [0.1, 0.5, 0.9]}}
      - {name: perplexity, context_tokens: 512, eval_tokens: 128}

With several models, KV specs pair with models by :func:`lmcompress.runner.model_list.pair_specs` (a DMS
checkpoint runs ``none`` and the ``dms`` specs, any other model the rest). A task's ``sweep`` maps parameters to lists of values and expands into their cartesian product; a list value of a
tuple-typed parameter (``needle_grid``'s ``lengths``) is that tuple. Groups (``ruler``) expand into their members.
Cells run model-major, every KV spec of one task back to back.

Every problem (bad YAML, an unknown top-level key, a typo in a method, task or parameter name, a value out of
range) raises :class:`GridError` naming the file, the line and the key path, before any model loads. Presets
shipped with the package (``lmcompress/grids/NAME.yaml``) are named by their file stem.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LMCompressError
from .spec import RunSpec

PRESET_DIR = Path(__file__).resolve().parent.parent / "grids"
TOP_KEYS = ("name", "description", "device", "dtype", "devices", "device_map", "models", "ratios", "kv", "tasks")
DTYPES = ("float32", "bfloat16", "float16")

Path_ = tuple[Any, ...]


class GridError(LMCompressError):
    """A malformed grid file; the message starts with ``FILE:LINE: KEY:``."""


@dataclass(frozen=True)
class Grid:
    """An expanded grid: its ``runs`` (in run order) and where they run."""

    name: str
    source: str
    device: str
    dtype: str
    runs: list[RunSpec]
    #: one model over several devices (``devices`` caps or an explicit ``device_map``), or None.
    placement: Any = None


def presets() -> list[str]:
    """Names of the grid presets shipped in the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve(grid: str) -> Path:
    """A grid file path, or the file of the preset named ``grid``."""
    path = Path(grid)
    if path.is_file():
        return path
    if (PRESET_DIR / f"{grid}.yaml").is_file() and path.suffix not in (".yaml", ".yml"):
        return PRESET_DIR / f"{grid}.yaml"
    raise GridError(f"grid {grid!r} is neither a file nor a preset; allowed: a YAML grid file or one of "
                    f"{', '.join(presets())}")


def _lines(node, path: Path_, out: dict[Path_, int]) -> None:
    """The 1-based line of every key path of a composed YAML node."""
    import yaml

    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for knode, vnode in node.value:
            key = knode.value
            out[(*path, key)] = knode.start_mark.line + 1
            _lines(vnode, (*path, key), out)
            out[(*path, key)] = knode.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _lines(item, (*path, i), out)


class _Where:
    """Builds located errors for one grid file."""

    def __init__(self, source: str, lines: dict[Path_, int]) -> None:
        self.source, self.lines = source, lines

    def error(self, path: Path_, message: str) -> GridError:
        probe = path
        while probe not in self.lines and probe:
            probe = probe[:-1]
        line = self.lines.get(probe)
        key = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))
        return GridError(f"{self.source}:{line if line else '?'}: {key or '(top)'}: {message}")


def load_grid(grid: str | Path) -> Grid:
    """Read, check and expand a grid file or preset name; raises :class:`GridError` on any problem."""
    import yaml

    path = resolve(str(grid))
    source = str(path)
    try:
        text = path.read_text()
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else "?"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise GridError(f"{source}:{line}: bad YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GridError(f"{source}: cannot be read ({exc})") from None
    lines: dict[Path_, int] = {}
    if node is not None:
        _lines(node, (), lines)
    where = _Where(source, lines)
    return expand(data, where, default_name=path.stem)


def expand(data: Any, where: _Where, default_name: str = "grid") -> Grid:
    """The :class:`Grid` of parsed YAML ``data`` (errors located through ``where``)."""
    if not isinstance(data, dict):
        raise where.error((), f"a grid is a mapping with keys {', '.join(TOP_KEYS)}; got {type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            raise where.error((key,), f"unknown key {key!r}; allowed: {', '.join(TOP_KEYS)}")
    for key in ("models", "kv", "tasks"):
        if not data.get(key):
            raise where.error((key,), f"missing or empty {key!r}; a grid needs models, kv and tasks")
    device = str(data.get("device", "cpu"))
    dtype = str(data.get("dtype", "float32"))
    if dtype not in DTYPES:
        raise where.error(("dtype",), f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    placement = _placement(data, device, where)
    models = _models(_list(data, "models", where), where)
    ratios = _ratios(data.get("ratios"), ("ratios",), where) if "ratios" in data else None
    specs = _kv_specs(_list(data, "kv", where), ratios, where)
    tasks = _tasks(_list(data, "tasks", where), where)
    from .model_list import pair_specs

    try:  # a DMS checkpoint runs none + the dms specs, other models the rest (runner/model_list.py)
        cells = pair_specs(models, specs)
    except LMCompressError as exc:
        raise where.error(("models",), str(exc)) from None
    runs = [RunSpec(m, s, t) for m in models for t in tasks for mm, s in cells if mm == m]
    keys = [r.key(dtype, device) for r in runs]
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(r for r, k in zip(runs, keys) if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise where.error(("kv",), f"the grid lists the cell {dup.model} / {dup.kv.label()} / {dup.task.label()} "
                                   "twice; allowed: each cell once")
    return Grid(str(data.get("name", default_name)), where.source, device, dtype, runs, placement)


def _placement(data: dict, device: str, where: _Where):
    """The grid's :class:`~lmcompress.placement.Placement` (its devices all of the grid's device type, or cpu)."""
    import torch

    from ..placement import parse_placement

    key = "devices" if "devices" in data else "device_map"
    try:
        placement = parse_placement(data.get("devices"), data.get("device_map"))
    except LMCompressError as exc:
        raise where.error((key,), str(exc)) from None
    if placement is None:
        return None
    kind = torch.device(device).type
    other = [d for d in placement.devices() if torch.device(d).type not in (kind, "cpu")]
    if other:
        raise where.error((key,), f"{other[0]} is not a {kind} device (the grid's device: {device}); allowed: "
                                  f"{kind} devices, or cpu")
    return placement


def _list(data: dict, key: str, where: _Where) -> list:
    value = data[key]
    if not isinstance(value, list):
        raise where.error((key,), f"{key!r} must be a list; got {type(value).__name__}")
    return value


def _models(items: list, where: _Where) -> list[str]:
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            unknown = set(item) - {"path"}
            if unknown or "path" not in item:
                raise where.error(("models", i), "a model entry is a name, a path, or {path: ...} (quantized "
                                                 "weights: the folder `lmcompress awq` writes, as its path)")
            item = item["path"]
        if not isinstance(item, str) or not item.strip():
            raise where.error(("models", i), f"model {item!r} is not a name or path")
        out.append(item.strip())
    return out


def _ratios(value: Any, path: Path_, where: _Where) -> list[float]:
    values = value if isinstance(value, list) else [value]
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) < 1.0:
            raise where.error((*path, i) if isinstance(value, list) else path,
                              f"ratio {v!r} is out of range; allowed: numbers in (0, 1)")
        out.append(float(v))
    if not out:
        raise where.error(path, "an empty ratio list; allowed: numbers in (0, 1)")
    return out


def _kv_specs(items: list, ratios: list[float] | None, where: _Where) -> list:
    from ..kv.parse import _part, has_eviction, parse_method

    specs = []
    for i, item in enumerate(items):
        own = None
        if isinstance(item, dict):
            unknown = set(item) - {"method", "ratios"}
            if unknown or "method" not in item:
                raise where.error(("kv", i), f"a kv entry is a method string or {{method, ratios}}; got keys "
                                             f"{', '.join(map(str, item))}")
            if "ratios" in item:
                own = _ratios(item["ratios"], ("kv", i, "ratios"), where)
            item = item["method"]
        if not isinstance(item, str) or not item.strip():
            raise where.error(("kv", i), f"kv entry {item!r} is not a method string")
        try:
            explicit = {"ratio", "budget", "base.ratio", "base.budget"}
            sweepable = has_eviction(item) and not any(explicit & set(_part(raw)[1]) for raw in item.split("+"))
            sweep = own if own is not None else (ratios if sweepable else None)
            if sweep is not None and not sweepable:
                raise LMCompressError(f"ratios given for {item!r}, which takes no ratio sweep; allowed: an eviction "
                                      "method without its own ratio/budget")
            specs += [parse_method(item, ratio=r) for r in sweep] if sweep else [parse_method(item)]
        except GridError:
            raise
        except LMCompressError as exc:
            raise where.error(("kv", i), str(exc)) from None
    return specs


def _task_entry(item: Any, i: int, where: _Where) -> tuple[str, dict[str, Any], Path_]:
    """``(name, params, key path of the params)`` of one ``tasks`` entry."""
    if isinstance(item, str):
        return item.strip().lower(), {}, ("tasks", i)
    if isinstance(item, dict) and "name" in item:
        params = {k: v for k, v in item.items() if k != "name"}
        return str(item["name"]).strip().lower(), params, ("tasks", i)
    if isinstance(item, dict) and len(item) == 1:
        (name, params), = item.items()
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise where.error(("tasks", i, name), f"the parameters of task {name!r} must be a mapping")
        return str(name).strip().lower(), dict(params), ("tasks", i, name)
    raise where.error(("tasks", i), "a task entry is a name, {NAME: {params}} or {name: NAME, params...}")


def _coerce(value: Any, default: Any) -> Any:
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _type_ok(value: Any, default: Any) -> bool:
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _tasks(items: list, where: _Where) -> list:
    from ..cli_tasks import _params
    from ..registry import TASKS

    tasks: list = []
    for i, item in enumerate(items):
        name, params, path = _task_entry(item, i, where)
        if name not in TASKS:
            raise where.error(path, f"unknown task {name!r}; allowed: {', '.join(TASKS.names())}")
        cls = TASKS.get(name)
        defaults = _params(cls)
        sweep = params.pop("sweep", {}) or {}
        if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
            raise where.error((*path, "sweep"), "sweep maps parameters to non-empty lists of values")
        for key, value in [*params.items(), *((k, v[0]) for k, v in sweep.items())]:
            kpath = (*path, "sweep", key) if key in sweep else (*path, key)
            if key not in defaults:
                raise where.error(kpath, f"unknown parameter {key!r} for task {name!r}; allowed: "
                                         f"{', '.join(defaults)}")
            if key in params and key in sweep:
                raise where.error(kpath, f"{key!r} is both set and swept; allowed: one of the two")
            if not _type_ok(_coerce(value, defaults[key]), defaults[key]):
                raise where.error(kpath, f"{key}={value!r} is not a {type(defaults[key]).__name__}")
        names = list(sweep)
        for combo in itertools.product(*(sweep[k] for k in names)) if names else [()]:
            kwargs = {k: _coerce(v, defaults[k]) for k, v in params.items()}
            kwargs.update({k: _coerce(v, defaults[k]) for k, v in zip(names, combo)})
            for k in names:
                if not _type_ok(kwargs[k], defaults[k]):
                    raise where.error((*path, "sweep", k), f"{k}={kwargs[k]!r} is not a "
                                                           f"{type(defaults[k]).__name__}")
            try:
                task = cls(**kwargs)
            except LMCompressError as exc:
                bad = next((k for k in kwargs if f"{k}=" in str(exc)), None)
                kpath = path if bad is None else ((*path, "sweep", bad) if bad in sweep else (*path, bad))
                raise where.error(kpath, str(exc)) from None
            except TypeError as exc:
                raise where.error(path, f"bad parameters for task {name!r} ({exc})") from None
            tasks += task.members() if hasattr(task, "members") else [task]
    return tasks


def describe(grid: Grid) -> dict[str, Any]:
    """Counts of a grid: models, KV specs, tasks, cells."""
    return {"models": len({r.model for r in grid.runs}), "kv_specs": len({r.kv.label() for r in grid.runs}),
            "tasks": len({r.task.label() for r in grid.runs}), "cells": len(grid.runs)}


__all__ = ["DTYPES", "Grid", "GridError", "describe", "expand", "load_grid", "presets", "resolve"]
