"""Eviction frees memory for real: ``nbytes`` drops in proportion to what is evicted, and so does what the
allocator holds (resident memory on CPU, ``torch.cuda.memory_allocated`` on GPU) — for uniform methods, AdaKV's
ragged heads and CAKE's per-layer budgets alike."""

from __future__ import annotations

import json

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.kv.evict import CAKE, AdaKV, Knorm, SnapKV

from .memory_helpers import N, allocator_freed, wide_tiny_llama

pytestmark = pytest.mark.model

SPECS = {
    "none": None,
    "knorm_0.75": Knorm(ratio=0.75),
    "adakv_snapkv_0.75": AdaKV(base=SnapKV(ratio=0.75, window_size=16)),
    "cake_256": CAKE(budget=256, window_size=16),
}


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


def test_allocator_releases_what_nbytes_reports():
    """In a subprocess where glibc serves every allocation >= 8 KiB by mmap, deleting a cache returns its
    storage to the OS: the resident memory freed matches ``nbytes`` (within page rounding and per-head buffers
    below the threshold), so evicted entries are really gone."""
    result = allocator_freed("kv.test_evict_memory", "SPECS")
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
