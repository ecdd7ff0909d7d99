"""Leaderboard of stored runs: a method x ratio x task table, score-vs-KV-bytes plots, needle heatmaps, HTML.

Generic over tasks: a row's score is the task's ``primary_metric`` (from the task class registered under the
run's task name; the first metric where the name is not registered), averaged over the task's stored runs;
costs come from ``costs`` (``kv_bytes``, ``ttft_s``, ``decode_tok_s``, ``peak_mem_bytes``), whatever the task.

Rows are keyed by (model, task, method): *task* is the task name, with ``@length`` when the task has an integer
``length`` parameter (a pass-key grid's cells of one length form one task; its depths average), and *method*
is the KV spec's label, with ``+q`` when the task ran query-aware. Each row shows the uncompressed row's score
of the same model and task (``none`` in the same query mode, else any ``none`` row) and the compression its
measured KV bytes imply (uncompressed bytes / bytes).

Optional task conventions read here: a chance level (``metrics["chance"]``, ``details["chance"]`` or a class
attribute ``chance_level``), a sample count (``details["samples"]`` as a list or a count, else the task's
``samples`` parameter, else 1 per run), and per-cell needle results ``details["cells"] = [{"length": ...,
"depth": ..., "score": ...}, ...]`` (the pass-key task's results are turned into such cells too).
"""

from __future__ import annotations

import html
import re
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

from .suite_table import markdown_suites

MB = 1024 * 1024
COLUMNS = ("task", "method", "ratio", "score", "none score", "KV MB", "compression", "TTFT s", "decode tok/s",
           "peak MB", "samples", "chance")


def _task_info(name: str) -> tuple[str | None, bool, float | None]:
    """(primary metric, higher is better, chance level) of the task registered as ``name``."""
    from ..registry import TASKS

    if name not in TASKS:
        return None, True, None
    cls = TASKS.get(name)
    return (getattr(cls, "primary_metric", "") or None, bool(getattr(cls, "higher_is_better", True)),
            getattr(cls, "chance_level", None))


def _mean(xs: list) -> float | None:
    xs = [float(x) for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool)]
    return statistics.fmean(xs) if xs else None


def task_key(rec: dict[str, Any]) -> str:
    task = rec["spec"]["task"]
    length = task["params"].get("length")
    return f"{task['name']}@{length}" if isinstance(length, int) and not isinstance(length, bool) else task["name"]


def display_label(rec: dict[str, Any]) -> str:
    """The KV spec's short label, rebuilt from the stored spec (so rows stored by older code, whose labels were
    spelled differently, group with new ones); the stored label where the spec no longer parses."""
    from ..kv.spec import KVSpec

    try:
        return KVSpec.from_dict(rec["spec"]["kv"]).label()
    except Exception:  # a method renamed or removed since the row was stored
        return rec["spec"]["kv_label"]


def method_key(rec: dict[str, Any]) -> str:
    return display_label(rec) + ("+q" if rec["spec"]["task"]["params"].get("query_aware") else "")


def _ratio(kv: dict[str, Any]) -> str:
    evict = kv.get("evict") or {}
    while evict and evict.get("ratio") in (None, 0, 0.0) and isinstance(evict.get("base"), dict):
        evict = evict["base"]  # wrappers take their size from the base
    if evict.get("budget"):
        return f"budget {evict['budget']}"
    return f"{evict['ratio']:.2f}" if evict.get("ratio") else "–"


def _samples(rec: dict[str, Any]) -> int:
    details = rec["result"].get("details") or {}
    s = details.get("samples")
    if isinstance(s, list):
        return len(s)
    if isinstance(s, int) and not isinstance(s, bool):
        return s
    p = rec["spec"]["task"]["params"].get("samples")
    return p if isinstance(p, int) and not isinstance(p, bool) else 1


def _chance(rec: dict[str, Any], cls_chance: float | None) -> float | None:
    for source in (rec["result"].get("metrics") or {}, rec["result"].get("details") or {}):
        if isinstance(source.get("chance"), (int, float)):
            return float(source["chance"])
    return cls_chance


def leaderboard_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, task, method), ordered by model, task, then first-seen method order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[(rec["spec"]["model"], task_key(rec), method_key(rec))].append(rec)
    rows = []
    for (model, task, method), recs in groups.items():
        name = recs[0]["spec"]["task"]["name"]
        metric, higher, cls_chance = _task_info(name)
        metrics = recs[0]["result"].get("metrics") or {}
        if metric is None or metric not in metrics:
            metric = next((k for k, v in metrics.items() if isinstance(v, (int, float)) and k != "chance"), None)
        costs = [r["result"].get("costs") or {} for r in recs]
        peaks = [c.get("peak_mem_bytes") for c in costs if isinstance(c.get("peak_mem_bytes"), (int, float))]
        rows.append({
            "model": model, "task": task, "task_name": name, "method": method,
            "kv_label": display_label(recs[0]), "query_aware": method.endswith("+q"),
            "ratio": _ratio(recs[0]["spec"]["kv"]),
            "metric": metric, "higher_is_better": higher,
            "score": _mean([(r["result"].get("metrics") or {}).get(metric) for r in recs]) if metric else None,
            "kv_bytes": _mean([c.get("kv_bytes") for c in costs]),
            "ttft_s": _mean([c.get("ttft_s") for c in costs]),
            "decode_tok_s": _mean([c.get("decode_tok_s") for c in costs]),
            "peak_mem_bytes": max(peaks) if peaks else None,
            "samples": sum(_samples(r) for r in recs), "runs": len(recs),
            "chance": _chance(recs[0], cls_chance),
            "shared_prefill": any(c.get("prefill") == "shared" for c in costs),
            "decode_batch": max((c.get("decode_batch") or 1 for c in costs), default=1),
        })
    for row in rows:
        peers = [r for r in rows if r["model"] == row["model"] and r["task"] == row["task"]
                 and r["kv_label"] == "none"]
        base = next((r for r in peers if r["query_aware"] == row["query_aware"]), peers[0] if peers else None)
        row["none_score"] = base["score"] if base else None
        row["compression"] = (base["kv_bytes"] / row["kv_bytes"]
                              if base and base["kv_bytes"] and row["kv_bytes"] else None)
    order = {}
    for row in rows:
        order.setdefault(row["method"], len(order))
    rows.sort(key=lambda r: (r["model"], r["task"], r["kv_label"] != "none", order[r["method"]]))
    return rows


def _fmt(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _cells(row: dict[str, Any]) -> list[str]:
    flag = "†" if row["shared_prefill"] else ""
    score = _fmt(row["score"], ".3f")
    return [
        row["task"], row["method"], row["ratio"],
        f"{score} ({row['metric']})" if row["metric"] else score,
        _fmt(row["none_score"], ".3f"),
        _fmt(row["kv_bytes"] and row["kv_bytes"] / MB, ".2f"),
        f"{_fmt(row['compression'], '.2f')}x" if row["compression"] else "–",
        _fmt(row["ttft_s"], ".2f") + (flag if row["ttft_s"] is not None else ""),
        _fmt(row["decode_tok_s"], ".1f"),
        _fmt(row["peak_mem_bytes"] and row["peak_mem_bytes"] / MB, ".0f") + (flag if row["peak_mem_bytes"] else ""),
        str(row["samples"]), _fmt(row["chance"], ".3f"),
    ]


SHARED_NOTE = ("† from a shared prefill (answers exact, TTFT and peak memory not a real prefill's; measure "
               "them with --no-shared-prefill)")


def markdown_leaderboard(rows: list[dict[str, Any]]) -> str:
    """The leaderboard as markdown, one table per model."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        out += [f"### {model}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        out += ["| " + " | ".join(_cells(r)) + " |" for r in rows if r["model"] == model]
        out.append("")
    notes = ["score: the task's primary metric, mean over its runs; none score: the uncompressed model's on the "
             "same task; compression: uncompressed KV bytes / measured KV bytes."]
    if any(r["shared_prefill"] for r in rows):
        notes.append(SHARED_NOTE)
    return "\n".join(out + notes)


# ------------------------------------------------------------------------------------------------ needle cells
def needle_cells(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, float]]]:
    """``{(model, task name, method): [{"length", "depth", "score"}, ...]}`` from ``details["cells"]`` and from
    pass-key runs (one cell per run: its length, depth and accuracy). Repeated cells are averaged."""
    acc: dict[tuple[str, str, str], dict[tuple[float, float], list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        key = (rec["spec"]["model"], rec["spec"]["task"]["name"], method_key(rec))
        cells = (rec["result"].get("details") or {}).get("cells")
        if isinstance(cells, list):
            for c in cells:
                acc[key][(c["length"], c["depth"])].append(float(c["score"]))
        elif rec["spec"]["task"]["name"] == "passkey":
            p = rec["spec"]["task"]["params"]
            acc[key][(p["length"], p["depth"])].append(float(rec["result"]["metrics"]["accuracy"]))
    return {k: [{"length": ln, "depth": d, "score": statistics.fmean(v)} for (ln, d), v in sorted(cells.items())]
            for k, cells in acc.items()}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "x"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(cells: list[dict[str, float]], title: str, path: Path) -> Path:
    """PNG of a depth (rows) x length (columns) grid of scores in [0, 1], each cell annotated."""
    plt = _pyplot()
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    import numpy as np

    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["score"]
    fig, ax = plt.subplots(figsize=(max(3.8, 1.6 + 0.9 * len(lengths)), 1.6 + 0.5 * len(depths)))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(textwrap.fill(title, 40), fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def score_plot(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """PNG: score against measured KV MB (log) for one model's task, the uncompressed score and chance as lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    pts = [r for r in rows if r["score"] is not None and r["kv_bytes"]]
    markers = "os^vD<>ph*"
    for i, r in enumerate(pts):
        ax.scatter(r["kv_bytes"] / MB, r["score"], s=40, alpha=0.85, label=r["method"],
                   marker="s" if r["kv_label"] == "none" else markers[i % len(markers)])
    base = next((r["none_score"] for r in rows if r["none_score"] is not None), None)
    if base is not None:
        ax.axhline(base, color="grey", lw=0.8, ls="--", label="uncompressed")
    chance = next((r["chance"] for r in rows if r["chance"] is not None), None)
    if chance is not None:
        ax.axhline(chance, color="red", lw=0.8, ls=":", label="chance")
    if pts:
        ax.set_xscale("log")
    ax.set_xlabel("KV cache MB held (measured, log)")
    metric = rows[0]["metric"] if rows else ""
    ax.set_ylabel(f"{metric}" + ("" if not rows or rows[0]["higher_is_better"] else " (lower is better)"))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if pts or base is not None or chance is not None:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ html
def _html_table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows)
    return f'<table class="leaderboard">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>'


def write_leaderboard(records: list[dict[str, Any]], out_dir: str | Path) -> dict[str, Any]:
    """Write ``leaderboard.md``, one score-vs-KV-bytes PNG per (model, task), one needle heatmap PNG per
    (model, task, method) with cells, and ``index.html`` bundling them (images linked relatively).

    Returns ``{"markdown": path, "html": path, "plots": [paths], "heatmaps": [paths], "rows": rows}``.
    """
    out = Path(out_dir)
    img_dir = out / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = leaderboard_rows(records)
    plots, sections = [], []
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        parts = [f"<h2>{html.escape(model)}</h2>", _html_table(mrows)]
        for task in dict.fromkeys(r["task"] for r in mrows):
            trows = [r for r in mrows if r["task"] == task]
            path = score_plot(trows, f"{model}: {task}", img_dir / f"score_{_slug(model)}_{_slug(task)}.png")
            plots.append(path)
            parts.append(f'<figure><img src="img/{path.name}" alt="{html.escape(task)} score vs KV bytes">'
                         f"<figcaption>{html.escape(task)}: score vs measured KV bytes</figcaption></figure>")
        sections.append("\n".join(parts))
    heatmaps = []
    cells = needle_cells(records)
    if cells:
        sections.append("<h2>Needle heatmaps (depth x length)</h2>")
    for (model, task, method), cs in cells.items():
        path = heatmap(cs, f"{model} {task}: {method}",
                       img_dir / f"needle_{_slug(model)}_{_slug(task)}_{_slug(method)}.png")
        heatmaps.append(path)
        sections.append(f'<figure class="heatmap"><img src="img/{path.name}" alt="{html.escape(method)} needle '
                        f'heatmap"><figcaption>{html.escape(model)} {html.escape(task)}: '
                        f"{html.escape(method)}</figcaption></figure>")
    suites = markdown_suites(rows)
    if suites:
        sections.insert(0, f"<h2>Suites</h2>\n<pre>{html.escape(suites)}</pre>")
    md = out / "leaderboard.md"
    md.write_text((suites + "\n\n" if suites else "") + markdown_leaderboard(rows) + "\n")
    notes = html.escape(SHARED_NOTE) if any(r["shared_prefill"] for r in rows) else ""
    page = out / "index.html"
    page.write_text(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>lmcompress leaderboard</title>\n"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}th{background:#eee}"
        "td:nth-child(-n+2){text-align:left}"
        "figure{display:inline-block;margin:1em}</style></head>\n<body>\n<h1>lmcompress leaderboard</h1>\n"
        "<p>score: the task's primary metric (mean over its runs); none score: the uncompressed model's on the "
        f"same task; compression: uncompressed KV bytes / measured KV bytes. {notes}</p>\n"
        + "\n".join(sections) + "\n</body></html>\n")
    return {"markdown": md, "html": page, "plots": plots, "heatmaps": heatmaps, "rows": rows}
