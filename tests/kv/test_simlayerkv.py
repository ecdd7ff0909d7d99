"""SimLayerKV: the lazy score against an explicit softmax on hand-built inputs, exact kept positions of lazy and
non-lazy rows, layer decisions on a model against its own eager attention weights, batch rows deciding
independently (ragged storage, bytes = storage), the no-compression cases and bad parameters."""

from __future__ import annotations

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.errors import LMCompressError
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.kv.evict import ScoreInputs, SimLayerKV
from lmcompress.models import tiny_model

pytestmark = pytest.mark.model


def _inputs(n: int = 20, b: int = 2, seed: int = 0) -> ScoreInputs:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, 1, n, 4, generator=g)
    queries = torch.randn(b, 2, 3, 4, generator=g)  # 2 query heads share the KV head; the last 3 tokens
    keys[0, 0, 0] = 4 * queries[0, :, -1].mean(0)  # row 0: the last token looks at the first one
    return ScoreInputs(keys=keys, values=torch.zeros_like(keys), queries=queries,
                       positions=torch.arange(n).expand(b, 1, n), scaling=0.5, layer_idx=0, num_layers=1)


def _explicit_score(inp: ScoreInputs, n_last: int, n_initial: int, n_recent: int) -> list[float]:
    n = inp.keys.shape[2]
    out = []
    for bi in range(inp.keys.shape[0]):
        total = 0.0
        for h in range(2):
            for i in range(n_last):
                qi = inp.queries[bi, h, -n_last + i]
                qpos = n - n_last + i
                logits = torch.tensor([float(qi @ inp.keys[bi, 0, j]) * inp.scaling for j in range(qpos + 1)])
                p = logits.softmax(0)
                cols = [j for j in range(n - n_last) if j < n_initial or j >= n - n_last - n_recent]
                total += float(p[cols].sum())
        out.append(total / (2 * n_last))
    return out


@pytest.mark.parametrize("n_last", [1, 3])
def test_lazy_score_and_kept_positions_on_hand_built_inputs(n_last):
    inp = _inputs()
    policy = SimLayerKV(lazy_threshold=0.5, n_last=n_last, n_recent=5, n_initial=2)
    scores = policy.lazy_scores(inp)
    expected = _explicit_score(inp, n_last, 2, 5)
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=0)
    threshold = (expected[0] + expected[1]) / 2
    assert expected[0] > expected[1]  # row 0 attends to its first token
    policy = SimLayerKV(lazy_threshold=threshold, n_last=n_last, n_recent=5, n_initial=2)
    mask = policy.keep_mask(inp)
    assert mask[0, 0].nonzero().flatten().tolist() == [0, 1, 15, 16, 17, 18, 19]  # 2 initial + 5 recent
    assert bool(mask[1].all())


def test_no_compression_when_short_or_threshold_one():
    inp = _inputs(n=8)
    assert bool(SimLayerKV(lazy_threshold=0.0, n_last=1, n_recent=3, n_initial=4).keep_mask(inp).all())  # 8 <= 8
    assert not bool(SimLayerKV(lazy_threshold=0.0, n_last=1, n_recent=2, n_initial=4).keep_mask(inp).all())
    assert SimLayerKV().is_noop and bool(SimLayerKV(n_recent=2).keep_mask(_inputs()).all())


def test_layer_decisions_match_eager_attention():
    model = tiny_model("llama")
    n, n_initial, n_recent = 48, 4, 8
    ids = torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(2))
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attn = model(ids, output_attentions=True).attentions  # per layer [1, Hq, n, n]
    finally:
        model.set_attn_implementation("sdpa")
    cols = [j for j in range(n - 1) if j < n_initial or j >= n - 1 - n_recent]
    scores = [float(a[0, :, -1, cols].sum(-1).mean()) for a in attn]
    low, high = sorted(scores)[1:3]  # random weights: near-uniform attention, scores close to 12/47
    threshold = (low + high) / 2  # the two layers above it are lazy
    assert high - low > 1e-5  # far above float32 rounding of the two computations
    cache = CompressedCache(model, KVSpec(evict=SimLayerKV(lazy_threshold=threshold, n_recent=n_recent,
                                                           n_initial=n_initial)))
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
    window = set(range(n_initial)) | set(range(n - n_recent, n))
    for layer, s in zip(cache.layers, scores):
        for h in range(layer.num_heads):
            kept = set(layer.positions()[0, h].tolist())
            assert kept == (window if s > threshold else set(range(n))), (layer.layer_idx, s, threshold)
    assert sum(s > threshold for s in scores) == 2


def test_batch_rows_decide_independently_and_bytes_are_storage():
    model = tiny_model("mistral")
    n = 40
    ids = torch.randint(3, 256, (2, n), generator=torch.Generator().manual_seed(1))
    ids[1, 1:] = ids[1, 0]  # a repeated token: attention of the last one spreads evenly, nothing concentrated
    rows = {}

    class Spy(SimLayerKV):
        def lazy_rows(self, inputs):
            out = super().lazy_rows(inputs)
            rows[inputs.layer_idx] = self.lazy_scores(inputs)
            return out

    with torch.no_grad():
        model(ids, **cache_kwargs(CompressedCache(model, KVSpec(evict=Spy(lazy_threshold=0.0, n_recent=6,
                                                                           n_initial=2)))), use_cache=True)
    li, s = next((li, s) for li, s in rows.items() if abs(float(s[0] - s[1])) > 1e-3)
    threshold = float(s.mean())
    cache = CompressedCache(model, KVSpec(evict=SimLayerKV(lazy_threshold=threshold, n_recent=6, n_initial=2)))
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)
    counts = cache.layers[li].held_per_head()  # [B, Hkv]
    lazy = s > threshold
    assert counts.tolist() == [[8 if bool(lazy[b]) else n] * counts.shape[1] for b in range(2)]
    assert cache.layers[li].ragged
    for layer in cache.layers:
        assert layer.nbytes == int(layer.held_per_head().sum()) * (2 * layer.head_dim * 4 + 4)
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())


@pytest.mark.parametrize("bad", [{"lazy_threshold": 1.5}, {"lazy_threshold": "x"}, {"lazy_threshold": -0.1},
                                 {"n_recent": 0}, {"n_last": 0}, {"n_initial": -1}, {"ratio": 0.5},
                                 {"budget": 10}])
def test_bad_parameters(bad):
    with pytest.raises(LMCompressError):
        SimLayerKV(**bad)


def test_a_ratio_sweep_leaves_it_alone():
    from lmcompress.kv.parse import has_eviction, parse_method

    spec = parse_method("simlayerkv:lazy_threshold=0.9,n_recent=64", ratio=0.5)
    assert spec.evict == SimLayerKV(lazy_threshold=0.9, n_recent=64) and spec.evict.ratio == 0
    assert not has_eviction("simlayerkv")
