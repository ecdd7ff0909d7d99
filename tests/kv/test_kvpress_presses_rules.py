"""Exact rules of the kvpress presses of issue 11 (part b) on hand-built tensors: kept indices, scores against
direct re-computations, and clear errors for bad parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.errors import LMCompressError
from lmcompress.kv.evict import (
    CUR,
    BlockPress,
    CapPress,
    ChunkKV,
    ChunkPress,
    Compactor,
    ComposedPolicy,
    CompressionRatioDecoding,
    DecodingCompression,
    EntropyGatedChunkKV,
    EvictionPolicy,
    Finch,
    KeyDiff,
    KeyRerotation,
    Knorm,
    LagKV,
    LeverageScore,
    NonCausalAttn,
    PerLayerCompression,
    PrefillDecoding,
    ScoreInputs,
    SnapKV,
    ThresholdEviction,
)
from lmcompress.registry import EVICTION_METHODS


def inputs_from(keys: torch.Tensor, values: torch.Tensor | None = None, queries: torch.Tensor | None = None,
                layer_idx: int = 0, num_layers: int = 1) -> ScoreInputs:
    b, h, n, d = keys.shape
    values = torch.ones_like(keys) if values is None else values
    queries = keys.new_zeros(b, h, 0, d) if queries is None else queries
    positions = torch.arange(n, dtype=torch.int32).expand(b, h, n)
    return ScoreInputs(keys=keys, values=values, queries=queries, positions=positions, scaling=d ** -0.5,
                       layer_idx=layer_idx, num_layers=num_layers, seen=n)


def keys_with_norms(norms: list[list[float]]) -> torch.Tensor:
    """``[1, H, n, 2]`` keys whose L2 norms are ``norms[h][j]``."""
    t = torch.tensor(norms, dtype=torch.float32)
    return torch.stack([t, torch.zeros_like(t)], dim=-1).unsqueeze(0)


def kept_indices(mask: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().squeeze(-1).tolist() for row in mask[0]]


# ------------------------------------------------------------------------------------------------ ChunkKV
def test_chunkkv_keeps_whole_chunks_by_mean_summed_score():
    # Knorm scores -norm; 10 tokens, chunks of 3: [0-2], [3-5], [6-8], [9] (remainder)
    norms = [[1, 1, 1, 9, 9, 9, 2, 2, 2, 0.5], [1, 1, 1, 9, 9, 9, 5, 5, 5, 0.5]]
    mask = ChunkKV(base=Knorm(ratio=0.5), chunk_length=3).keep_mask(inputs_from(keys_with_norms(norms)))
    # chunk means of summed scores: -2, -18, -7, -1 -> keep 4 - floor(0.5 * 4) = 2 chunks: [9] and [0-2]
    assert kept_indices(mask) == [[0, 1, 2, 9], [0, 1, 2, 9]]


def test_chunkkv_rounding_keeps_our_count_where_kvpress_loses_one():
    # 30 chunks at r = 0.9: kvpress int(30 * 0.1) = 2 (0.1 rounds down), here 30 - floor(27) = 3
    policy = ChunkKV(base=Knorm(ratio=0.9), chunk_length=2)
    assert int(30 * (1 - 0.9)) == 2 and policy.chunks_kept(30) == 3
    mask = policy.keep_mask(inputs_from(torch.randn(1, 2, 60, 4)))
    assert mask.sum(-1).unique().tolist() == [6]


def test_chunkkv_short_input_falls_back_to_base():
    keys = keys_with_norms([[3, 1, 2, 4]])
    mask = ChunkKV(base=Knorm(ratio=0.5), chunk_length=8).keep_mask(inputs_from(keys))
    assert kept_indices(mask) == [[1, 2]]


@dataclass(frozen=True)
class FirstChannel(EvictionPolicy):
    """Test scorer: score(j) = k_j[0] (non-negative scores, where the entropy gate is meaningful)."""

    name = "first_channel_test"

    def score(self, inputs):
        return inputs.keys[..., 0].float()


def test_entropy_gated_chunkkv_trims_spiky_important_chunks():
    # chunks of 4: spiky and best (mean 2.075), flat (2), nearly flat (1.15), flat and worst (0.5)
    first = [[8, 0.1, 0.1, 0.1, 2, 2, 2, 2, 1.0, 1.1, 1.2, 1.3, 0.5, 0.5, 0.5, 0.5]]
    inputs = inputs_from(keys_with_norms(first))
    gated = EntropyGatedChunkKV(base=FirstChannel(ratio=0.5), chunk_length=4, low_entropy_chunk_length=1)
    # budget 8: chunk 0 is high-scoring and spiky -> its best token only; chunk 1 whole; chunk 2's best 3
    assert kept_indices(gated.keep_mask(inputs)) == [[0, 4, 5, 6, 7, 9, 10, 11]]
    plain = ChunkKV(base=FirstChannel(ratio=0.5), chunk_length=4)
    assert kept_indices(plain.keep_mask(inputs)) == [[0, 1, 2, 3, 4, 5, 6, 7]]


# ------------------------------------------------------------------------------------------------ BlockPress
def test_block_with_query_agnostic_fixed_scores_is_global_topk():
    keys = torch.randn(1, 2, 37, 8, generator=torch.Generator().manual_seed(0))
    inputs = inputs_from(keys)
    block = BlockPress(base=Knorm(ratio=0.6), block_size=5).keep_mask(inputs)
    assert torch.equal(block, Knorm(ratio=0.6).keep_mask(inputs))


def test_block_keydiff_matches_an_explicit_iteration():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 23, 8, generator=gen)
    inputs = inputs_from(keys)
    n, k, bs = 23, 23 - math.floor(0.5 * 23), 4
    expected = []
    for h in range(2):
        kept = list(range(k))
        for start in range(k, n, bs):
            cur = kept + list(range(start, min(start + bs, n)))
            sub = keys[0, h, cur]
            anchor = torch.nn.functional.normalize(sub, dim=-1).mean(0, keepdim=True)
            score = torch.nn.functional.cosine_similarity(sub, anchor, dim=-1)
            kept = sorted(cur[i] for i in (-score).topk(k).indices.tolist())
        expected.append(kept)
    mask = BlockPress(base=KeyDiff(ratio=0.5), block_size=bs).keep_mask(inputs)
    assert kept_indices(mask) == expected
    assert mask.sum(-1).unique().tolist() == [k]


def test_block_merges_a_last_block_shorter_than_the_query_window():
    policy = BlockPress(base=SnapKV(ratio=0.5, window_size=4), block_size=8)
    assert policy.blocks(10, 30) == [(10, 18), (18, 30)]  # 26..29 would be 4 tokens <= window
    assert policy.blocks(10, 31) == [(10, 18), (18, 26), (26, 31)]


# ------------------------------------------------------------------------------------------------ ChunkPress
def test_chunk_press_keeps_the_ratio_of_every_chunk():
    norms = [[5, 4, 3, 2, 1, 9, 8, 7, 6, 0.1, 0.2]]  # chunks of 5: [0-4], [5-9], [10]
    mask = ChunkPress(base=Knorm(ratio=0.4), chunk_length=5).keep_mask(inputs_from(keys_with_norms(norms)))
    # each chunk keeps c - floor(0.4 c): 3, 3, 1 -> smallest norms inside each chunk
    assert kept_indices(mask) == [[2, 3, 4, 7, 8, 9, 10]]
    assert ChunkPress(base=Knorm(ratio=0.4), chunk_length=5).n_keep(11) == 7


def test_chunk_press_scores_each_chunk_on_its_own():
    keys = torch.randn(1, 1, 12, 4, generator=torch.Generator().manual_seed(2))
    mask = ChunkPress(base=KeyDiff(ratio=0.5), chunk_length=6).keep_mask(inputs_from(keys))
    expected = []
    for s in (0, 6):
        sub = keys[0, 0, s : s + 6]
        anchor = torch.nn.functional.normalize(sub, dim=-1).mean(0, keepdim=True)
        score = -torch.nn.functional.cosine_similarity(sub, anchor, dim=-1)
        expected += sorted((s + score.topk(3).indices).tolist())
    assert kept_indices(mask) == [expected]


# ------------------------------------------------------------------------------------------------ per layer
def test_per_layer_counts_and_errors():
    policy = PerLayerCompression(base=Knorm(), ratios="0.25/0.5/0.9")
    assert policy.ratios == (0.25, 0.5, 0.9)
    assert [policy.n_keep(3000, i, 3) for i in range(3)] == [2250, 1500, 300]  # kvpress: 0.9 keeps 299
    assert int(3000 * (1 - 0.9)) == 299
    with pytest.raises(LMCompressError, match="has 3 ratios but the model has 4 decoder layers"):
        policy.n_keep(10, 0, 4)
    with pytest.raises(LMCompressError, match=r"ratios entry=1.5 is out of range"):
        PerLayerCompression(base=Knorm(), ratios=(0.2, 1.5))
    with pytest.raises(LMCompressError, match="ratios entry 'abc' is not a number"):
        PerLayerCompression(base=Knorm(), ratios="0.2/abc")
    with pytest.raises(LMCompressError, match="cannot have a budget"):
        PerLayerCompression(base=Knorm(budget=4), ratios=(0.5,))
    assert PerLayerCompression(base=Knorm(ratio=0.3), ratios=(0.5,)).base.ratio == 0.0


# ------------------------------------------------------------------------------------------------ composition
def test_composed_counts_and_errors():
    policy = ComposedPolicy(policies=[SnapKV(ratio=0.5, window_size=4), Knorm(ratio=0.25)])
    assert policy.n_keep(100) == 50 - math.floor(0.25 * 50)
    assert EVICTION_METHODS.get("composed").from_dict(policy.to_dict()["policies"] and
                                                       {"policies": policy.to_dict()["policies"]}) == policy
    with pytest.raises(LMCompressError, match="two or more"):
        ComposedPolicy(policies=[Knorm(ratio=0.5)])
    with pytest.raises(LMCompressError, match="cannot contain decoding"):
        ComposedPolicy(policies=[Knorm(ratio=0.5), DecodingCompression(base=Knorm())])
    with pytest.raises(LMCompressError, match="cannot contain threshold"):
        ComposedPolicy(policies=[Knorm(ratio=0.5), ThresholdEviction(base=Knorm(), threshold=1.0)])


# ------------------------------------------------------------------------------------------------ LagKV
def direct_lag_scores(x: torch.Tensor, sink: int, lag: int) -> torch.Tensor:
    """Per-token loop: softmax over a partition of std_D((x - min_next) / (max_next - min_next))."""
    n = x.shape[0]
    end = sink + ((n - sink) // lag) * lag
    out = []
    for p in range(sink, end - lag, lag):
        cur, ref = x[p : p + lag], x[p + lag : p + 2 * lag]
        low, high = ref.min(0).values, ref.max(0).values
        out.append(torch.stack([((cur[i] - low) / (high - low)).std() for i in range(lag)]).softmax(0))
    return torch.cat(out)


@pytest.mark.parametrize("cross", [False, True])
def test_lagkv_scores_match_a_direct_loop(cross):
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 2, 17, 6, generator=gen), torch.randn(1, 2, 17, 6, generator=gen)
    sink, lag = 2, 4  # partitions 2-5, 6-9, 10-13, then 14-16 remainder; scored: 2..9
    scores = LagKV(ratio=0.5, n_sink=sink, lag_size=lag, cross_scoring=cross).score(inputs_from(keys, values))
    for h in range(2):
        direct = (direct_lag_scores(keys[0, h], sink, lag) + direct_lag_scores(values[0, h], sink, lag)) / 2
        if not cross:
            direct = direct.view(-1, lag).argsort(-1).argsort(-1).flatten().float() / lag
        torch.testing.assert_close(scores[0, h, sink:10], direct)
        assert scores[0, h, :sink].tolist() == [1.0] * sink and scores[0, h, 10:].tolist() == [1.0] * 7


def test_lagkv_short_input_keeps_sinks_and_newest():
    scores = LagKV(ratio=0.5, n_sink=2, lag_size=8).score(inputs_from(torch.randn(1, 1, 10, 4)))
    assert scores[0, 0].tolist() == pytest.approx([1, 1, 0, 1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8])


# ------------------------------------------------------------------------------------------------ CUR
def test_cur_scores_match_the_formula():
    gen = torch.Generator().manual_seed(4)
    keys, values = torch.randn(1, 1, 10, 4, generator=gen), torch.randn(1, 1, 10, 4, generator=gen)
    scores = CUR(ratio=0.5, num_sinks=1, local_window_size=4).score(inputs_from(keys, values))
    k2, v2 = keys[0, 0].square().sum(-1), values[0, 0].square().sum(-1)
    for x in (k2, v2):
        for s in range(0, 10, 4):
            x[s : s + 4] = x[s : s + 4] / x[s : s + 4].sum()
    expected = k2 * v2 / (k2 * v2).sum()
    expected[0] = 1.0
    torch.testing.assert_close(scores[0, 0], expected)
    with pytest.raises(LMCompressError, match="leverage_type='foo' is not supported"):
        CUR(leverage_type="foo")


# ------------------------------------------------------------------------------------------------ LeverageScore
class NoRope:
    """A rotary table that applies no rotation (pre-RoPE = post-RoPE states)."""

    available = True

    def unrotate(self, x, positions, layer_idx):
        return x.float()

    def mean_rotation(self, positions, layer_idx, head_dim, device):
        return torch.eye(head_dim)


def test_leverage_scores_find_the_outlier_and_match_the_projection():
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(1, 1, 64, 8, generator=gen) * 0.1
    keys[0, 0, 17] = 5.0  # an outlier of the key geometry
    inputs = inputs_from(keys)
    inputs.rope = NoRope()
    scores = LeverageScore(ratio=0.5, sketch_dimension=8).score(inputs)
    assert int(scores[0, 0].argmax()) == 17
    # the same leverage from an explicit (X'X + eps I)^-1 with the same seeded sketch
    sketch = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) / math.sqrt(8)
    x = (keys - keys.mean(-2, keepdim=True)) @ sketch
    gram = x.transpose(-2, -1) @ x + 1e-2 * torch.eye(8)
    lev = (x @ torch.linalg.inv(gram) * x).sum(-1)
    torch.testing.assert_close(scores, (lev - lev.mean()) / lev.std(), rtol=1e-3, atol=1e-3)


def test_leverage_needs_a_rotary_table():
    with pytest.raises(LMCompressError, match="needs the model's rotary embedding"):
        LeverageScore(ratio=0.5).score(inputs_from(torch.randn(1, 1, 8, 4)))


# ------------------------------------------------------------------------------------------------ NonCausalAttn
def test_non_causal_attention_matches_a_direct_loop():
    gen = torch.Generator().manual_seed(6)
    hq, hkv, n, d, c = 4, 2, 12, 4, 4
    keys, values = torch.randn(1, hkv, n, d, generator=gen), torch.randn(1, hkv, n, d, generator=gen)
    queries = torch.randn(1, hq, n, d, generator=gen)
    scores = NonCausalAttn(ratio=0.5, chunk_size=c).score(inputs_from(keys, values, queries))
    raw = torch.zeros(1, hkv, n)
    for h in range(hkv):
        for g in range(2):
            q = queries[0, 2 * h + g]
            for s in range(0, n, c):
                raw[0, h, s : s + c] += (q[s : s + c] @ keys[0, h, s : s + c].T).softmax(-1).sum(0) / 2
    raw = raw * values.norm(dim=-1)
    pooled = torch.nn.functional.avg_pool1d(raw, 3, stride=1, padding=1)
    torch.testing.assert_close(scores, (pooled - pooled.mean()) / pooled.std())
    with pytest.raises(LMCompressError, match="needs the queries of every cached token"):
        NonCausalAttn(ratio=0.5).score(inputs_from(keys, values, queries[:, :, -3:]))


# ------------------------------------------------------------------------------------------------ Compactor, CapPress
def test_compactor_blends_leverage_and_non_causal_attention_between_protected_ends():
    gen = torch.Generator().manual_seed(8)
    keys, values = torch.randn(1, 2, 40, 8, generator=gen), torch.randn(1, 2, 40, 8, generator=gen)
    queries = torch.randn(1, 4, 40, 8, generator=gen)
    inputs = inputs_from(keys, values, queries)
    inputs.rope = NoRope()
    scores = Compactor(ratio=0.5, sink_size_start=3, sink_size_end=2, chunk_size=8, sketch_dimension=8).score(inputs)
    middle = inputs_from(keys[:, :, 3:38], values[:, :, 3:38], queries[:, :, 3:38])
    middle.rope = NoRope()
    expected = 0.5 * LeverageScore(sketch_dimension=8).score(middle) + NonCausalAttn(chunk_size=8).score(middle)
    torch.testing.assert_close(scores[:, :, 3:38], expected)
    assert torch.isinf(scores[:, :, :3]).all() and torch.isinf(scores[:, :, 38:]).all()


def test_cap_scores_match_the_formula():
    gen = torch.Generator().manual_seed(9)
    hq, hkv, n, d, sink = 2, 1, 12, 4, 2
    keys, values = torch.randn(1, hkv, n, d, generator=gen), torch.randn(1, hkv, n, d, generator=gen)
    queries = torch.randn(1, hq, n, d, generator=gen)
    inputs = inputs_from(keys, values, queries)
    inputs.rope = NoRope()
    scores = CapPress(ratio=0.5, n_sink=sink, tau=2.0).score(inputs)
    k, v = keys[0, 0, sink:], values[0, 0, sink:]
    per_head = []
    for g in range(hq):
        anchor = queries[0, g, sink:].mean(0)
        cos = (k / k.norm(dim=-1, keepdim=True)) @ (anchor / anchor.norm())
        w = torch.exp(2.0 * cos - (2.0 * cos).max())
        cap = torch.eye(d) + sum((w[i] + 1e-6) * torch.outer(v[i], v[i]) for i in range(n - sink))
        per_head.append(w * torch.stack([v[i] @ torch.linalg.solve(cap, v[i]) for i in range(n - sink)]))
    torch.testing.assert_close(scores[0, 0, sink:], torch.stack(per_head).mean(0), rtol=1e-4, atol=1e-6)
    assert torch.isinf(scores[0, 0, :sink]).all()


# ------------------------------------------------------------------------------------------------ Finch
def test_finch_scores_are_count_normalised_window_attention():
    gen = torch.Generator().manual_seed(10)
    hq, hkv, n, d, w = 2, 1, 10, 4, 3
    keys = torch.randn(1, hkv, n, d, generator=gen)
    queries = torch.randn(1, hq, n, d, generator=gen)
    inputs = inputs_from(keys, None, queries)
    scores = Finch(ratio=0.5, window_size=w).score(inputs)
    expected = torch.zeros(n - w)
    for g in range(hq):
        for i in range(w):
            row = n - w + i
            logits = (queries[0, g, row] @ keys[0, 0, : row + 1].T) * inputs.scaling
            expected += logits.softmax(-1)[: n - w] * row / (w * hq)
    torch.testing.assert_close(scores[0, 0, : n - w], expected)
    assert torch.isinf(scores[0, 0, n - w :]).all()
    with pytest.raises(LMCompressError, match="finch needs window_size"):
        Finch(ratio=0.5)
    with pytest.raises(LMCompressError, match="must exceed window_size / \\(1 - ratio\\)"):
        Finch(ratio=0.5, window_size=8, chunk_length=16)


# ------------------------------------------------------------------------------------------------ KeyRerotation
def test_key_rerotation_rotates_kept_keys_by_their_position_shift():
    """Against transformers' own rotary embedding: a kept key at position p moved to position t equals the cached
    key rotated by t - p (cos/sin of the delta, kvpress's formula)."""
    from transformers import DynamicCache

    from lmcompress.kv import CompressedCache, KVSpec
    from lmcompress.models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(7))
    ref = DynamicCache(config=model.config)
    cache = CompressedCache(model, KVSpec(evict=KeyRerotation(base=Knorm(ratio=0.5))))
    with torch.no_grad():
        model(ids, **cache_kwargs(ref))
        model(ids, **cache_kwargs(cache))
    rotary = model.model.rotary_emb
    for layer, full in zip(cache.layers, ref.layers):
        index = Knorm(ratio=0.5).select(inputs_from(full.keys))  # the same selection on the same keys
        kept = full.keys.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, full.keys.shape[-1]))
        target = torch.arange(30 - 15, 30)
        delta = (target - index).float()  # [1, Hkv, 15]
        cos, sin = rotary(kept, delta.reshape(1, -1))
        cos, sin = cos.view(*delta.shape, -1), sin.view(*delta.shape, -1)
        half = kept.shape[-1] // 2
        rot = torch.cat((-kept[..., half:], kept[..., :half]), dim=-1)
        expected = kept * cos + rot * sin
        held_keys, _ = layer.segments[0].all_tokens()
        torch.testing.assert_close(held_keys, expected, rtol=1e-5, atol=1e-5)
        assert layer.positions()[0, 0].tolist() == target.tolist()
        assert layer.get_seq_length() == 30


# ------------------------------------------------------------------------------------------------ decoding variants
def test_ratio_decoding_target_and_errors():
    class Layer:
        seen = 3000

    policy = CompressionRatioDecoding(base=Knorm(), interval=4, target_ratio=0.9)
    assert policy.target_for(Layer()) == 300  # kvpress: max(1, int(3000 * 0.1)) = 299
    with pytest.raises(LMCompressError, match=r"target_ratio=1.5 is out of range"):
        CompressionRatioDecoding(base=Knorm(), target_ratio=1.5)
    with pytest.raises(LMCompressError, match="target_ratio='x' is not a number"):
        CompressionRatioDecoding(base=Knorm(), target_ratio="x")


def test_prefill_decoding_errors():
    with pytest.raises(LMCompressError, match="needs a prefill policy, a decoding policy or both"):
        PrefillDecoding()
    with pytest.raises(LMCompressError, match="must be a decoding or ratio_decoding policy"):
        PrefillDecoding(prefill=Knorm(ratio=0.5), decoding=Knorm(ratio=0.5))


# ------------------------------------------------------------------------------------------------ bad parameters
@pytest.mark.parametrize(("build", "needle"), [
    (lambda: ChunkKV(base=Knorm(ratio=0.5), chunk_length=0), "chunk_length=0 is not allowed"),
    (lambda: ChunkKV(base=None), "chunkkv needs a score-based eviction policy as base"),
    (lambda: BlockPress(base=Knorm(ratio=0.5), block_size=0), "block_size=0 is not allowed"),
    (lambda: BlockPress(base=SnapKV(ratio=0.5, window_size=64), block_size=32),
     "raise block_size above 64"),
    (lambda: ChunkPress(base=Knorm(ratio=0.5), chunk_length=-1), "chunk_length=-1 is not allowed"),
    (lambda: ChunkPress(base=Knorm(budget=8)), "give the base a ratio, not budget=8"),
    (lambda: LagKV(lag_size=0), "lag_size=0 is not allowed"),
    (lambda: LagKV(ratio=1.0), "ratio=1.0 is out of range"),
    (lambda: CUR(local_window_size=0), "local_window_size=0 is not allowed"),
    (lambda: LeverageScore(sketch_dimension=0), "sketch_dimension=0 is not allowed"),
    (lambda: NonCausalAttn(chunk_size=0), "chunk_size=0 is not allowed"),
    (lambda: Compactor(blending="x"), "blending='x' must be a finite number or none"),
    (lambda: CapPress(tau=float("nan")), "tau=nan must be a finite number >= 0"),
    (lambda: KeyRerotation(base=Knorm(ratio=0.5), ratio=0.5), "leave ratio/budget unset"),
])
def test_bad_parameters_raise_clear_errors(build, needle):
    with pytest.raises(LMCompressError, match=None) as err:
        build()
    assert needle in str(err.value)


def test_chunk_wrappers_take_per_layer_ratios():
    inputs = inputs_from(torch.randn(1, 2, 40, 4, generator=torch.Generator().manual_seed(11)), layer_idx=1,
                         num_layers=2)
    per_layer = PerLayerCompression(base=Knorm(), ratios=(0.5, 0.75))
    # layer 1 evicts 0.75: 10 chunks of 4 -> 3 kept; 5 chunks of 8 -> 2 of each kept
    assert ChunkKV(base=per_layer, chunk_length=4).keep_mask(inputs).sum(-1).tolist() == [[12, 12]]
    assert ChunkPress(base=per_layer, chunk_length=8).keep_mask(inputs).sum(-1).tolist() == [[10, 10]]


def test_every_press_round_trips_through_to_dict():
    from .kvpress_presses import presses

    for name, policy in presses(4).items():
        data = policy.to_dict()
        rebuilt = EVICTION_METHODS.get(data.pop("method")).from_dict(data)
        assert rebuilt == policy, name


@dataclass(frozen=True)
class HiddenScorer(EvictionPolicy):
    """Test scorer that declares it scores from hidden states."""

    name = "hidden_test"
    needs_hidden_states = True

    def score(self, inputs):
        return inputs.hidden_states.new_zeros(inputs.keys.shape[:3])


@pytest.mark.parametrize("wrapper", [BlockPress, ChunkPress])
def test_part_scorers_refuse_hidden_state_scorers(wrapper):
    with pytest.raises(LMCompressError, match="carry no hidden states; hidden_test needs them"):
        wrapper(base=HiddenScorer(ratio=0.5))
