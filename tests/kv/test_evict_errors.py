"""Bad input gets a clear error, never a wrong answer; specs with nested policies serialise and hash."""

from __future__ import annotations

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.errors import LMCompressError
from lmcompress.kv import CompressedCache, IntKV, KVSpec
from lmcompress.kv.evict import (
    CAKE,
    H2O,
    TOVA,
    AdaKV,
    DecodingCompression,
    ExpectedAttention,
    Knorm,
    ObservedAttention,
    PyramidKV,
    SnapKV,
    ThresholdEviction,
)
from lmcompress.models import tiny_model

from .helpers import make_inputs


@pytest.mark.parametrize("make, match", [
    (lambda: Knorm(ratio=1.0), "ratio=1.0 is out of range"),
    (lambda: Knorm(ratio=-0.1), "ratio=-0.1 is out of range"),
    (lambda: SnapKV(ratio=0.5, budget=10), "either ratio or budget"),
    (lambda: SnapKV(window_size=0), "window_size=0"),
    (lambda: SnapKV(kernel_size=4), "kernel_size=4 must be odd"),
    (lambda: PyramidKV(beta=0), "beta=0"),
    (lambda: CAKE(tau1=0.0), r"tau1=0.0 is out of range; allowed: \(0.0"),
    (lambda: CAKE(tau2=-1.0), "tau2=-1.0 is out of range"),
    (lambda: CAKE(gamma=-1.0), "gamma=-1.0"),
    (lambda: CAKE(budget=16, window_size=32), "must exceed window_size"),
    (lambda: CAKE(ratio=0.5, budget=64), "either ratio or budget"),
    (lambda: AdaKV(base=CAKE()), "needs a score-based eviction policy"),
    (lambda: AdaKV(base=Knorm(ratio=0.5), alpha_safeguard=1.5), "alpha_safeguard=1.5"),
    (lambda: AdaKV(base=Knorm(), ratio=0.5), "leave ratio/budget unset"),
    (lambda: DecodingCompression(base=SnapKV(window_size=64), interval=16), "raise them to >= 64"),
    (lambda: DecodingCompression(base=Knorm(), interval=0), "interval=0"),
    (lambda: ThresholdEviction(base=Knorm()), "threshold=None is required"),
    (lambda: ExpectedAttention(epsilon=-1.0), "epsilon=-1.0"),
])
def test_bad_parameters_raise(make, match):
    with pytest.raises(LMCompressError, match=match):
        make()


def test_window_larger_than_context_raises():
    keys = torch.randn(1, 1, 16, 8)
    with pytest.raises(LMCompressError, match="window_size=32"):
        SnapKV(ratio=0.5, window_size=32).keep_mask(make_inputs(keys, torch.randn(1, 2, 16, 8)))
    with pytest.raises(LMCompressError, match="window_size=8 queries"):
        SnapKV(ratio=0.5, window_size=8).keep_mask(make_inputs(keys, torch.randn(1, 2, 4, 8)))


def test_window_larger_than_prompt_raises_in_a_model():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 20))
    for policy in (SnapKV(ratio=0.5, window_size=32), CAKE(budget=40, window_size=32)):
        cache = CompressedCache(model, KVSpec(evict=policy))
        with pytest.raises(LMCompressError, match="window_size=32"), torch.no_grad():
            model(ids, **cache_kwargs(cache), use_cache=True)


def test_attention_weights_unavailable_raise():
    keys = torch.randn(1, 1, 16, 8)
    for policy in (H2O(ratio=0.5), ObservedAttention(ratio=0.5)):
        with pytest.raises(LMCompressError, match="needs the attention weights"):
            policy.keep_mask(make_inputs(keys))
    with pytest.raises(LMCompressError, match="rotary embedding"):
        ExpectedAttention(ratio=0.5).keep_mask(make_inputs(keys, torch.randn(1, 2, 16, 8)))
    # TOVA at decoding time inside a threshold rule has one query, which is enough; SnapKV's window is not
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 20))
    cache = CompressedCache(model, KVSpec(evict=ThresholdEviction(base=TOVA(), threshold=0.0, window=4)))
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True)


def test_nested_specs_round_trip_and_hash():
    specs = [
        KVSpec(evict=AdaKV(base=SnapKV(ratio=0.5, window_size=16)), quant=IntKV(bits=4, group_size=16)),
        KVSpec(evict=DecodingCompression(base=AdaKV(base=Knorm(ratio=0.25)), interval=8, target_size=64)),
        KVSpec(evict=ThresholdEviction(base=Knorm(), threshold=-1.5, window=32)),
        KVSpec(evict=CAKE(budget=512, tau1=1.6, tau2=0.4)),
        KVSpec(evict=PyramidKV(ratio=0.75)),
    ]
    for spec in specs:
        again = KVSpec.from_dict(spec.to_dict())
        assert again == spec
        assert hash(again) == hash(spec)
        assert again.key() == spec.key()
    assert len({s.key() for s in specs}) == len(specs)


def test_cake_defaults_to_the_papers_cache_size_and_takes_a_sweep_ratio():
    from lmcompress.kv.parse import parse_method

    assert CAKE().layer_size(5000) == 1024 and not CAKE().is_noop
    assert CAKE(ratio=0.75).layer_size(1000) == 250
    spec = parse_method("cake:tau1=1.6", ratio=0.5)
    assert spec.evict == CAKE(ratio=0.5, tau1=1.6)
