"""RULER-style tasks on the real default model: prompts sized in its own tokens, and the single needle found
uncompressed (recorded: 2 of 2 at 2048 tokens, seed 42)."""

from __future__ import annotations

import pytest

from lmcompress.eval.tasks import RunContext
from lmcompress.eval.tasks.ruler_suite import SYNTHETIC
from lmcompress.kv import KVSpec
from lmcompress.kv.parse import parse_method
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


def test_stop_at_full_score_keeps_scores_and_shortens_answers(smollm):
    """The early stop ends found answers right after the needle's value; every score equals the full-length
    decode's (one found needle, one needle lost to StreamingLLM)."""
    model, tok = smollm
    for spec in (KVSpec(), parse_method("streaming_llm", ratio=0.9)):
        ctx = RunContext(model, tok, spec)
        short = TASKS.get("niah_single_1")(length=1024, samples=1).run(ctx)
        full = TASKS.get("niah_single_1")(length=1024, samples=1, stop_at_full_score=False).run(ctx)
        (s,), (f,) = short.details["samples"], full.details["samples"]
        assert s["score"] == f["score"], (s["answer"], f["answer"])
        assert f["answer"].startswith(s["answer"])
        if s["score"] == 1.0:
            assert s["answer_tokens"] < f["answer_tokens"]
            assert s["answer"].endswith(s["outputs"][0])
        else:
            assert s["answer_tokens"] == f["answer_tokens"]


@pytest.mark.parametrize("method", ["snapkv", "kivi"])
def test_batched_answers_equal_one_by_one_on_the_default_model(smollm, method):
    """``answer_batch``: three samples decoded as one batch give the one-by-one answers, bytes and scores
    (recorded equal for none, snapkv, kivi and adakv at 1024 tokens with five samples; a rounding difference could
    in principle flip a near-tie)."""
    model, tok = smollm
    ctx = RunContext(model, tok, parse_method(method, ratio=0.5))
    one = TASKS.get("niah_multikey_2")(length=768, samples=3, max_new_tokens=16).run(ctx)
    five = TASKS.get("niah_multikey_2")(length=768, samples=3, max_new_tokens=16, answer_batch=3).run(ctx)
    for a, b in zip(one.details["samples"], five.details["samples"]):
        assert (b["answer"], b["score"], b["kv_bytes"]) == (a["answer"], a["score"], a["kv_bytes"])
        assert (a["decode_batch"], b["decode_batch"]) == (1, 3)
    assert five.metrics == one.metrics and five.costs["decode_batch"] == 3
