"""Where a 32k prefill's time goes with and without a prompt-time eviction policy (8B shape, random bf16 weights,
fused model, one GPU): CUDA time per operator (torch.profiler, one profiled prefill after a warm-up), so that
the TTFT cost of compression (BENCHMARKS.md section 5, repeated TTFT) can be placed.

    PYTHONPATH=src python benchmarks/prefill_profile.py --context 32768 --methods none snapkv:ratio=0.875 --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_gpu import build_model, fuse
from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache
from lmcompress.kv.parse import parse_method


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--methods", nargs="+", default=["none", "snapkv:ratio=0.875"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    model = build_model(args.layers, False, torch.device("cuda"))
    fuse(model)
    ids = torch.randint(100, 120000, (1, args.context), device="cuda")
    result = {"context": args.context}
    for method in args.methods:
        for profiled in (False, True):
            cache = CompressedCache(model, parse_method(method), reserve=1)
            torch.cuda.synchronize()
            if not profiled:
                model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
                continue
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
            rows = []
            for ev in prof.key_averages():
                dev = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
                if dev > 0:
                    rows.append((ev.key[:70], round(dev / 1e3, 3), ev.count))
            rows.sort(key=lambda r: -r[1])
            result[method] = {"device_ms_total": round(sum(r[1] for r in rows), 2), "top": rows[: args.top]}
            print(method, json.dumps(result[method], indent=0), flush=True)
        del cache
        torch.cuda.empty_cache()
    Path(args.out, "prefill_profile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
