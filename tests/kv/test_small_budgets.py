"""Budgets smaller than a windowed scorer's observation window keep the newest window tokens, the last always.

A 300-token prompt on a tiny Llama with a 64-token window (positions 236-299): at ratio r every head keeps
``300 - floor(300 r)`` tokens; up to 64 of them these are exactly the newest positions, above 64 the whole window
plus the best-scored older tokens. Checked for SnapKV, PyramidKV, CAKE, AdaKV and decoding compression around
SnapKV, TOVA and protected recent tokens, at ratios up to 0.99.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.kv.evict import CAKE, TOVA, AdaKV, DecodingCompression, Knorm, PyramidKV, SnapKV
from lmcompress.kv.evict.base import topk_mask
from lmcompress.models import tiny_model

pytestmark = pytest.mark.model

N = 300
W = 64
RATIOS = (0.5, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    torch.manual_seed(0)
    return model, torch.randint(3, 256, (1, N))


def kept_positions(model, ids, policy) -> list[list[list[int]]]:
    """Per layer, per KV head of row 0: the sorted kept positions after the prompt."""
    cache = CompressedCache(model, KVSpec(evict=policy))
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
    out = []
    for layer in cache.layers:
        pos = layer.positions()[0]
        out.append([sorted(p for p in head.tolist() if p >= 0) for head in pos])
    return out


def check_window_rule(kept: list[int], keep: int, window: int) -> None:
    assert len(kept) == keep
    if keep <= window:
        assert kept == list(range(N - keep, N))
    else:
        assert kept[-window:] == list(range(N - window, N))


def test_ties_go_to_the_newest_token():
    scores = torch.tensor([[math.inf, 1.0, math.inf, math.inf, 0.5, math.inf]])
    assert topk_mask(scores, 2).nonzero()[:, 1].tolist() == [3, 5]
    assert topk_mask(scores, 5).nonzero()[:, 1].tolist() == [0, 1, 2, 3, 5]
    flat = torch.tensor([[math.inf, math.inf, math.inf, math.inf]])  # two heads of two tokens, flattened
    order = torch.tensor([[0, 1, 0, 1]])
    assert topk_mask(flat, 2, order=order).nonzero()[:, 1].tolist() == [1, 3]  # the newest position of each


def test_known_case_300_tokens_at_ratio_099_keeps_297_to_299(llama):
    model, ids = llama
    for layer in kept_positions(model, ids, SnapKV(ratio=0.99, window_size=W)):
        assert layer == [[297, 298, 299]] * 2


@pytest.mark.parametrize("ratio", RATIOS)
def test_snapkv_keeps_newest_window_tokens_first(llama, ratio):
    model, ids = llama
    keep = N - math.floor(ratio * N + 1e-9)
    for layer in kept_positions(model, ids, SnapKV(ratio=ratio, window_size=W)):
        for head in layer:
            check_window_rule(head, keep, W)


@pytest.mark.parametrize("ratio", RATIOS)
def test_pyramidkv_keeps_newest_window_tokens_first(llama, ratio):
    model, ids = llama
    policy = PyramidKV(ratio=ratio, window_size=W)
    kept = kept_positions(model, ids, policy)
    for idx, layer in enumerate(kept):
        keep = policy.n_keep(N, idx, len(kept))
        for head in layer:
            check_window_rule(head, keep, W)


@pytest.mark.parametrize("ratio", RATIOS)
def test_adakv_around_snapkv_keeps_newest_window_tokens_first(llama, ratio):
    model, ids = llama
    keep = N - math.floor(ratio * N + 1e-9)
    for layer in kept_positions(model, ids, AdaKV(base=SnapKV(ratio=ratio, window_size=W))):
        total = sum(len(head) for head in layer)
        assert total == len(layer) * keep
        if keep <= W:  # the layer's budget fits in the window: the same newest tokens in every head
            assert layer == [list(range(N - keep, N))] * len(layer)
        else:
            for head in layer:
                assert head[-W:] == list(range(N - W, N))


@pytest.mark.parametrize("ratio", RATIOS)
def test_decoding_compression_prompt_follows_its_base(llama, ratio):
    model, ids = llama
    keep = N - math.floor(ratio * N + 1e-9)
    policy = DecodingCompression(base=SnapKV(ratio=ratio, window_size=W), interval=W, target_size=N)
    for layer in kept_positions(model, ids, policy):
        for head in layer:
            check_window_rule(head, keep, W)


@pytest.mark.parametrize("ratio", RATIOS)
def test_cake_keeps_newest_window_tokens_first(llama, ratio):
    model, ids = llama
    size = N - math.floor(ratio * N + 1e-9)  # average tokens per layer, window included
    kept = kept_positions(model, ids, CAKE(ratio=ratio, window_size=W))
    assert sum(len(layer[0]) for layer in kept) == len(kept) * size
    for layer in kept:
        for head in layer:
            assert len(head) == len(layer[0])
            if size <= W:
                assert head == list(range(N - size, N))
            else:
                assert head[-W:] == list(range(N - W, N))


def test_cake_below_the_window_keeps_its_size_while_decoding(llama):
    model, ids = llama
    cache = CompressedCache(model, KVSpec(evict=CAKE(ratio=0.99, window_size=W)))
    with torch.no_grad():
        out = model(ids, **cache_kwargs(cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(4):
            token = model(token, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
    for layer in cache.layers:
        assert layer.positions()[0, 0].tolist() == [301, 302, 303]


@pytest.mark.parametrize("ratio", (0.9, 0.99))
def test_tova_and_protected_recent_tokens_keep_the_newest(llama, ratio):
    model, ids = llama
    keep = N - math.floor(ratio * N + 1e-9)
    for layer in kept_positions(model, ids, TOVA(ratio=ratio)):
        for head in layer:
            assert head[-1] == N - 1 and len(head) == keep
    for layer in kept_positions(model, ids, Knorm(ratio=ratio, protect_recent=W)):
        for head in layer:
            check_window_rule(head, keep, W)
