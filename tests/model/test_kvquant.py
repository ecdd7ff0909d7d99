"""KVQuant: pre-RoPE key storage reproduces post-RoPE attention exactly, codebook codes, calibration files."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from random_ids import ids

from lmcompress._compat import cache_kwargs
from lmcompress.errors import LMCompressError
from lmcompress.kv import CompressedCache, KVSpec, SnapKV
from lmcompress.kv.quant import KVQuant
from lmcompress.kv.quant.kvquant import KVQuantCalibration, model_identity
from lmcompress.kv.quant.kvquant_calibrate import calibrate_kvquant
from lmcompress.kv.quant.pre_rope_store import PreRopeStore

pytestmark = pytest.mark.model


@dataclass(frozen=True)
class IdentityCodec:
    """Stores states exactly (float32), in token blocks like a per-channel codec."""

    token_block: int = 8
    row_independent: bool = False

    def encode(self, x, ignore=None):
        b, h, t, d = x.shape
        return {"x": x.float().reshape(b, h, t // self.token_block, self.token_block, d).clone()}

    def decode(self, parts, head_dim, dtype):
        x = parts["x"]
        b, h, n, tb, d = x.shape
        return x.reshape(b, h, n * tb, d).to(dtype)

    def validate(self, head_dim):
        pass

    def bits_per_value(self, head_dim):
        return 32.0


@dataclass(frozen=True)
class IdentityKVQuant(KVQuant):
    """KVQuant's pre-RoPE store with exact codecs: only the un-rotation and re-rotation of keys remain."""

    def key_codec(self, layer_idx):
        return IdentityCodec()

    def value_codec(self, layer_idx):
        return IdentityCodec()


def run(model, spec: KVSpec, prompt: int = 40, steps: int = 10):
    tokens = ids(prompt + steps)
    cache = CompressedCache(model, spec)
    outs = [model(tokens[:, :prompt], **cache_kwargs(cache)).logits]
    for i in range(prompt, prompt + steps):
        outs.append(model(tokens[:, i : i + 1], **cache_kwargs(cache)).logits)
    return cache, torch.cat(outs, dim=1)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "phi3"])
def test_pre_rope_keys_reproduce_post_rope_attention(tiny_models, arch):
    model = tiny_models(arch)
    _, ref = run(model, KVSpec())
    cache, out = run(model, KVSpec(quant=IdentityKVQuant()))
    seg = cache.layers[-1].segments[0]
    assert isinstance(seg.store, PreRopeStore) and seg.store.length >= 40
    # the stored keys are pre-RoPE: they differ from the post-RoPE keys attention reads
    stored = seg.store.key_codec.decode(seg.store.parts("keys"), seg.head_dim, torch.float32)
    assert float((stored[:, :, 1:] - seg.store.dequantize()[0][:, :, 1:]).abs().max()) > 1e-2
    assert float((out - ref).abs().max()) < 1e-4


def test_pre_rope_keys_exact_after_eviction(tiny_models):
    """Eviction leaves non-contiguous positions: the store then holds them and re-rotates correctly."""
    model = tiny_models("llama")
    tokens = ids(60)
    for quant in (None, IdentityKVQuant()):
        cache = CompressedCache(model, KVSpec(evict=SnapKV(ratio=0.5, window_size=8), quant=quant))
        outs = [model(tokens[:, :48], **cache_kwargs(cache)).logits[:, -1:]]
        for i in range(48, 60):
            outs.append(model(tokens[:, i : i + 1], **cache_kwargs(cache)).logits)
        if quant is None:
            ref = torch.cat(outs, dim=1)
        else:
            out = torch.cat(outs, dim=1)
            store = cache.layers[0].segments[0].store
            assert store.length > 0 and store._pos is not None and store.nbytes > 0
    assert float((out - ref).abs().max()) < 1e-4


def test_eight_bit_kvquant_is_close(tiny_models):
    model = tiny_models("llama")
    _, ref = run(model, KVSpec())
    cache, out = run(model, KVSpec(quant=KVQuant(bits=8, group_size=8, outliers=0.01)))
    assert cache.layers[0].packed_length == 48
    assert float((out - ref).abs().max()) < 0.05
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())


def test_calibration_round_trip_and_model_mismatch(tiny_models, tmp_path):
    model = tiny_models("llama")
    calib = calibrate_kvquant(model, ids(64, seed=3).expand(2, -1).clone(), bits=2, group_size=8, outliers=0.01)
    assert calib.key_levels.shape == (4, 4) and calib.meta == {**model_identity(model), **calib.meta}
    assert bool((calib.key_levels.diff(dim=-1) >= 0).all())
    path = tmp_path / "calib.safetensors"
    calib.save(path)
    quant = KVQuant(bits=2, group_size=8, outliers=0.01, calibration=str(path))
    assert quant.key_inner(1).levels == tuple(float(v) for v in calib.key_levels[1])
    cache, out = run(model, KVSpec(quant=quant))
    assert torch.isfinite(out).all() and cache.layers[0].packed_length == 48
    with pytest.raises(LMCompressError, match="fitted on"):
        CompressedCache(tiny_models("qwen3"), KVSpec(quant=quant))
    with pytest.raises(LMCompressError, match="bits=2"):
        KVQuant(bits=3, group_size=8, outliers=0.01, calibration=str(path))
    with pytest.raises(LMCompressError, match="does not exist"):
        KVQuant(calibration=str(tmp_path / "missing.safetensors"))
    assert KVQuantCalibration.load(path).meta == calib.meta
