"""Reports of stored runs: a summary per (model, KV spec), a markdown table, ``results.json`` and a PNG plot.

Summary columns: pass-key accuracy over every (length, depth) cell; perplexity; KV bytes, TTFT and peak
memory at the longest pass-key length; decode tokens/s averaged over pass-key runs (without pass-key runs: those
costs over the other tasks' runs at their longest length); and the provenance of the
row's runs: dtype, device and lmcompress code version (a code version other than the current one is marked
``(stale)``: the row was reused with ``--reuse-stale``).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .leaderboard import display_label

MB = 1024 * 1024


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _joined(values: list[str]) -> str:
    return ",".join(dict.fromkeys(values))  # unique, first-seen order


def _code_label(rec: dict[str, Any]) -> str:
    return rec["code_version"] + (" (stale)" if rec.get("stale") else "")


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, dtype, device type, KV spec label), in first-seen order."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        dev_type = rec.get("provenance", {}).get("device_type", rec["device"])
        groups[(rec["spec"]["model"], rec["dtype"], dev_type, display_label(rec))].append(rec)
    rows = []
    for (model, dtype, _dev_type, label), recs in groups.items():
        kv = recs[0]["spec"]["kv"]
        evict, quant = kv.get("evict") or {}, kv.get("quant") or {}
        pk = [r for r in recs if r["spec"]["task"]["name"] == "passkey"]
        ppl = [r for r in recs if r["spec"]["task"]["name"] == "perplexity"]
        row: dict[str, Any] = {
            "model": model,
            "weights": recs[0]["spec"].get("weights"),  # 4-bit checkpoint format, None for float weights
            "label": label,
            "evict": evict.get("method", "none") if evict else "none",
            "ratio": evict.get("ratio") if evict else 0.0,
            "budget": evict.get("budget") if evict else None,
            "quant": (f"{quant['method']}{quant.get('bits', '')}" if quant else "none"),
            "accuracy": None, "cells": len(pk), "perplexity": None,
            "kv_bytes": None, "length": None, "ttft_s": None, "decode_tok_s": None,
            "peak_mem_bytes": None, "mem_source": None,
            "dtype": dtype, "device": _joined([r["device"] for r in recs]),
            "code_version": _joined([_code_label(r) for r in recs]), "stale": any(r.get("stale") for r in recs),
        }
        if pk:
            longest = max(r["spec"]["task"]["params"]["length"] for r in pk)
            at_max = [r for r in pk if r["spec"]["task"]["params"]["length"] == longest]
            row.update(
                accuracy=_mean([r["result"]["metrics"]["accuracy"] for r in pk]),
                length=longest,
                kv_bytes=_mean([r["result"]["costs"]["kv_bytes"] for r in at_max]),
                ttft_s=_mean([r["result"]["costs"]["ttft_s"] for r in at_max]),
                decode_tok_s=_mean([r["result"]["costs"]["decode_tok_s"] for r in pk]),
                peak_mem_bytes=max(r["result"]["costs"]["peak_mem_bytes"] for r in at_max),
                mem_source=pk[0]["result"]["costs"]["mem_source"],
            )
        other = [r for r in recs if r["spec"]["task"]["name"] not in ("passkey", "perplexity")
                 and (r["result"].get("costs") or {}).get("kv_bytes") is not None]
        if not pk and other:  # no pass-key runs (e.g. --tasks ruler): the costs of the other tasks' runs
            longest = max((r["spec"]["task"]["params"].get("length") or 0 for r in other), default=0)
            at_max = [r for r in other if (r["spec"]["task"]["params"].get("length") or 0) == longest]
            costs = [r["result"]["costs"] for r in at_max]
            peaks = [c["peak_mem_bytes"] for c in costs if c.get("peak_mem_bytes") is not None]
            row.update(
                length=longest or None, kv_bytes=_mean([c["kv_bytes"] for c in costs]),
                ttft_s=_mean([c.get("ttft_s") for c in costs]), decode_tok_s=_mean([c.get("decode_tok_s") for c in costs]),
                peak_mem_bytes=max(peaks) if peaks else None, mem_source=costs[0].get("mem_source"),
            )
        row["shared_prefill"] = any((r["result"].get("costs") or {}).get("prefill") == "shared" for r in recs)
        if ppl:
            row["perplexity"] = _mean([r["result"]["metrics"]["perplexity"] for r in ppl])
            row["ppl_kv_bytes"] = _mean([r["result"]["costs"]["kv_bytes"] for r in ppl])
        rows.append(row)
    for setting in {(r["model"], r["dtype"], r["device"]) for r in rows}:
        base = next((r for r in rows if (r["model"], r["dtype"], r["device"]) == setting and r["label"] == "none"),
                    None)
        for r in rows:
            if (r["model"], r["dtype"], r["device"]) == setting and base and base["kv_bytes"] and r["kv_bytes"]:
                r["kv_fraction"] = r["kv_bytes"] / base["kv_bytes"]
    return rows


def needle_grid(records: list[dict[str, Any]]) -> dict[str, dict[int, dict[float, float]]]:
    """``{kv_label: {length: {depth: accuracy}}}`` of pass-key runs (``"model | kv_label"`` keys when the runs
    are of several models)."""
    grid: dict[str, dict[int, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    several = len({rec["spec"].get("model") for rec in records}) > 1
    for rec in records:
        if rec["spec"]["task"]["name"] != "passkey":
            continue
        p = rec["spec"]["task"]["params"]
        label = f"{rec['spec'].get('model')} | {display_label(rec)}" if several else display_label(rec)
        grid[label][p["length"]][p["depth"]] = rec["result"]["metrics"]["accuracy"]
    return {k: dict(v) for k, v in grid.items()}


def _fmt(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The summary as a markdown table."""
    mem_note = rows[0].get("mem_source") if rows else None
    head = ("| model | method | ratio | quant | retrieval acc | perplexity | KV MB @len | KV vs none | "
            "TTFT s @len | decode tok/s | peak MB | dtype | device | code |")
    lines = [head, "|" + "---|" * 14]

    def mark(r: dict[str, Any]) -> str:
        return "†" if r.get("shared_prefill") and r["ttft_s"] is not None else ""

    for r in rows:
        ratio = f"budget {r['budget']}" if r.get("budget") else _fmt(r["ratio"], ".2f")
        kv = f"{_fmt(r['kv_bytes'] and r['kv_bytes'] / MB, '.1f')} @{r['length'] or '–'}"
        model = r["model"] + (f" [{r['weights']}]" if r.get("weights") else "")
        lines.append(
            f"| {model} | {r['evict']} | {ratio} | {r['quant']} | "
            f"{_fmt(r['accuracy'], '.2f')} ({r['cells']}) | {_fmt(r['perplexity'], '.2f')} | {kv} | "
            f"{_fmt(r.get('kv_fraction'), '.3f')} | {_fmt(r['ttft_s'], '.2f')}{mark(r)} | "
            f"{_fmt(r['decode_tok_s'], '.1f')} | "
            f"{_fmt(r['peak_mem_bytes'] and r['peak_mem_bytes'] / MB, '.0f')}{mark(r)} | "
            f"{r['dtype']} | {r['device']} | {r['code_version']} |"
        )
    if mem_note:
        lines.append("")
        lines.append(f"peak MB: {mem_note} (growth over the run); retrieval acc: mean over cells (count in brackets).")
    if any(r.get("stale") for r in rows):
        lines.append("")
        lines.append("(stale): reused with --reuse-stale; computed by another lmcompress code version than this one.")
    if any(r.get("shared_prefill") for r in rows):
        from .leaderboard import SHARED_NOTE

        lines.append("TTFT and peak MB of the runs marked † " + SHARED_NOTE.removeprefix("† "))
    return "\n".join(lines)


def grid_text(grid: dict[str, dict[int, dict[float, float]]]) -> str:
    """Per-method needle grids (rows: lengths, columns: depths)."""
    out = []
    for label, by_len in grid.items():
        depths = sorted({d for row in by_len.values() for d in row})
        out.append(f"{label}: " + "  ".join(
            f"{length}:[" + " ".join(_fmt(by_len[length].get(d), ".0f") for d in depths) + "]"
            for length in sorted(by_len)
        ) + f"  (depths {', '.join(f'{d:g}' for d in depths)})")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """PNG: retrieval accuracy (left) and perplexity (right) against KV bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, ylabel, xkey in (
        (axes[0], "accuracy", "pass-key retrieval accuracy", "kv_bytes"),
        (axes[1], "perplexity", "perplexity (lower is better)", "ppl_kv_bytes"),
    ):
        pts = [r for r in rows if r.get(metric) is not None and r.get(xkey)]
        for r in pts:
            ax.scatter(r[xkey] / MB, r[metric], s=40)
            ax.annotate(r["label"], (r[xkey] / MB, r[metric]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("KV cache MB held (log)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if rows:
        fig.suptitle(f"{rows[0]['model']}: KV compression trade-off", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(records: list[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``report.md``, ``kv_tradeoff.png`` and the leaderboard (``leaderboard.md``,
    ``index.html``, ``img/*.png``: :mod:`lmcompress.runner.leaderboard`) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    grid = needle_grid(records)
    paths = {"json": out / "results.json", "markdown": out / "report.md", "plot": out / "kv_tradeoff.png"}
    paths["json"].write_text(json.dumps({"summary": rows, "needle_grid": grid, "runs": records}, indent=1,
                                        default=str))
    paths["markdown"].write_text(markdown_table(rows) + "\n\nNeedle grids (accuracy):\n\n```\n"
                                 + grid_text(grid) + "\n```\n")
    plot(rows, paths["plot"])
    from .leaderboard import write_leaderboard

    board = write_leaderboard(records, out)  # any task: method x ratio x task table, plots, heatmaps, HTML
    paths["leaderboard"], paths["html"] = board["markdown"], board["html"]
    return paths
