"""The static decode path (fixed slots; the CUDA-graph path on a GPU) against the eager path: batches of several
rows and 4-bit packed (RTN, WQLinear) weights (the default model: tests/golden/test_static_decode_golden.py)."""

from __future__ import annotations

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.eval.graph_decode import StaticDecoder
from lmcompress.kv import CompressedCache, KVSpec, SnapKV
from lmcompress.models import tiny_model

pytestmark = pytest.mark.model


def _eager_greedy(model, cache, first: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``[B, steps]`` greedy tokens after ``first: [B, 1]`` and each step's ``[B, V]`` logits."""
    tok, tokens, logits = first, [], []
    for _ in range(steps):
        out = model(tok, **cache_kwargs(cache)).logits[:, -1]
        logits.append(out)
        tok = out.argmax(-1, keepdim=True)
        tokens.append(tok)
    return torch.cat(tokens, dim=1), logits


def _static_greedy(model, cache, first: torch.Tensor, position: int, steps: int):
    dec = StaticDecoder(model, cache, steps)
    dec.start(first[:, 0], position)
    tokens, logits = [], []
    for _ in range(steps):
        dec.run(1)
        logits.append(dec.logits.clone())
        tokens.append(dec.tok.clone())
    dec.close()
    return torch.cat(tokens, dim=1), logits


@pytest.mark.parametrize("spec", [KVSpec(), KVSpec(evict=SnapKV(ratio=0.5, window_size=8))], ids=["none", "snapkv"])
def test_batch_of_three_rows_decodes_like_eager(spec):
    model = tiny_model("llama")
    prompt = torch.randint(3, 256, (3, 40), generator=torch.Generator().manual_seed(2))
    steps = 24
    with torch.no_grad():
        dyn, sta = CompressedCache(model, spec), CompressedCache(model, spec)
        first = model(prompt, **cache_kwargs(dyn)).logits[:, -1].argmax(-1, keepdim=True)
        model(prompt, **cache_kwargs(sta))
        ref_tokens, ref_logits = _eager_greedy(model, dyn, first, steps)
        tokens, logits = _static_greedy(model, sta, first, 40, steps)
    assert torch.equal(tokens, ref_tokens)
    assert not torch.equal(tokens[0], tokens[1])  # the rows decode different tokens
    assert max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits)) < 1e-4
    assert sta.held_tokens() == dyn.held_tokens()


def test_generate_refuses_a_batch():
    model = tiny_model("llama")
    cache = CompressedCache(model, KVSpec())
    with torch.no_grad():
        model(torch.randint(3, 256, (2, 10)), **cache_kwargs(cache))
    dec = StaticDecoder(model, cache, 4)
    with pytest.raises(ValueError, match="batch=2"):
        dec.generate(2)
    assert dec.generate_batch(3).shape == (2, 3)
    dec.close()


def test_packed_4bit_weights_decode_like_eager_for_64_steps():
    from lmcompress.weights import RTNConfig, WQLinear, quantize_

    model = tiny_model("llama")
    quantize_(model, RTNConfig(group_size=32), progress=False)
    assert any(isinstance(m, WQLinear) for m in model.modules())
    spec = KVSpec(evict=SnapKV(ratio=0.875, window_size=8))
    prompt = torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dyn, sta = CompressedCache(model, spec), CompressedCache(model, spec)
        first = model(prompt, **cache_kwargs(dyn)).logits[:, -1].argmax(-1, keepdim=True)
        model(prompt, **cache_kwargs(sta))
        ref_tokens, ref_logits = _eager_greedy(model, dyn, first, 64)
        tokens, logits = _static_greedy(model, sta, first, 64, 64)
    assert torch.equal(tokens, ref_tokens)
    assert max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits)) < 1e-4
