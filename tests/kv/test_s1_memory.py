"""QFilter and SimLayerKV free memory for real: ``nbytes`` is exactly the kept entries' bytes and, in a subprocess
where glibc serves every large allocation by mmap (:func:`memory_helpers.allocator_freed`), deleting the
compressed cache returns as much resident memory as ``nbytes`` reports (a quarter of the uncompressed cache:
QFilter at ratio 0.75, SimLayerKV with every layer lazy and a 4 + 252-token window of the 1024 tokens)."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.kv.evict import QFilter, SimLayerKV
from lmcompress.kv.evict.calibration_files import model_identity
from lmcompress.kv.evict.qfilter import save_filters
from lmcompress.kv.evict.qfilter_calibration import compute_filters

from .memory_helpers import N, allocator_freed, wide_tiny_llama

pytestmark = pytest.mark.model


def policies(model) -> dict:
    """``name -> policy`` on :func:`wide_tiny_llama` (QFilter calibrated on random ids in a temporary file)."""
    g = torch.Generator().manual_seed(0)
    path = tempfile.mkdtemp() + "/f.safetensors"
    save_filters(path, compute_filters(model, [torch.randint(0, 128, (1, 64), generator=g)]), model_identity(model),
                 {})
    return {"none": None, "qfilter_0.75": QFilter(ratio=0.75, filters=path),
            "simlayerkv_all_lazy": SimLayerKV(lazy_threshold=0.0, n_initial=4, n_recent=N // 4 - 4)}


def test_nbytes_is_the_kept_entries_storage():
    model = wide_tiny_llama()
    ids = torch.randint(0, 128, (1, N), generator=torch.Generator().manual_seed(1))
    for name, policy in policies(model).items():
        if policy is None:
            continue
        cache = CompressedCache(model, KVSpec(evict=policy))
        with torch.no_grad():
            model(ids, **cache_kwargs(cache), use_cache=True)
        held = sum(int(layer.held_per_head().sum()) for layer in cache.layers)
        assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors()), name
        assert held == 2 * 8 * N // 4, name  # 2 layers x 8 KV heads x 256 tokens
        assert cache.nbytes == held * (2 * 64 * 4 + 4), name  # fp32 K + V and an int32 position


def test_the_allocator_releases_nbytes():
    result = allocator_freed("kv.test_s1_memory", "policies")
    print(json.dumps(result))  # the BENCHMARKS.md numbers (pytest -s)
    for name, r in result.items():
        assert r["freed"] == pytest.approx(r["nbytes"], rel=0.05, abs=100_000), (name, r)
        if name != "none":
            assert r["freed"] / result["none"]["freed"] == pytest.approx(0.25, abs=0.05), (name, r)
