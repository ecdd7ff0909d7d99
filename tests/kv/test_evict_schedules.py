"""Policies with a schedule: CAKE's cascading layer budgets, compression during decoding, threshold eviction."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.kv.evict import CAKE, DecodingCompression, Knorm, SnapKV, ThresholdEviction
from lmcompress.kv.evict.attention_probs import window_attention
from lmcompress.kv.evict.cake import proportional_split
from lmcompress.models import tiny_model

from .helpers import make_inputs

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    torch.manual_seed(0)
    return model, torch.randint(3, 256, (1, 64))


# ------------------------------------------------------------------------------------------------ CAKE


def test_proportional_split_is_exact_and_capped():
    assert proportional_split([1.0, 1.0, 2.0], 100, [100, 100, 100]) == [25, 25, 50]
    assert proportional_split([1.0, 1.0, 8.0], 100, [100, 100, 30]) == [35, 35, 30]
    assert sum(proportional_split([0.3, 0.3, 0.4], 10, [10, 10, 10])) == 10
    assert proportional_split([1.0, 2.0], 100, [5, 10]) == [5, 10]  # total above what the layers hold
    assert proportional_split([0.0, 0.0], 7, [10, 10]) in ([4, 3], [3, 4])


def test_cake_preference_and_indicator_follow_the_formulas():
    torch.manual_seed(0)
    n, d, w = 20, 8, 4
    keys = torch.randn(1, 1, n, d)
    queries = torch.randn(1, 2, w, d)
    policy = CAKE(budget=10, window_size=w, tau1=0.5, tau2=2.0, gamma=3.0, kernel_size=3)
    inputs = make_inputs(keys, queries, scaling=0.5)
    pref, indicator = policy.preference_and_indicator(inputs)
    attn = window_attention(inputs, w)[..., : n - w][0, 0]  # [G, w, n-w]
    entropy = -(attn * torch.log(attn + 1e-10)).sum()
    var = attn.var(dim=1)
    assert pref == pytest.approx(float(entropy**2 * var.sum() ** 0.5), rel=1e-5)
    raw = attn.mean(dim=1) + 3.0 * var  # [G, n-w]
    padded = torch.nn.functional.pad(raw, (1, 1))
    pooled = (padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]) / 3
    torch.testing.assert_close(indicator[0, 0, : n - w], pooled.mean(0), rtol=1e-5, atol=1e-7)
    assert bool(torch.isinf(indicator[0, 0, n - w :]).all())


def test_cake_cascading_bounds_prefill_memory_and_fills_the_budget(llama):
    model, ids = llama
    budget, w = 24, 8
    totals = {}
    for cascading in (True, False):
        cache = CompressedCache(model, KVSpec(evict=CAKE(budget=budget, window_size=w, cascading=cascading)))
        peak: list[int] = []

        def record(*_, _peak=peak, _cache=cache):
            _peak.append(sum(layer.held for layer in _cache.layers))

        hooks = [layer.self_attn.register_forward_hook(record) for layer in model.model.layers]
        try:
            with torch.no_grad():
                model(ids, **cache_kwargs(cache), use_cache=True)
        finally:
            for h in hooks:
                h.remove()
        totals[cascading] = max(peak)
        held = cache.held_tokens()
        assert sum(held) == 4 * budget
        assert all(h >= w for h in held)
        state = cache.layers[0].shared
        assert sorted(state.budgets) == [0, 1, 2, 3]
        assert [state.budgets[i] + w for i in range(4)] == held
        # more preference, more budget
        prefs = [state.prefs[i] for i in range(4)]
        assert held[prefs.index(max(prefs))] == max(held)
        # the indicators are dropped once the prompt's round is over
        assert all(not layer.segments[0].aux for layer in cache.layers)
    assert totals[True] <= 4 * budget  # cascading: never more than the total budget during prefill
    assert totals[False] > 4 * budget  # one-shot: every layer holds the whole prompt until the last one


def test_cake_keeps_evicting_to_budget_while_decoding(llama):
    model, ids = llama
    cache = CompressedCache(model, KVSpec(evict=CAKE(budget=24, window_size=8)))
    with torch.no_grad():
        out = model(ids, **cache_kwargs(cache), use_cache=True)
        held = cache.held_tokens()
        token = out.logits[:, -1:].argmax(-1)
        sizes = []
        for _ in range(5):
            out = model(token, **cache_kwargs(cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            assert cache.held_tokens() == held
            sizes.append(cache.nbytes)
    # one token in, one out: the freed slot takes the next token, so storage stops growing or moving
    assert len(set(sizes[1:])) == 1
    newest = [int(layer.positions()[0, 0, -1]) for layer in cache.layers]
    assert newest == [68] * 4  # the window always holds the newest token


def test_cake_with_ratio_uses_the_uniform_total(llama):
    model, ids = llama
    cache = CompressedCache(model, KVSpec(evict=CAKE(ratio=0.75, window_size=8)))
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
    assert sum(cache.held_tokens()) == 4 * (64 - 48)


# ------------------------------------------------------------------------------------------------ decoding


def test_decoding_compression_every_interval(llama):
    model, ids = llama
    policy = DecodingCompression(base=SnapKV(window_size=3), interval=4, target_size=50)
    cache = CompressedCache(model, KVSpec(evict=policy))
    seen = []
    with torch.no_grad():
        out = model(ids, **cache_kwargs(cache), use_cache=True)
        seen.append(cache.held_tokens()[0])
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(9):
            out = model(token, **cache_kwargs(cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            seen.append(cache.held_tokens()[0])
            assert all(layer.held_per_head().unique().numel() == 1 for layer in cache.layers)
    assert seen == [64, 65, 66, 67, 50, 51, 52, 53, 50, 51]
    # the query buffer is counted and holds at most the base's window
    assert all(layer.evict_state.queries.shape[2] == 1 for layer in cache.layers)
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())


def test_decoding_compression_with_prefill_ratio(llama):
    model, ids = llama
    policy = DecodingCompression(base=Knorm(ratio=0.5), interval=2, target_size=20)
    cache = CompressedCache(model, KVSpec(evict=policy))
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
        assert cache.held_tokens() == [32] * 4
        for _ in range(2):
            model(torch.tensor([[5]]), **cache_kwargs(cache), use_cache=True)
    assert cache.held_tokens() == [20] * 4


# ------------------------------------------------------------------------------------------------ threshold


def test_threshold_eviction_during_decoding_matches_key_norms(llama):
    """Prompt tokens inside the window at the end of the prompt are judged while decoding pushes them out."""
    model, ids = llama
    steps = 12
    ref = DynamicCache(config=model.config)
    with torch.no_grad():  # the prompt's keys, computed exactly as in the compressed run (one chunk)
        model(ids, **cache_kwargs(ref), use_cache=True)
    norms = [layer.keys.norm(dim=-1) for layer in ref.layers]  # [1, Hkv, 64]
    ordered = torch.cat([n.flatten() for n in norms]).sort().values
    mid = ordered.numel() // 2
    threshold = -float(ordered[mid - 1 : mid + 1].mean())  # between two norms: no float-rounding ties
    policy = ThresholdEviction(base=Knorm(), threshold=threshold, window=steps, protect_sinks=2)
    cache = CompressedCache(model, KVSpec(evict=policy))
    n = ids.shape[1]
    pos = torch.arange(n)
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
        at_prefill = [layer.held_per_head().clone() for layer in cache.layers]
        for _ in range(steps):
            model(torch.tensor([[9]]), **cache_kwargs(cache), use_cache=True)
    for layer, norm, before in zip(cache.layers, norms, at_prefill):
        evicted = (pos >= 2) & (-norm < threshold)  # every prompt token has left the window by now
        assert torch.equal(before, n - ((pos < n - steps) & evicted).sum(-1))
        assert torch.equal(layer.held_per_head(), n - evicted.sum(-1) + steps)
        for h in range(2):
            kept = layer.segments[h].positions(1, 1, torch.device("cpu"))[0, 0].tolist()
            assert kept == pos[~evicted[0, h]].tolist() + list(range(n, n + steps))


def test_threshold_without_decoding_only_evicts_the_prompt(llama):
    model, ids = llama
    policy = ThresholdEviction(base=Knorm(), threshold=0.0, window=16, decoding=False)  # -norm < 0: all
    cache = CompressedCache(model, KVSpec(evict=policy))
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
        assert cache.held_tokens() == [16] * 4
        for _ in range(20):
            model(torch.tensor([[7]]), **cache_kwargs(cache), use_cache=True)
    assert cache.held_tokens() == [36] * 4


def test_decoding_window_queries_are_buffered_for_query_scorers(llama):
    model, ids = llama
    policy = ThresholdEviction(base=SnapKV(window_size=4), threshold=0.0, window=8)
    cache = CompressedCache(model, KVSpec(evict=policy))
    from lmcompress.errors import LMCompressError

    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
        with pytest.raises(LMCompressError, match="window_size=4"):
            model(torch.tensor([[7]]), **cache_kwargs(cache), use_cache=True)
    assert not math.isnan(cache.nbytes)
