"""The CPU decode path over packed affine codes (``kv/kernels/cpu_decode.py``) against dequantize-then-attend."""

from __future__ import annotations

import pytest
import torch

from lmcompress.kv.kernels import cpu_decode, cpu_fused, cpu_native
from lmcompress.kv.quant.kivi_store import KIVIStore
from lmcompress.kv.quant.store import PackedStore
from lmcompress.kv.quant.uniform import UniformCodec
from lmcompress.kv.reference import attend_blocks


def _reference(store, fk, fv, q, scaling):
    """Attention over the store's dequantized tokens, then the full-precision ones (the oracle)."""
    keys, values = store.dequantize()
    keys, values = torch.cat([keys, fk], dim=2), torch.cat([values, fv], dim=2)
    return attend_blocks(q, [(keys, values, None)], scaling)


def _states(b, h, t, d, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h, t, d, generator=g) * torch.linspace(0.2, 4.0, d)  # outlier-ish channels
    v = torch.randn(b, h, t, d, generator=g)
    return k, v


STORES = {
    "int4-g64": lambda d: PackedStore(UniformCodec(4, 64), UniformCodec(4, 64), d, torch.float32),
    "int4-head": lambda d: PackedStore(UniformCodec(4, 64, granularity="head"), UniformCodec(4, 64), d,
                                       torch.float32),
    "int2-g16": lambda d: PackedStore(UniformCodec(2, 16), UniformCodec(2, 16), d, torch.float32),
    "int3-g16 (unpacked codes)": lambda d: PackedStore(UniformCodec(3, 16), UniformCodec(3, 16), d,
                                                       torch.float32),
    "int8-g32": lambda d: PackedStore(UniformCodec(8, 32), UniformCodec(8, 32), d, torch.float32),
    "kivi2": lambda d: KIVIStore(UniformCodec(2, 32, granularity="channel"), UniformCodec(2, 32), d, torch.float32,
                                 unit=64, value_window=64),
    "kivi4": lambda d: KIVIStore(UniformCodec(4, 16, granularity="channel"), UniformCodec(4, 16), d, torch.float32,
                                 unit=32, value_window=32),
    "kivi2-channels-over-several-blocks": lambda d: PackedStore(UniformCodec(2, 16, granularity="channel"),
                                                                UniformCodec(2, 32), d, torch.float32),
}


@pytest.fixture(params=["fused C kernel", "torch products"])
def native(request, monkeypatch):
    """Both implementations of the codes path: the fused C kernel (where a compiler built it) and the torch one."""
    fused = request.param == "fused C kernel"
    if fused and cpu_native.library() is None:
        pytest.skip("no C compiler here: the fused kernel is not built (the torch path runs)")
    monkeypatch.setenv("LMCOMPRESS_NO_NATIVE", "0" if fused else "1")
    return fused


@pytest.mark.parametrize("name", list(STORES))
@pytest.mark.parametrize("batch,hq,hkv", [(1, 6, 2), (2, 4, 4), (1, 3, 1)])
@pytest.mark.parametrize("fp_tokens", [0, 5])
def test_matches_dequantized_attention(name, batch, hq, hkv, fp_tokens, native):
    d = 64
    store = STORES[name](d)
    k, v = _states(batch, hkv, 192, d, seed=1)
    store.append(k[:, :, :128], v[:, :, :128])
    store.append(k[:, :, 128:192], v[:, :, 128:192])
    fk, fv = _states(batch, hkv, fp_tokens, d, seed=2)
    q = torch.randn(batch, hq, 1, d, generator=torch.Generator().manual_seed(3)) * 0.5
    assert cpu_decode.supported(store)
    out = cpu_decode.decode_attention(store, fk, fv, q, 0.125)
    ref = _reference(store, fk, fv, q, 0.125)
    assert out.shape == (batch, hq, 1, d)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(STORES))
def test_fused_kernel_takes_the_formats_it_reads(name):
    """The C kernel really runs for 2-, 4- and 8-bit codes (3-bit codes stay on the torch path)."""
    if cpu_native.library() is None:
        pytest.skip("no C compiler here")
    d = 64
    store = STORES[name](d)
    k, v = _states(1, 2, 192, d, seed=1)
    store.append(k, v)
    fk, fv = _states(1, 2, 4, d, seed=2)
    qg = torch.randn(1, 2, 3, d)
    vp = getattr(store, "value_packed", store.length)
    window = store.value_window_view() if isinstance(store, KIVIStore) else None
    fp_v = fv if window is None else torch.cat([window, fv], dim=2)
    got = cpu_fused.attention(store, store.parts("keys"), store.parts("values"), store.length, vp, fk, fp_v, qg,
                              0.125)
    assert (got is None) == name.startswith("int3")


def test_long_store_crosses_blocks(monkeypatch, native):
    """More tokens than one unpacking block: the per-block pieces and the single softmax still agree."""
    monkeypatch.setattr(cpu_decode, "BLOCK_TOKENS", 96)
    d = 32
    for store in (PackedStore(UniformCodec(4, 16), UniformCodec(4, 16), d, torch.float32),
                  KIVIStore(UniformCodec(2, 32, granularity="channel"), UniformCodec(2, 16), d, torch.float32,
                            unit=32, value_window=32)):
        k, v = _states(1, 2, 320, d, seed=4)
        store.append(k, v)
        fk, fv = _states(1, 2, 3, d, seed=5)
        q = torch.randn(1, 4, 1, d, generator=torch.Generator().manual_seed(6))
        torch.testing.assert_close(cpu_decode.decode_attention(store, fk, fv, q, 0.2),
                                   _reference(store, fk, fv, q, 0.2), rtol=1e-5, atol=1e-5)


def test_bfloat16_query_returns_bfloat16():
    d = 64
    store = STORES["int4-g64"](d)
    k, v = _states(1, 2, 64, d, seed=7)
    store.append(k.bfloat16(), v.bfloat16())
    q = torch.randn(1, 4, 1, d).bfloat16()
    fk, fv = _states(1, 2, 2, d, seed=8)
    out = cpu_decode.decode_attention(store, fk.bfloat16(), fv.bfloat16(), q, 0.125)
    assert out.dtype == torch.bfloat16
    ref = _reference(store, fk.bfloat16().float(), fv.bfloat16().float(), q.float(), 0.125)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_unsupported_formats_fall_back(monkeypatch):
    d = 64
    sym = PackedStore(UniformCodec(4, 64, symmetric=True), UniformCodec(4, 64), d, torch.float32)
    layer = PackedStore(UniformCodec(4, 64, granularity="layer"), UniformCodec(4, 64), d, torch.float32)
    chan_values = PackedStore(UniformCodec(4, 64), UniformCodec(4, 32, granularity="channel"), d, torch.float32)
    q = torch.randn(1, 2, 1, d)
    k, v = _states(1, 2, 64, d, seed=9)
    for store in (sym, layer, chan_values):
        assert not cpu_decode.supported(store)
        store.append(k, v)
        assert cpu_decode.decode_attention(store, k[:, :, :0], v[:, :, :0], q, 0.1) is None
    ok = STORES["int4-g64"](d)
    ok.append(k, v)
    assert cpu_decode.decode_attention(ok, k[:, :, :0], v[:, :, :0], q, 0.1) is not None
    monkeypatch.setenv("LMCOMPRESS_NO_KERNELS", "1")
    assert cpu_decode.decode_attention(ok, k[:, :, :0], v[:, :, :0], q, 0.1) is None
    assert cpu_decode.decode_attention(ok, k[:, :, :0], v[:, :, :0], torch.randn(1, 2, 2, d), 0.1) is None


@pytest.mark.parametrize("keys,values", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("base", ["int4", "kivi2"])
def test_rotated_formats(base, keys, values):
    """Rotated stores (``rotated:base=...``): the query is rotated in, the packed part's output rotated back; the
    result equals attention over the store's dequantized (un-rotated) states."""
    from lmcompress.kv.quant import KIVI, IntKV, Rotated

    inner = IntKV(bits=4, group_size=32) if base == "int4" else KIVI(bits=2, group_size=32, residual=64)
    store = Rotated(base=inner, keys=keys, values=values).new_store(3, 64, torch.float32)
    k, v = _states(1, 2, 192, 64, seed=10)
    store.append(k, v)
    fk, fv = _states(1, 2, 4, 64, seed=11)
    q = torch.randn(1, 4, 1, 64, generator=torch.Generator().manual_seed(12)) * 0.5
    assert cpu_decode.supported(store)
    torch.testing.assert_close(cpu_decode.decode_attention(store, fk, fv, q, 0.125),
                               _reference(store, fk, fv, q, 0.125), rtol=1e-5, atol=1e-5)
