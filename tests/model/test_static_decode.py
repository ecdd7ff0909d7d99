"""Static-shaped decode (fixed slots written by device-side index, CUDA-graph capturable): same logits as the
dynamic path; StreamingLLM's rolling window keeps the size fixed; unsupported specs say so."""

from __future__ import annotations

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.errors import LMCompressError
from lmcompress.eval.graph_decode import StaticDecoder
from lmcompress.kv import CompressedCache, IntKV, KVSpec, SnapKV, StreamingLLM
from lmcompress.models import tiny_model

pytestmark = pytest.mark.model

PROMPT = torch.randint(3, 256, (1, 60), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
@pytest.mark.parametrize("spec", [KVSpec(), KVSpec(evict=SnapKV(ratio=0.5, window_size=16))], ids=["none", "snapkv"])
def test_static_steps_match_dynamic_steps(arch, spec):
    model = tiny_model(arch)
    dyn, sta = CompressedCache(model, spec), CompressedCache(model, spec)
    feed = torch.randint(3, 256, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        model(PROMPT, **cache_kwargs(dyn))
        model(PROMPT, **cache_kwargs(sta))
        dec = StaticDecoder(model, sta, len(feed))
        for i, tok in enumerate(feed):
            ref = model(torch.tensor([[tok]]), **cache_kwargs(dyn)).logits[:, -1]
            dec.start(tok, 60 + i)
            dec.run(1)
            assert (dec.logits - ref).abs().max() < 1e-5
        dec.close()
    assert sta.held_tokens() == dyn.held_tokens()
    assert [layer.seen for layer in sta.layers] == [layer.seen for layer in dyn.layers]
    for a, b in zip(sta.layers, dyn.layers):
        assert torch.equal(a.positions(), b.positions())


def test_rolling_window_keeps_size_and_sinks():
    model = tiny_model("llama")
    cache = CompressedCache(model, KVSpec(evict=StreamingLLM(budget=24, n_sink=4)))
    with torch.no_grad():
        first = int(model(PROMPT, **cache_kwargs(cache)).logits[:, -1].argmax(-1))
    before = cache.nbytes
    dec = StaticDecoder(model, cache, 40, rolling=True)
    dec.start(first, 60)
    tokens = dec.generate(40)
    dec.close()
    assert len(tokens) == 40
    assert cache.held_tokens() == [24] * 4 and cache.nbytes == before
    pos = cache.layers[0].positions()[0, 0].tolist()
    assert pos == [0, 1, 2, 3, *range(100 - 20, 100)]  # sinks + the 20 newest of 100 positions


def test_unsupported_specs_are_refused():
    model = tiny_model("llama")
    cache = CompressedCache(model, KVSpec(quant=IntKV(bits=4, group_size=16)))
    with torch.no_grad():
        model(PROMPT, **cache_kwargs(cache))
    with pytest.raises(LMCompressError, match="static decode cannot run"):
        cache.begin_static(8)
    assert not cache.is_static
    cache = CompressedCache(model, KVSpec(evict=SnapKV(ratio=0.5, window_size=16)))
    with torch.no_grad():
        model(PROMPT, **cache_kwargs(cache))
    with pytest.raises(LMCompressError, match="rolling static decode needs evict=StreamingLLM"):
        cache.begin_static(8, rolling=True)


def test_pipeline_static_decode_gives_the_eager_answer():
    from lmcompress.eval.pipeline import answer

    model = tiny_model("qwen2")
    ctx, q = PROMPT[:, :50], PROMPT[:, 50:]
    spec = KVSpec(evict=StreamingLLM(ratio=0.5))
    eager = answer(model, ctx, q, spec, max_new_tokens=8, decode="eager", eos_token_ids=[])
    static = answer(model, ctx, q, spec, max_new_tokens=8, decode="static", eos_token_ids=[])
    assert static.token_ids == eager.token_ids and len(eager.token_ids) == 8
    with pytest.raises(LMCompressError, match="static decode cannot run"):
        answer(model, ctx, q, KVSpec(quant=IntKV(bits=8, group_size=16)), max_new_tokens=4, decode="static")


def test_layers_share_one_clock_that_advances_once_per_step():
    """One set of slot counters (and one mask) per slot layout: every layer of a uniform cache shares the first
    layer's clock; a decode step advances it by one token, and the mask marks exactly the valid slots."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cache = CompressedCache(model, KVSpec(evict=SnapKV(ratio=0.5, window_size=8)))
        first = int(model(ids, **cache_kwargs(cache)).logits[:, -1].argmax(-1))
        dec = StaticDecoder(model, cache, 10)
        clocks = {id(layer.static.clock) for layer in cache.layers}
        clock = cache.layers[0].static.clock
        assert len(clocks) == 1 and clock.owner is cache.layers[0].static
        dec.start(first, 40)
        dec.run(3)
        assert int(clock.length) == 20 + 3 and int(clock.next_pos) == 43
        assert clock.mask.dtype == torch.float32 and clock.mask.shape == (1, 1, 1, 30)
        assert torch.equal(clock.mask[0, 0, 0] == 0, torch.arange(30) < 23)
        assert bool(torch.isneginf(clock.mask[0, 0, 0, 23:]).all())
        positions = cache.layers[3].static.pos[0, 0, 20:23].tolist()
        dec.close()
    assert positions == [40, 41, 42]
    assert cache.held_tokens()[0] == 23
