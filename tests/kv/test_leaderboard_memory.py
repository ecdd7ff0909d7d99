"""The leaderboard methods of issue 11 (KVzip, KVzip+, KVzap, CriticalKV, CriticalAdaKV, DuoAttention) and ThinK
free memory for real: ``nbytes`` is exactly the bytes of the kept entries (positions included; ThinK: the kept
key channels and their indices) and, on CPU, deleting the cache returns as much resident memory as ``nbytes``
reports (:func:`memory_helpers.allocator_freed`). The other kvpress presses are covered the same way by
``test_kvpress_presses_memory.py``.

KVzap's surrogate and DuoAttention's head pattern are made here for the test model: the surrogate is an
untrained (seeded random) linear map and the pattern comes from one random sample: they only decide *which*
entries go, which is all a memory test needs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, KVSpec, scoring_hooks
from lmcompress.kv.evict import (
    ComposedPolicy,
    CriticalAdaKV,
    CriticalKV,
    DuoAttention,
    KVzap,
    KVzip,
    KVzipPlus,
    SnapKV,
    ThinK,
)

from .memory_helpers import N, allocator_freed, wide_tiny_llama

pytestmark = pytest.mark.model

RATIO = 0.75


def policies(model) -> dict:
    """``name -> policy`` for the wide test model (calibration files in a temporary folder)."""
    from lmcompress.kv.evict.calibration_files import model_identity, save_calibration
    from lmcompress.kv.evict.duo_calibration import KIND, head_scores
    from lmcompress.kv.evict.kvzap import Surrogate, save_surrogate

    folder = Path(tempfile.mkdtemp(prefix="lmc-memory-"))
    torch.manual_seed(7)
    surrogate = Surrogate(n_layers=2, input_dim=512, output_dim=8)
    zap = save_surrogate(folder / "kvzap.safetensors", surrogate, model_identity(model), {})
    scores = head_scores(model, [torch.randint(0, 128, (1, 64))], q_len=32)
    duo = save_calibration(folder / "duo.json", KIND, model_identity(model),
                           {"scores": scores.tolist(), "sink_size": 4, "recent_size": 60})
    snap = SnapKV(ratio=RATIO, window_size=16)
    return {
        "none": None,
        "kvzip_0.75": KVzip(ratio=RATIO, chunk_size=256, prompt_ids=(5, 6, 7)),
        "kvzip_plus_0.75": KVzipPlus(ratio=RATIO, chunk_size=256, prompt_ids=(5, 6, 7)),
        "kvzap_0.75": KVzap(ratio=RATIO, surrogate=str(zap)),
        "criticalkv_0.75": CriticalKV(base=snap),
        "criticaladakv_0.75": CriticalAdaKV(base=snap),
        "duo_attention_0.5": DuoAttention(pattern=str(duo), ratio=0.5),
        "think_0.75": ThinK(key_channel_compression_ratio=RATIO, window_size=16),
        "snapkv_think_0.75": ComposedPolicy(policies=(snap, ThinK(key_channel_compression_ratio=RATIO,
                                                                  window_size=16))),
    }


def expected_nbytes(name: str, cache) -> int:
    """The bytes the kept entries need: fp32 K + V, an int32 position per entry where tokens are evicted;
    ThinK: a quarter of the key channels and an int64 index per kept channel and head."""
    total = 0
    for layer in cache.layers:
        held = int(layer.held_per_head().sum())
        d = layer.head_dim
        if name.startswith(("think", "snapkv_think")):
            dk = d - int(RATIO * d)
            pos = 4 if name.startswith("snapkv") else 0
            total += held * ((dk + d) * 4 + pos) + layer.num_heads * dk * 8
        elif name == "none":
            total += held * 2 * d * 4
        else:
            total += held * (2 * d * 4 + 4)
    return total


def test_nbytes_is_the_kept_entries():
    model = wide_tiny_llama()
    ids = torch.randint(0, 128, (1, N), generator=torch.Generator().manual_seed(0))
    full = 2 * 8 * N
    for name, policy in policies(model).items():
        cache = CompressedCache(model, KVSpec(evict=policy))
        with torch.no_grad(), scoring_hooks(model, cache):
            model(ids, **cache_kwargs(cache), use_cache=True)
        held = sum(int(layer.held_per_head().sum()) for layer in cache.layers)
        assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors()), name
        assert cache.nbytes == expected_nbytes(name, cache), name
        if name.endswith("_0.75") and "think" not in name:
            assert held == full // 4, name
        elif name.startswith("think"):
            assert held == full
        elif name == "duo_attention_0.5":  # half the heads keep 4 sinks + 60 recent tokens
            assert held == full // 2 + (full // 2) * 64 // N


def test_allocator_releases_what_nbytes_reports():
    result = allocator_freed("kv.test_leaderboard_memory", "policies")
    print(result)
    full = result["none"]["freed"]
    for name, r in result.items():
        assert r["freed"] == pytest.approx(r["nbytes"], rel=0.05, abs=100_000), (name, r)
    for name in ("kvzip_0.75", "kvzip_plus_0.75", "kvzap_0.75", "criticalkv_0.75", "criticaladakv_0.75"):
        assert result[name]["freed"] / full == pytest.approx(0.25, abs=0.05), name
    # ThinK at 0.75: keys a quarter wide, values whole -> (1/4 + 1) / 2 of the K+V bytes
    assert result["think_0.75"]["freed"] / full == pytest.approx(0.625, abs=0.05)
    assert result["snapkv_think_0.75"]["freed"] / full == pytest.approx(0.625 / 4, abs=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_allocator_holds_what_nbytes_reports():
    model = wide_tiny_llama("cuda")
    ids = torch.randint(0, 128, (1, N), device="cuda")
    with torch.no_grad():  # warm-up: cuBLAS workspaces and other one-time allocations stay for the process
        model(ids, **cache_kwargs(CompressedCache(model, KVSpec())), use_cache=True)
    results = {}
    for name, policy in policies(model).items():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        cache = CompressedCache(model, KVSpec(evict=policy))
        with torch.no_grad(), scoring_hooks(model, cache):
            logits = model(ids, **cache_kwargs(cache), use_cache=True).logits
        del logits
        torch.cuda.synchronize()
        results[name] = (torch.cuda.memory_allocated() - base, cache.nbytes)
        assert cache.nbytes == expected_nbytes(name, cache), name
        del cache
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - base < 1 << 20, name
    print(results)
    for name, (held, nbytes) in results.items():
        # the caching allocator rounds blocks up to 512 bytes (small) or 2 MiB segments' blocks (large)
        assert held == pytest.approx(nbytes, rel=0.05, abs=64 * 1024), (name, held, nbytes)
