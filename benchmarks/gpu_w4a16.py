"""W4A16 kernels on CUDA: correctness of every kernel configuration and speed against bf16 cuBLAS and torch's
int4 tinygemm (``torch.ops.aten._weight_int4pack_mm``), for the Llama-3.1-8B linear shapes.

    python benchmarks/gpu_w4a16.py --out DIR        # writes DIR/gpu_w4a16.json, prints a table

For each shape (K x N = in x out features) and batch M: random bf16 weights are quantized to AWQ 4-bit, group
128; every candidate configuration of the tuner runs once against the dequantize-then-matmul reference (relative
Frobenius error must stay < 1e-2) and is timed with ``triton.testing.do_bench`` (median, L2 flushed between
runs; whole calls, split-K reduction included). The fastest is "ours"; bf16 cuBLAS (``F.linear`` on the
dequantized weight) and tinygemm (same random weight, its own int4 format, group 128, inner_k_tiles 8) are timed
the same way in the same run. All "us" columns time one CUDA-graph replay of the whole call (L2 still flushed
between replays), i.e. GPU time without Python's launch cost, which for a Triton launch from Python is of the
order of the kernels themselves; ``bf16_eager_us`` / ``ours_eager_us`` in the JSON are plain eager calls.

A second method, **rotating weights** (``*_rot_us``), times what a decoder does: one CUDA graph holds two
passes over enough copies of the weight (the same values at other addresses) that they fill at least three
times the L2 cache, called back to back with no flush in between; the time per call is a graph replay's
(CUDA events, median) over the number of calls. Each call finds its weight out of L2, as a layer's weight is
during decoding, and the L2 holds no dirty lines left by a flush. Ours is the fastest of the three best
configurations of the first method, re-timed this way.
Takes 2-3 minutes on an H100 (mostly Triton compilation).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir():  # this checkout's code, even where another lmcompress is installed
    sys.path.insert(0, str(_SRC))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from lmcompress.weights.kernels.dispatch import candidates, launch, sm_count  # noqa: E402
from lmcompress.weights.packing import dequantize_gemm, pack_gemm  # noqa: E402
from lmcompress.weights.quantizer import quantize_weight  # noqa: E402

SHAPES = ((4096, 14336), (14336, 4096), (4096, 4096))  # (K, N)
BATCHES = (1, 4, 16, 64)
GROUP = 128


SMOKE = False  # --cpu-smoke: tiny shapes under TRITON_INTERPRET=1, wall-clock timing (checks the script only)


def bench_us(fn, rep: int = 100) -> float:
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median")) * 1e3


def graph_us(fn, rep: int = 100) -> float:
    """``bench_us`` of one CUDA-graph replay of ``fn``: the GPU time of its kernels without Python's launch cost
    (do_bench still flushes L2 between replays). A first call on the capture stream, outside the capture,
    compiles the kernels and allocates what they keep (the fused split-K counters)."""
    if SMOKE:
        return bench_us(fn, rep)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    torch.cuda.synchronize()
    return bench_us(graph.replay, rep)


ROTATION_PASSES = 2


def rotating_us(calls: list, rep: int = 30) -> float:
    """GPU time per call of ``calls`` (each on its own copy of the weight), replayed back to back in one CUDA
    graph of ``ROTATION_PASSES`` passes, no L2 flush: median over ``rep`` replays, timed with CUDA events."""
    if SMOKE:
        return bench_us(calls[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(ROTATION_PASSES):
            for call in calls:
                call()
    torch.cuda.synchronize()
    for _ in range(3):  # warm-up replays
        graph.replay()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2] * 1e3 / (ROTATION_PASSES * len(calls))


def rotation_set(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """``tensors`` and clones of them (same values, other addresses): enough copies to fill at least three times
    the L2 cache, and at least 3."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    l2 = (
        0
        if SMOKE
        else getattr(torch.cuda.get_device_properties(tensors[0].device), "L2_cache_size", 50 << 20)
    )
    n_copies = max(3, -(-3 * l2 // nbytes))
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n_copies - 1)]


def best_per_kind(timings: dict) -> dict[str, float]:
    """Fastest time of each kernel family, split-K reduced by a second kernel or fused apart."""
    best: dict[str, float] = {}
    for cfg, t in timings.items():
        name = cfg.kind + (" (fused split-K)" if cfg.fused_reduce and cfg.split_k > 1 else "")
        best[name] = min(t, best.get(name, t))
    return dict(sorted(best.items(), key=lambda kv: kv[1]))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def tinygemm_pack(w: torch.Tensor, group: int):
    """torch's int4 format (as in torch's own tests): codes q in [0, 15], w ~ (q - 8) * scale + zero.

    Returns (packed weight, scales_and_zeros [K/group, N, 2] bf16, dequantized weight [N, K] fp32)."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    w_max, w_min = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
    scale = (w_max - w_min).clamp(min=1e-6) / 15
    zero = w_min + scale * 8
    q = ((wg - w_min) / scale).round().clamp(0, 15).to(torch.int32)
    dequant = ((q - 8) * scale + zero).reshape(n, k)
    q = q.reshape(n, k)
    packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales_and_zeros, dequant


def measure(k, n, m, sms, qweight, qzeros, scales, w_deq, w_bf16, tg_packed, tg_sz, tg_deq, failures) -> dict:
    """Check and time every candidate for one (K, N, M), then ours / bf16 / tinygemm."""
    x = torch.randn(m, k, device=qweight.device, dtype=torch.bfloat16)
    ref = x.float() @ w_deq
    timings = {}
    for cfg in candidates(m, n, k, GROUP, sms):
        try:
            err = rel_err(launch(x, qweight, qzeros, scales, GROUP, None, cfg), ref)
        except Exception as exc:
            failures.append({"K": k, "N": n, "M": m, "config": repr(cfg), "error": str(exc).splitlines()[0]})
            continue
        if not err < 1e-2:
            failures.append({"K": k, "N": n, "M": m, "config": repr(cfg), "rel_err": err})
            continue
        timings[cfg] = graph_us(lambda cfg=cfg: launch(x, qweight, qzeros, scales, GROUP, None, cfg), rep=25)
    best = min(timings, key=timings.get)
    packed_bytes = qweight.numel() * 4 + qzeros.numel() * 4 + scales.numel() * 2
    packed = rotation_set(qweight, qzeros, scales)
    rot = {
        cfg: rotating_us([lambda w=w, cfg=cfg: launch(x, *w, GROUP, None, cfg) for w in packed])
        for cfg in sorted(timings, key=timings.get)[:3]
    }
    rot_best = min(rot, key=rot.get)
    bf16_copies = rotation_set(w_bf16)
    row = {
        "K": k, "N": n, "M": m,
        "bf16_us": graph_us(lambda: F.linear(x, w_bf16)),
        "ours_us": graph_us(lambda: launch(x, qweight, qzeros, scales, GROUP, None, best)),
        "bf16_eager_us": bench_us(lambda: F.linear(x, w_bf16)),
        "ours_eager_us": bench_us(lambda: launch(x, qweight, qzeros, scales, GROUP, None, best)),
        "ours_rel_err": rel_err(launch(x, qweight, qzeros, scales, GROUP, None, best), ref),
        "ours_config": best.label(),
        "best_per_kind_us": best_per_kind(timings),
        "candidate_us": {c.label(): t for c, t in sorted(timings.items(), key=lambda kv: kv[1])},
        "candidates_ok": len(timings),
        "weight_bytes": packed_bytes,
        "bf16_rot_us": rotating_us([lambda w=w: F.linear(x, *w) for w in bf16_copies]),
        "bf16_rot_copies": len(bf16_copies),
        "ours_rot_us": rot[rot_best],
        "ours_rot_config": rot_best.label(),
        "ours_rot_copies": len(packed),
        "ours_rot_candidates_us": {c.label(): t for c, t in rot.items()},
    }  # fmt: skip
    del bf16_copies, packed
    if tg_packed is not None:
        tg_out = torch.ops.aten._weight_int4pack_mm(x, tg_packed, GROUP, tg_sz)
        row["tinygemm_rel_err"] = rel_err(tg_out, x.float() @ tg_deq.t())
        row["tinygemm_us"] = graph_us(lambda: torch.ops.aten._weight_int4pack_mm(x, tg_packed, GROUP, tg_sz))
        row["tinygemm_rot_us"] = rotating_us(
            [
                lambda p=p, sz=sz: torch.ops.aten._weight_int4pack_mm(x, p, GROUP, sz)
                for p, sz in rotation_set(tg_packed, tg_sz)
            ]
        )
    return row


def print_table(rows: list[dict], method: str, eager: bool = False) -> None:
    """Markdown table of the ``*{method}_us`` timings (``""``: L2 flushed; ``"_rot"``: rotating weights)."""
    extra = " eager bf16 / W4A16 us |" if eager else ""
    print(
        "| K x N | batch | bf16 cuBLAS us | torch int4 us | W4A16 us | W4A16 vs bf16 | int4 vs bf16 | W4A16 GB/s "
        f"| kernel |{extra}"
    )
    print("|---" * (10 if eager else 9) + "|")
    for r in rows:
        bf16, ours, tg = r[f"bf16{method}_us"], r[f"ours{method}_us"], r.get(f"tinygemm{method}_us")
        tg_cells = f"{tg:.1f} | " if tg else "n/a | "
        tg_ratio = f"{bf16 / tg:.2f}x" if tg else "n/a"
        eager_cell = f" {r['bf16_eager_us']:.1f} / {r['ours_eager_us']:.1f} |" if eager else ""
        print(
            f"| {r['K']} x {r['N']} | {r['M']} | {bf16:.1f} | {tg_cells}{ours:.1f} | {bf16 / ours:.2f}x | {tg_ratio} "
            f"| {r['weight_bytes'] / ours / 1e3:.0f} | {r[f'ours{method}_config']} |{eager_cell}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="results", help="folder for gpu_w4a16.json")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    global SMOKE, SHAPES
    SMOKE = args.cpu_smoke
    if SMOKE:
        SHAPES = ((256, 128),)
    device = torch.device("cpu" if SMOKE else "cuda")
    sms = sm_count(device)
    torch.manual_seed(0)
    rows, failures = [], []
    start = time.perf_counter()
    for k, n in SHAPES:
        w = torch.randn(n, k, device=device) * 0.02
        q = quantize_weight(w, 4, GROUP)
        qweight, qzeros, scales = pack_gemm(q.codes, q.zeros, q.scales)
        w_deq = dequantize_gemm(qweight, qzeros, scales, GROUP)  # [K, N] fp32
        w_bf16 = w_deq.t().contiguous().to(torch.bfloat16)  # [N, K] for F.linear
        try:
            if SMOKE:
                raise RuntimeError("tinygemm is CUDA-only")
            tg_packed, tg_sz, tg_deq = tinygemm_pack(w, GROUP)
            tinygemm_error = None
        except Exception as exc:  # an op missing from this torch build
            tg_packed = tg_sz = tg_deq = None
            tinygemm_error = f"{type(exc).__name__}: {exc}"
        del w, q
        for m in batches:
            row = measure(
                k, n, m, sms, qweight, qzeros, scales, w_deq, w_bf16, tg_packed, tg_sz, tg_deq, failures
            )
            if tinygemm_error:
                row["tinygemm_error"] = tinygemm_error
            rows.append(row)
            best = row["ours_config"]
            print(
                f"K={k:5d} N={n:5d} M={m:3d}: bf16 {row['bf16_us']:6.1f} us, ours {row['ours_us']:6.1f} us "
                f"({row['bf16_us'] / row['ours_us']:4.2f}x, err {row['ours_rel_err']:.1e}, {best}), "
                f"tinygemm {row.get('tinygemm_us', float('nan')):6.1f} us",
                flush=True,
            )
    total = time.perf_counter() - start
    name = "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(device)
    print(f"\n{name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{total:.0f} s; weights random bf16 -> AWQ 4-bit g128; do_bench medians of CUDA-graph replays, L2 flushed")  # fmt: skip
    print_table(rows, "", eager=True)
    print(
        f"\nRotating weights (>= 3x L2 of copies, {ROTATION_PASSES} passes back to back in one CUDA graph, no flush)"
    )
    print_table(rows, "_rot")
    if failures:
        print(f"\n{len(failures)} candidate configurations failed or were wrong:")
        for f in failures[:20]:
            print("  ", f)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_w4a16.json").write_text(
        json.dumps(
            {
                "device": name,
                "torch": torch.__version__,
                "triton": triton.__version__,
                "python": platform.python_version(),
                "seconds": total,
                "group_size": GROUP,
                "rows": rows,
                "failures": failures,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
