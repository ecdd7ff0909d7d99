"""CUDA tier (skipped without a GPU): the allocator sees eviction and quantization free memory, and the
compressed cache matches on GPU what it does on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, IntKV, KVSpec, SnapKV, StreamingLLM

pytestmark = pytest.mark.gpu


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192)
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


@pytest.mark.parametrize(("spec", "fraction"), [
    (KVSpec(), 1.0),
    (KVSpec(evict=StreamingLLM(ratio=0.75)), 0.25),
    (KVSpec(evict=SnapKV(ratio=0.5)), 0.5),
    (KVSpec(quant=IntKV(bits=4)), 0.28),
])
def test_allocator_holds_what_nbytes_says(spec, fraction):
    model = _model()
    ids = torch.randint(0, 128, (1, 8192), device="cuda")
    with torch.no_grad():
        model(ids[:, :16])
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        cache = CompressedCache(model, spec)
        out = model(ids, **cache_kwargs(cache), logits_to_keep=1)
        del out
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
    full = 2 * 2 * 8 * 128 * 2 * 8192  # layers x K,V x heads x dims x bf16 x tokens
    assert abs(held - cache.nbytes) <= 2 << 20
    assert cache.nbytes <= full * fraction * 1.05 + 2 * 8 * 8192 * 4


def test_decode_on_gpu_matches_cpu():
    model = _model()
    ids = torch.randint(0, 128, (1, 300))
    spec = KVSpec(evict=SnapKV(ratio=0.5), quant=IntKV(bits=8))
    outs = {}
    for dev in ("cuda", "cpu"):
        m = model.to(dev, torch.float32)
        cache = CompressedCache(m, spec)
        outs[dev] = m.generate(ids.to(dev), **cache_kwargs(cache), max_new_tokens=8, do_sample=False,
                               pad_token_id=0).cpu()
    assert torch.equal(outs["cuda"], outs["cpu"])
