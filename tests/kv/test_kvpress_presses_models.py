"""Model runner for the kvpress presses of issue 11 (ChunkKV, BlockPress, ChunkPress, PerLayerCompression,
composition, LagKV, CUR, LeverageScore, NonCausalAttn, KeyRerotation, the decoding variants): on every tiny
architecture, alone and with KIVI-2, the prompt keeps exactly the expected count, bytes are the storage
tensors' (and, unquantized, exactly the kept entries'), generate() runs and decodes from the compressed cache,
and a hand-written decode loop gives generate()'s tokens."""

from __future__ import annotations

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.kv.quant import KIVI
from lmcompress.models import TINY_ARCHS as ARCHS

from .kvpress_presses import decode_counts, prefill_count, presses

pytestmark = pytest.mark.model

N = 48
NAMES = list(presses(4))
QUANTS = {"fp": None, "kivi2": KIVI(bits=2, group_size=8, residual=16)}


def prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (1, N), generator=torch.Generator().manual_seed(seed))


def spec_for(model, name: str, quant: str) -> KVSpec:
    return KVSpec(evict=presses(model.config.num_hidden_layers)[name], quant=QUANTS[quant])


def check_prefill(cache, name: str, n: int) -> None:
    layers = [layer for layer in cache.layers if layer.evict is not None]
    assert layers
    for layer in cache.layers:
        counts = layer.held_per_head()
        if layer.evict is None:  # gemma3's sliding layers keep the model's window
            assert counts.unique().tolist() == [min(n, layer.sliding_window - 1)]
            continue
        expected = prefill_count(name, layer.evict, n, layer.layer_idx, len(cache.layers))
        if expected is None:  # AdaKV: the layer total is the per-layer uniform total
            base = layer.evict.base
            assert int(counts.sum()) == counts.numel() * base.n_keep(n, layer.layer_idx, len(cache.layers))
        else:
            assert counts.unique().tolist() == [expected], (name, layer.layer_idx)
        assert layer.get_seq_length() == n


def entry_bytes(layer) -> int:
    """fp32 K + V, an int32 position and float32 per-token policy values per held entry."""
    return 2 * layer.head_dim * 4 + 4 + 4 * len(layer.segments[0].aux)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("name", NAMES)
def test_prefill_counts_and_bytes(tiny_models, arch, quant, name):
    model = tiny_models(arch)
    cache = CompressedCache(model, spec_for(model, name, quant))
    with torch.no_grad():
        out = model(prompt(), **cache_kwargs(cache), use_cache=True)
    assert torch.isfinite(out.logits).all()
    check_prefill(cache, name, N)
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())
    if quant == "fp":
        for layer in cache.layers:
            if layer.evict is not None:
                assert layer.nbytes == int(layer.held_per_head().sum()) * entry_bytes(layer), (name, layer.layer_idx)
    else:  # KIVI-2 keeps at most its 16-token residual plus one 8-token group in full precision, packs the rest
        for layer in cache.layers:
            if layer.evict is not None:
                for seg in layer.segments:
                    assert seg.fp_length <= 16 + 8, (name, layer.layer_idx)
                    assert seg.packed_length == seg.held - seg.fp_length
                    assert seg.packed_length > 0 or seg.held <= 16 + 8


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("name", NAMES)
def test_generate_and_hand_written_loop(tiny_models, arch, quant, name):
    model = tiny_models(arch)
    ids = prompt(1)
    cache = CompressedCache(model, spec_for(model, name, quant))
    out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (1, N + 6)
    num_layers = len(cache.layers)
    for layer in cache.layers:
        assert layer.get_seq_length() == N + 5
        if layer.evict is None:
            continue
        first = prefill_count(name, layer.evict, N, layer.layer_idx, num_layers)
        if first is not None:
            assert layer.held_per_head().unique().tolist() == [decode_counts(name, first, N, 5)], name
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())
    loop_cache = CompressedCache(model, spec_for(model, name, quant))
    tokens = []
    with torch.no_grad():
        logits = model(ids, **cache_kwargs(loop_cache)).logits[:, -1]
        for _ in range(6):
            nxt = int(logits.argmax(-1))
            tokens.append(nxt)
            logits = model(torch.tensor([[nxt]]), **cache_kwargs(loop_cache)).logits[:, -1]
    assert tokens == out[0, N:].tolist()
