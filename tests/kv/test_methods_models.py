"""Shared model-test runner: every eviction method on every tiny architecture.

For each (architecture, method): the prompt compresses to exactly the expected count per layer and head, the
bytes held equal the kept entries' bytes (keys, values, positions and per-token policy values, nothing else),
generation runs, and a policy that evicts nothing leaves the logits unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.kv.evict import (
    CAKE,
    H2O,
    TOVA,
    AdaKV,
    DecodingCompression,
    ExpectedAttention,
    KeyDiff,
    Knorm,
    ObservedAttention,
    PyramidKV,
    Random,
    SnapKV,
    StreamingLLM,
    ThresholdEviction,
)
from lmcompress.models import tiny_model

pytestmark = pytest.mark.model

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3")
N = 40  # prompt tokens
RATIO = 0.5
WINDOW = 4
UNIFORM = N - math.floor(RATIO * N)


def scorers(ratio: float = RATIO, **size) -> dict:
    kw = size or {"ratio": ratio}
    return {
        "random": Random(**kw),
        "streaming_llm": StreamingLLM(**kw),
        "knorm": Knorm(**kw),
        "keydiff": KeyDiff(**kw),
        "snapkv": SnapKV(**kw, window_size=WINDOW),
        "pyramidkv": PyramidKV(**kw, window_size=WINDOW),
        "tova": TOVA(**kw),
        "expected_attention": ExpectedAttention(**kw),
        "h2o": H2O(**kw),
        "observed_attention": ObservedAttention(**kw),
    }


def all_methods() -> dict:
    methods = scorers()
    methods["adakv"] = AdaKV(base=SnapKV(ratio=RATIO, window_size=WINDOW))
    methods["cake"] = CAKE(budget=16, window_size=WINDOW)
    methods["decoding"] = DecodingCompression(base=Knorm(), interval=2, target_size=24)
    methods["threshold"] = None  # threshold set per model in the test
    return methods


METHODS = all_methods()


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    model = tiny_model(request.param)
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (1, N))
    with torch.no_grad():
        base_logits = model(ids).logits[:, -1]
    return request.param, model, ids, base_logits


def compressed_layers(cache: CompressedCache) -> list:
    return [layer for layer in cache.layers if layer.evict is not None]


def aux_count(layer) -> int:
    seg = layer.segments[0]
    return len(seg.aux)


def expected_bytes(layer) -> int:
    """K + V (fp32) + int32 position + float32 per-token policy values, per held entry."""
    d = layer.head_dim
    per_entry = 2 * d * 4 + 4 + 4 * aux_count(layer)
    return int(layer.held_per_head().sum()) * per_entry


def key_norms(model, ids) -> list[torch.Tensor]:
    """``[B, Hkv, N]`` key norms per layer from an ordinary cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
    return [layer.keys.float().norm(dim=-1) for layer in cache.layers]


def check_counts(name, policy, cache, model, ids) -> None:
    layers = compressed_layers(cache)
    assert layers, "no layer is compressed"
    num_layers = len(cache.layers)
    for layer in cache.layers:
        counts = layer.held_per_head()
        if layer.evict is None:  # gemma3 sliding layers keep the model's window
            assert counts.unique().tolist() == [min(N, layer.sliding_window - 1)]
    if name in ("decoding",):
        assert all(layer.held_per_head().unique().tolist() == [N] for layer in layers)
    elif name == "pyramidkv":
        for layer in layers:
            assert layer.held_per_head().unique().tolist() == [policy.n_keep(N, layer.layer_idx, num_layers)]
    elif name == "adakv":
        for layer in layers:
            counts = layer.held_per_head()
            assert int(counts.sum()) == counts.numel() * UNIFORM
            assert int(counts.min()) >= max(1, math.floor(0.2 * UNIFORM))
    elif name == "cake":
        total = 0
        for layer in layers:
            counts = layer.held_per_head()
            assert counts.unique().numel() == 1 and int(counts[0, 0]) >= WINDOW
            total += int(counts[0, 0])
        assert total == len(layers) * 16  # the split fills the total budget exactly
    elif name == "threshold":
        norms = key_norms(model, ids)
        for layer in layers:
            old = torch.arange(N) < N - policy.window
            expected = (~(old & (-norms[layer.layer_idx] < policy.threshold))).sum(-1)
            assert torch.equal(layer.held_per_head(), expected)
            assert int(expected.sum()) < expected.numel() * N  # something was evicted
    else:
        for layer in layers:
            assert layer.held_per_head().unique().tolist() == [UNIFORM]


@pytest.mark.parametrize("name", list(METHODS))
def test_method_on_architecture(arch_model, name):
    arch, model, ids, _ = arch_model
    policy = METHODS[name]
    if name == "threshold":  # a threshold at the median key norm of the full-attention layers evicts about half
        norms = torch.cat([n.flatten() for n in key_norms(model, ids) if n.shape[-1] == N]).sort().values
        mid = norms.numel() // 2
        policy = ThresholdEviction(base=Knorm(), threshold=-float(norms[mid - 1 : mid + 1].mean()), window=8)
    cache = CompressedCache(model, KVSpec(evict=policy))
    with torch.no_grad():
        out = model(ids, **cache_kwargs(cache), use_cache=True)
    assert torch.isfinite(out.logits).all()
    check_counts(name, policy, cache, model, ids)
    if name in ("adakv", "threshold"):  # head-wise methods leave heads of different lengths, stored ragged
        assert any(layer.ragged for layer in compressed_layers(cache))
    # honest bytes: exactly the kept entries (after the prompt every buffer is sized to what it holds)
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())
    for layer in compressed_layers(cache):
        assert layer.nbytes == expected_bytes(layer), (arch, name, layer.layer_idx)
    # generation continues from the compressed cache
    before = [layer.held_per_head().clone() for layer in cache.layers]
    token = out.logits[:, -1:].argmax(-1)
    with torch.no_grad():
        for _ in range(3):
            step = model(token, **cache_kwargs(cache), use_cache=True)
            token = step.logits[:, -1:].argmax(-1)
    assert torch.isfinite(step.logits).all()
    assert cache.get_seq_length() == N + 3
    for layer, prev in zip(cache.layers, before):
        now = layer.held_per_head()
        if layer.evict is None:
            continue
        if name == "decoding":  # compressed back to the target after 2 steps, then one more token
            assert now.unique().tolist() == [25]
        elif name == "cake":  # decoding keeps evicting back to the layer's budget + window
            assert torch.equal(now, prev)
        elif name == "threshold":
            assert bool((now <= prev + 3).all())
        else:
            assert torch.equal(now, prev + 3)


def test_ratio_zero_gives_identical_logits(arch_model):
    _, model, ids, base_logits = arch_model
    for policy in scorers(ratio=0.0).values():
        cache = CompressedCache(model, KVSpec(evict=policy))
        with torch.no_grad():
            logits = model(ids, **cache_kwargs(cache), use_cache=True).logits[:, -1]
        torch.testing.assert_close(logits, base_logits, rtol=1e-5, atol=1e-5)


def test_active_policy_that_evicts_nothing_keeps_logits(arch_model):
    """Every method running (scores, observation, buffers) with a budget above the prompt changes nothing."""
    _, model, ids, base_logits = arch_model
    policies = [
        *scorers(budget=10 * N).values(),
        AdaKV(base=Knorm(budget=10 * N)),
        CAKE(budget=10 * N, window_size=WINDOW),
        DecodingCompression(base=Knorm(), interval=1, target_size=10 * N),
        ThresholdEviction(base=Knorm(), threshold=-math.inf, window=4),
    ]
    for policy in policies:
        cache = CompressedCache(model, KVSpec(evict=policy))
        with torch.no_grad():
            logits = model(ids, **cache_kwargs(cache), use_cache=True).logits[:, -1]
        torch.testing.assert_close(logits, base_logits, rtol=1e-5, atol=1e-5, msg=policy.name)
        assert all(layer.eviction_events == 0 for layer in cache.layers)


@pytest.mark.parametrize("name", ["knorm", "adakv", "cake", "h2o"])
def test_eviction_composes_with_quantization(name):
    """KVSpec(evict=..., quant=...): only the kept tokens are stored, and stored packed."""
    from lmcompress.kv import IntKV

    model = tiny_model("llama")
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (1, N))
    policy = METHODS[name]
    cache = CompressedCache(model, KVSpec(evict=policy, quant=IntKV(bits=4, group_size=16)))
    with torch.no_grad():
        out = model(ids, **cache_kwargs(cache), use_cache=True)
    plain = CompressedCache(model, KVSpec(evict=policy))
    with torch.no_grad():
        model(ids, **cache_kwargs(plain), use_cache=True)
    for layer, ref in zip(cache.layers, plain.layers):
        assert torch.equal(layer.held_per_head(), ref.held_per_head())  # same kept counts as unquantized
        for seg in layer.segments:
            assert seg.fp_length == 0 and seg.packed_length == seg.held
        d = layer.head_dim
        per_entry = 2 * (d // 2 + 2 + 2) + 4 + 4 * aux_count(layer)  # 4-bit codes, fp16 scale+zero, position
        spare = layer.held_per_head().numel() * 2 * d * 4  # one full-precision K and V slot per head (headroom)
        assert layer.nbytes == int(layer.held_per_head().sum()) * per_entry + spare
    token = out.logits[:, -1:].argmax(-1)
    with torch.no_grad():
        step = model(token, **cache_kwargs(cache), use_cache=True)
    assert torch.isfinite(step.logits).all()


def test_gemma3_sliding_layers_can_be_compressed_explicitly():
    model = tiny_model("gemma3")
    ids = torch.randint(3, 256, (1, N))
    cache = CompressedCache(model, KVSpec(evict=Knorm(ratio=0.5), compress_sliding=True))
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
    # sliding layers evict to 20 and then keep the model's window (15 tokens); the full layer keeps 20
    assert cache.held_tokens() == [15, 15, 15, UNIFORM]
    assert all(layer.evict is not None for layer in cache.layers)
