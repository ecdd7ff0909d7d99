"""Shared by the memory tests: a model whose cache is large enough to see through the allocator, and the check
that deleting a compressed cache returns as much resident memory as ``nbytes`` reports.

The RSS check runs in a subprocess where glibc serves every allocation >= 8 KiB by mmap
(``MALLOC_MMAP_THRESHOLD_``), so a freed tensor goes back to the OS at once: the resident memory that drops when a
cache is deleted is then the bytes its storage held (within page rounding and buffers below the threshold).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

SRC = str(Path(__file__).resolve().parents[2] / "src")
TESTS = str(Path(__file__).resolve().parents[1])
N = 1024


def wide_tiny_llama(device: str = "cpu"):
    """A 2-layer Llama with 8 KV heads of 64 channels: 8 KiB of fp32 K+V per token and layer, so a 1k-token
    cache is large enough to measure through the allocator."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                            max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def measure_freed(model, policies: dict, ids: torch.Tensor) -> dict[str, dict[str, int]]:
    """For each ``name -> policy`` (None = no compression): prefill ``ids`` into a fresh cache (inside
    ``scoring_hooks``), then delete it; ``{"freed": RSS dropped, "nbytes": cache.nbytes}``."""
    import gc

    from lmcompress._compat import cache_kwargs
    from lmcompress.kv import CompressedCache, KVSpec, scoring_hooks

    out = {}
    for name, policy in policies.items():
        cache = CompressedCache(model, KVSpec(evict=policy))
        with torch.no_grad(), scoring_hooks(model, cache):
            logits = model(ids, **cache_kwargs(cache), use_cache=True).logits
        del logits
        gc.collect()
        with_cache = rss()
        nbytes = cache.nbytes
        del cache
        gc.collect()
        out[name] = {"freed": with_cache - rss(), "nbytes": nbytes}
    return out


_SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    import torch
    sys.path.insert(0, {tests!r})
    from kv.memory_helpers import N, measure_freed, wide_tiny_llama

    torch.set_num_threads(1)
    model = wide_tiny_llama()
    ids = torch.randint(0, 128, (1, N))
    policies = getattr(importlib.import_module({module!r}), {builder!r})
    policies = policies(model) if callable(policies) else policies
    print(json.dumps(measure_freed(model, policies, ids)))
""")


def allocator_freed(module: str, builder: str) -> dict[str, dict[str, int]]:
    """Run :func:`measure_freed` in a subprocess with the low mmap threshold, on the policies
    ``module.builder`` (a dict, or a function of the model returning one; ``module`` as imported from the tests
    folder, e.g. ``"kv.test_evict_memory"``)."""
    script = _SCRIPT.format(tests=TESTS, module=module, builder=builder)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="8192", PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
