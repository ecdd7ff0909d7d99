"""Eviction on the GPU: TTFT, decode speed, peak memory and KV bytes of lmcompress's eviction methods on the
anchor shape (Llama-3.1-8B: 32 layers, 32 heads, 8 KV heads, head_dim 128; random bf16 weights — timing and
memory only, never quality), to set beside the kvpress figures in shared/ANCHORS.md.

    python benchmarks/evict_gpu.py --out out/evict_gpu          # on the GPU machine (about 5 minutes)
    PYTHONPATH=src python benchmarks/evict_gpu.py --tiny --out /tmp/evict_gpu   # CPU smoke test

Each row: one prompt of ``ctx`` random tokens prefilled with the method, then ``--new`` greedy decode steps.
``kv_gib`` is ``cache.nbytes`` after the prompt; ``alloc_after_prefill_gib`` is ``torch.cuda.memory_allocated``
above the weights after the prompt (what the allocator really holds: cache plus the last logits).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lmcompress._compat import cache_kwargs


def build_model(tiny: bool, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192)
        dtype = torch.float32
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                          rope_theta=500000.0)
        dtype = torch.bfloat16
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(default)
    return model.eval()


def policies(tiny: bool) -> list[tuple[str, object]]:
    from lmcompress.kv import evict

    win = 16 if tiny else 64
    return [
        ("none", None),
        ("snapkv 0.5", evict.SnapKV(ratio=0.5, window_size=win)),
        ("knorm 0.75", evict.Knorm(ratio=0.75)),
        ("streaming_llm 0.75", evict.StreamingLLM(ratio=0.75)),
        ("expected_attention 0.75", evict.ExpectedAttention(ratio=0.75)),
        ("adakv(snapkv) 0.5", evict.AdaKV(base=evict.SnapKV(ratio=0.5, window_size=win))),
        ("cake 0.75", evict.CAKE(ratio=0.75, window_size=32 if not tiny else 8)),
        ("observed_attention 0.75", evict.ObservedAttention(ratio=0.75)),
    ]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(model, ctx: int, name: str, policy, new: int, device: str, vocab: int) -> dict:
    from lmcompress.kv import CompressedCache, KVSpec

    sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    ids = torch.randint(100, vocab - 1, (1, ctx), device=device)
    cache = CompressedCache(model, KVSpec(evict=policy), reserve=new)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        sync(device)
        ttft = time.perf_counter() - t0
        kv_bytes = cache.nbytes
        alloc = (torch.cuda.memory_allocated() - base_alloc) if device == "cuda" else None
        held = cache.held_per_head()
        tok = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(new):
            t1 = time.perf_counter()
            out = model(tok, **cache_kwargs(cache), use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            sync(device)
            times.append(time.perf_counter() - t1)
    dec = sorted(times[min(4, len(times) - 1):])
    med = dec[len(dec) // 2]
    return {
        "ctx": ctx, "method": name, "ttft_s": round(ttft, 3),
        "kept_per_head_mean": round(float(torch.stack([h.float().mean() for h in held]).mean()), 1),
        "kv_gib": round(kv_bytes / 2**30, 3),
        "alloc_after_prefill_gib": None if alloc is None else round(alloc / 2**30, 3),
        "decode_ms_median": round(med * 1e3, 2), "decode_tok_s": round(1 / med, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/evict_gpu")
    parser.add_argument("--tiny", action="store_true", help="small model on CPU (smoke test)")
    parser.add_argument("--contexts", nargs="+", type=int, default=None)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    contexts = args.contexts or ([512] if args.tiny else [8192, 32768])
    model = build_model(args.tiny, device)
    vocab = model.config.vocab_size
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    import transformers

    info["transformers"] = transformers.__version__
    print(json.dumps(info), flush=True)
    run(model, 256 if args.tiny else 2048, "warm-up", None, 4, device, vocab)
    rows = []
    for ctx in contexts:
        for name, policy in policies(args.tiny):
            if ctx != contexts[-1] and name != "none":
                continue  # methods at the longest context only; the baseline at every context
            try:
                row = run(model, ctx, name, policy, args.new, device, vocab)
            except torch.OutOfMemoryError as exc:  # pragma: no cover - GPU only
                row = {"ctx": ctx, "method": name, "error": f"out of memory: {str(exc)[:120]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evict_gpu.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
