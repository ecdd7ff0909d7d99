"""Suite tables: one row per method over a task group's members (RULER-style: the mean of the member scores),
the way published leaderboards show a suite, built from :func:`lmcompress.runner.leaderboard.leaderboard_rows`.

A row averages the member tasks the store holds for that method; its ``none`` mean is over the same members, so a
method with fewer finished tasks is compared on those only (the ``tasks`` column says how many). KV bytes, TTFT
and decode rate are means over the members too; ``compression`` = the uncompressed mean bytes / the method's.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

MB = 1024 * 1024


def _group_of(task_name: str) -> str:
    from ..registry import TASKS

    if task_name not in TASKS:
        return ""
    return getattr(TASKS.get(task_name), "group", "") or ""


def _suffix(task: str) -> str:
    return task.split("@", 1)[1] if "@" in task else ""


def suite_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``{model, suite, method, ratio, tasks, scores: {task: score}, mean, none_mean, kv_bytes, compression,
    ttft_s, decode_tok_s, decode_batch, samples}`` per (model, group@length, method), in the rows' order."""
    members: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        group = _group_of(row["task_name"])
        if group and row["score"] is not None:
            suite = f"{group}@{_suffix(row['task'])}" if _suffix(row["task"]) else group
            members[(row["model"], suite, row["method"])].append(row)
    out = []
    for (model, suite, method), rs in members.items():
        base = {r["task"]: r for r in rows if r["model"] == model and r["kv_label"] == "none"
                and r["query_aware"] == rs[0]["query_aware"] and r["score"] is not None}
        tasks = [r["task"] for r in rs]
        none_scores = [base[t]["score"] for t in tasks if t in base]
        none_bytes = [base[t]["kv_bytes"] for t in tasks if t in base and base[t]["kv_bytes"]]
        kv = [r["kv_bytes"] for r in rs if r["kv_bytes"]]
        kv_mean = statistics.fmean(kv) if kv else None
        ttft = [r["ttft_s"] for r in rs if r["ttft_s"] is not None]
        dec = [r["decode_tok_s"] for r in rs if r["decode_tok_s"] is not None]
        out.append({
            "model": model, "suite": suite, "method": method, "ratio": rs[0]["ratio"], "tasks": len(rs),
            "scores": {r["task_name"]: r["score"] for r in rs},
            "mean": statistics.fmean(r["score"] for r in rs),
            "none_mean": statistics.fmean(none_scores) if len(none_scores) == len(tasks) else None,
            "kv_bytes": kv_mean,
            "compression": (statistics.fmean(none_bytes) / kv_mean
                            if kv_mean and len(none_bytes) == len(tasks) else None),
            "ttft_s": statistics.fmean(ttft) if ttft else None,
            "decode_tok_s": statistics.fmean(dec) if dec else None,
            "decode_batch": max(r.get("decode_batch") or 1 for r in rs),
            "samples": sum(r["samples"] for r in rs),
            "shared_prefill": any(r["shared_prefill"] for r in rs),
        })
    return out


def _f(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown_suites(rows: list[dict[str, Any]]) -> str:
    """One table per (model, suite): method, ratio, mean score beside the uncompressed mean, KV MB, compression,
    TTFT, decode rate, samples, then every member's score. Empty when no group task is stored."""
    srows = suite_rows(rows)
    out: list[str] = []
    for model, suite in dict.fromkeys((r["model"], r["suite"]) for r in srows):
        these = [r for r in srows if r["model"] == model and r["suite"] == suite]
        names = list(dict.fromkeys(n for r in these for n in r["scores"]))
        head = ["method", "ratio", "tasks", "mean score", "none mean", "KV MB", "compression", "TTFT s",
                "decode tok/s", "samples", *names]
        out += [f"### {model}: {suite} (mean over member tasks)", "", "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head)]
        for r in these:
            dec = _f(r["decode_tok_s"], ".1f") + ("‡" if r["decode_batch"] > 1 and r["decode_tok_s"] else "")
            ttft = _f(r["ttft_s"], ".2f") + ("†" if r["shared_prefill"] and r["ttft_s"] is not None else "")
            cells = [r["method"], r["ratio"], str(r["tasks"]), _f(r["mean"], ".1f"), _f(r["none_mean"], ".1f"),
                     _f(r["kv_bytes"] and r["kv_bytes"] / MB, ".1f"),
                     f"{_f(r['compression'], '.2f')}x" if r["compression"] else "–", ttft, dec, str(r["samples"]),
                     *(_f(r["scores"].get(n), ".1f") for n in names)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    if srows:
        out.append("none mean: the uncompressed model's mean over the same member tasks. KV MB: bytes held after the "
                   "prompt, mean over the members.")
        if any(r["decode_batch"] > 1 for r in srows):
            out.append("‡ answers decoded as a batch (answer_batch): a sample's rate inside the batch, not alone.")
        if any(r["shared_prefill"] for r in srows):
            out.append("† from a shared prefill: TTFT is not a real prefill's.")
    return "\n".join(out)
