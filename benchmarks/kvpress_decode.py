"""kvpress presses on a Llama-3.1-8B-shaped model (random bf16 weights): TTFT, eager decode ms/token, peak and KV
memory, one JSON line per run on stdout. Run by ``benchmarks/decode_gpu.py`` in a subprocess whose PYTHONPATH
holds kvpress 0.5.5 and transformers < 5.3 (kvpress's pin); timing only, random weights.

    PYTHONPATH=/tmp/site python benchmarks/kvpress_decode.py --contexts 8192 32768 --ratio 0.875

The presses run as kvpress's own pipeline does (``with press(model): model(prompt)``, then plain decoding with
the pressed ``DynamicCache``), as the shared anchor script ``gpu_anchor_baseline.py`` does.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import statistics
import sys
import time
import types


def _stub_unused_imports() -> None:
    """kvpress imports datasets/fire/cachetools for presses and pipelines not used here (not installed there)."""
    for name in ("datasets", "fire", "cachetools"):
        if name in sys.modules:
            continue
        try:
            __import__(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.load_dataset = None
            mod.LRUCache = dict
            mod.cached = lambda *a, **k: (lambda f: f)
            sys.modules[name] = mod
    real = metadata.version
    # transformers 5.2 checks tokenizers <= 0.23.0 at import; no tokenizer is used here
    metadata.version = lambda p: "0.22.2" if p == "tokenizers" else real(p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--ratio", type=float, default=0.875)
    ap.add_argument("--presses", nargs="+", default=["snapkv", "streaming_llm"])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    _stub_unused_imports()
    import torch
    import transformers
    from kvpress import SnapKVPress, StreamingLLMPress
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    presses = {"snapkv": SnapKVPress, "streaming_llm": StreamingLLMPress}
    print(json.dumps({"kvpress_env": f"transformers {transformers.__version__}, kvpress "
                      f"{metadata.version('kvpress')}"}), flush=True)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                      rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()

    @torch.no_grad()
    def run(ctx: int, press_name: str) -> dict:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(100, 120000, (1, ctx), device="cuda")
        cache = DynamicCache()
        press = presses[press_name](compression_ratio=args.ratio)
        t0 = time.perf_counter()
        with press(model):
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        tok, pos, times = out.logits[:, -1:].argmax(-1), ctx, []
        for _ in range(args.new_tokens):
            t1 = time.perf_counter()
            out = model(tok, past_key_values=cache, use_cache=True, cache_position=torch.tensor([pos], device="cuda"),
                        position_ids=torch.tensor([[pos]], device="cuda"))
            tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t1)
            pos += 1
        med = statistics.median(times[4:])
        return {"context": ctx, "batch": 1, "setup": f"kvpress {press_name} {args.ratio}", "ttft_s": round(ttft, 3),
                "decode_ms": round(med * 1e3, 2), "tok_s": round(1 / med, 1),
                "peak_gib": round((torch.cuda.max_memory_allocated()) / 2**30, 2),
                "peak_above_weights_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2),
                "kv_bytes": kv}

    run(1024, args.presses[0])  # warm-up
    for ctx in args.contexts:
        for name in args.presses:
            try:
                row = run(ctx, name)
            except torch.cuda.OutOfMemoryError as exc:
                row = {"context": ctx, "batch": 1, "setup": f"kvpress {name} {args.ratio}",
                       "error": f"OOM: {str(exc)[:80]}"}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
