"""Eviction scores on hand-built inputs give known kept sets; kept counts follow the documented rule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lmcompress.kv.evict import (
    H2O,
    TOVA,
    AdaKV,
    ExpectedAttention,
    KeyDiff,
    Knorm,
    ObservedAttention,
    PyramidKV,
    Random,
    SnapKV,
    StreamingLLM,
)
from lmcompress.kv.evict.attention_probs import summed_attention
from lmcompress.kv.evict.base import topk_mask

from .helpers import kept_sets, make_inputs


def basis_keys(n: int, d: int, scale: float = 1.0) -> torch.Tensor:
    """``[1, 1, n, d]`` keys e_(j mod d) * scale."""
    keys = torch.zeros(1, 1, n, d)
    for j in range(n):
        keys[0, 0, j, j % d] = scale
    return keys


def test_knorm_keeps_smallest_norms():
    norms = torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0, 2.0, 6.0, 0.1])
    keys = torch.zeros(1, 1, 8, 4)
    keys[0, 0, :, 0] = norms
    mask = Knorm(ratio=0.5).keep_mask(make_inputs(keys))
    assert kept_sets(mask) == [[[1, 3, 5, 7]]]


def test_keydiff_keeps_keys_unlike_the_mean_direction():
    keys = torch.zeros(1, 1, 6, 3)
    keys[0, 0, :4, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # four keys along e0: the anchor leans to e0
    keys[0, 0, 4, 1] = 1.0
    keys[0, 0, 5, 2] = 1.0
    mask = KeyDiff(budget=2).keep_mask(make_inputs(keys))
    assert kept_sets(mask) == [[[4, 5]]]


def test_streaming_keeps_sinks_and_recent():
    keys = torch.randn(1, 2, 20, 4)
    mask = StreamingLLM(ratio=0.5, n_sink=3).keep_mask(make_inputs(keys))
    for head in kept_sets(mask)[0]:
        assert head == [0, 1, 2, *range(13, 20)]


def test_snapkv_keeps_attended_tokens_and_the_window():
    n, d, w = 12, 16, 2
    keys = basis_keys(n, d)
    queries = torch.zeros(1, 1, w, d)
    queries[0, 0, :, 3] = 30.0  # both window queries attend to token 3
    queries[0, 0, 0, 7] = 30.0  # the first also to token 7
    mask = SnapKV(budget=4, window_size=w, kernel_size=1).keep_mask(make_inputs(keys, queries))
    assert kept_sets(mask) == [[[3, 7, 10, 11]]]


def test_snapkv_pools_then_averages_over_the_group():
    # two query heads share one KV head: head 0 looks at token 2, head 1 at token 5
    n, d, w = 10, 16, 1
    keys = basis_keys(n, d)
    queries = torch.zeros(1, 2, w, d)
    queries[0, 0, 0, 2] = 40.0
    queries[0, 1, 0, 5] = 40.0
    inputs = make_inputs(keys, queries)
    scores = SnapKV(budget=3, window_size=w, kernel_size=3).score(inputs)
    # with pooling 3 each peak of height ~1/2 (after the group mean) spreads as 1/6 over its neighbours
    assert scores[0, 0, 2] == pytest.approx(1 / 6, abs=1e-3)
    assert scores[0, 0, 1] == pytest.approx(1 / 6, abs=1e-3)
    assert scores[0, 0, 0] == pytest.approx(0.0, abs=1e-3)
    assert math.isinf(scores[0, 0, -1])


def test_tova_uses_the_last_query_averaged_over_all_heads():
    n, d = 8, 16
    keys = basis_keys(n, d).expand(1, 2, n, d).clone()
    queries = torch.zeros(1, 2, 3, d)
    queries[0, 0, -1, 1] = 40.0  # KV head 0's query looks at token 1
    queries[0, 1, -1, 4] = 40.0  # KV head 1's query looks at token 4
    queries[0, :, :-1, 6] = 40.0  # earlier queries are ignored by TOVA
    mask = TOVA(budget=3).keep_mask(make_inputs(keys, queries))
    # averaged over all heads, both KV heads keep tokens 1 and 4 plus the last token
    assert kept_sets(mask) == [[[1, 4, 7], [1, 4, 7]]]


def test_h2o_scores_are_the_recorded_accumulated_attention():
    keys = torch.randn(1, 1, 6, 4)
    acc = torch.tensor([[[0.5, 3.0, 0.1, 2.0, 0.2, 1.0]]])
    mask = H2O(budget=3).keep_mask(make_inputs(keys, aux={"h2o": acc}))
    assert kept_sets(mask) == [[[1, 3, 5]]]


def test_observed_attention_matches_kvpress_normalisation():
    torch.manual_seed(0)
    n, d = 10, 8
    keys = torch.randn(1, 1, n, d)
    queries = torch.randn(1, 2, n, d)
    inputs = make_inputs(keys, queries, scaling=d**-0.5)
    acc = summed_attention(inputs)
    # brute force: full causal attention, sum over queries per head, divide by (n - j), mean over the group
    logits = torch.einsum("bhqd,bkd->bhqk", queries, keys[:, 0]) * d**-0.5
    logits = logits.masked_fill(torch.ones(n, n).triu(1).bool(), -math.inf)
    probs = logits.softmax(-1)
    expected = (probs.sum(2) / torch.arange(n, 0, -1)).mean(1, keepdim=True)
    inputs.aux = {"h2o": acc}
    got = ObservedAttention(budget=4).score(inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_expected_attention_prefers_keys_aligned_with_future_queries():
    n, d = 12, 8
    keys = torch.zeros(1, 1, n, d)
    keys[0, 0, :, 1] = 1.0
    keys[0, 0, 9, 0] = 3.0  # aligned with the queries' mean direction
    queries = torch.zeros(1, 1, n, d)
    queries[0, 0, :, 0] = 2.0

    class NoRope:  # identity rotation: pre-RoPE queries equal the given ones
        available = True

        def unrotate(self, x, positions, layer_idx):
            return x.float()

        def mean_rotation(self, positions, layer_idx, head_dim, device):
            return torch.eye(head_dim)

    inputs = make_inputs(keys, queries, rope=NoRope())
    mask = ExpectedAttention(budget=5, n_sink=4, use_vnorm=False).keep_mask(inputs)
    kept = kept_sets(mask)[0][0]
    assert kept[:4] == [0, 1, 2, 3]  # sinks
    assert 9 in kept


def test_pyramid_budgets_shrink_upward_and_average_the_uniform_count():
    p = PyramidKV(ratio=0.5, window_size=64, beta=20)
    counts = [p.n_keep(1000, layer, 30) for layer in range(30)]
    assert counts[0] == 936 and counts[-1] == 64
    assert all(a >= b for a, b in itertools.pairwise(counts))
    assert abs(sum(counts) - 30 * 500) <= 15  # rounding per layer
    # not a well-formed pyramid (short prompt): every layer keeps the uniform count
    assert {p.n_keep(100, layer, 30) for layer in range(30)} == {50}


def test_uniform_kept_count_is_n_minus_floor_ratio_n():
    keys = torch.randn(1, 2, 101, 4)
    for ratio in (0.25, 0.5, 0.75, 0.9):
        mask = Knorm(ratio=ratio).keep_mask(make_inputs(keys))
        assert mask.sum(-1).tolist() == [[101 - math.floor(ratio * 101)] * 2]


@pytest.mark.parametrize("policy", [
    Knorm(ratio=0.75, protect_sinks=3, protect_recent=5),
    KeyDiff(ratio=0.75, protect_sinks=3, protect_recent=5),
    Random(ratio=0.75, protect_sinks=3, protect_recent=5),
    SnapKV(ratio=0.75, window_size=4, protect_sinks=3, protect_recent=5),
    TOVA(ratio=0.75, protect_sinks=3, protect_recent=5),
    H2O(ratio=0.75, protect_sinks=3, protect_recent=5),
])
def test_sinks_and_recent_window_are_always_kept(policy):
    torch.manual_seed(1)
    n = 40
    keys = torch.randn(1, 2, n, 8)
    queries = torch.randn(1, 4, 6, 8)
    inputs = make_inputs(keys, queries, aux={"h2o": torch.rand(1, 2, n)})
    mask = policy.keep_mask(inputs)
    assert mask.sum(-1).tolist() == [[10, 10]]
    assert bool(mask[..., :3].all()) and bool(mask[..., -5:].all())


def test_random_is_reproducible_per_seed():
    keys = torch.randn(1, 2, 30, 4)
    a = Random(ratio=0.5, seed=3).keep_mask(make_inputs(keys))
    b = Random(ratio=0.5, seed=3).keep_mask(make_inputs(keys))
    c = Random(ratio=0.5, seed=4).keep_mask(make_inputs(keys))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_adakv_gives_budget_to_the_head_with_the_best_scores():
    keys = torch.zeros(1, 2, 10, 4)
    # head 0 has small norms (high Knorm scores), head 1 large norms
    keys[0, 0, :, 0] = torch.linspace(0.1, 1.0, 10)
    keys[0, 1, :, 0] = torch.linspace(5.0, 10.0, 10)
    policy = AdaKV(base=Knorm(ratio=0.5), alpha_safeguard=0.2)
    mask = policy.keep_mask(make_inputs(keys))
    # 2 heads x 5 = 10 kept in all; head 1 keeps only its safeguard floor(0.2 * 5) = 1 (its smallest norm)
    assert mask.sum(-1).tolist() == [[9, 1]]
    assert kept_sets(mask) == [[list(range(9)), [0]]]


def test_adakv_without_safeguard_can_starve_a_head():
    keys = torch.zeros(1, 2, 10, 4)
    keys[0, 0, :, 0] = torch.linspace(0.1, 1.0, 10)
    keys[0, 1, :, 0] = torch.linspace(5.0, 10.0, 10)
    mask = AdaKV(base=Knorm(ratio=0.5), alpha_safeguard=0.0).keep_mask(make_inputs(keys))
    assert mask.sum(-1).tolist() == [[10, 0]]


def test_topk_mask_respects_per_row_counts_and_never_picks_minus_inf():
    scores = torch.tensor([[1.0, 5.0, -math.inf, 3.0], [2.0, 1.0, 0.0, -1.0]])
    mask = topk_mask(scores, torch.tensor([4, 1]))
    assert mask.tolist() == [[True, True, False, True], [True, False, False, False]]
