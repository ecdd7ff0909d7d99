"""Decode attention over a packed 2-/4-bit KV cache (Triton kernel) against torch SDPA over the bf16 cache.

One layer of a Llama-3.1-8B-shaped decode step: query ``[B, 32, 1, 128]``, K/V ``[B, 8, T, 128]``, GQA inside
SDPA (``enable_gqa=True``). For each context ``T`` (8k, 32k, 128k) and batch (1, 8):

* ``sdpa-bf16``: ``scaled_dot_product_attention`` over the bf16 cache;
* ``kernel-<fmt>``: the split-sequence Triton kernel reading the packed cache (+ its combine kernel), in the
  launch configuration the dispatch uses (``decode.choose_config``), and at half and twice its split count;
* ``dequant+sdpa-<fmt>``: what transformers' QuantizedCache does each step: dequantize the whole cache to bf16
  with torch ops, then SDPA.

Formats: ``kivi2``/``kivi4`` (keys per channel over 32 tokens, values per token over 32 channels, fp16
scale+zero), ``int2`` (keys and values per token, groups of 32 channels). Correctness first: each kernel's
output is compared with fp32 attention over the dequantized cache (relative error = max abs diff / max abs ref).
Timings are ``triton.testing.do_bench`` medians of each path replayed from a CUDA graph (no Python or launch
overhead in the figure, as in a graph-captured decode loop), with do_bench's L2 flush before every call. Bytes moved count what each path must read (codes, scales,
zeros, query); effective GB/s = bytes / time.

Usage: ``PYTHONPATH=src python benchmarks/gpu_kv_attention.py --out DIR`` (about 3 minutes on an H100); writes
``DIR/gpu_kv_attention.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmcompress.kv.kernels import decode, pack  # noqa: E402
from lmcompress.kv.quant.uniform import UniformCodec  # noqa: E402

HQ, HKV, D = 32, 8, 128
FORMATS = {
    "kivi2": dict(bits=2, key_gran="channel"),
    "kivi4": dict(bits=4, key_gran="channel"),
    "int2": dict(bits=2, key_gran="token"),
}


def nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def make_packed(k: torch.Tensor, v: torch.Tensor, fmt: dict) -> tuple[dict, dict, dict]:
    kparts = pack.quantize_pack(k, fmt["bits"], fmt["key_gran"], 32)
    vparts = pack.quantize_pack(v, fmt["bits"], "token", 32)
    args = dict(bits=fmt["bits"], key_token_block=32 if fmt["key_gran"] == "channel" else 1, key_group=32,
                value_group=32)
    return kparts, vparts, args


def dequantize(parts: dict, bits: int, gran: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return UniformCodec(bits, 32, granularity=gran).decode(parts, D, dtype)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 attention over the fp32 dequantized cache, one batch row at a time."""
    outs = []
    for i in range(q.shape[0]):
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[i : i + 1].float(), k[i : i + 1], v[i : i + 1], scale=scaling, enable_gqa=True))
    return torch.cat(outs)


DEVICE = "cuda"


def graphed(fn):
    """``fn`` captured in a CUDA graph (replay costs no Python/launch overhead), or ``fn`` if capture fails."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except RuntimeError as exc:  # pragma: no cover - reported in the output
        print(f"  (CUDA graph capture failed, timing eagerly: {exc})")
        return fn


def bench(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph, with triton's L2 flush before every call."""
    if DEVICE != "cuda":  # --smoke: one timed call, no statistics
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(graphed(fn), warmup=warmup, rep=rep, return_mode="median"))


def bench_eager(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median ms of ``fn`` called from Python (launch overhead included where the GPU waits for it)."""
    if DEVICE != "cuda":
        return float("nan")
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def run_case(batch: int, tokens: int, splits_scale: tuple[float, ...]) -> list[dict]:
    torch.manual_seed(0)
    dev = DEVICE
    scaling = D**-0.5
    q = torch.randn(batch, HQ, 1, D, device=dev, dtype=torch.bfloat16)
    k = (torch.randn(batch, HKV, tokens, D, device=dev) + torch.randn(D, device=dev) * 2).to(torch.bfloat16)
    v = torch.randn(batch, HKV, tokens, D, device=dev, dtype=torch.bfloat16)
    rows = []
    bf16_bytes = 2 * k.numel() * 2 + q.numel() * 2
    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True)

    ms = bench(sdpa)
    sdpa_ms = ms
    rows.append(dict(batch=batch, tokens=tokens, path="sdpa-bf16", ms=ms, ms_eager=bench_eager(sdpa),
                     bytes=bf16_bytes))
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 4
    for name, fmt in FORMATS.items():
        kp, vp, args = make_packed(k, v, fmt)
        packed_bytes = nbytes(kp) + nbytes(vp) + q.numel() * 2
        kd = dequantize(kp, fmt["bits"], fmt["key_gran"], torch.float32)
        vd = dequantize(vp, fmt["bits"], "token", torch.float32)
        ref = reference(q, kd, vd, scaling)
        out, _ = decode.decode_attention(q, kp, vp, scaling=scaling, **args)
        rel = float((out.float() - ref).abs().max() / ref.abs().max())
        del kd, vd, ref
        cfg = decode.choose_config(batch * HKV, tokens, fmt["bits"], args["key_token_block"], False, sms)
        default_splits = decode.num_splits(batch * HKV, tokens, cfg["block_n"], cfg["programs_per_sm"] * sms)
        for f in splits_scale:
            splits = max(1, int(default_splits * f))

            def kernel(kp=kp, vp=vp, args=args, splits=splits):
                return decode.decode_attention(q, kp, vp, scaling=scaling, splits=splits, **args)

            is_default = f == 1.0
            ms = bench(kernel)
            row = dict(batch=batch, tokens=tokens, path=f"kernel-{name}", splits=splits, block_n=cfg["block_n"],
                       num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"], ms=ms, bytes=packed_bytes, rel_err=rel,
                       bytes_ratio=bf16_bytes / packed_bytes, speedup_vs_sdpa=sdpa_ms / ms, default=is_default)
            if is_default:
                row["ms_eager"] = bench_eager(kernel)
            rows.append(row)

        def dequant_sdpa(kp=kp, vp=vp, fmt=fmt):
            kk = dequantize(kp, fmt["bits"], fmt["key_gran"])
            vv = dequantize(vp, fmt["bits"], "token")
            return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, scale=scaling, enable_gqa=True)

        ms = bench(dequant_sdpa, warmup=3, rep=20)
        rows.append(dict(batch=batch, tokens=tokens, path=f"dequant+sdpa-{name}", ms=ms, bytes=packed_bytes,
                         speedup_vs_sdpa=sdpa_ms / ms, ms_eager=bench_eager(dequant_sdpa, warmup=3, rep=20)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--splits-scale", type=float, nargs="+", default=[1.0, 0.5, 2.0],
                        help="kernel split counts tried, as multiples of the default (the dispatch's choice)")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on CPU (run with TRITON_INTERPRET=1 and small --tokens)")
    args = parser.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    import triton

    t0 = time.time()
    rows = []
    for batch in args.batches:
        for tokens in args.tokens:
            rows.extend(run_case(batch, tokens, tuple(args.splits_scale)))
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            print(f"done B={batch} T={tokens} ({time.time() - t0:.0f} s)", flush=True)
    for r in rows:
        r["gbps"] = r["bytes"] / (r["ms"] * 1e-3) / 1e9
    meta = dict(device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (smoke)", torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                shape=dict(q_heads=HQ, kv_heads=HKV, head_dim=D), seconds=time.time() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_kv_attention.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}")
    print(f"{'B':>2} {'T':>7} {'path':<22} {'splits':>6} {'block':>5} {'us':>9} {'eager us':>9} {'MB':>8} {'GB/s':>7} "
          f"{'x SDPA':>7} {'rel err':>8}")
    for r in rows:
        if r["path"].startswith("kernel") and not r.get("default"):
            continue
        print(f"{r['batch']:>2} {r['tokens']:>7} {r['path']:<22} {r.get('splits', ''):>6} {r.get('block_n', ''):>5} "
              f"{r['ms'] * 1e3:>9.1f} {r.get('ms_eager', float('nan')) * 1e3:>9.1f} {r['bytes'] / 1e6:>8.1f} "
              f"{r['gbps']:>7.0f} {r.get('speedup_vs_sdpa', 1.0):>7.2f} {r.get('rel_err', float('nan')):>8.1e}")
    print("\nbest kernel configuration per case:")
    for r in rows:
        if not r.get("default"):
            continue
        same = [x for x in rows if x["path"] == r["path"] and x["batch"] == r["batch"] and x["tokens"] == r["tokens"]]
        best = min(same, key=lambda x: x["ms"])
        print(f"  B={r['batch']} T={r['tokens']} {r['path'][7:]}: {best['ms'] * 1e3:.1f} us (splits {best['splits']}), "
              f"{r['ms'] * 1e3 / (best['ms'] * 1e3):.2f}x faster than the default; "
              f"{sdpa(rows, r) / best['ms']:.2f}x SDPA")


def sdpa(rows: list[dict], r: dict) -> float:
    return next(x["ms"] for x in rows if x["path"] == "sdpa-bf16" and x["batch"] == r["batch"]
                and x["tokens"] == r["tokens"])


if __name__ == "__main__":
    main()
