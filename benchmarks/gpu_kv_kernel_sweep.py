"""Sweep of the packed-KV decode kernel's launch configurations (warps, splits, register cap, block, unpacking)
against torch SDPA over the bf16 cache, on the Llama-3.1-8B decode shape of ``gpu_kv_attention.py``.

Each configuration is checked against fp32 attention over the dequantized cache (relative error) before it is
timed (CUDA-graph replay, ``do_bench`` median). Used to choose :func:`lmcompress.kv.kernels.decode.choose_config`.

Usage: ``PYTHONPATH=src python benchmarks/gpu_kv_kernel_sweep.py --out DIR`` (writes ``DIR/sweep.json``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_kv_attention import FORMATS, HKV, HQ, D, bench, dequantize, make_packed, reference  # noqa: E402
from lmcompress.kv.kernels import decode  # noqa: E402


def configs(fmt: str, full: bool) -> list[dict]:
    """Kernel options to time; ``ppsm``: resident programs per SM aimed at (splits = ppsm * SMs / (B * Hkv))."""
    base = dict(block_n=32, num_warps=1)
    out = [dict(base, ppsm=8), dict(base, ppsm=12, maxnreg=168)]
    if full:
        out += [dict(base, ppsm=16), dict(base, ppsm=16, maxnreg=128), dict(base, ppsm=8, unpack=1),
                dict(base, ppsm=8, unpack=0), dict(base, ppsm=8, num_stages=2), dict(block_n=32, num_warps=2, ppsm=8),
                dict(block_n=32, num_warps=4, ppsm=4)]
        if FORMATS[fmt]["key_gran"] == "token":
            out += [dict(block_n=64, num_warps=2, ppsm=8)]
    return out


def candidate(kind: str, cfg: dict, q, kp, vp, fargs: dict, batch: int, tokens: int, sms: int, old):
    """(splits, callable) of one configuration."""
    scaling = D**-0.5
    if kind == "old":
        blk = fargs["key_token_block"] if fargs["key_token_block"] > 1 else 64
        splits = max(1, int(old.num_splits(batch * HKV, tokens, blk, sms) * cfg["splits_x"]))
        return splits, lambda: old.decode_attention(q, kp, vp, scaling=scaling, splits=splits, **fargs)
    kw = {k: v for k, v in cfg.items() if k != "ppsm"}
    blocks = -(-tokens // cfg["block_n"])
    splits = max(1, min(blocks, cfg["ppsm"] * sms // (batch * HKV)))
    return splits, lambda: decode.decode_attention(q, kp, vp, scaling=scaling, splits=splits, **kw, **fargs)


def sweep_case(batch: int, tokens: int, full: bool, formats: list[str], sms: int, old) -> list[dict]:
    torch.manual_seed(0)
    scaling = D**-0.5
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    k = (torch.randn(batch, HKV, tokens, D, device="cuda") + torch.randn(D, device="cuda") * 2).to(torch.bfloat16)
    v = torch.randn(batch, HKV, tokens, D, device="cuda", dtype=torch.bfloat16)
    sdpa_us = 1e3 * bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling,
                                                                                   enable_gqa=True), 5, 20)
    print(f"B={batch} T={tokens} sdpa {sdpa_us:.1f} us", flush=True)
    rows = [dict(batch=batch, tokens=tokens, path="sdpa", us=sdpa_us)]
    for name in formats:
        fmt = FORMATS[name]
        kp, vp, fargs = make_packed(k, v, fmt)
        ref = reference(q, dequantize(kp, fmt["bits"], fmt["key_gran"], torch.float32),
                        dequantize(vp, fmt["bits"], "token", torch.float32), scaling)
        cands = [("new", c) for c in configs(name, full)]
        if old is not None and full:
            cands += [("old", dict(splits_x=f)) for f in (0.5, 1.0, 2.0)]
        results = []
        for kind, cfg in cands:
            try:
                splits, fn = candidate(kind, cfg, q, kp, vp, fargs, batch, tokens, sms, old)
                out, _ = fn()
                rel = float((out.float() - ref).abs().max() / ref.abs().max())
                us = bench(fn, 5, 20) * 1e3
            except Exception as exc:  # a failing variant is reported, the sweep goes on
                print(f"  {name} {kind} {cfg} FAILED: {str(exc)[:300]}", flush=True)
                continue
            results.append(dict(batch=batch, tokens=tokens, path=f"{kind}-{name}", splits=splits, us=us,
                                rel_err=rel, x_sdpa=sdpa_us / us, **cfg))
        results.sort(key=lambda r: r["us"])
        skip = ("batch", "tokens", "path", "us", "rel_err", "x_sdpa")
        for r in results[:6] + [r for r in results if r["path"].startswith("old")][:3]:
            cfg = {k2: v2 for k2, v2 in r.items() if k2 not in skip}
            print(f"  {r['path']:<10} {r['us']:8.1f} us  x{r['x_sdpa']:.2f}  err {r['rel_err']:.1e}  {cfg}",
                  flush=True)
        rows += results
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", default=["1x32768:full", "8x32768:full", "1x8192", "1x131072",
                                                        "8x8192", "8x131072"])
    parser.add_argument("--formats", nargs="+", default=["kivi2", "int2", "kivi4"])
    args = parser.parse_args()
    try:
        old = importlib.import_module("decode_old")  # the previous kernel, when provided (comparison only)
    except ImportError:
        old = None
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    t0 = time.time()
    for case in args.cases:
        shape, _, mode = case.partition(":")
        batch, tokens = map(int, shape.split("x"))
        rows += sweep_case(batch, tokens, mode == "full", args.formats, sms, old)
        torch.cuda.empty_cache()
        print(f"  ({time.time() - t0:.0f} s)", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep.json").write_text(json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}))


if __name__ == "__main__":
    main()
