"""CAKE against uniform per-layer budgets at the same total KV budget, on the default model.

For each ratio r, every spec keeps ``n - floor(r n)`` tokens per layer on average (the same total): SnapKV keeps
it in every layer, PyramidKV shifts it to the lower layers by a fixed pyramid, CAKE by measured layer
preferences (cascading). Quality: perplexity of ``--eval`` tokens of held-out news text continued after a
``--context``-token compressed prefix (the Perplexity task). Also recorded: each CAKE layer's kept count.

    PYTHONPATH=src python benchmarks/cake_vs_uniform.py --out out/cake_vs_uniform
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from lmcompress._compat import cache_kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/cake_vs_uniform")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.75, 0.9])
    parser.add_argument("--context", type=int, default=1536)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--source", default="lee-test")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from lmcompress.eval.tasks.base import RunContext
    from lmcompress.eval.tasks.perplexity import Perplexity, text_token_ids
    from lmcompress.kv import CompressedCache, KVSpec
    from lmcompress.kv.evict import CAKE, PyramidKV, SnapKV
    from lmcompress.models import load_model

    torch.set_grad_enabled(False)
    model, tok = load_model(args.model)
    task = Perplexity(source=args.source, context_tokens=args.context, eval_tokens=args.eval)
    rows = []
    specs = [("none", 0.0, None)]
    for r in args.ratios:
        specs += [("snapkv", r, SnapKV(ratio=r)), ("pyramidkv", r, PyramidKV(ratio=r)), ("cake", r, CAKE(ratio=r))]
    for name, ratio, policy in specs:
        spec = KVSpec(evict=policy)
        result = task.run(RunContext(model, tok, spec, args.model))
        row = {"method": name, "ratio": ratio, "perplexity": result.metrics["perplexity"],
               "kv_bytes": result.costs.get("kv_bytes")}
        if name in ("cake", "pyramidkv"):  # the per-layer split after the prefix
            prefix = text_token_ids(tok, args.source)[: args.context].unsqueeze(0)
            cache = CompressedCache(model, spec)
            model(prefix, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
            row["held_per_layer"] = cache.held_tokens()
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cake_vs_uniform.json").write_text(json.dumps(rows, indent=1))
    lines = ["| method | ratio | perplexity | KV MB |", "|---|---|---|---|"]
    for r in rows:
        kv = f"{r['kv_bytes'] / 1e6:.1f}" if r.get("kv_bytes") else "-"
        lines.append(f"| {r['method']} | {r['ratio']} | {r['perplexity']:.2f} | {kv} |")
    (out / "cake_vs_uniform.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
