"""topk_index (the no-sync selection of the default after_forward) picks exactly topk_mask's tokens."""

import math

import pytest
import torch

from lmcompress.kv.evict.base import topk_index, topk_mask


@pytest.mark.parametrize("seed", range(6))
def test_topk_index_equals_topk_mask_with_ties_zeros_and_inf(seed):
    g = torch.Generator().manual_seed(seed)
    b, h, n = 2, 3, 97
    # few distinct values force many ties; signed zeros, +inf (protected tokens) and negatives included
    scores = torch.randint(-3, 4, (b, h, n), generator=g).float() / 4
    scores[torch.rand(b, h, n, generator=g) < 0.1] = math.inf
    scores[torch.rand(b, h, n, generator=g) < 0.1] = -0.0
    for k in (1, 5, 40, 96):
        mask = topk_mask(scores, k)
        idx = topk_index(scores, k)
        assert idx.shape == (b, h, k)
        assert torch.equal(idx, mask.nonzero()[:, 2].view(b, h, k))


def test_topk_index_continuous_scores():
    scores = torch.rand(1, 8, 4096, generator=torch.Generator().manual_seed(1))
    k = 512
    assert torch.equal(topk_index(scores, k), topk_mask(scores, k).nonzero()[:, 2].view(1, 8, k))


@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv"])
def test_prefill_fast_path_keeps_the_keep_mask_tokens(policy):
    """The default after_forward of a finite-score policy (no host sync) keeps what keep_mask selects."""
    from lmcompress.kv.layer import CompressedLayer
    from lmcompress.registry import EVICTION_METHODS

    torch.manual_seed(3)
    b, h, g, n, d = 2, 2, 3, 200, 16
    pol = EVICTION_METHODS.get(policy)(ratio=0.6, window_size=8)
    layer = CompressedLayer(1, 4, evict=pol)
    k, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    query = torch.randn(b, h * g, n, d)
    layer.update(k, v)
    expected = pol.keep_mask(layer.score_inputs(query, 0.25))
    assert pol._uniform_fast_path(layer.score_inputs(query, 0.25))
    pol.after_forward(layer, query, 0.25, None)
    keep = int(expected.sum(-1)[0, 0])
    assert layer.held == keep < n
    assert torch.equal(layer.positions().long(), expected.nonzero()[:, 2].view(b, h, keep))
    assert torch.equal(layer.segments[0].all_tokens()[0], k.gather(2, layer.positions().long()[..., None]
                                                                   .expand(b, h, keep, d)))


def test_snapkv_scores_a_few_heads_at_a_time_with_the_same_result(monkeypatch):
    """Long prompts are scored in KV-head tiles (bounded float32 probabilities); the scores and kept set equal
    the one-tile computation."""
    from lmcompress.kv.evict import attention_probs
    from lmcompress.kv.evict.base import ScoreInputs
    from lmcompress.kv.evict.snapkv import SnapKV

    torch.manual_seed(5)
    b, h, g, n, d, w = 2, 4, 2, 150, 16, 8
    inputs = ScoreInputs(keys=torch.randn(b, h, n, d), values=torch.randn(b, h, n, d),
                         queries=torch.randn(b, h * g, w, d), positions=torch.arange(n).expand(b, h, n).int(),
                         scaling=0.25, layer_idx=0, num_layers=1)
    pol = SnapKV(ratio=0.7, window_size=w)
    assert len(attention_probs.head_tiles(inputs, w)) == 1
    whole = pol.score(inputs)
    monkeypatch.setattr(attention_probs, "TILE_BYTES", b * g * w * n * 4 * 3)  # 3 heads a tile: tiles 3 + 1
    assert attention_probs.head_tiles(inputs, w) == [(0, 3), (3, 4)]
    tiled = pol.score(inputs)
    torch.testing.assert_close(tiled, whole, rtol=1e-6, atol=0)
    assert torch.equal(topk_mask(tiled, 40), topk_mask(whole, 40))
