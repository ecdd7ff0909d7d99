"""CUDA graphs over static slots: replays give the tokens eager static steps give, memory stays flat."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmcompress._compat import cache_kwargs
from lmcompress.eval.graph_decode import StaticDecoder
from lmcompress.kv import CompressedCache, KVSpec, SnapKV, StreamingLLM

pytestmark = pytest.mark.gpu


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192)
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


@pytest.mark.parametrize(("spec", "rolling"), [
    (KVSpec(), False), (KVSpec(evict=SnapKV(ratio=0.5)), False), (KVSpec(evict=StreamingLLM(budget=256)), True),
])
def test_graph_replay_matches_eager_static_steps(spec, rolling):
    model = _model()
    ids = torch.randint(0, 512, (1, 1000), device="cuda")
    tokens = {}
    for use_graph in (False, True):
        cache = CompressedCache(model, spec)
        with torch.no_grad():
            first = int(model(ids, **cache_kwargs(cache)).logits[:, -1].argmax(-1))
        dec = StaticDecoder(model, cache, 40, rolling=rolling, use_graph=use_graph)
        dec.start(first, 1000)
        tokens[use_graph] = dec.generate(20)
        if use_graph:
            assert dec.graph is not None
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            dec.run(15)
            torch.cuda.synchronize()
            assert torch.cuda.memory_allocated() == before
        dec.close()
    assert tokens[True] == tokens[False]
