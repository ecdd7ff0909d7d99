"""Eviction frees memory for real: ``nbytes`` drops in proportion to what is evicted, and so does what the
allocator holds (resident memory on CPU, ``torch.cuda.memory_allocated`` on GPU) — for uniform methods, AdaKV's
ragged heads and CAKE's per-layer budgets alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.kv.evict import CAKE, AdaKV, Knorm, SnapKV

pytestmark = pytest.mark.model

SRC = str(Path(__file__).resolve().parents[2] / "src")


def wide_tiny_llama(device: str = "cpu"):
    """A 2-layer Llama with 8 KV heads of 64 channels: 8 KiB of fp32 K+V per token and layer, so a 1k-token
    cache is large enough to measure through the allocator."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                            max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()


SPECS = {
    "none": None,
    "knorm_0.75": Knorm(ratio=0.75),
    "adakv_snapkv_0.75": AdaKV(base=SnapKV(ratio=0.75, window_size=16)),
    "cake_256": CAKE(budget=256, window_size=16),
}
N = 1024


def kv_entry_bytes(layer) -> int:
    return 2 * layer.head_dim * 4


def test_nbytes_drop_in_proportion():
    model = wide_tiny_llama()
    ids = torch.randint(0, 128, (1, N))
    sizes = {}
    for name, policy in SPECS.items():
        cache = CompressedCache(model, KVSpec(evict=policy))
        with torch.no_grad():
            model(ids, **cache_kwargs(cache), use_cache=True)
        held = sum(int(layer.held_per_head().sum()) for layer in cache.layers)
        kv = sum(int(layer.held_per_head().sum()) * kv_entry_bytes(layer) for layer in cache.layers)
        sizes[name] = (cache.nbytes, held, kv)
        assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())
    full_bytes, full_held, _ = sizes["none"]
    assert full_held == 2 * 8 * N
    for name in ("knorm_0.75", "adakv_snapkv_0.75"):
        nbytes, held, kv = sizes[name]
        assert held == full_held // 4
        # K/V bytes are a quarter; the rest is one int32 position per entry (1/128 of an fp32 K+V entry)
        assert nbytes == kv + 4 * held
        assert nbytes / full_bytes == pytest.approx(0.25 * (1 + 4 / 512), rel=1e-6)
    nbytes, held, kv = sizes["cake_256"]
    assert held == 2 * 8 * 256
    assert nbytes == kv + 4 * held


ALLOCATOR_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_evict_memory import SPECS, N, wide_tiny_llama
    from lmcompress._compat import cache_kwargs
    from lmcompress.kv import CompressedCache, KVSpec

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    torch.set_num_threads(1)
    model = wide_tiny_llama()
    ids = torch.randint(0, 128, (1, N))
    out = {{}}
    for name, policy in SPECS.items():
        cache = CompressedCache(model, KVSpec(evict=policy))
        with torch.no_grad():
            logits = model(ids, **cache_kwargs(cache), use_cache=True).logits
        del logits
        gc.collect()
        with_cache = rss()
        nbytes = cache.nbytes
        del cache
        gc.collect()
        out[name] = {{"freed": with_cache - rss(), "nbytes": nbytes}}
    print(json.dumps(out))
""")


def test_allocator_releases_what_nbytes_reports():
    """In a subprocess where glibc serves every allocation >= 8 KiB by mmap, deleting a cache returns its
    storage to the OS: the resident memory freed matches ``nbytes`` (within page rounding and per-head buffers
    below the threshold), so evicted entries are really gone."""
    script = ALLOCATOR_SCRIPT.format(tests=str(Path(__file__).parent))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="8192", PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    full = result["none"]["nbytes"]
    assert full == 2 * 2 * 8 * N * 64 * 4  # 2 layers, K+V, 8 heads, fp32 (no positions without eviction)
    for name, r in result.items():
        assert r["freed"] == pytest.approx(r["nbytes"], rel=0.05, abs=100_000), (name, r)
    for name in ("knorm_0.75", "adakv_snapkv_0.75"):
        assert result[name]["freed"] / result["none"]["freed"] == pytest.approx(0.25, abs=0.05)
    assert result["cake_256"]["freed"] / result["none"]["freed"] == pytest.approx(0.25, abs=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_allocator_drops_with_eviction():
    model = wide_tiny_llama("cuda")
    ids = torch.randint(0, 128, (1, N), device="cuda")
    with torch.no_grad():  # warm-up: cuBLAS workspaces and other one-time allocations stay for the process
        model(ids, **cache_kwargs(CompressedCache(model, KVSpec())), use_cache=True)
    results = {}
    for name, policy in SPECS.items():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        cache = CompressedCache(model, KVSpec(evict=policy))
        with torch.no_grad():
            logits = model(ids, **cache_kwargs(cache), use_cache=True).logits
        del logits
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base
        results[name] = (held, cache.nbytes)
        del cache
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - base < 1 << 20
    for name, (held, nbytes) in results.items():
        # the caching allocator rounds blocks up to 512 bytes (small) or 2 MiB segments' blocks (large)
        assert held == pytest.approx(nbytes, rel=0.05, abs=64 * 1024), (name, held, nbytes)
    for name in ("knorm_0.75", "adakv_snapkv_0.75", "cake_256"):
        assert results[name][0] / results["none"][0] == pytest.approx(0.25, abs=0.05)
    print(json.dumps(results))


@pytest.mark.parametrize("name", list(SPECS))
def test_dropping_a_cache_frees_it_without_the_cyclic_gc(name):
    """No reference cycle holds a cache's layers: storage goes back as soon as the last reference is dropped
    (the CUDA allocator test above depends on it, and so does a user freeing memory between requests)."""
    import gc
    import weakref

    model = wide_tiny_llama("cpu")
    ids = torch.randint(0, 128, (1, 256))
    gc.disable()
    try:
        cache = CompressedCache(model, KVSpec(evict=SPECS[name]))
        with torch.no_grad():
            model(ids, **cache_kwargs(cache), use_cache=True)
        refs = [weakref.ref(cache), *(weakref.ref(layer) for layer in cache.layers)]
        del cache
        assert all(r() is None for r in refs)
    finally:
        gc.enable()
