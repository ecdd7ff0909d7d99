"""Eviction frees memory for real: the allocator shows it, not only ``nbytes``.

On CPU the check runs in a subprocess with glibc's mmap threshold lowered, so every large tensor is its own
mapping and freeing it shrinks the resident set at once; RSS growth while the cache is alive must then track
the cache's bytes. The CUDA version (tests/gpu) uses ``torch.cuda.memory_allocated``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.model

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from lmcompress._compat import cache_kwargs
    from lmcompress.eval.perf import rss_bytes
    from lmcompress.kv import CompressedCache, KVSpec, StreamingLLM, IntKV
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 4096))
    specs = {"none": KVSpec(), "evict": KVSpec(evict=StreamingLLM(ratio=0.75)),
             "int4": KVSpec(quant=IntKV(bits=4))}
    result = {}
    with torch.no_grad():
        model(ids[:, :16])  # warm up
        for name, spec in specs.items():
            before = rss_bytes()
            cache = CompressedCache(model, spec)
            model(ids, **cache_kwargs(cache), logits_to_keep=1)
            result[name] = {"rss_growth": rss_bytes() - before, "nbytes": cache.nbytes}
            del cache
    print(json.dumps(result))
""")


def test_rss_drops_with_eviction_and_quantization():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    full, evicted, int4 = res["none"], res["evict"], res["int4"]
    mb = 1 << 20
    # 2 layers x K,V x 8 heads x 128 dims x fp32 x 4096 tokens = 64 MiB
    assert full["nbytes"] == 64 * mb
    assert evicted["nbytes"] == 16 * mb + 2 * 8 * 1024 * 4  # kept K/V + int32 positions
    assert abs(full["rss_growth"] - full["nbytes"]) < 6 * mb
    assert abs(evicted["rss_growth"] - evicted["nbytes"]) < 6 * mb
    assert abs(int4["rss_growth"] - int4["nbytes"]) < 6 * mb
    assert int4["nbytes"] < full["nbytes"] / 6
