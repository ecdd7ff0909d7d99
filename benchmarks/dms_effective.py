"""Measured effective compression of a DMS checkpoint: prefill ``--tokens`` tokens of Lee-corpus text (one window
per ``--windows``, consecutive) with ``dms`` (and optionally ``dms+QUANT``) and report, after the prefill,

* held tokens / total: the tokens every (layer, KV head) still stores, summed, over ``layers x kv_heads x tokens``
  (the window's last ``dms_window_size`` tokens are always held);
* ``nbytes`` over the uncompressed cache's ``nbytes`` of the same tokens (same model, ``none``), and the resulting
  compression ``none / dms``;
* per layer, the held fraction (min / mean / max over KV heads).

A Markdown table on stdout, JSON in ``--out``.

    PYTHONPATH=src python benchmarks/dms_effective.py /work/artifacts/s6/dms-smollm2-4x --tokens 1024 --windows 2 \
        --specs dms,dms+kivi2 --out out/dms_effective.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="DMS checkpoint folder")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--specs", default="dms", help="comma-separated specs using dms (default dms)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from lmcompress._compat import cache_kwargs
    from lmcompress.eval.tasks.perplexity import text_token_ids
    from lmcompress.kv import CompressedCache, scoring_hooks
    from lmcompress.kv.evict.dms_load import load_dms_model
    from lmcompress.kv.parse import parse_method

    model, tokenizer, settings = load_dms_model(args.folder, quiet=True)
    ids = text_token_ids(tokenizer, "lee")
    rows = []
    for w in range(args.windows):
        window = ids[w * args.tokens : (w + 1) * args.tokens].unsqueeze(0)
        base = CompressedCache(model, parse_method("none"))
        with torch.inference_mode():
            model(window, **cache_kwargs(base))
        for text in [s.strip() for s in args.specs.split(",") if s.strip()]:
            cache = CompressedCache(model, parse_method(text))
            with torch.inference_mode(), scoring_hooks(model, cache):
                model(window, **cache_kwargs(cache))
            per_head = [c[0].float() for c in cache.held_per_head()]  # per layer [Hkv]
            held = float(sum(h.sum() for h in per_head))
            total = len(per_head) * per_head[0].numel() * args.tokens
            rows.append({
                "window": w, "spec": text, "tokens": args.tokens, "held_fraction": held / total,
                "nbytes": cache.nbytes, "none_nbytes": base.nbytes, "compression": base.nbytes / cache.nbytes,
                "layers": [{"min": float(h.min()) / args.tokens, "mean": float(h.mean()) / args.tokens,
                            "max": float(h.max()) / args.tokens} for h in per_head],
            })
    print(f"settings: {settings.to_config()}")
    print("| window | spec | tokens | held / total | nbytes MB | none MB | compression (bytes) | layer held min-max |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo = min(x["mean"] for x in r["layers"])
        hi = max(x["mean"] for x in r["layers"])
        print(f"| {r['window']} | {r['spec']} | {r['tokens']} | {r['held_fraction']:.3f} | {r['nbytes'] / 2**20:.2f} | "
              f"{r['none_nbytes'] / 2**20:.2f} | {r['compression']:.2f}x | {lo:.2f}-{hi:.2f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"folder": args.folder, "settings": settings.to_config(), "rows": rows},
                                             indent=1))


if __name__ == "__main__":
    main()
