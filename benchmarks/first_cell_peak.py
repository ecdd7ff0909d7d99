"""Peak memory of the first cell after a model load against the same-shaped cells after it, with and without the
executors' warm-up, inline and in a local worker process (issue 9, item 7).

Each configuration runs in a fresh interpreter (the warm-up's effect is process-wide), on a fresh store, over
``--cells`` ``decode_cost`` cells that differ only in the seed of their random prompt (same shapes, same work).

    python benchmarks/first_cell_peak.py [--model smollm2-135m] [--length 1024] [--cells 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    from lmcompress.eval.tasks import DecodeCost
    from lmcompress.kv import KVSpec
    from lmcompress.runner.executors import InlineExecutor
    from lmcompress.runner.parallel import LocalExecutor
    from lmcompress.runner.spec import RunSpec
    from lmcompress.runner.store import ResultStore

    runs = [RunSpec(args.model, KVSpec(), DecodeCost(length=args.length, new_tokens=16, seed=s))
            for s in range(args.cells)]
    with tempfile.TemporaryDirectory() as d, ResultStore(Path(d) / "s.sqlite") as store:
        if args.executor == "inline":
            ex = InlineExecutor(progress=False, warmup=args.warmup == "on")
        else:
            ex = LocalExecutor(["cpu"], progress=False, warmup=args.warmup == "on")
        records = ex.run(runs, store)
    print(json.dumps([r["result"]["costs"]["peak_mem_bytes"] for r in records]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--cells", type=int, default=4)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--executor", default="inline", help=argparse.SUPPRESS)
    p.add_argument("--warmup", default="on", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    print(f"{args.model}, decode_cost length {args.length}, {args.cells} cells; peak MB (cpu_rss_sampled) per cell")
    print("| executor | warm-up | first cell | later cells |\n|---|---|---|---|")
    for executor in ("inline", "local"):
        for warmup in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--length",
                                  str(args.length), "--cells", str(args.cells), "--executor", executor,
                                  "--warmup", warmup], capture_output=True, text=True, check=True)
            peaks = [x / 1e6 for x in json.loads(out.stdout.strip().splitlines()[-1])]
            print(f"| {executor} | {warmup} | {peaks[0]:.1f} | {', '.join(f'{x:.1f}' for x in peaks[1:])} |",
                  flush=True)


if __name__ == "__main__":
    main()
