"""End-to-end decode on one GPU, Llama-3.1-8B shape, random bf16 weights: what compression does to tokens/s.

One run measures, per context (8k, 32k, 128k at batch 1; then larger batches at 32k):

* transformers eager (``DynamicCache``) and transformers ``StaticCache`` + ``torch.compile(mode="reduce-overhead")``
  with the full cache (re-measured here, not quoted);
* kvpress SnapKV and StreamingLLM at the same ratio (8x), eager, in a subprocess whose PYTHONPATH holds kvpress
  and the transformers it pins (``--kvpress-path``; ``benchmarks/kvpress_decode.py``);
* ours: no compression, SnapKV 8x, KIVI-2, SnapKV 4x + KIVI-4, and 4-bit weights with SnapKV 8x and with
  KIVI-2. Our setups decode through the static path (fixed slots, one CUDA graph per step) where the cache
  supports it and eagerly otherwise; the ``path`` column says which ran.

4-bit weights: round-to-nearest (``RTNConfig``, group 128, AWQ's packed format and W4A16 kernels) instead of an
AWQ search, for speed: on random weights the search changes quality only, not the bytes or kernels timed. The
kernel tuner times its candidates for decode shapes (M = 1 row) in a warm-up before any timed run; the prefill
uses the default configuration (``LMCOMPRESS_W4A16_TUNE=0`` for that bucket) so that tuning stays out of TTFT.

Columns: TTFT = prefill of the prompt (compression included); ms/token = median decode step (steps after the
4th; the static path's warm-up and graph capture are in the first steps); tokens/s = batch / step; peak GiB =
``torch.cuda.max_memory_allocated`` during the run, the weights of the model in use included (the bf16 and
the 4-bit model both stay on the GPU once the second is built; the idle one's bytes are subtracted); KV GiB = bytes of the cache's storage
tensors after the prompt. **Bandwidth floor**: bytes a decode step must read (every weight but the input
embedding table, plus the held KV) over the device-to-device copy bandwidth measured at the start of the same
run (bytes read + written); "% floor" = floor / measured step.

    PYTHONPATH=src python benchmarks/decode_gpu.py --out OUT --kvpress-path /tmp/site
    PYTHONPATH=src python benchmarks/decode_gpu.py --cpu-smoke --out /tmp/smoke   # tiny shapes on the CPU

Random weights are fine for time and memory, never for quality. Writes ``decode_gpu.json`` (rewritten after
every row, so a run stopped by a time limit keeps what it measured) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmcompress._compat import cache_kwargs, output_cache

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir():
    sys.path.insert(0, str(_SRC))

from lmcompress.errors import LMCompressError  # noqa: E402
from lmcompress.eval.chunked_prefill import chunked_prefill  # noqa: E402
from lmcompress.eval.graph_decode import StaticDecoder  # noqa: E402
from lmcompress.kv import CompressedCache  # noqa: E402
from lmcompress.kv.parse import parse_method  # noqa: E402

GiB = 1 << 30
RATIO_8X = 0.875
#: setup name -> (weights, lmcompress method or a transformers baseline)
SETUPS: dict[str, tuple[str, str]] = {
    "hf eager": ("bf16", "hf_eager"),
    "hf static+compile": ("bf16", "hf_compiled"),
    "ours none": ("bf16", "none"),
    "ours snapkv 8x": ("bf16", f"snapkv:ratio={RATIO_8X}"),
    "ours kivi2": ("bf16", "kivi2"),
    "ours snapkv 4x + kivi4": ("bf16", "snapkv:ratio=0.75+kivi4"),
    "ours int4w + snapkv 8x": ("int4", f"snapkv:ratio={RATIO_8X}"),
    "ours int4w + kivi2": ("int4", "kivi2"),
    # the same bf16 model with its RMSNorms fused into one Triton kernel each (lmcompress.fused)
    "ours none, fused norm": ("bf16f", "none"),
    "ours snapkv 8x, fused norm": ("bf16f", f"snapkv:ratio={RATIO_8X}"),
    # fused norms + fused decoder modules (concatenated qkv / gate-up, one-kernel RoPE and SwiGLU)
    "ours none, fused": ("bf16F", "none"),
    "ours snapkv 8x, fused": ("bf16F", f"snapkv:ratio={RATIO_8X}"),
    "ours int4w + snapkv 8x, fused": ("int4F", f"snapkv:ratio={RATIO_8X}"),
    # fixed budgets (1/8 of a 32k prompt), for prefills that evict at every chunk (chunked_prefill)
    "ours streaming_llm 4096, fused": ("bf16F", "streaming_llm:budget=4096"),
    "ours snapkv 4096, fused": ("bf16F", "snapkv:budget=4096"),
    "ours int4w + streaming_llm 4096, fused": ("int4F", "streaming_llm:budget=4096"),
    # the decode attention over static slots through SDPA instead of the split-K Triton kernel (A/B)
    "ours none, fused, sdpa attn": ("bf16F", "none"),
    "ours snapkv 8x, fused, sdpa attn": ("bf16F", f"snapkv:ratio={RATIO_8X}"),
    "ours int4w + snapkv 8x, fused, sdpa attn": ("int4F", f"snapkv:ratio={RATIO_8X}"),
}
SDPA_SUFFIX = ", sdpa attn"
FUSED_KINDS = ("bf16f", "bf16F", "int4F")
BATCH_SETUPS = ("hf eager", "ours none", "ours snapkv 8x", "ours int4w + snapkv 8x", "ours none, fused",
                "ours snapkv 8x, fused", "ours int4w + snapkv 8x, fused", "ours snapkv 8x, fused, sdpa attn")


def build_model(layers: int, smoke: bool, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                          rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.set_attn_implementation("sdpa")
    return model.eval()


def read_bytes_per_step(model) -> int:
    """Bytes of every parameter and buffer a decode step reads: all but the input embedding table (one row)."""
    emb = model.get_input_embeddings().weight
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    tied = model.get_output_embeddings().weight is emb
    return total - (0 if tied else emb.numel() * emb.element_size())


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second (1 GiB buffers)."""
    if device.type != "cuda":
        return float("nan")
    from triton.testing import do_bench

    src = torch.empty(GiB, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    src = dst = None
    torch.cuda.empty_cache()
    return 2 * GiB / (ms * 1e-3)


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def _hf_compiled(model, ids, new_tokens, clock):
    from transformers import StaticCache

    ctx = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=ctx + new_tokens + 8)
    t0 = clock.now()
    out = model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1,
                cache_position=torch.arange(ctx, device=ids.device))
    ttft = clock.now() - t0
    tok = out.logits[:, -1:].argmax(-1)
    step = torch.compile(lambda t, p: model(t, **cache_kwargs(cache), use_cache=True, cache_position=p,
                                            position_ids=p[None].expand(t.shape[0], 1)).logits,
                         mode="reduce-overhead", fullgraph=False)
    times, pos = [], ctx
    for _ in range(new_tokens):
        p = torch.tensor([pos], device=ids.device)
        t1 = clock.now()
        tok = step(tok, p)[:, -1:].argmax(-1)
        times.append(clock.now() - t1)
        pos += 1
    kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return ttft, times[new_tokens // 2:], kv, "compiled", cache


def _hf_eager(model, ids, new_tokens, clock):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    t0 = clock.now()
    out = model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    ttft = clock.now() - t0
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    tok, times = out.logits[:, -1:].argmax(-1), []
    for _ in range(new_tokens):
        t1 = clock.now()
        tok = model(tok, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
        times.append(clock.now() - t1)
    return ttft, times[4:], kv, "eager", cache


def parse_chunk(text: str) -> tuple[int, bool]:
    """``"0"`` (one forward), ``"4096"`` (chunks, compression at the last) or ``"4096e"`` (evict at every chunk)
    -> ``(chunk, evict_each_chunk)``."""
    each = text.endswith("e")
    return int(text[:-1] if each else text), each


def _prefill(model, ids, cache, chunk: int | str) -> torch.Tensor:
    """The prompt into ``cache``: one forward, or :func:`chunked_prefill` (``chunk`` as :func:`parse_chunk`
    reads it); ``[B, 1]`` next tokens."""
    size, each = parse_chunk(str(chunk))
    if size:
        return chunked_prefill(model, ids, cache, size, evict_each_chunk=each).argmax(-1, keepdim=True)
    out = model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def _ours(model, ids, new_tokens, clock, method, eager_tokens, chunk="0"):
    cache = CompressedCache(model, parse_method(method), reserve=new_tokens + 1)
    t0 = clock.now()
    tok = _prefill(model, ids, cache, chunk)
    ttft = clock.now() - t0
    kv = cache.nbytes
    times = []
    try:
        dec = StaticDecoder(model, cache, new_tokens)
    except LMCompressError:
        dec = None
    if dec is not None:
        dec.start(tok[:, 0], ids.shape[1])
        for _ in range(new_tokens):
            t1 = clock.now()
            dec.run(1)
            times.append(clock.now() - t1)
        path = "graph" if dec.graph is not None else "static"
        dec.close()
    else:
        for _ in range(eager_tokens):
            t1 = clock.now()
            tok = model(tok, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
            times.append(clock.now() - t1)
        path = "eager"
    return ttft, times[4:], kv, path, cache


@torch.inference_mode()
def run_one(model, setup: str, ctx: int, batch: int, new_tokens: int, eager_tokens: int,
            device: torch.device, chunk: str = "0") -> dict:
    """One prefill + decode of ``setup``: ``new_tokens`` steps on the static/compiled paths, ``eager_tokens``
    on eager ones."""
    clock = Clock(device)
    if clock.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(100, model.config.vocab_size - 1, (batch, ctx), device=device)
    method = SETUPS[setup][1]
    if method == "hf_eager":
        res = _hf_eager(model, ids, eager_tokens, clock)
    elif method == "hf_compiled":
        res = _hf_compiled(model, ids, new_tokens, clock)
    else:
        from lmcompress.kv.static import set_slot_attention

        prev = set_slot_attention("sdpa" if setup.endswith(SDPA_SUFFIX) else "triton")
        try:
            res = _ours(model, ids, new_tokens, clock, method, eager_tokens, chunk)
        finally:
            set_slot_attention(prev)
    ttft, times, kv, path, cache = res
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / GiB if clock.cuda else float("nan")
    del cache
    return {"context": ctx, "batch": batch, "setup": setup, "path": path, "ttft_s": round(ttft, 3),
            **({"prefill_chunk": chunk} if chunk != "0" else {}),
            "decode_ms": round(med * 1e3, 3), "tok_s": round(batch / med, 1), "peak_gib": round(peak, 2),
            "kv_bytes": int(kv)}


def add_floor(row: dict, weight_bytes: int, bandwidth: float) -> dict:
    if "decode_ms" in row and bandwidth == bandwidth:
        floor_ms = (weight_bytes + row["kv_bytes"]) / bandwidth * 1e3
        row["floor_ms"] = round(floor_ms, 3)
        row["floor_frac"] = round(floor_ms / row["decode_ms"], 3)
    if "kv_bytes" in row:
        row["kv_gib"] = round(row["kv_bytes"] / GiB, 3)
    return row


def kvpress_rows(args) -> list[dict]:
    """kvpress rows from ``kvpress_decode.py`` in a subprocess with ``--kvpress-path`` first on its path."""
    script = Path(__file__).with_name("kvpress_decode.py")
    env = dict(os.environ, PYTHONPATH=args.kvpress_path)
    cmd = [sys.executable, str(script), "--contexts", *map(str, args.contexts[:2]), "--ratio", str(RATIO_8X),
           "--new-tokens", str(args.eager_tokens), "--layers", str(args.layers)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.kvpress_timeout)
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
        err = "timeout"
    rows = []
    for line in out.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if "kvpress_env" in row:
                print("kvpress subprocess:", row["kvpress_env"], flush=True)
            else:
                row["path"] = "eager"
                rows.append(row)
    if not rows:
        print("kvpress subprocess gave no rows:", err[-600:], flush=True)
    return rows


def plan(args) -> list[tuple[str, str, int, int]]:
    """``(weights, setup, context, batch)`` in the order they run (most wanted first, so that a time budget
    cuts the least wanted): batch 1 at the first two contexts, then the larger batches at ``--batch-context``,
    then batch 1 at the other contexts. bf16 runs come before 4-bit-weight runs within each group."""
    def group(ctx: int, batch: int) -> list[tuple[str, str, int, int]]:
        runs = []
        for setup in args.setups:
            kind, method = SETUPS[setup]
            if batch > 1 and (setup not in BATCH_SETUPS or (batch >= 32 and method in ("none", "hf_eager"))):
                continue  # a full bf16 cache of 32 rows at 32k (137 GiB) does not fit next to the weights
            if method == "hf_compiled" and (batch > 1 or ctx not in args.compiled_contexts):
                continue
            runs.append((kind, setup, ctx, batch))
        return sorted(runs, key=lambda r: r[0] != "bf16")

    runs = [r for ctx in args.contexts[:2] for r in group(ctx, 1)]
    runs += [r for batch in args.batches for r in group(args.batch_context, batch)]
    runs += [r for ctx in args.contexts[2:] for r in group(ctx, 1)]
    return runs


def fuse(model) -> dict:
    """Fused norms and decoder modules (:mod:`lmcompress.fused`) in place; returns the counts."""
    from lmcompress.fused import fuse_decoder, fuse_rmsnorm

    return {"norms": fuse_rmsnorm(model), **fuse_decoder(model)}


def int4_model(args, device: torch.device, fused: bool = False):
    """The same random model (same seed) with RTN 4-bit weights (AWQ's format), ``fused`` or not; the W4A16 tuner
    has run for decode shapes (M = 1) and the prefill bucket has the default configuration, outside every timed
    region."""
    from lmcompress.weights import RTNConfig, quantize_

    model = build_model(args.layers, args.cpu_smoke, device)
    quantize_(model, RTNConfig(group_size=128), device=device, progress=False)
    if fused:
        fuse(model)
    with torch.inference_mode():
        os.environ["LMCOMPRESS_W4A16_TUNE"] = "0"
        ids = torch.randint(100, 1000, (1, 512), device=device)
        out = model(ids, use_cache=True, logits_to_keep=1)
        os.environ["LMCOMPRESS_W4A16_TUNE"] = "1"
        model(out.logits[:, -1:].argmax(-1), **cache_kwargs(output_cache(out)), use_cache=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return model


def ttft_phase(args, ensure, models: dict, device: torch.device) -> list[dict]:
    """TTFT (prefill of ``--contexts[0]`` tokens, batch 1, compression included) of every ``--ttft-setups``,
    ``--ttft-repeats`` times, the setups interleaved within each repeat so that drift hits them alike; for each
    ``--ttft-chunks`` size. Peak memory per prefill, the idle models' bytes subtracted (max over repeats)."""
    ctx = args.contexts[0]
    clock = Clock(device)
    rows = []
    for setup in args.ttft_setups:
        ensure(SETUPS[setup][0])
    for chunk in args.ttft_chunks:
        peaks: dict[str, float] = {s: 0.0 for s in args.ttft_setups}
        kv: dict[str, int] = {}
        each = parse_chunk(chunk)[1]
        setups = [s for s in args.ttft_setups if not each or "budget" in SETUPS[s][1] or SETUPS[s][1] == "none"]
        samples = {s: [] for s in setups}
        for rep in range(args.ttft_repeats + 1):  # the first round is a warm-up, not counted
            for setup in setups:
                kind, method = SETUPS[setup]
                model = models[kind]
                idle = sum(model_bytes(m) for k, m in models.items() if k != kind)
                if clock.cuda:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                gen = torch.Generator(device=device).manual_seed(rep)
                ids = torch.randint(100, model.config.vocab_size - 1, (1, ctx), device=device, generator=gen)
                with torch.inference_mode():
                    cache = CompressedCache(model, parse_method(method), reserve=1)
                    t0 = clock.now()
                    _prefill(model, ids, cache, chunk)
                    elapsed = clock.now() - t0
                kv[setup] = cache.nbytes
                del cache
                if rep == 0:
                    continue
                samples[setup].append(elapsed)
                if clock.cuda:
                    peaks[setup] = max(peaks[setup], (torch.cuda.max_memory_allocated() - idle) / GiB)
        for setup, ts in samples.items():
            q1, med, q3 = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else (ts[0],) * 3
            rows.append({"phase": "ttft", "context": ctx, "batch": 1, "setup": setup, "prefill_chunk": chunk,
                         "repeats": len(ts), "ttft_median_s": round(med, 4), "ttft_q1_s": round(q1, 4),
                         "ttft_q3_s": round(q3, 4), "ttft_all_s": [round(t, 4) for t in ts],
                         "peak_gib": round(peaks[setup], 2), "kv_gib": round(kv[setup] / GiB, 3),
                         "weights_gib": round(model_bytes(models[SETUPS[setup][0]]) / GiB, 2)})
    return rows


def print_ttft(rows: list[dict]) -> None:
    if not rows:
        return
    print("\n| setup | prefill chunk | repeats | TTFT median s | IQR s | vs first setup | peak GiB | weights GiB | "
          "KV GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    base: dict[str, float] = {}
    for r in rows:
        ref = base.setdefault(r["prefill_chunk"], r["ttft_median_s"])
        print(f"| {r['setup']} | {r['prefill_chunk'] if r['prefill_chunk'] != '0' else 'none'} | {r['repeats']} | {r['ttft_median_s']} | "
              f"{r['ttft_q1_s']}-{r['ttft_q3_s']} | {100 * (r['ttft_median_s'] / ref - 1):+.1f}% | "
              f"{r['peak_gib']} | {r['weights_gib']} | {r['kv_gib']} |")


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def print_table(rows: list[dict]) -> None:
    print("\n| context | batch | setup | path | TTFT s | ms/token | tokens/s | peak GiB | KV GiB | floor ms | "
          "% of floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['context']} | {r['batch']} | {r['setup']} | {r['error']} | | | | | | | |")
            continue
        frac = f"{100 * r['floor_frac']:.0f}%" if "floor_frac" in r else "n/a"
        print(f"| {r['context']} | {r['batch']} | {r['setup']} | {r['path']} | {r['ttft_s']} | {r['decode_ms']} | "
              f"{r['tok_s']} | {r['peak_gib']} | {r['kv_gib']} | {r.get('floor_ms', 'n/a')} | {frac} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 8192, 131072],
                    help="batch-1 contexts; the first two run before the larger batches, the rest after")
    ap.add_argument("--compiled-contexts", type=int, nargs="*", default=[32768],
                    help="contexts for transformers StaticCache+compile (each compiles anew, ~1 min)")
    ap.add_argument("--batches", type=int, nargs="*", default=[8, 32], help="batches > 1, at --batch-context")
    ap.add_argument("--batch-context", type=int, default=32768)
    ap.add_argument("--setups", nargs="+", default=[s for s in SETUPS if SETUPS[s][0] != "bf16f"],
                    choices=list(SETUPS), metavar="SETUP", help=f"any of: {', '.join(SETUPS)}")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps of the static/graph path")
    ap.add_argument("--eager-tokens", type=int, default=24, help="decode steps of eager paths (slow)")
    ap.add_argument("--kvpress-path", default=None, help="PYTHONPATH with kvpress + transformers<5.3")
    ap.add_argument("--kvpress-timeout", type=float, default=150)
    ap.add_argument("--time-budget", type=float, default=1e9, help="skip runs that start after this many s")
    ap.add_argument("--prefill-chunk", default="0",
                    help="our setups prefill in chunks of this many tokens (chunked_prefill; a trailing e: evict "
                         "at every chunk); 0: one forward")
    ap.add_argument("--ttft-repeats", type=int, default=0,
                    help="first, this many interleaved prefills of each --ttft-setups at --contexts[0], batch 1")
    ap.add_argument("--ttft-setups", nargs="+", default=["ours none, fused", "ours snapkv 8x, fused"],
                    choices=[s for s in SETUPS if not SETUPS[s][1].startswith("hf_")], metavar="SETUP")
    ap.add_argument("--ttft-chunks", nargs="+", default=["0", "4096"],
                    help="prefill chunk sizes of the TTFT phase (0: one forward; 4096e: evict at every chunk, "
                         "budget setups only)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the script only")
    ap.add_argument("--slot-config", default=None,
                    help="JSON launch settings of the Triton slot attention (kv/kernels/slot_attention.CONFIG)")
    args = ap.parse_args()
    if args.slot_config:
        from lmcompress.kv.kernels import slot_attention

        slot_attention.CONFIG.update(json.loads(args.slot_config))
    start = time.perf_counter()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if args.cpu_smoke:
        args.contexts, args.compiled_contexts, args.layers = [256], [], 2
        args.batches, args.batch_context = [2], 256
        args.new_tokens, args.eager_tokens = 8, 8
        args.ttft_chunks = [c if c == "0" else ("64e" if c.endswith("e") else "64") for c in args.ttft_chunks]
        args.prefill_chunk = "0" if args.prefill_chunk == "0" else "64"
    os.makedirs(args.out, exist_ok=True)
    rows: list[dict] = []
    out_file = Path(args.out) / "decode_gpu.json"
    bandwidth = copy_bandwidth(device)
    header = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "copy_TBps": round(bandwidth / 1e12, 3),
              **({"slot_config": json.loads(args.slot_config)} if args.slot_config else {})}

    def save() -> None:
        out_file.write_text(json.dumps({**header, "rows": rows}, indent=1))

    if args.kvpress_path and device.type == "cuda":
        for row in kvpress_rows(args):
            rows.append(row)
        save()
    model = build_model(args.layers, args.cpu_smoke, device)
    weights_bf16 = read_bytes_per_step(model)
    header["weights_read_gib_bf16"] = round(weights_bf16 / GiB, 3)
    for row in rows:
        add_floor(row, weights_bf16, bandwidth)
    print(json.dumps(header), flush=True)
    for setup in ("hf eager", "ours none"):  # warm-up: kernels, allocator, lmcompress hooks
        run_one(model, setup, min(1024, args.contexts[0]), 1, 8, 8, device)
    models = {"bf16": model}

    def ensure(kind: str):
        if kind == "bf16f" and kind not in models:
            from lmcompress.fused import fuse_rmsnorm

            models[kind] = build_model(args.layers, args.cpu_smoke, device)
            header["fused_norms"] = fuse_rmsnorm(models[kind])
        if kind == "bf16F" and kind not in models:
            models[kind] = build_model(args.layers, args.cpu_smoke, device)
            header["fused"] = fuse(models[kind])
        if kind not in models:
            t0 = time.perf_counter()
            models[kind] = int4_model(args, device, fused=kind == "int4F")
            header[f"weights_read_gib_{kind}"] = round(read_bytes_per_step(models[kind]) / GiB, 3)
            header[f"{kind}_setup_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(header), flush=True)
        return models[kind]

    if args.ttft_repeats:
        for row in ttft_phase(args, ensure, models, device):
            rows.append(row)
            save()
            print(json.dumps(row), flush=True)
    for kind, setup, ctx, batch in plan(args):
        if time.perf_counter() - start > args.time_budget:
            row = {"context": ctx, "batch": batch, "setup": setup, "error": "skipped (time budget)"}
            rows.append(row)
            save()
            print(json.dumps(row), flush=True)
            continue
        ensure(kind)
        # both models stay resident: a run's peak leaves out the other model's weights
        idle = sum(model_bytes(m) for k, m in models.items() if k != kind)
        try:
            row = run_one(models[kind], setup, ctx, batch, args.new_tokens, args.eager_tokens, device,
                          args.prefill_chunk)
            row["peak_gib"] = round(row["peak_gib"] - idle / GiB, 2)
            row = add_floor(row, read_bytes_per_step(models[kind]), bandwidth)
        except torch.cuda.OutOfMemoryError as exc:
            row = {"context": ctx, "batch": batch, "setup": setup, "error": f"OOM: {str(exc)[:60]}"}
        except (LMCompressError, RuntimeError) as exc:
            row = {"context": ctx, "batch": batch, "setup": setup,
                   "error": f"{type(exc).__name__}: {str(exc)[:120]}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        save()
        print(json.dumps(row), flush=True)
    header["seconds"] = round(time.perf_counter() - start, 1)
    save()
    print(json.dumps(header))
    print_table([r for r in rows if r.get("phase") != "ttft"])
    print_ttft([r for r in rows if r.get("phase") == "ttft"])


if __name__ == "__main__":
    main()
