"""CPU decode speed over packed KV caches (issue 15, item 4): tokens/s after a ``--tokens``-long prefill for the
uncompressed cache and packed INT4 / KIVI-2 caches, in the same process, interleaved, repeated ``--repeats``
times (medians reported).

Each packed method runs three times: through the codes-level CPU path with the fused C kernel (the default where a
compiler built it, ``kv/kernels/cpu_fused.py``), through the same path's torch products
(``LMCOMPRESS_NO_NATIVE=1``) and through the block-wise dequantize-then-attend reference
(``LMCOMPRESS_NO_KERNELS=1``), so the table shows what each step changes. Reported per row: wall-clock tokens/s
and CPU-time tokens/s (``time.process_time``: CPU time of all the process's threads, less sensitive to other jobs
on a shared machine than wall time), the OMP thread count and the 1-minute load average before and after the
row.

Usage (repository root)::

    PYTHONPATH=src python benchmarks/cpu_decode_packed.py --tokens 2048 --new 16 --repeats 3 --out results/cpu_decode.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmcompress._compat import cache_kwargs  # noqa: E402
from lmcompress.kv import CompressedCache  # noqa: E402
from lmcompress.kv.parse import parse_method  # noqa: E402
from lmcompress.models import load_model  # noqa: E402

METHODS = ("none", "int4", "kivi2")


PATHS = {"fused": {}, "torch": {"LMCOMPRESS_NO_NATIVE": "1"}, "reference": {"LMCOMPRESS_NO_KERNELS": "1"}}


def decode_rate(model, method: str, ids: torch.Tensor, new: int, path: str) -> dict:
    """Prefill ``ids: [1, T]`` into a fresh cache for ``method``, decode ``new`` greedy tokens (two warm-up steps
    first) through ``path`` (``fused``: the C kernel where it reads the format, ``torch``: the torch codes path,
    ``reference``: dequantize-then-attend); returns wall and CPU-time tokens/s and the cache's bytes."""
    for env in PATHS.values():
        for k in env:
            os.environ.pop(k, None)
    os.environ.update(PATHS[path])
    try:
        cache = CompressedCache(model, parse_method(method), reserve=new + 4)
        with torch.no_grad():
            logits = model(input_ids=ids, **cache_kwargs(cache)).logits[:, -1:]
            nxt = logits.argmax(-1)
            for _ in range(2):
                nxt = model(input_ids=nxt, **cache_kwargs(cache)).logits.argmax(-1)
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(new):
                nxt = model(input_ids=nxt, **cache_kwargs(cache)).logits.argmax(-1)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        for k in ("LMCOMPRESS_NO_KERNELS", "LMCOMPRESS_NO_NATIVE"):
            os.environ.pop(k, None)
    return {"wall_tok_s": new / wall, "cpu_tok_s": new / cpu, "kv_bytes": cache.nbytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-reference", action="store_true", help="skip the dequantize-then-attend rows")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "cpu_decode.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model("smollm2-135m", quiet=True)
    ids = torch.randint(0, 49152, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    methods = args.methods.split(",")
    rows = [(m, "fused") for m in methods] + [(m, "torch") for m in methods if m != "none"]
    if not args.no_reference:
        rows += [(m, "reference") for m in methods if m != "none"]
    results: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for method, path in rows:
            label = method if path == "fused" or method == "none" else f"{method} ({path})"
            load0 = os.getloadavg()[0]
            r = decode_rate(model, method, ids, args.new, path)
            r.update(label=label, repeat=rep, load_before=load0, load_after=os.getloadavg()[0])
            results.setdefault(label, []).append(r)
            print(json.dumps(r), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    base_wall = statistics.median(r["wall_tok_s"] for r in results["none"]) if "none" in results else None
    base_cpu = statistics.median(r["cpu_tok_s"] for r in results["none"]) if "none" in results else None
    print(f"\ntokens={args.tokens} new={args.new} repeats={args.repeats} OMP threads={torch.get_num_threads()}")
    print("| method | wall tok/s (median) | x none | CPU-time tok/s (median) | x none | KV bytes | load avg (1 min) |")
    print("|---|---|---|---|---|---|---|")
    with args.out.open("a") as f:
        for label, rs in results.items():
            wall = statistics.median(r["wall_tok_s"] for r in rs)
            cpu = statistics.median(r["cpu_tok_s"] for r in rs)
            loads = [x for r in rs for x in (r["load_before"], r["load_after"])]
            row = {"label": label, "tokens": args.tokens, "new": args.new, "threads": torch.get_num_threads(),
                   "wall_tok_s": wall, "cpu_tok_s": cpu, "kv_bytes": rs[0]["kv_bytes"],
                   "load_min": min(loads), "load_max": max(loads), "repeats": len(rs)}
            f.write(json.dumps(row) + "\n")
            xw = f"{wall / base_wall:.2f}x" if base_wall else "-"
            xc = f"{cpu / base_cpu:.2f}x" if base_cpu else "-"
            print(f"| {label} | {wall:.2f} | {xw} | {cpu:.2f} | {xc} | {rs[0]['kv_bytes'] / 1e6:.1f} MB | "
                  f"{min(loads):.1f}-{max(loads):.1f} |")


if __name__ == "__main__":
    main()
