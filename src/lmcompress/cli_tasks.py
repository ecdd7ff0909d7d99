"""The ``lmcompress tasks`` command and ``lmcompress bench --tasks``: registered tasks by name, with
parameters.

Task list syntax: ``NAME[:k=v,...],NAME2[:k=v,...]``. A comma-separated item with ``:`` or without ``=`` starts
a new task; an item ``k=v`` is a parameter of the task before it. List values are written with ``/`` or in
brackets: ``needle_grid:lengths=1024/2048,depths=[0.05,0.5,0.95]``. ``default`` stands for the bench's pass-key
grid and perplexity run; a group (``ruler``) expands into its member tasks, so each is stored and resumed on
its own. Values are typed by the parameter's default (int, float, bool, str, tuple).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from typing import Any

from .errors import LMCompressError

DEFAULT_ITEM = "default"


# ------------------------------------------------------------------------------------------------ catalog
def _params(cls) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


def task_catalog() -> dict[str, dict[str, Any]]:
    """``{name: {summary, group, primary_metric, higher_is_better, chance, params}}`` of every registered task."""
    from .registry import TASKS

    catalog = {}
    for name, cls in TASKS.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        catalog[name] = {
            "summary": doc[0] if doc else "",
            "group": getattr(cls, "group", ""),
            "primary_metric": cls.primary_metric,
            "higher_is_better": cls.higher_is_better,
            "chance": getattr(cls, "chance", None),
            "params": _params(cls),
        }
    return catalog


def cmd_tasks(args: argparse.Namespace) -> int:
    catalog = task_catalog()
    if args.json:
        print(json.dumps(catalog, indent=1, default=list))
        return 0
    for name, info in catalog.items():
        group = f" [{info['group']}]" if info["group"] else ""
        print(f"{name}{group}: {info['summary']}")
        print(f"    metric: {info['primary_metric']} ({'higher' if info['higher_is_better'] else 'lower'} is better)")
        print("    " + ", ".join(f"{k}={_show(v)}" for k, v in info["params"].items()))
    return 0


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(map(str, value)) if value else "(auto)"
    return repr(value) if isinstance(value, str) else str(value)


def add_tasks_subcommand(sub) -> None:
    t = sub.add_parser("tasks", help="list registered evaluation tasks with their parameters and defaults")
    t.add_argument("--json", action="store_true", help="machine-readable output")
    t.set_defaults(func=cmd_tasks)


# ------------------------------------------------------------------------------------------------ parsing
def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets."""
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    return [i.strip() for i in items if i.strip()]


def parse_task_list(text: str) -> list[tuple[str, dict[str, str]]]:
    """``"ruler:length=4096,samples=5,passkey"`` -> ``[("ruler", {"length": "4096", "samples": "5"}),
    ("passkey", {})]``."""
    out: list[tuple[str, dict[str, str]]] = []
    for item in _split_top(text):
        if "=" not in item or (":" in item and item.index(":") < item.index("=")):
            name, _, rest = item.partition(":")
            out.append((name.strip().lower(), {}))
            item = rest.strip()
            if not item:
                continue
        if not out:
            raise LMCompressError(f"--tasks={text!r} starts with a parameter {item!r}; allowed: NAME[:k=v,...],...")
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise LMCompressError(f"--tasks item {item!r} is not k=v; allowed: NAME[:k=v,...],...")
        out[-1][1][key.strip()] = value.strip()
    if not out:
        raise LMCompressError("--tasks is empty; give at least one task (see `lmcompress tasks`)")
    return out


def _scalar(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def coerce(task: str, key: str, text: str, default: Any) -> Any:
    """``text`` as the type of the parameter's ``default``."""
    try:
        if isinstance(default, bool):
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            inner = text.strip().removeprefix("[").removesuffix("]")
            parts = [p for p in inner.replace("/", ",").split(",") if p.strip()]
            return tuple(_scalar(p.strip()) for p in parts)
        if default is None:
            return None if text.lower() in ("none", "") else _scalar(text)
        return text
    except ValueError:
        kind = "true/false" if isinstance(default, bool) else type(default).__name__
        raise LMCompressError(f"{task}: {key}={text!r} is not a valid {kind}; allowed: a {kind} value") from None


def make_task(name: str, raw: dict[str, str], inherited: dict[str, Any] | None = None):
    """One task from its registered ``name`` and string parameters; ``inherited`` values (the bench's
    ``--query-aware``, ``--decode``) fill parameters the task has and the user did not set."""
    from .registry import TASKS

    cls = TASKS.get(name)
    defaults = _params(cls)
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise LMCompressError(f"unknown parameter {unknown[0]!r} for task {name!r}; allowed: {', '.join(defaults)}")
    kwargs = {k: v for k, v in (inherited or {}).items() if k in defaults and k not in raw}
    kwargs.update({k: coerce(name, k, v, defaults[k]) for k, v in raw.items()})
    return cls(**kwargs)


def build_tasks(text: str, inherited: dict[str, Any], default: Callable[[], list]) -> list:
    """The task objects of a ``--tasks`` value, groups expanded into their members."""
    tasks: list = []
    for name, raw in parse_task_list(text):
        if name == DEFAULT_ITEM:
            if raw:
                raise LMCompressError("--tasks item 'default' takes no parameters (use --lengths, --depths, ...)")
            tasks += default()
            continue
        task = make_task(name, raw, inherited)
        tasks += task.members() if hasattr(task, "members") else [task]
    return tasks


def longest_sequence(tasks) -> int:
    """The longest sequence any task needs that is known before loading the model (0: none known)."""
    return max((t.max_sequence_tokens() for t in tasks), default=0)


# ------------------------------------------------------------------------------------------------ output
def task_table(records: list[dict[str, Any]]) -> str:
    """A markdown table of every run's primary metric and KV bytes (one row per KV spec and task label), and
    each group's mean per KV spec; with runs of several models, a first column names the model."""
    from .registry import TASKS

    several = len({rec["spec"].get("model") for rec in records}) > 1
    rows, groups = [], {}
    for rec in records:
        spec = rec["spec"]
        if spec["task"]["name"] not in TASKS:
            continue
        task = TASKS.get(spec["task"]["name"])  # the class: its metric and group, without re-reading any file
        metric = task.primary_metric
        value = rec["result"]["metrics"].get(metric)
        kv = rec["result"]["costs"].get("kv_bytes")
        model = f"| {spec.get('model')} " if several else ""
        rows.append(f"{model}| {spec['kv_label']} | {task.name} | {metric} | {_num(value)} | {_num(kv, 0)} |")
        if getattr(task, "group", "") and value is not None:
            groups.setdefault((model, spec["kv_label"], task.group), []).append(value)
    head = ("| model " if several else "") + "| KV spec | task | metric | value | KV bytes |"
    lines = [head, "|---" * head.count(" | ") + "|---|", *rows]
    for (model, label, group), values in groups.items():
        lines.append(f"{model}| {label} | {group} (mean of {len(values)}) | score | "
                     f"{_num(sum(values) / len(values))} | |")
    return "\n".join(lines)


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)
