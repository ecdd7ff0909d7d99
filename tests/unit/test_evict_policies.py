import math
from fractions import Fraction

import pytest
import torch

from lmcompress.errors import LMCompressError
from lmcompress.kv.evict import ScoreInputs, SnapKV, StreamingLLM
from lmcompress.kv.evict.base import EvictionPolicy


def inputs(n=40, hkv=2, g=2, d=8, q=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = n if q is None else q
    return ScoreInputs(
        keys=torch.randn(1, hkv, n, d, generator=gen), values=torch.randn(1, hkv, n, d, generator=gen),
        queries=torch.randn(1, hkv * g, q, d, generator=gen),
        positions=torch.arange(n, dtype=torch.int32).expand(1, hkv, n), scaling=d**-0.5,
        layer_idx=0, num_layers=1,
    )


@pytest.mark.parametrize("n", [1, 7, 10, 99, 100, 1000, 1023])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.29, 0.3, 0.5, 0.7, 0.75, 0.9, 0.99])
def test_kept_count_is_n_minus_floor_rn(n, ratio):
    expected = n - math.floor(Fraction(str(ratio)) * n)
    assert StreamingLLM(ratio=ratio).n_keep(n) == expected


def test_budget_keeps_min_n_budget():
    assert StreamingLLM(budget=50).n_keep(40) == 40
    assert StreamingLLM(budget=50).n_keep(400) == 50


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ratio": 1.0}, r"ratio=1.0 is out of range; allowed: \[0.0, 1.0\)"),
    ({"ratio": -0.1}, "out of range"),
    ({"ratio": float("nan")}, "out of range"),
    ({"budget": 0}, "budget=0 is not allowed"),
    ({"budget": -5}, "budget=-5"),
    ({"ratio": 0.5, "budget": 10}, "either ratio or budget"),
    ({"n_sink": -1}, "n_sink"),
])
def test_bad_parameters_rejected(kwargs, match):
    with pytest.raises(LMCompressError, match=match):
        StreamingLLM(**kwargs)


def test_streaming_keeps_sinks_and_most_recent():
    kept = StreamingLLM(ratio=0.5, n_sink=4).select(inputs(n=40))
    expected = list(range(4)) + list(range(24, 40))
    assert kept.shape == (1, 2, 20)
    assert kept[0, 0].tolist() == expected and kept[0, 1].tolist() == expected


def test_protected_recent_and_sinks_always_kept():
    class Oldest(EvictionPolicy):
        name = "oldest"

        def score(self, inp):
            return -inp.positions.float()  # prefers old tokens

    kept = Oldest(ratio=0.5, protect_sinks=2, protect_recent=5).select(inputs(n=20))
    assert kept[0, 0].tolist() == [0, 1, 2, 3, 4, 15, 16, 17, 18, 19]


def test_snapkv_keeps_the_tokens_the_window_attends_to():
    n, w, d = 48, 8, 16
    inp = inputs(n=n, d=d, q=n)
    # make every window query point strongly at tokens 5 and 30 of KV head 0 and token 12 of KV head 1
    inp.keys.zero_()
    inp.queries.zero_()
    inp.keys[0, 0, 5, 0] = inp.keys[0, 0, 30, 1] = 10.0
    inp.keys[0, 1, 12, 2] = 10.0
    inp.queries[0, :2, -w:, 0] = inp.queries[0, :2, -w:, 1] = 10.0
    inp.queries[0, 2:, -w:, 2] = 10.0
    kept = SnapKV(budget=w + 3, window_size=w, kernel_size=1).select(inp)
    window = list(range(n - w, n))
    assert set(kept[0, 0].tolist()) >= {5, 30, *window}
    assert set(kept[0, 1].tolist()) >= {12, *window}


def test_snapkv_pooling_spreads_to_neighbours():
    n, w = 40, 4
    inp = inputs(n=n, q=n)
    inp.keys.zero_()
    inp.queries.zero_()
    inp.keys[0, :, 10, 0] = 8.0
    inp.queries[0, :, -w:, 0] = 8.0
    scores = SnapKV(window_size=w, kernel_size=5).score(inp)
    assert scores[0, 0, 8:13].min() > scores[0, 0, 20]  # neighbours within kernel//2 gain score
    assert torch.isinf(scores[0, 0, -w:]).all()


def test_snapkv_needs_a_chunk_longer_than_its_window():
    with pytest.raises(LMCompressError, match="SnapKV needs window_size=64"):
        SnapKV(ratio=0.5).select(inputs(n=30))
    with pytest.raises(LMCompressError, match="must be odd"):
        SnapKV(kernel_size=4)
