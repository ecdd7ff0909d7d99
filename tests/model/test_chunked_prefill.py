"""chunked_prefill against the one-shot prefill: the same logits and cache for no compression, the same kept
positions for SnapKV (window within the last chunk) and StreamingLLM; a bad chunk size is refused."""

from __future__ import annotations

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.errors import LMCompressError
from lmcompress.eval.chunked_prefill import chunked_prefill
from lmcompress.kv import CompressedCache, KVSpec, SnapKV, StreamingLLM
from lmcompress.models import tiny_model


@pytest.mark.parametrize("spec", [KVSpec(), KVSpec(evict=SnapKV(ratio=0.75, window_size=8)),
                                  KVSpec(evict=StreamingLLM(ratio=0.5, n_sink=4))], ids=["none", "snapkv", "sllm"])
def test_chunked_prefill_matches_one_shot(spec):
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 100), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        one = CompressedCache(model, spec)
        ref = model(ids, **cache_kwargs(one), use_cache=True, logits_to_keep=1).logits[:, -1]
        chunked = CompressedCache(model, spec)
        out = chunked_prefill(model, ids, chunked, 32)  # chunks of 4, 32, 32, 32
        assert chunked.get_seq_length() == one.get_seq_length() == 100
        if spec.evict is None:
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
            assert chunked.held_tokens() == one.held_tokens()  # (storage may differ: buffers grow with headroom)
        for a, b in zip(one.layers, chunked.layers):
            assert torch.equal(a.positions(), b.positions())
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_evict_each_chunk_bounds_the_held_tokens_and_keeps_streaming_positions():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 100), generator=torch.Generator().manual_seed(5))
    spec = KVSpec(evict=StreamingLLM(budget=24, n_sink=4))
    held = []
    with torch.inference_mode():
        one = CompressedCache(model, spec)
        model(ids, **cache_kwargs(one), use_cache=True)
        chunked = CompressedCache(model, spec)
        layer = chunked.layers[0]
        orig = layer.after_attention

        def spy(*a, **k):  # held tokens of layer 0 after each chunk's compression
            orig(*a, **k)
            held.append(layer.held)
        layer.after_attention = spy
        chunked_prefill(model, ids, chunked, 16, evict_each_chunk=True)
    assert max(held) == 24 and len(held) == 7  # 4, 16 x 6 tokens: never more than the budget after a chunk
    for a, b in zip(one.layers, chunked.layers):
        assert torch.equal(a.positions(), b.positions())  # sinks + the last 20 positions


def test_evict_each_chunk_refuses_a_ratio_policy():
    model = tiny_model("llama")
    cache = CompressedCache(model, KVSpec(evict=SnapKV(ratio=0.5)))
    with pytest.raises(LMCompressError, match="budget"):
        chunked_prefill(model, torch.ones((1, 40), dtype=torch.long), cache, 16, evict_each_chunk=True)


def test_bad_chunk_is_refused():
    model = tiny_model("llama")
    with pytest.raises(LMCompressError, match="chunk"):
        chunked_prefill(model, torch.ones((1, 4), dtype=torch.long), CompressedCache(model, KVSpec()), 0)
