"""The default model (SmolLM2-135M) with SnapKV 8x: 64 greedy steps of the static decode path (what the CUDA
graph replays on a GPU) give the eager path's tokens, logits within 1e-3."""

from __future__ import annotations

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.eval.graph_decode import StaticDecoder
from lmcompress.eval.text import english_text
from lmcompress.kv import CompressedCache, KVSpec, SnapKV

pytestmark = pytest.mark.golden


def test_default_model_64_greedy_steps_with_snapkv_8x_match_eager(smollm):
    model, tok = smollm
    prompt = tok(english_text()[:3000], return_tensors="pt").input_ids[:, :256]
    spec = KVSpec(evict=SnapKV(ratio=0.875))
    with torch.no_grad():
        dyn, sta = CompressedCache(model, spec), CompressedCache(model, spec)
        nxt = model(prompt, **cache_kwargs(dyn)).logits[:, -1].argmax(-1, keepdim=True)
        model(prompt, **cache_kwargs(sta))
        assert dyn.held_tokens()[0] == 32  # 256 tokens kept 8x fewer
        dec = StaticDecoder(model, sta, 64)
        dec.start(int(nxt), prompt.shape[1])
        err, eager, static = 0.0, [], []
        for _ in range(64):
            logits = model(nxt, **cache_kwargs(dyn)).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            eager.append(int(nxt))
            dec.run(1)
            static.append(int(dec.tok))
            err = max(err, float((dec.logits - logits).abs().max()))
        dec.close()
    assert static == eager
    assert len(set(eager)) > 4  # a real continuation, not one repeated token
    assert err < 1e-3


def test_default_model_fused_static_decode_matches_unfused_eager_for_64_steps(smollm):
    """The same check with a copy of the model whose norms, attention and MLP are fused (lmcompress.fused):
    concatenated projections and the torch fallbacks of the fused kernels (on the CPU)."""
    import copy

    from lmcompress.fused import fuse_decoder, fuse_rmsnorm

    model, tok = smollm
    fused = copy.deepcopy(model)
    fuse_rmsnorm(fused)
    assert fuse_decoder(fused) == {"attention": 30, "mlp": 30}
    prompt = tok(english_text()[:3000], return_tensors="pt").input_ids[:, :256]
    spec = KVSpec(evict=SnapKV(ratio=0.875))
    with torch.no_grad():
        dyn, sta = CompressedCache(model, spec), CompressedCache(fused, spec)
        nxt = model(prompt, **cache_kwargs(dyn)).logits[:, -1].argmax(-1, keepdim=True)
        first = fused(prompt, **cache_kwargs(sta)).logits[:, -1].argmax(-1, keepdim=True)
        assert int(first) == int(nxt)
        dec = StaticDecoder(fused, sta, 64)
        dec.start(int(nxt), prompt.shape[1])
        err, eager, static = 0.0, [], []
        for _ in range(64):
            logits = model(nxt, **cache_kwargs(dyn)).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            eager.append(int(nxt))
            dec.run(1)
            static.append(int(dec.tok))
            err = max(err, float((dec.logits - logits).abs().max()))
        dec.close()
    assert static == eager
    assert err < 1e-3
