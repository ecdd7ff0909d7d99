"""Shared prefill: a recorded uncompressed prefill replayed into each method's cache gives the state, kept sets
and answers of a real prefill, for every registered eviction method and KV quantizer."""

from __future__ import annotations

import pytest
import torch
from random_ids import ids

from lmcompress.eval.pipeline import answer, prefill
from lmcompress.eval.shared_prefill import runs_model, sharing_prefills
from lmcompress.kv import (
    CompressedCache,
    Knorm,
    KVSpec,
    SnapKV,
)
from lmcompress.kv.evict import KVzip
from lmcompress.registry import EVICTION_METHODS
from method_examples import NEEDS_ARTIFACTS, W, every_spec

pytestmark = pytest.mark.model

def test_every_registered_method_is_covered():
    covered = {key.removeprefix("evict:") for key in every_spec() if key.startswith("evict:")}
    assert covered | set(NEEDS_ARTIFACTS) == set(EVICTION_METHODS.names())


def _segment_tensors(seg) -> list[torch.Tensor]:
    """The valid contents of a segment (spare capacity is uninitialised memory): packed tokens dequantized,
    full-precision tokens, positions and per-token policy values."""
    out = list(seg.store.dequantize()) if seg.packed_length else []
    for buf in (seg.fp_k, seg.fp_v, seg.pos, *seg.aux.values()):
        if buf is not None:
            out.append(buf.view().clone())
    return out


def _state(cache: CompressedCache) -> list:
    """Per layer: held per head, kept positions, bytes and every segment's contents."""
    return [(layer.held_per_head().tolist(), layer.positions().tolist(), layer.nbytes,
             [t for seg in layer.segments for t in _segment_tensors(seg)]) for layer in cache.layers]


def _assert_same_state(a: CompressedCache, b: CompressedCache) -> None:
    for (held_a, pos_a, bytes_a, ta), (held_b, pos_b, bytes_b, tb) in zip(_state(a), _state(b)):
        assert held_a == held_b
        assert pos_a == pos_b
        assert bytes_a == bytes_b
        assert len(ta) == len(tb)
        for x, y in zip(ta, tb):
            assert x.shape == y.shape and torch.equal(x, y)


CONTEXT = ids(100, seed=11)
QUESTION = ids(6, seed=12)


@pytest.mark.parametrize("name", list(every_spec()))
@pytest.mark.parametrize("query_aware", [False, True])
def test_shared_prefill_is_exact(model, name, query_aware):
    spec = every_spec()[name]
    prompt = torch.cat([CONTEXT, QUESTION], dim=1) if query_aware else CONTEXT
    with torch.inference_mode():
        real = CompressedCache(model, spec, reserve=8)
        real_logits = prefill(model, prompt, real)
        with sharing_prefills() as shared:
            for _ in range(2):  # the first call records, the second replays the stored recording
                replayed = CompressedCache(model, spec, reserve=8)
                logits = prefill(model, prompt, replayed)
                assert torch.equal(logits, real_logits)
                _assert_same_state(real, replayed)
        shares = not runs_model(real)  # policies that run or hook the model prefill for real (never shared)
        # KVzip(+) prefill for real but the second run reuses the first one's reconstruction scores
        memo = 1 if isinstance(spec.evict, KVzip) else 0
        assert (shared.recorded, shared.replayed) == ((1, 2) if shares else (0, memo))
    unshared = answer(model, CONTEXT, QUESTION, spec, max_new_tokens=6, query_aware=query_aware, eos_token_ids=[])
    with sharing_prefills() as shared:
        one = answer(model, CONTEXT, QUESTION, spec, max_new_tokens=6, query_aware=query_aware, eos_token_ids=[])
        two = answer(model, CONTEXT, QUESTION, spec, max_new_tokens=6, query_aware=query_aware, eos_token_ids=[])
        assert (shared.recorded, shared.replayed) == ((1, 2) if shares else (0, memo))
    assert one.token_ids == two.token_ids == unshared.token_ids
    assert one.held_tokens == unshared.held_tokens and one.kv_bytes == unshared.kv_bytes


def test_eviction_happened(model):
    """The exactness test compares caches that were really compressed (not two identical full caches)."""
    cache = CompressedCache(model, every_spec()["evict:adakv"])
    with torch.inference_mode(), sharing_prefills():
        prefill(model, CONTEXT, cache)
    assert max(cache.held_tokens()) < CONTEXT.shape[1]
    assert any(layer.ragged for layer in cache.layers)


def test_non_first_chunks_run_normally(model):
    spec = KVSpec(evict=SnapKV(ratio=0.5, window_size=W))
    with torch.inference_mode(), sharing_prefills() as shared:
        cache = CompressedCache(model, spec)
        prefill(model, CONTEXT, cache)
        prefill(model, ids(12, seed=5), cache)  # a second chunk attends over compressed tokens: not replayed
        assert (shared.recorded, shared.replayed) == (1, 1)
    with torch.inference_mode():
        ref = CompressedCache(model, spec)
        prefill(model, CONTEXT, ref)
        prefill(model, ids(12, seed=5), ref)
    _assert_same_state(ref, cache)


def test_store_is_bounded(model):
    with torch.inference_mode(), sharing_prefills(max_bytes=1) as shared:
        prefill(model, CONTEXT, CompressedCache(model, KVSpec(evict=Knorm(ratio=0.5))))
        assert shared.nbytes == 0
        prefill(model, CONTEXT, CompressedCache(model, KVSpec(evict=Knorm(ratio=0.5))))
        assert shared.recorded == 2


@pytest.mark.parametrize("name", ["evict:snapkv", "evict:cake", "quant:kivi"])
def test_shared_prefill_is_exact_with_sliding_window_layers(tiny_models, name):
    """Gemma 3 (sliding-window layers trimmed after attention, their own RoPE) replays exactly too."""
    gemma = tiny_models("gemma3")
    spec = every_spec()[name]
    with torch.inference_mode():
        real = CompressedCache(gemma, spec)
        real_logits = prefill(gemma, CONTEXT, real)
        with sharing_prefills():
            replayed = CompressedCache(gemma, spec)
            assert torch.equal(prefill(gemma, CONTEXT, replayed), real_logits)
    assert any(layer.is_sliding for layer in real.layers)
    _assert_same_state(real, replayed)
