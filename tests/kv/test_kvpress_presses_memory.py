"""The kvpress presses of issue 11 (part b) free memory for real: ``nbytes`` is exactly the kept entries' bytes
and, in a subprocess where glibc serves every large allocation by mmap, deleting a compressed cache returns as
much resident memory as ``nbytes`` reports (a quarter of the uncompressed cache at ratio 0.75)."""

from __future__ import annotations

import json

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.kv.evict import (
    CUR,
    BlockPress,
    CapPress,
    ChunkKV,
    ChunkPress,
    Compactor,
    EntropyGatedChunkKV,
    Finch,
    KeyRerotation,
    Knorm,
    LagKV,
    LeverageScore,
    NonCausalAttn,
    PerLayerCompression,
    SnapKV,
)

from .memory_helpers import N, allocator_freed, wide_tiny_llama

pytestmark = pytest.mark.model

SPECS = {
    "none": None,
    "chunkkv_snapkv_0.75": ChunkKV(base=SnapKV(ratio=0.75, window_size=16), chunk_length=16),
    "block_knorm_0.75": BlockPress(base=Knorm(ratio=0.75), block_size=128),
    "chunk_knorm_0.75": ChunkPress(base=Knorm(ratio=0.75), chunk_length=256),
    "per_layer_0.75": PerLayerCompression(base=Knorm(), ratios=(0.75, 0.75)),
    "lagkv_0.75": LagKV(ratio=0.75, lag_size=64),
    "cur_0.75": CUR(ratio=0.75),
    "leverage_0.75": LeverageScore(ratio=0.75),
    "non_causal_0.75": NonCausalAttn(ratio=0.75),
    "key_rerotation_0.75": KeyRerotation(base=Knorm(ratio=0.75)),
    "entropy_chunkkv_0.75": EntropyGatedChunkKV(base=Knorm(ratio=0.75), chunk_length=16),
    "finch_0.75": Finch(ratio=0.75, window_size=16),
    "compactor_0.75": Compactor(ratio=0.75),
    "cap_0.75": CapPress(ratio=0.75),
}


def test_nbytes_is_a_quarter_at_ratio_075():
    model = wide_tiny_llama()
    ids = torch.randint(0, 128, (1, N), generator=torch.Generator().manual_seed(0))
    for name, policy in SPECS.items():
        cache = CompressedCache(model, KVSpec(evict=policy))
        with torch.no_grad():
            model(ids, **cache_kwargs(cache), use_cache=True)
        held = sum(int(layer.held_per_head().sum()) for layer in cache.layers)
        assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())
        if policy is None:
            continue
        assert held == 2 * 8 * N // 4, name  # 2 layers x 8 heads x 256 tokens
        assert cache.nbytes == held * (2 * 64 * 4 + 4), name  # fp32 K + V and an int32 position per entry


def test_allocator_releases_what_nbytes_reports():
    result = allocator_freed("kv.test_kvpress_presses_memory", "SPECS")
    print(json.dumps(result))  # the BENCHMARKS.md table (pytest -s)
    for name, r in result.items():
        assert r["freed"] == pytest.approx(r["nbytes"], rel=0.05, abs=100_000), (name, r)
        if name != "none":
            assert r["freed"] / result["none"]["freed"] == pytest.approx(0.25, abs=0.05), (name, r)
