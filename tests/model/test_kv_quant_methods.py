"""KV quantization methods in the compressed cache: KIVI's window, QAQ's bit rules and buckets, byte accounting,
composition with eviction, attention over packed storage."""

from __future__ import annotations

import math

import pytest
import torch
from random_ids import ids

from lmcompress._compat import cache_kwargs
from lmcompress.errors import LMCompressError
from lmcompress.kv import CompressedCache, KVSpec, SnapKV, StreamingLLM
from lmcompress.kv.quant import FP8KV, KIVI, QAQ, IntKV, NormalKV, Rotated, TurboKV, UniformKV
from lmcompress.kv.quant.observation import AttentionObservation, lse_over, window_probabilities
from lmcompress.kv.quant.qaq import bits_for_error, key_sigma, value_sigma
from lmcompress.kv.quant.store import PackedStore
from lmcompress.registry import KV_QUANTIZERS

pytestmark = pytest.mark.model  # fixtures `model` and no-grad: conftest.py


def run(model, spec: KVSpec, prompt: int = 40, steps: int = 10, chunk: int | None = None):
    """Prefill ``prompt`` tokens (in chunks of ``chunk``), then decode ``steps``; returns (cache, logits)."""
    tokens = ids(prompt + steps)
    cache = CompressedCache(model, spec)
    outs = []
    chunk = chunk or prompt
    for s in range(0, prompt, chunk):
        outs.append(model(tokens[:, s : s + chunk], **cache_kwargs(cache)).logits)
    for i in range(prompt, prompt + steps):
        outs.append(model(tokens[:, i : i + 1], **cache_kwargs(cache)).logits)
    return cache, torch.cat(outs, dim=1)


def tensor_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for t in cache.tensors())


def test_methods_are_registered():
    for name in ("int", "uniform", "normal", "fp8", "kivi", "qaq", "turbo", "rotated"):
        assert name in KV_QUANTIZERS


@pytest.mark.parametrize("quant", [
    IntKV(bits=8, group_size=16), UniformKV(key_bits=8, value_bits=8, key_granularity="channel", group_size=8),
    NormalKV(key_bits=8, value_bits=8),
    FP8KV(group_size=16), KIVI(bits=8, group_size=8, residual=16), QAQ(min_bits=8, group_size=16, outliers=0),
    TurboKV(bits=8), Rotated(base=IntKV(bits=8, group_size=16)),
    Rotated(base=KIVI(bits=8, group_size=8, residual=16), keys=False),
])
def test_eight_bit_methods_match_full_precision(model, quant):
    _, ref = run(model, KVSpec())
    cache, out = run(model, KVSpec(quant=quant))
    assert cache.layers[0].packed_length > 0
    assert float((out - ref).abs().max()) < 0.05
    assert cache.nbytes == tensor_bytes(cache)


def test_spec_round_trips_every_method():
    for quant in (UniformKV(key_bits=2, value_bits=4, outliers=0.02), NormalKV(key_bits=3, value_bits=3), FP8KV(), KIVI(bits=4), QAQ(key_error=0.01),
                  TurboKV(key_bits=2, value_bits=3, residual=16), Rotated(base=KIVI(bits=2), keys=False)):
        spec = KVSpec(quant=quant)
        assert KVSpec.from_dict(spec.to_dict()) == spec


# ------------------------------------------------------------------------------------------------ KIVI
def test_kivi_flushes_its_window_whole(model):
    cache, _ = run(model, KVSpec(quant=KIVI(bits=2, group_size=8, residual=16)), prompt=40, steps=0)
    layer = cache.layers[0]
    assert (layer.packed_length, layer.fp_length) == (32, 8)  # largest multiple of R, rest full precision
    tokens = ids(60, seed=1)
    for i in range(7):
        model(tokens[:, i : i + 1], **cache_kwargs(cache))
    assert (layer.packed_length, layer.fp_length) == (32, 15)
    model(tokens[:, 7:8], **cache_kwargs(cache))
    assert (layer.packed_length, layer.fp_length) == (48, 0)  # window full: flushed into the packed store


def kivi_bytes(tokens: int, heads: int, dim: int, bits: int, group: int, window: int) -> int:
    """Bytes of KIVI's store holding ``tokens`` (a multiple of the window): keys packed with an fp16 scale and
    zero per channel and group of tokens, values packed with an fp16 scale and zero per token and group of
    channels except the newest ``window``, which are fp32."""
    codes = heads * dim * bits // 8
    keys = tokens * codes + (tokens // group) * heads * dim * 4
    packed_values = tokens - window
    values = packed_values * codes + packed_values * heads * (dim // group) * 4
    return keys + values + window * heads * dim * 4


def test_kivi_layout_and_bytes(model):
    cache, _ = run(model, KVSpec(quant=KIVI(bits=2, group_size=8, residual=16)), prompt=32, steps=0)
    store = cache.layers[0].store
    k, v = store.parts("keys"), store.parts("values")
    # keys: per channel over 8-token groups; values: per token over 8-channel groups; 2-bit codes, 4 per byte
    assert k["scale"].shape == (1, 2, 4, 16) and k["codes"].shape == (1, 2, 4, 8, 4)
    # the newest 16 values stay in full precision (KIVI's sliding value window)
    assert v["scale"].shape == (1, 2, 16, 2) and v["codes"].shape == (1, 2, 16, 4)
    assert store.value_packed == 16
    assert store.nbytes == kivi_bytes(32, 2, 16, 2, 8, 16)
    _, values = store.dequantize()
    assert torch.equal(values[:, :, 16:], cache.layers[0].store._vfp.view())  # exact window


def test_snapkv_composes_with_kivi(model):
    n = 128
    full, _ = run(model, KVSpec(), prompt=n, steps=0)
    spec = KVSpec(evict=SnapKV(ratio=0.75, window_size=8), quant=KIVI(bits=2, group_size=8, residual=16))
    cache, _ = run(model, spec, prompt=n, steps=0)
    assert cache.held_tokens() == [32] * 4
    layer = cache.layers[0]
    assert (layer.packed_length, layer.fp_length) == (32, 0)
    # 4x fewer tokens, 2-bit codes with fp16 scale and zero per 8 elements, the newest 16 values in fp32
    assert layer.store.nbytes == kivi_bytes(32, 2, 16, 2, 8, 16)
    assert full.nbytes == 4 * 2 * (2 * 128 * 16) * 4
    # what else the layer holds: int32 positions of the kept tokens and one free full-precision slot
    positions, spare = 2 * 32 * 4, 2 * (2 * 1 * 16) * 4
    assert layer.nbytes == layer.store.nbytes + positions + spare
    assert full.nbytes / cache.nbytes == pytest.approx(full.nbytes / (4 * (kivi_bytes(32, 2, 16, 2, 8, 16)
                                                                          + positions + spare)))


@pytest.mark.parametrize("evict", [StreamingLLM(ratio=0.5, protect_sinks=4), SnapKV(ratio=0.5, window_size=8)])
@pytest.mark.parametrize("quant", [IntKV(bits=4, group_size=16), QAQ(group_size=16), NormalKV(4, 4), TurboKV(bits=2),
                                   Rotated(base=UniformKV(bits=3, group_size=8))])
def test_eviction_composes_with_quantization(model, evict, quant):
    cache, out = run(model, KVSpec(evict=evict, quant=quant), prompt=64, steps=4)
    assert cache.held_tokens() == [36] * 4
    assert torch.isfinite(out).all()
    assert cache.nbytes == tensor_bytes(cache)


# ------------------------------------------------------------------------------------------------ QAQ rules
def test_qaq_key_and_value_error_bounds():
    q2 = torch.tensor([4.0, 16.0])
    t = 100
    expected = math.sqrt(math.log(t**3 / (t - 1) * 0.01**2 + 1) / 4.0)
    assert key_sigma(q2, t, 0.01)[0].item() == pytest.approx(expected, rel=1e-6)
    assert key_sigma(q2, t, 0.01)[1].item() == pytest.approx(expected / 2, rel=1e-6)  # larger queries: tighter
    s = torch.tensor([0.5, 0.05, 0.0])
    sig = value_sigma(s, t, 0.1)
    assert sig[0].item() == pytest.approx(0.1 / (10 * 0.5))
    assert sig[1].item() == pytest.approx(10 * sig[0].item())  # 10x less attention: 10x more error allowed
    assert math.isinf(sig[2].item())


def test_qaq_bits_from_error():
    ranges = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    sigma = torch.tensor([1.0, 0.1, 0.05, 0.03, 1e-4, 1e-9])
    # log2(1 / (2 sqrt(3) sigma) + 1) = 0.38, 1.96, 2.76, 3.41, 11.5 (clamped), 0 (clamped)
    assert bits_for_error(ranges, sigma, 1, 8).tolist() == [1, 2, 3, 4, 8, 1]
    assert bits_for_error(ranges, sigma, 2, 4).tolist() == [2, 2, 3, 4, 4, 2]


def test_qaq_buckets_tokens_by_width(model):
    quant = QAQ(group_size=16, key_error=1e-2, value_error=0.05, min_bits=1, attention_window=5)
    cache, out = run(model, KVSpec(quant=quant), prompt=40, steps=6)
    for layer in cache.layers:
        store = layer.store
        hist = store.width_histogram()
        assert sum(hist["keys"].values()) == sum(hist["values"].values()) == 42  # 46 held, 4 pending
        assert hist["pending"] == {8: 4}  # the newest attention_window - 1 tokens at max_bits
        assert layer.fp_length == 0
        keys, _ = store.dequantize()
        blocks = list(store.blocks(8))
        assert torch.equal(torch.cat([b[2] for b in blocks], dim=2), keys)
        assert set(hist["keys"]) <= set(range(1, 9))
    assert cache.nbytes == tensor_bytes(cache)
    assert torch.isfinite(out).all()


def test_qaq_looser_targets_store_fewer_bytes(model):
    sizes = []
    for err in (1e-4, 1e-2, 1.0):
        cache, _ = run(model, KVSpec(quant=QAQ(group_size=16, key_error=err, value_error=err, min_bits=1)),
                       prompt=64, steps=0)
        sizes.append(cache.nbytes)
    assert sizes[0] > sizes[1] > sizes[2]


def test_qaq_rejects_bad_settings():
    with pytest.raises(LMCompressError, match="outliers"):
        QAQ(outliers=0.5)
    with pytest.raises(LMCompressError, match="min_bits"):
        QAQ(min_bits=0)
    with pytest.raises(LMCompressError, match="max_bits"):
        QAQ(max_bits=9)
    with pytest.raises(LMCompressError, match="key_error"):
        QAQ(key_error=0)
    with pytest.raises(LMCompressError, match="granularity"):
        QAQ(granularity="channel")


# ------------------------------------------------------------------------------------------------ attention
class RecordingStore(PackedStore):
    """A packed store that asks for attention statistics and records them."""

    needs_attention = True
    attention_rows = 3

    def observe_attention(self, obs):
        self.seen = obs


def test_layer_hands_exact_attention_probabilities(model):
    quant = IntKV(bits=8, group_size=16)
    cache, _ = run(model, KVSpec(quant=quant), prompt=24, steps=0)
    layer = cache.layers[1]
    old = layer.store
    store = RecordingStore(old.key_codec, old.value_codec, old.head_dim, old.dtype)
    k, v = old.dequantize()
    store.append(k, v)
    layer.segments[0].store = store
    torch.manual_seed(0)
    query = torch.randn(1, 4, 2, 16)
    new_k, new_v = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    layer.update(new_k, new_v)
    layer.attend(query, None, 0.25)
    obs = store.seen
    assert obs.query.shape[2] == 2 and obs.lse is not None
    all_k = torch.cat([store.dequantize()[0], new_k], dim=2)
    probs = window_probabilities(obs, all_k, slice(0, 26))  # [1, 2, 26]
    s = torch.einsum("bhgqd,bhkd->bhgqk", query.reshape(1, 2, 2, 2, 16), all_k) * 0.25
    s[..., 0, 25] = -torch.inf  # the first of the two queries does not see the second new token
    expected = s.softmax(-1).amax(dim=(2, 3))
    assert torch.allclose(probs, expected, atol=1e-5)


def test_lse_over_full_precision_keys():
    q = torch.randn(1, 4, 3, 8)
    k = torch.randn(1, 2, 5, 8)
    obs = AttentionObservation(query=q, scaling=0.5, mask=None, lse=None, fp_keys=k)
    lse = lse_over(obs, k)
    s = torch.einsum("bhgqd,bhkd->bhgqk", q.reshape(1, 2, 2, 3, 8), k) * 0.5
    assert torch.allclose(lse, torch.logsumexp(s, -1).reshape(1, 4, 3), atol=1e-6)


@pytest.mark.parametrize("quant", [KIVI(bits=4, group_size=8, residual=16), QAQ(group_size=16)])
def test_packed_attention_equals_attention_over_dequantized_states(model, quant):
    cache, _ = run(model, KVSpec(quant=quant), prompt=40, steps=3)
    layer = cache.layers[2]
    pk, pv = layer.store.dequantize()
    keys = torch.cat([pk, layer.fp_k.view()], dim=2)
    values = torch.cat([pv, layer.fp_v.view()], dim=2)
    query = torch.randn(1, 4, 1, 16)
    out = layer.attend(query, None, 0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(query, keys, values, scale=0.25, enable_gqa=True)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)


def test_group_size_not_dividing_head_dim_rejected_at_cache_build(model):
    with pytest.raises(LMCompressError, match="does not divide head_dim=16"):
        CompressedCache(model, KVSpec(quant=UniformKV(group_size=24)))


def test_non_finite_states_rejected_when_committed(model):
    cache = CompressedCache(model, KVSpec(quant=IntKV(bits=4, group_size=16)))
    layer = cache.layers[0]
    bad = torch.randn(1, 2, 4, 16)
    bad[0, 0, 1, 3] = float("nan")
    layer.update(bad, torch.randn(1, 2, 4, 16))
    with pytest.raises(LMCompressError, match="NaN/inf"):
        layer.after_attention(torch.randn(1, 4, 4, 16), None, 0.25)


@pytest.mark.parametrize("make", [
    lambda: KIVI(bits=5), lambda: KIVI(residual=20, group_size=32), lambda: UniformKV(key_bits=0),
    lambda: UniformKV(value_bits=9), lambda: NormalKV(outliers=-0.1), lambda: FP8KV(granularity="row"),
])
def test_methods_reject_bad_settings(make):
    with pytest.raises(LMCompressError):
        make()


def test_method_strings_parse_to_quantizers():
    from lmcompress.kv.parse import parse_method

    assert parse_method("uniform2").quant == UniformKV(key_bits=2, value_bits=2)
    assert parse_method("kivi4").quant == KIVI(bits=4)
    assert parse_method("normal3:outliers=0.01").quant == NormalKV(key_bits=3, value_bits=3, outliers=0.01)
    spec = parse_method("snapkv+qaq:key_error=0.01", ratio=0.5)
    assert spec.quant == QAQ(key_error=0.01) and spec.evict == SnapKV(ratio=0.5)


def every_eviction_policy():
    from lmcompress.registry import EVICTION_METHODS
    from method_examples import example_policy

    for name in EVICTION_METHODS.names():
        yield pytest.param(example_policy(name), id=name)


@pytest.mark.parametrize("policy", list(every_eviction_policy()))
def test_every_eviction_policy_composes_with_quantization(model, policy):
    from lmcompress.kv import scoring_hooks

    tokens = ids(52)
    for quant in (IntKV(bits=4, group_size=16), KIVI(bits=2, group_size=16, residual=16), QAQ(group_size=16)):
        cache = CompressedCache(model, KVSpec(evict=policy, quant=quant))
        if getattr(policy, "name", None) == "think" and not isinstance(quant, KIVI):  # 8 kept key channels: 16-channel
            # groups and QAQ's storage cannot hold them (a one-line refusal)
            with pytest.raises(LMCompressError, match="think"), scoring_hooks(model, cache):
                model(tokens[:, :48], **cache_kwargs(cache))
            continue
        with scoring_hooks(model, cache):
            model(tokens[:, :48], **cache_kwargs(cache))
            for i in range(48, 52):
                out = model(tokens[:, i : i + 1], **cache_kwargs(cache)).logits
        assert torch.isfinite(out).all()
        assert cache.nbytes == tensor_bytes(cache)
        assert any(layer.packed_length > 0 for layer in cache.layers)
        assert max(cache.held_tokens()) <= 52
