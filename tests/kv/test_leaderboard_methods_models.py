"""Issue-11 methods of helper h11a (KVzip, KVzip+, CriticalKV, CriticalAdaKV, DuoAttention), of s1 (QFilter,
SimLayerKV) and ThinK (alone and after SnapKV) on every tiny architecture,
alone and with KIVI-2: exact kept counts after the prompt, bytes = the kept entries' storage, a hand-written
greedy loop that matches ``generate()`` on the same spec, all inside ``scoring_hooks``."""

from __future__ import annotations

import math

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, KVSpec, scoring_hooks
from lmcompress.kv.evict import (
    ComposedPolicy,
    CriticalAdaKV,
    CriticalKV,
    DuoAttention,
    KVzip,
    KVzipPlus,
    QFilter,
    SimLayerKV,
    SnapKV,
    ThinK,
)
from lmcompress.kv.evict.calibration_files import model_identity, save_calibration
from lmcompress.kv.evict.duo_calibration import KIND, head_scores
from lmcompress.kv.evict.qfilter import save_filters
from lmcompress.kv.evict.qfilter_calibration import compute_filters
from lmcompress.kv.quant import KIVI
from lmcompress.models import tiny_model

pytestmark = pytest.mark.model

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3")
N = 40
RATIO = 0.5
UNIFORM = N - math.floor(RATIO * N)
STEPS = 3


def methods() -> dict:
    return {
        "kvzip": KVzip(ratio=RATIO, chunk_size=16, prompt_ids=(5, 6, 7)),
        "kvzip_plus": KVzipPlus(ratio=RATIO, chunk_size=16, prompt_ids=(5, 6, 7)),
        "kvzip_layerwise": KVzip(ratio=RATIO, layerwise=True, chunk_size=64, prompt_ids=(9,)),
        "criticalkv": CriticalKV(base=SnapKV(ratio=RATIO, window_size=4)),
        "criticaladakv": CriticalAdaKV(base=SnapKV(ratio=RATIO, window_size=4)),
        "duo_attention": None,  # calibrated per architecture in the test
        "qfilter": None,  # calibrated per architecture in the test
        # every layer lazy (a mass of probabilities is > 0): 4 initial + 24 recent of the 40 tokens (more than
        # KIVI's 16-token residual, so some are packed)
        "simlayerkv": SimLayerKV(lazy_threshold=0.0, n_recent=24, n_initial=4),
        "think": ThinK(key_channel_compression_ratio=0.5, window_size=4),
        "think_snapkv": ComposedPolicy(policies=(SnapKV(ratio=RATIO, window_size=4),
                                                 ThinK(key_channel_compression_ratio=0.5, window_size=4))),
    }


def qfilter_policy(model, folder) -> QFilter:
    """QFilter with filters calibrated on this model (two random samples: a test, not a calibration)."""
    torch.manual_seed(6)
    filters = compute_filters(model, [torch.randint(3, 256, (1, 24)) for _ in range(2)])
    path = save_filters(folder / "qfilter.safetensors", filters, model_identity(model), {})
    return QFilter(ratio=RATIO, filters=str(path))


def duo_policy(model, folder) -> DuoAttention:
    """DuoAttention with a head pattern calibrated on this model (one random sample: a test, not a pattern)."""
    torch.manual_seed(5)
    scores = head_scores(model, [torch.randint(3, 256, (1, 24))], q_len=32)
    path = save_calibration(folder / "duo.json", KIND, model_identity(model),
                            {"scores": scores.tolist(), "sink_size": 4, "recent_size": 8})
    return DuoAttention(pattern=str(path), ratio=0.5)


QUANTS = {"fp": None, "kivi2": KIVI(bits=2, group_size=16, residual=16)}


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    model = tiny_model(request.param)
    torch.manual_seed(0)
    return request.param, model, torch.randint(3, 256, (1, N))


def check_counts(name: str, layers: list, policy) -> None:
    counts = [layer.held_per_head() for layer in layers]
    heads = sum(c.numel() for c in counts)
    total = sum(int(c.sum()) for c in counts)
    if name == "think":
        assert all(c.unique().tolist() == [N] for c in counts)
    elif name in ("criticalkv", "qfilter", "think_snapkv"):
        assert all(c.unique().tolist() == [UNIFORM] for c in counts)
    elif name == "criticaladakv":
        for c in counts:
            assert int(c.sum()) == c.numel() * UNIFORM and int(c.min()) >= math.floor(0.2 * UNIFORM)
    elif name == "duo_attention":
        for layer, c in zip(layers, counts):
            stream = policy.streaming_heads[layer.layer_idx]
            assert c[0].tolist() == [12 if s else N for s in stream.tolist()]
    elif name == "simlayerkv":
        assert all(c.unique().tolist() == [28] for c in counts)
    elif name == "kvzip_layerwise":
        for c in counts:
            assert int(c.sum()) == c.numel() * N - math.floor(RATIO * c.numel() * N)
    else:
        assert total == heads * N - math.floor(RATIO * heads * N)


@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("name", list(methods()))
def test_method_on_architecture(arch_model, name, quant, tmp_path):
    arch, model, ids = arch_model
    calibrated = {"duo_attention": duo_policy, "qfilter": qfilter_policy}
    policy = calibrated[name](model, tmp_path) if name in calibrated else methods()[name]
    spec = KVSpec(evict=policy, quant=QUANTS[quant])
    cache = CompressedCache(model, spec)
    tokens = []
    with torch.no_grad(), scoring_hooks(model, cache):
        out = model(ids, **cache_kwargs(cache), use_cache=True)
        layers = [layer for layer in cache.layers if layer.evict is not None]
        check_counts(name, layers, policy)
        assert cache.get_seq_length() == N
        assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())
        if name.startswith("think"):  # half the key channels per head, the same in every token
            for layer in layers:
                channels = layer.key_channels()
                assert channels.shape == (1, layer.num_heads, layer.head_dim // 2)
        if quant == "fp" and name.startswith("think"):  # K's kept channels + V (fp32) (+ int32 position once
            for layer in layers:  # tokens are evicted) per entry, + the int64 kept channel indices per head
                dk, pos = layer.head_dim // 2, 4 if name == "think_snapkv" else 0
                assert layer.nbytes == (int(layer.held_per_head().sum()) * ((dk + layer.head_dim) * 4 + pos)
                                        + layer.num_heads * dk * 8)
        elif quant == "fp":  # K + V (fp32) + int32 position per kept entry, nothing else
            for layer in layers:
                assert layer.nbytes == int(layer.held_per_head().sum()) * (2 * layer.head_dim * 4 + 4)
        else:
            # held packed, apart from KIVI's full-precision residual (< residual + one group per head)
            assert any(seg.packed_length > 0 for layer in layers for seg in layer.segments)
            assert all(seg.fp_length < 16 + 16 for layer in layers for seg in layer.segments)
        before = [layer.held_per_head().clone() for layer in layers]
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(STEPS):
            tokens.append(int(token))
            step = model(token, **cache_kwargs(cache), use_cache=True)
            token = step.logits[:, -1:].argmax(-1)
        tokens.append(int(token))
    assert torch.isfinite(step.logits).all()
    for layer, prev in zip(layers, before):
        assert torch.equal(layer.held_per_head(), prev + STEPS)
    fresh = CompressedCache(model, spec)
    with torch.no_grad(), scoring_hooks(model, fresh):
        gen = model.generate(ids, **cache_kwargs(fresh), max_new_tokens=STEPS + 1, do_sample=False,
                             pad_token_id=0)
    assert gen[0, N:].tolist() == tokens, (arch, name, quant)
