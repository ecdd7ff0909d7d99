"""End-to-end prefill + decode on a Llama-3.1-8B-shaped model (random bf16 weights) on CUDA: TTFT, decode
ms/token, peak memory and KV bytes for transformers' DynamicCache and StaticCache + torch.compile (the anchor
setups, re-measured in the same run) and lmcompress caches, decoded eagerly or with a captured CUDA graph.

Method strings are lmcompress method strings with an optional decode suffix: ``@graph`` (static slots + CUDA
graph) or ``@rolling`` (StreamingLLM's rolling window, fixed size, CUDA graph). ``dynamic`` and
``hf_static_compiled`` are the transformers baselines. Random weights are fine for time and memory, never for
quality. Usage:

    PYTHONPATH=src python benchmarks/gpu_e2e.py --contexts 8192 32768 --out OUT

Prints a markdown table and writes ``gpu_e2e.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from lmcompress._compat import cache_kwargs
from lmcompress.eval.graph_decode import StaticDecoder
from lmcompress.kv import CompressedCache
from lmcompress.kv.parse import parse_method

GiB = 1 << 30


def build_model(layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                      rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.set_attn_implementation("sdpa")
    return model.eval()


def _hf_static_compiled(model, ids, new_tokens):
    """transformers' StaticCache + torch.compile(mode="reduce-overhead"), as in the project's anchor script."""
    ctx = ids.shape[1]
    model.set_attn_implementation("sdpa")
    cache = StaticCache(config=model.config, max_cache_len=ctx + new_tokens + 8)
    t0 = time.perf_counter()
    out = model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    ttft = time.perf_counter() - t0
    tok = out.logits[:, -1:].argmax(-1)
    step = torch.compile(lambda t, p: model(t, **cache_kwargs(cache), use_cache=True, position_ids=p).logits,
                         mode="reduce-overhead", fullgraph=False)
    times, pos = [], ctx
    for _ in range(new_tokens):
        p = torch.tensor([[pos]], device="cuda")
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        tok = step(tok, p)[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t1)
        pos += 1
    kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return ttft, times[len(times) // 2:], kv, cache


@torch.inference_mode()
def run(model, ctx: int, method: str, new_tokens: int) -> dict:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(100, 120000, (1, ctx), device="cuda")
    name, _, decode = method.partition("@")
    if name == "hf_static_compiled":
        ttft, times, kv_bytes, cache = _hf_static_compiled(model, ids, new_tokens)
        med = statistics.median(times)
    else:
        if name == "dynamic":
            model.set_attn_implementation("sdpa")
            cache = DynamicCache(config=model.config)
        else:
            cache = CompressedCache(model, parse_method(name), reserve=new_tokens + 1)
        t0 = time.perf_counter()
        out = model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        kv_bytes = (sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
                    if name == "dynamic" else cache.nbytes)
        tok = out.logits[:, -1:].argmax(-1)
        times = []
        if decode:
            dec = StaticDecoder(model, cache, new_tokens, rolling=decode == "rolling")
            dec.start(int(tok), ctx)
            for _ in range(new_tokens):
                t1 = time.perf_counter()
                dec.run(1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t1)
            dec.close()
        else:
            for _ in range(new_tokens):
                t1 = time.perf_counter()
                out = model(tok, **cache_kwargs(cache), use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t1)
        med = statistics.median(times[4:])
    peak = torch.cuda.max_memory_allocated() - base
    del cache
    return {"context": ctx, "method": method, "ttft_s": round(ttft, 3), "decode_ms": round(med * 1e3, 2),
            "tok_s": round(1 / med, 1), "peak_gib": round(peak / GiB, 2), "kv_gib": round(kv_bytes / GiB, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--methods", nargs="+",
                    default=["dynamic", "hf_static_compiled", "none", "none@graph", "streaming_llm:ratio=0.75",
                             "streaming_llm:ratio=0.75@graph", "streaming_llm:ratio=0.75@rolling",
                             "snapkv:ratio=0.5@graph", "int4"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    model = build_model(args.layers)
    print(f"weights {sum(p.numel() * p.element_size() for p in model.parameters()) / GiB:.2f} GiB", flush=True)
    for warm in ("dynamic", "none", "none@graph"):  # warm-up
        run(model, 1024, warm, 8)
    rows = []
    for ctx in args.contexts:
        for method in args.methods:
            try:
                r = run(model, ctx, method, args.new_tokens)
            except torch.cuda.OutOfMemoryError as exc:
                r = {"context": ctx, "method": method, "error": f"OOM: {str(exc)[:80]}"}
                torch.cuda.empty_cache()
            rows.append(r)
            print(json.dumps(r), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_e2e.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n| context | cache | TTFT s | decode ms/token | tokens/s | peak GiB | KV GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['context']} | {r['method']} | {r['error']} | | | | |")
        else:
            print(f"| {r['context']} | {r['method']} | {r['ttft_s']} | {r['decode_ms']} | {r['tok_s']} | "
                  f"{r['peak_gib']} | {r['kv_gib']} |")


if __name__ == "__main__":
    main()
