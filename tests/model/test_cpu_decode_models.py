"""Decoding over packed INT / KIVI caches on the CPU through the codes-level path (``kv/kernels/cpu_decode.py``)
gives the logits and tokens of the dequantize-then-attend reference path, on every tiny architecture."""

from __future__ import annotations

import pytest
import torch
from random_ids import ids

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.kv.kernels import cpu_decode
from lmcompress.kv.quant import KIVI, IntKV, Rotated
from lmcompress.models import TINY_ARCHS

pytestmark = pytest.mark.model

QUANTS = {
    "int4-g8": IntKV(bits=4, group_size=8),
    "int4-residual": IntKV(bits=4, group_size=16, residual=8),
    "int2-g16": IntKV(bits=2, group_size=16),
    "kivi2": KIVI(bits=2, group_size=8, residual=16),
    "kivi4": KIVI(bits=4, group_size=16, residual=32),
    "rotated-int4": Rotated(base=IntKV(bits=4, group_size=16)),
    "rotated-values-kivi2": Rotated(base=KIVI(bits=2, group_size=8, residual=16), keys=False),
}


def greedy(model, spec: KVSpec, prompt: int = 48, steps: int = 8):
    """Prefill ``prompt`` random ids, then decode ``steps`` greedy tokens; returns (tokens, decode logits)."""
    cache = CompressedCache(model, spec)
    logits = model(ids(prompt), **cache_kwargs(cache)).logits[:, -1:]
    tokens, outs = [], []
    for _ in range(steps):
        nxt = logits.argmax(-1)
        tokens.append(int(nxt))
        logits = model(nxt, **cache_kwargs(cache)).logits
        outs.append(logits)
    return tokens, torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("name", list(QUANTS))
def test_codes_path_matches_reference(tiny_models, monkeypatch, arch, name):
    model = tiny_models(arch)
    spec = KVSpec(quant=QUANTS[name])
    calls = []
    real = cpu_decode.decode_attention

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(cpu_decode, "decode_attention", counted)
    tokens, logits, cache = greedy(model, spec)
    assert any(calls), "the codes-level path never ran"
    assert cache.nbytes > 0
    monkeypatch.setenv("LMCOMPRESS_NO_KERNELS", "1")
    calls.clear()
    ref_tokens, ref_logits, _ = greedy(model, spec)
    assert not any(calls)  # the reference path ran
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
