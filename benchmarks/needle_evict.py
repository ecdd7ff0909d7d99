"""Pass-key retrieval (needle in a haystack) under every eviction method, with KV bytes and peak memory.

For each method x ratio x mode (query-agnostic: the context is compressed before the question is seen;
query-aware: context and question are compressed together) x length x depth, one pass-key prompt is answered
by the default model through the evaluation pipeline. Results are appended to ``OUT/needle.jsonl`` as they
come (a rerun skips finished cells) and summarised in ``OUT/needle.md``. ``--cake-vs-uniform`` adds CAKE
against the uniform-budget SnapKV at the same total budget (both keep ``n - floor(r n)`` tokens per layer on
average; CAKE shifts them between layers).

    PYTHONPATH=src python benchmarks/needle_evict.py --out out/needle \
        --lengths 1024 2048 --ratios 0.5 0.75 0.9 --modes agnostic aware
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

METHODS = ("random", "streaming_llm", "knorm", "keydiff", "snapkv", "pyramidkv", "tova", "expected_attention",
           "h2o", "observed_attention", "adakv_snapkv", "cake")


def policy_for(method: str, ratio: float):
    from lmcompress.kv import evict

    simple = {
        "random": evict.Random, "streaming_llm": evict.StreamingLLM, "knorm": evict.Knorm,
        "keydiff": evict.KeyDiff, "snapkv": evict.SnapKV, "pyramidkv": evict.PyramidKV, "tova": evict.TOVA,
        "expected_attention": evict.ExpectedAttention, "h2o": evict.H2O,
        "observed_attention": evict.ObservedAttention,
    }
    if method == "none":
        return None
    if method in simple:
        return simple[method](ratio=ratio)
    if method == "adakv_snapkv":
        return evict.AdaKV(base=evict.SnapKV(ratio=ratio))
    if method == "cake":
        return evict.CAKE(ratio=ratio)
    if method == "cake_oneshot":
        return evict.CAKE(ratio=ratio, cascading=False)
    raise SystemExit(f"unknown method {method}")


def configs(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(method, ratio) pairs in run order: the baseline, then ``--configs`` or every method x ratio."""
    if args.configs:
        pairs = []
        for item in args.configs:
            method, _, ratio = item.partition(":")
            pairs.append((method, float(ratio)))
    else:
        pairs = [(m, r) for r in args.ratios for m in args.methods]
    return [("none", 0.0), *pairs]


def cells(args: argparse.Namespace):
    """Config-major order, so that an interrupted run leaves whole configurations."""
    for method, ratio in configs(args):
        for length in args.lengths:
            for depth in args.depths:
                for mode in args.modes:
                    yield {"method": method, "ratio": ratio, "mode": mode, "length": length, "depth": depth}


def cell_key(cell: dict) -> str:
    return f"{cell['method']}|{cell['ratio']}|{cell['mode']}|{cell['length']}|{cell['depth']}"


def summarise(records: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["ratio"], r["mode"]), []).append(r)
    base_bytes = {}
    for r in records:
        if r["method"] == "none":
            base_bytes[(r["mode"], r["length"], r["depth"])] = r["kv_bytes"]
    lines = ["| method | ratio | mode | found | cells | lengths | KV bytes vs none | mean KV MB | peak MB (max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (method, ratio, mode), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "none", kv[0])):
        found = sum(r["correct"] for r in rs)
        rel = [r["kv_bytes"] / base_bytes[(mode, r["length"], r["depth"])] for r in rs
               if (mode, r["length"], r["depth"]) in base_bytes]
        lengths = ",".join(str(x) for x in sorted({r["length"] for r in rs}))
        lines.append(
            f"| {method} | {ratio} | {mode} | {found} | {len(rs)} | {lengths} | "
            f"{sum(rel) / len(rel):.3f} | {sum(r['kv_bytes'] for r in rs) / len(rs) / 1e6:.1f} | "
            f"{max(r['peak_mem_bytes'] for r in rs) / 1e6:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/needle")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096])
    parser.add_argument("--depths", nargs="+", type=float, default=[0.05, 0.5, 0.95])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    parser.add_argument("--modes", nargs="+", choices=["agnostic", "aware"], default=["agnostic", "aware"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--configs", nargs="+", help="method:ratio pairs to run instead of methods x ratios")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()

    from lmcompress.eval.tasks.base import RunContext
    from lmcompress.eval.tasks.passkey import Passkey
    from lmcompress.kv import KVSpec
    from lmcompress.models import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "needle.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done[cell_key(r)] = r
    if not args.summary_only:
        torch.set_grad_enabled(False)
        model, tok = load_model(args.model)
        with path.open("a") as f:
            for cell in cells(args):
                if cell_key(cell) in done:
                    continue
                spec = KVSpec(evict=policy_for(cell["method"], cell["ratio"]))
                task = Passkey(length=cell["length"], depth=cell["depth"], samples=1,
                               query_aware=cell["mode"] == "aware")
                t0 = time.time()
                result = task.run(RunContext(model, tok, spec, args.model))
                sample = result.details["samples"][0]
                record = {**cell, "correct": bool(sample["correct"]), "answer": sample["answer"],
                          "key": sample["key"], "kv_bytes": result.costs["kv_bytes"],
                          "peak_mem_bytes": result.costs["peak_mem_bytes"],
                          "mem_source": result.costs["mem_source"],
                          "prompt_tokens": result.costs["prompt_tokens"], "ttft_s": result.costs["ttft_s"],
                          "held_tokens": sample["held_tokens"], "seconds": time.time() - t0}
                f.write(json.dumps(record) + "\n")
                f.flush()
                done[cell_key(record)] = record
                print(f"{cell_key(record)}: {'found' if record['correct'] else 'missed'} "
                      f"({record['answer']!r}), {record['kv_bytes'] / 1e6:.1f} MB, {record['seconds']:.1f}s",
                      flush=True)
    table = summarise(list(done.values()))
    (out / "needle.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
