"""Where one static decode step's time goes (8B shape, random bf16 weights, one GPU): CUDA kernels per step and
the sum of their durations (torch.profiler over eager static steps, the same kernels the graph replays) against
the replayed graph's step time. If kernel time << step time, the step is bound by per-kernel overhead (launch
gaps and tiny kernels), not by bytes.

    PYTHONPATH=src python benchmarks/step_profile.py --context 32768 --method snapkv:ratio=0.875 --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from lmcompress._compat import cache_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_gpu import build_model
from lmcompress.eval.graph_decode import StaticDecoder
from lmcompress.kv import CompressedCache
from lmcompress.kv.parse import parse_method


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--method", default="snapkv:ratio=0.875")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--fused", action="store_true", help="fused norms and decoder modules (lmcompress.fused)")
    ap.add_argument("--int4", action="store_true",
                    help="RTN 4-bit weights (W4A16 kernels tuned for M = 1 first, as decode_gpu.py does)")
    ap.add_argument("--slot-config", default=None,
                    help="JSON launch settings of the Triton slot attention (kv/kernels/slot_attention.CONFIG)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.slot_config:
        from lmcompress.kv.kernels import slot_attention

        slot_attention.CONFIG.update(json.loads(args.slot_config))
    if args.int4:
        from decode_gpu import int4_model

        model = int4_model(argparse.Namespace(layers=args.layers, cpu_smoke=False), torch.device("cuda"),
                           fused=args.fused)
    else:
        model = build_model(args.layers, False, torch.device("cuda"))
    if args.fused and not args.int4:
        from lmcompress.fused import fuse_decoder, fuse_rmsnorm

        fuse_rmsnorm(model)
        fuse_decoder(model)
    ids = torch.randint(100, 120000, (1, args.context), device="cuda")
    result = {"context": args.context, "method": args.method, "fused": args.fused, "int4": args.int4}
    for use_graph in (False, True):
        cache = CompressedCache(model, parse_method(args.method), reserve=80)
        first = model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
        dec = StaticDecoder(model, cache, 64, use_graph=use_graph)
        dec.start(first, args.context)
        dec.run(4)
        torch.cuda.synchronize()
        if not use_graph:
            steps = 5
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                dec.run(steps)
                torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            if not kernels:  # profilers that fold kernels into their launching ops
                kernels = [e for e in prof.events() if e.self_device_time_total > 0]
                dur = {id(e): e.self_device_time_total for e in kernels}
            else:
                dur = {id(e): e.time_range.elapsed_us() for e in kernels}
            total_us = sum(dur.values())
            names = Counter(e.name[:60] for e in kernels)
            by_time = Counter()
            for e in kernels:
                by_time[e.name[:60]] += dur[id(e)]
            result.update(kernels_per_step=len(kernels) / steps, kernel_ms_per_step=total_us / steps / 1e3,
                          top_by_time={k: round(v / steps, 1) for k, v in by_time.most_common(20)},
                          top_by_count={k: v / steps for k, v in names.most_common(20)})
        else:
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                dec.run(1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            result["graph_step_ms"] = statistics.median(times[5:]) * 1e3
        dec.close()
        del cache
        torch.cuda.empty_cache()
    result["overhead_us_per_kernel"] = (result["graph_step_ms"] - result["kernel_ms_per_step"]) * 1e3 / result[
        "kernels_per_step"]
    print(json.dumps(result, indent=1))
    Path(args.out, f"step_profile{'_int4' if args.int4 else ''}{'_fused' if args.fused else ''}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
