"""RULER-style tasks on the real default model: prompts sized in its own tokens, and the single needle found
uncompressed (recorded: 2 of 2 at 2048 tokens, seed 42)."""

from __future__ import annotations

import pytest

from lmcompress.eval.tasks import RunContext
from lmcompress.eval.tasks.ruler_suite import SYNTHETIC
from lmcompress.kv import KVSpec
from lmcompress.registry import TASKS

pytestmark = pytest.mark.golden


def test_prompts_fill_4096_tokens_of_the_model_tokenizer(smollm):
    _, tok = smollm
    for name in SYNTHETIC:
        task = TASKS.get(name)(length=4096, samples=1)
        (_, prompt), = task.build_samples(tok)
        total = prompt.n_tokens + task.max_new_tokens
        assert 4096 * 0.93 <= total <= 4096, name
        assert tok.decode(prompt.question_ids[0]).endswith("<|im_start|>assistant\n")  # chat frame, no prefix


def test_single_needle_found_uncompressed(smollm):
    model, tok = smollm
    result = TASKS.get("niah_single_1")(length=2048, samples=2).run(RunContext(model, tok, KVSpec()))
    assert result.metrics["score"] == 100.0, [s["answer"] for s in result.details["samples"]]
