"""The context pipeline through ``transformers.pipeline`` (the kvpress-style entry point), on the default model."""

from __future__ import annotations

import pytest

import lmcompress
from lmcompress.errors import LMCompressError
from lmcompress.eval.context_pipeline import encode_prompt
from lmcompress.eval.pipeline import answer
from lmcompress.kv import KVSpec, SnapKV

pytestmark = pytest.mark.golden

CONTEXT = "Alice lives in Paris. Bob lives in Rome. Carol has a red car. Dan plays the violin. " * 4
QUESTIONS = ["\nIn which city does Bob live?", "\nWhat does Dan play?", "\nWhat colour is Carol's car?"]


def test_transformers_pipeline_task_matches_separate_runs(smollm):
    from transformers import pipeline

    model, tok = smollm
    task = lmcompress.register_pipeline()
    assert task == "lmcompress-text-generation"
    pipe = pipeline(task, model=model, tokenizer=tok)
    spec = KVSpec(evict=SnapKV(ratio=0.5, window_size=16))
    out = pipe(CONTEXT, questions=QUESTIONS, spec=spec, max_new_tokens=6)
    expected = []
    for q in QUESTIONS:
        ctx_ids, q_ids = encode_prompt(tok, CONTEXT, q)
        expected.append(answer(model, ctx_ids, q_ids, spec, tokenizer=tok, max_new_tokens=6).text)
    assert out["answers"] == expected
    assert pipe(CONTEXT, question=QUESTIONS[0], press=spec, max_new_tokens=6)["answer"] == expected[0]
    direct = lmcompress.pipeline(model, tok, spec)(CONTEXT, questions=QUESTIONS, max_new_tokens=6)
    assert direct["answers"] == expected
    with pytest.raises(LMCompressError, match="not an lmcompress KVSpec"):
        pipe(CONTEXT, question=QUESTIONS[0], press=object())


def test_chat_prompt_splits_at_the_question(smollm):
    _, tok = smollm
    ctx_ids, q_ids = encode_prompt(tok, "The sky is blue.", " What colour is the sky?", answer_prefix="Answer:")
    whole = tok.decode(ctx_ids[0].tolist() + q_ids[0].tolist())
    assert "The sky is blue. What colour is the sky?" in whole
    assert whole.rstrip().endswith("Answer:")
    assert "What colour" not in tok.decode(ctx_ids[0].tolist())
