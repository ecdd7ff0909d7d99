"""The shared model-test runner: every tiny architecture x every KV spec through generate and a hand-written
decode loop, with exact kept lengths, honest byte counts and identity at ratio 0."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, IntKV, KVSpec, SnapKV, StreamingLLM
from lmcompress.models import TINY_ARCHS as ARCHS

pytestmark = pytest.mark.model

N_PROMPT = 96
SPECS = {
    "none": KVSpec(),
    "streaming_0.5": KVSpec(evict=StreamingLLM(ratio=0.5)),
    "snapkv_0.75": KVSpec(evict=SnapKV(ratio=0.75, window_size=16)),
    "snapkv_budget": KVSpec(evict=SnapKV(budget=40, window_size=16)),
    "int8": KVSpec(quant=IntKV(bits=8, group_size=16)),
    "int4": KVSpec(quant=IntKV(bits=4, group_size=16)),
    "snapkv+int2": KVSpec(evict=SnapKV(ratio=0.5, window_size=16), quant=IntKV(bits=2, group_size=8)),
}


def prompt(seed: int = 0, n: int = N_PROMPT) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def expected_held(spec: KVSpec, layer, n: int) -> int:
    if layer.is_sliding:
        return min(n, layer.sliding_window - 1)
    if spec.evict is None:
        return n
    if spec.evict.budget is not None:
        return min(n, spec.evict.budget)
    return n - math.floor(spec.evict.ratio * n + 1e-9)


def storage_bytes(cache: CompressedCache) -> int:
    return sum(t.untyped_storage().nbytes() for t in cache.tensors())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(SPECS))
def test_prefill_keeps_exact_counts_and_bytes(tiny_models, arch, name):
    model, spec = tiny_models(arch), SPECS[name]
    cache = CompressedCache(model, spec)
    with torch.no_grad():
        model(prompt(), **cache_kwargs(cache), use_cache=True)
    for layer in cache.layers:
        assert layer.held == expected_held(spec, layer, N_PROMPT), (arch, name, layer.layer_idx)
        assert layer.get_seq_length() == N_PROMPT
        if layer.pos is not None:  # evicted layers: positions distinct, ascending, within range
            pos = layer.pos.view()
            assert (pos[..., 1:] > pos[..., :-1]).all() and int(pos.max()) < N_PROMPT
    assert cache.nbytes == storage_bytes(cache) == sum(t.numel() * t.element_size() for t in cache.tensors())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(SPECS))
def test_generate_runs_and_decode_appends(tiny_models, arch, name):
    model, spec = tiny_models(arch), SPECS[name]
    cache = CompressedCache(model, spec)
    out = model.generate(prompt(1), **cache_kwargs(cache), max_new_tokens=6, do_sample=False,
                         min_new_tokens=6, pad_token_id=0)
    assert out.shape == (1, N_PROMPT + 6)
    for layer in cache.layers:
        assert layer.get_seq_length() == N_PROMPT + 5
        full = expected_held(spec, layer, N_PROMPT) + 5
        assert layer.held == (min(full, layer.sliding_window - 1) if layer.is_sliding else full)
    assert cache.nbytes == storage_bytes(cache)


@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_zero_is_identical_to_an_uncompressed_run(tiny_models, arch):
    model = tiny_models(arch)
    ids = prompt(2)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref_logits = model(ids, **cache_kwargs(DynamicCache(config=model.config))).logits
    ref_tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                **cache_kwargs(DynamicCache(config=model.config)))
    for spec in (KVSpec(), KVSpec(evict=SnapKV(ratio=0.0)), KVSpec(evict=StreamingLLM(ratio=0.0))):
        cache = CompressedCache(model, spec)
        with torch.no_grad():
            logits = model(ids, **cache_kwargs(cache)).logits
        assert torch.equal(logits, ref_logits)
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                **cache_kwargs(CompressedCache(model, spec)))
        assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_hand_written_decode_loop_matches_generate(tiny_models, arch):
    model = tiny_models(arch)
    spec = KVSpec(evict=SnapKV(ratio=0.5, window_size=16), quant=IntKV(bits=8, group_size=16))
    ids = prompt(3)
    expected = model.generate(ids, **cache_kwargs(CompressedCache(model, spec)), max_new_tokens=5,
                              do_sample=False, pad_token_id=0)[0, N_PROMPT:].tolist()
    cache = CompressedCache(model, spec)
    tokens = []
    with torch.no_grad():
        logits = model(ids, **cache_kwargs(cache)).logits[:, -1]
        for _ in range(5):
            nxt = int(logits.argmax(-1))
            tokens.append(nxt)
            logits = model(torch.tensor([[nxt]]), **cache_kwargs(cache)).logits[:, -1]
    assert tokens == expected


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_packed_attention_matches_dequantized_dense_attention(tiny_models, arch):
    """Decode over the packed store must equal SDPA over the same tokens dequantized."""
    model = tiny_models(arch)
    cache = CompressedCache(model, KVSpec(quant=IntKV(bits=4, group_size=16)))
    with torch.no_grad():
        model(prompt(4), **cache_kwargs(cache))
    layer = next(layer for layer in cache.layers if layer.store is not None)
    assert layer.packed_length == N_PROMPT and layer.fp_length == 0
    k, v = layer.store.dequantize()
    q = torch.randn(1, 4, 1, 16)
    new_k, new_v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    layer.update(new_k, new_v)
    out = layer.attend(q, None, 0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, torch.cat([k, new_k], 2), torch.cat([v, new_v], 2), scale=0.25, enable_gqa=True).transpose(1, 2)
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_quantization_error_is_bounded_in_logits(tiny_models, arch):
    model = tiny_models(arch)
    ids = prompt(5)
    with torch.no_grad():
        ref = model(ids, **cache_kwargs(CompressedCache(model, KVSpec()))).logits
        errs = {}
        for bits in (8, 4, 2):
            cache = CompressedCache(model, KVSpec(quant=IntKV(bits=bits, group_size=16)))
            model(ids[:, :-16], **cache_kwargs(cache))
            out = model(ids[:, -16:], **cache_kwargs(cache)).logits  # attends to the packed prefix
            errs[bits] = (out - ref[:, -16:]).abs().max().item()
    assert errs[8] < 2e-3 and errs[8] < errs[4] < errs[2]


def test_question_after_compressed_context_sees_the_right_positions(tiny_models):
    """A second prefill chunk after eviction must attend causally with positions continuing from `seen`."""
    model = tiny_models("llama")
    ids = prompt(6)
    spec = KVSpec(evict=StreamingLLM(budget=N_PROMPT - 26, n_sink=4))  # evicts 10 of the first 80 tokens
    cache = CompressedCache(model, spec)
    with torch.no_grad():
        model(ids[:, :N_PROMPT - 16], **cache_kwargs(cache))
        with cache.compression_paused():
            out = model(ids[:, N_PROMPT - 16:], **cache_kwargs(cache)).logits
        # the same thing, one token at a time
        cache2 = CompressedCache(model, spec)
        model(ids[:, :N_PROMPT - 16], **cache_kwargs(cache2))
        steps = [model(ids[:, i:i + 1], **cache_kwargs(cache2)).logits for i in range(N_PROMPT - 16, N_PROMPT)]
    assert cache.layers[0].held == N_PROMPT - 16 - 10 + 16
    assert (out - torch.cat(steps, dim=1)).abs().max() < 1e-4
