"""ThinK (key channel pruning): exact kept channels, logits equal to kvpress's zeroed-channel form, pruned
channels not stored (``nbytes``), decoding keys whole, chunked prefill, composition, quantizers, bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lmcompress._compat import cache_kwargs
from lmcompress.errors import LMCompressError
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.kv.evict import (
    AdaKV,
    ComposedPolicy,
    DecodingCompression,
    KeyRerotation,
    Knorm,
    SnapKV,
    ThinK,
)
from lmcompress.kv.evict.think import kept_channels, think_channel_scores
from lmcompress.kv.pruned_keys import PrunedKeyBuffer
from lmcompress.kv.quant import KIVI, QAQ, IntKV
from lmcompress.models import tiny_model

N = 48


def test_kept_channels_hand_built():
    # 2 KV heads x 2 query heads, D = 8. Window queries: |q_d| = d + 1 in query head 0, 1 in query head 1 of
    # each group; an older query (outside the window of 2) is huge and must be ignored. Keys: |k_d| given.
    d = 8
    q = torch.ones(1, 4, 3, d)
    q[:, 0::2, 1:] = torch.arange(1, d + 1, dtype=torch.float32)
    q[:, :, 0] = 1000.0  # outside the window
    k = torch.ones(1, 2, 5, d)
    k[0, 0] = torch.tensor([8.0, 1, 1, 1, 1, 1, 1, 0.5])  # head 0: channel 0 large, 7 small
    k[0, 1] = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 1])
    k[0, 1, :, 0::2] *= -1  # signs do not matter (squares)
    policy = ThinK(key_channel_compression_ratio=0.5, window_size=2)
    scores = think_channel_scores(k, q[:, :, -2:])
    qn = (torch.arange(1, d + 1, dtype=torch.float32) ** 2 + 1) / 2
    assert torch.allclose(scores[0, 0], qn * k[0, 0, 0] ** 2)
    assert torch.allclose(scores[0, 1], qn)
    kept = policy.channels_for(k, q)
    # head 0 scores: qn * k^2 = [64, 2.5, 5, 8.5, 13, 18.5, 25, 8.25] -> keep 0, 4, 5, 6; head 1: the 4 largest
    assert kept[0, 0].tolist() == [0, 4, 5, 6]
    assert kept[0, 1].tolist() == [4, 5, 6, 7]
    assert kept_channels(scores, 0).shape == (1, 2, d)


def _prefill(model, spec, ids):
    cache = CompressedCache(model, spec)
    with torch.no_grad():
        out = model(ids, **cache_kwargs(cache), use_cache=True)
    return cache, out


@pytest.mark.model
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_logits_equal_kvpress_masked_form(arch):
    """kvpress zeroes the pruned channels of the prefill keys; storing only the kept channels gives the same
    logits for the tokens that follow (decoding keys whole in both)."""
    model = tiny_model(arch)
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (1, N))
    cont = torch.randint(3, 256, (1, 6))
    policy = ThinK(key_channel_compression_ratio=0.5, window_size=8)
    cache, _ = _prefill(model, KVSpec(evict=policy), ids)
    ref = DynamicCache()
    with torch.no_grad():
        model(ids, **cache_kwargs(ref), use_cache=True)
        for layer, ref_layer in zip(cache.layers, ref.layers):
            channels = layer.key_channels()  # [1, Hkv, Dk]
            drop = torch.ones_like(ref_layer.keys[:, :, 0], dtype=torch.bool).scatter_(-1, channels, False)
            ref_layer.keys.masked_fill_(drop[:, :, None, :], 0.0)
        rows, ref_rows = [], []
        for i in range(cont.shape[1]):
            rows.append(model(cont[:, i : i + 1], **cache_kwargs(cache), use_cache=True).logits[0, -1])
            ref_rows.append(model(cont[:, i : i + 1], **cache_kwargs(ref), use_cache=True).logits[0, -1])
    assert torch.allclose(torch.stack(rows), torch.stack(ref_rows), atol=1e-5, rtol=1e-5)
    seg = cache.layers[0].segments[0]
    assert isinstance(seg.fp_k, PrunedKeyBuffer)
    assert seg.fp_k.pruned_length == N and seg.fp_k.whole.length == cont.shape[1]  # decoding keys whole


@pytest.mark.model
def test_nbytes_saves_the_pruned_key_channels():
    model = tiny_model("llama")
    torch.manual_seed(2)
    ids = torch.randint(3, 256, (1, N))
    base, _ = _prefill(model, KVSpec(), ids)
    think, _ = _prefill(model, KVSpec(evict=ThinK(key_channel_compression_ratio=0.75, window_size=8)), ids)
    for cache in (base, think):
        assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())
    for lb, lt in zip(base.layers, think.layers):
        d, h = lt.head_dim, lt.num_heads
        dk = d - int(0.75 * d)
        assert lt.key_channels().shape == (1, h, dk)
        pruned_key_bytes = h * N * (d - dk) * 4
        # fewer key bytes by the pruned fraction, + the kept channel indices (int64); no positions (no eviction)
        assert lt.nbytes == lb.nbytes - pruned_key_bytes + h * dk * 8
        keys = lt.segments[0].fp_k.tensors()
        assert [tuple(t.shape) for t in keys] == [(1, h, N, dk)]


@pytest.mark.model
def test_chunked_prefill_keeps_the_first_channels():
    model = tiny_model("llama")
    torch.manual_seed(3)
    ids = torch.randint(3, 256, (1, N))
    cache = CompressedCache(model, KVSpec(evict=ThinK(key_channel_compression_ratio=0.5, window_size=8)))
    with torch.no_grad():
        model(ids[:, :32], **cache_kwargs(cache), use_cache=True)
        first = [layer.key_channels().clone() for layer in cache.layers]
        model(ids[:, 32:], **cache_kwargs(cache), use_cache=True)
    for layer, ch in zip(cache.layers, first):
        assert torch.equal(layer.key_channels(), ch)
        buf = layer.segments[0].fp_k
        assert buf.pruned_length == N and buf.whole is None
    with torch.no_grad(), cache.compression_paused():  # a question fed with compression paused stays whole
        model(ids[:, :5], **cache_kwargs(cache), use_cache=True)
    assert cache.layers[0].segments[0].fp_k.whole.length == 5


@pytest.mark.model
def test_composed_snapkv_then_think_and_adakv():
    model = tiny_model("llama")
    torch.manual_seed(4)
    ids = torch.randint(3, 256, (1, N))
    think = ThinK(key_channel_compression_ratio=0.5, window_size=8)
    snap = SnapKV(ratio=0.5, window_size=8)
    alone, _ = _prefill(model, KVSpec(evict=snap), ids)
    both, _ = _prefill(model, KVSpec(evict=ComposedPolicy(policies=(snap, think))), ids)
    for la, lb in zip(alone.layers, both.layers):
        assert torch.equal(la.positions(), lb.positions())  # ThinK evicts no token
        # the kept tokens' kept channels are exactly SnapKV's keys there (nothing else stored for keys)
        ch = lb.key_channels()
        kept = la.segments[0].fp_k.view().gather(-1, ch[:, :, None, :].expand(-1, -1, la.held, -1))
        assert torch.equal(lb.segments[0].fp_k.pruned, kept)
    ragged, _ = _prefill(model, KVSpec(evict=ComposedPolicy(policies=(AdaKV(base=snap), think))), ids)
    assert any(layer.ragged for layer in ragged.layers)
    assert ragged.nbytes == sum(t.numel() * t.element_size() for t in ragged.tensors())
    for layer in ragged.layers:
        assert layer.key_channels().shape == (1, layer.num_heads, layer.head_dim // 2)


@pytest.mark.model
def test_with_kivi_packed_keys_hold_kept_channels():
    model = tiny_model("llama")
    torch.manual_seed(5)
    ids = torch.randint(3, 256, (1, N))
    kivi = KIVI(bits=2, group_size=16, residual=16)
    plain, _ = _prefill(model, KVSpec(quant=kivi), ids)
    think, _ = _prefill(model, KVSpec(evict=ThinK(key_channel_compression_ratio=0.5, window_size=8), quant=kivi),
                        ids)
    for lp, lt in zip(plain.layers, think.layers):
        sp, st = lp.segments[0].store, lt.segments[0].store
        assert st.length == sp.length > 0
        key_p = sum(t.numel() * t.element_size() for t in sp._k.values() for t in [t.data])
        key_t = sum(t.numel() * t.element_size() for t in st._k.values() for t in [t.data])
        assert key_t * 2 == key_p  # half the channels: half the codes and per-channel scales
        dk = lt.head_dim // 2
        # dequantized keys are zero in the dropped channels
        keys = st.dequantize()[0]
        drop = torch.ones(keys.shape[-1], dtype=torch.bool)
        for h in range(lt.num_heads):
            drop[:] = True
            drop[lt.key_channels()[0, h]] = False
            assert bool((keys[0, h][:, drop] == 0).all()) and drop.sum() == lt.head_dim - dk
            # the only differences: the packed and full-precision key parts and the kept channel indices
            fp_p, fp_t = lp.segments[0].fp_k.nbytes, lt.segments[0].fp_k.nbytes
            assert lt.nbytes - key_t - fp_t - lt.num_heads * dk * 8 == lp.nbytes - key_p - fp_p
    assert think.nbytes < plain.nbytes


@pytest.mark.model
def test_refusals():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, N))
    think = ThinK(key_channel_compression_ratio=0.5, window_size=8)
    with pytest.raises(LMCompressError, match=r"think cannot store pruned key channels.*allowed quantizers"):
        _prefill(model, KVSpec(evict=think, quant=QAQ()), ids)
    with pytest.raises(LMCompressError, match="keeps 8 of 16 key channels"):  # per-token groups of 16 channels
        _prefill(model, KVSpec(evict=think, quant=IntKV(bits=4, group_size=16)), ids)
    with pytest.raises(LMCompressError, match="composed cannot contain key_rerotation"):
        ComposedPolicy(policies=(KeyRerotation(base=Knorm(ratio=0.5)), think))


@pytest.mark.parametrize("kwargs, match", [
    ({"key_channel_compression_ratio": "half"}, "is not a number"),
    ({"key_channel_compression_ratio": 1.0}, "key_channel_compression_ratio"),
    ({"key_channel_compression_ratio": 0.5, "window_size": 0}, "window_size"),
    ({"key_channel_compression_ratio": 0.5, "ratio": 0.5}, "leave ratio/budget unset"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(LMCompressError, match=match):
        ThinK(**kwargs)


@pytest.mark.model
def test_base_equals_the_composition_and_parses():
    from lmcompress.kv.parse import has_eviction, parse_method

    spec = parse_method("think:base=snapkv,base.window_size=8,key_channel_compression_ratio=0.5,window_size=8+kivi2",
                        ratio=0.5)
    assert spec.evict == ThinK(base=SnapKV(ratio=0.5, window_size=8), key_channel_compression_ratio=0.5,
                               window_size=8)
    assert isinstance(spec.quant, KIVI)
    assert parse_method("think:key_channel_compression_ratio=0.5", ratio=0.5).evict.ratio == 0  # no sweep
    assert not has_eviction("think:key_channel_compression_ratio=0.5")
    model = tiny_model("llama")
    torch.manual_seed(6)
    ids = torch.randint(3, 256, (1, N))
    snap = SnapKV(ratio=0.5, window_size=8)
    think = ThinK(key_channel_compression_ratio=0.5, window_size=8)
    a, _ = _prefill(model, KVSpec(evict=ComposedPolicy(policies=(snap, think))), ids)
    b, _ = _prefill(model, KVSpec(evict=ThinK(base=snap, key_channel_compression_ratio=0.5, window_size=8)), ids)
    assert a.nbytes == b.nbytes
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.positions(), lb.positions())
        assert torch.equal(la.key_channels(), lb.key_channels())
        assert torch.equal(la.segments[0].fp_k.view(), lb.segments[0].fp_k.view())
    with pytest.raises(LMCompressError, match=r"think cannot take base=decoding \(composed cannot contain decoding"):
        ThinK(base=DecodingCompression(base=Knorm(), interval=4, target_size=40), key_channel_compression_ratio=0.5)


@pytest.mark.model
def test_kivi_keys_packed_before_the_channels_are_chosen():
    """A first chunk fed with compression paused is packed whole; the next (compressing) prefill chunk chooses
    the channels and re-encodes the packed keys with the kept channels only (KIVI's per-channel groups: the same
    codes up to fp16 rounding of the scales); decoding past KIVI's window then commits whole keys pruned."""
    model = tiny_model("llama")
    torch.manual_seed(8)
    ids = torch.randint(3, 256, (1, N))
    kivi = KIVI(bits=2, group_size=16, residual=16)
    plain = CompressedCache(model, KVSpec(quant=kivi))
    think = CompressedCache(model, KVSpec(evict=ThinK(key_channel_compression_ratio=0.5, window_size=8), quant=kivi))
    with torch.no_grad():
        for cache in (plain, think):
            with cache.compression_paused():
                model(ids[:, :32], **cache_kwargs(cache), use_cache=True)
            model(ids[:, 32:], **cache_kwargs(cache), use_cache=True)
    for lp, lt in zip(plain.layers, think.layers):
        ch = lt.key_channels()
        kp, kt = lp.segments[0].store.dequantize()[0], lt.segments[0].store.dequantize()[0]
        assert lp.segments[0].packed_length == lt.segments[0].packed_length == N
        gather = ch[:, :, None, :].expand(-1, -1, N, -1)
        assert torch.allclose(kt.gather(-1, gather), kp.gather(-1, gather), atol=1e-3, rtol=1e-3)
        assert float(kt.abs().sum()) == pytest.approx(float(kt.gather(-1, gather).abs().sum()))  # zeros elsewhere
    with torch.no_grad():
        for _ in range(20):  # past the 16-token window: whole decoding keys are committed (pruned) to the store
            out = model(ids[:, -1:], **cache_kwargs(think), use_cache=True)
    assert torch.isfinite(out.logits).all()
    seg = think.layers[0].segments[0]
    assert seg.packed_length == N + 16 and seg.pruned_prefix == N + 16
    assert think.nbytes == sum(t.numel() * t.element_size() for t in think.tensors())


def test_attend_one_equals_attention_over_the_zeroed_keys():
    """A decoding step attends with the query's kept channels (no re-expansion): the same as SDPA over the keys
    with zeros in the dropped channels, with and without a mask, grouped query heads included."""
    from lmcompress.kv.buffers import TokenBuffer

    torch.manual_seed(9)
    b, h, g, d, p, w = 2, 3, 2, 16, 20, 5
    keys = torch.randn(b, h, p + w, d)
    channels = torch.stack([torch.randperm(d)[:6].sort().values for _ in range(b * h)]).view(b, h, 6)
    buf = PrunedKeyBuffer.from_keys(keys, channels, p)
    buf.whole = TokenBuffer(keys[:, :, p:].contiguous())
    values = torch.randn(b, h, p + w, d)
    query = torch.randn(b, h * g, 1, d)
    zeroed = buf.view()
    assert bool((zeroed[:, :, p:] == keys[:, :, p:]).all())
    mask = torch.rand(b, 1, 1, p + w) > 0.3
    mask[..., -1] = True
    for m in (None, mask):
        ref = torch.nn.functional.scaled_dot_product_attention(query, zeroed, values, attn_mask=m, scale=0.25,
                                                               enable_gqa=True)
        assert torch.allclose(buf.attend_one(query, values, m, 0.25), ref, atol=1e-6, rtol=1e-5)
