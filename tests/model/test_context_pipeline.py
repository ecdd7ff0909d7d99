"""The multi-question pipeline: one compressed context, several answers, each identical to a separate run."""

from __future__ import annotations

import pytest
import torch
from random_ids import ids

import lmcompress
from lmcompress._compat import cache_kwargs
from lmcompress.errors import LMCompressError
from lmcompress.eval.context_pipeline import answer_many
from lmcompress.eval.pipeline import answer
from lmcompress.kv import CAKE, AdaKV, CompressedCache, KVSpec, SnapKV, StreamingLLM
from lmcompress.kv.quant import KIVI, IntKV

pytestmark = pytest.mark.model

SPECS = {
    "snapkv": KVSpec(evict=SnapKV(ratio=0.5, window_size=8)),
    "kivi2": KVSpec(quant=KIVI(bits=2, residual=32, group_size=16)),
    "int4": KVSpec(quant=IntKV(bits=4, group_size=16)),
    "adakv": KVSpec(evict=AdaKV(base=SnapKV(ratio=0.6, window_size=8))),
    "cake": KVSpec(evict=CAKE(ratio=0.5, window_size=8)),
    "snapkv+kivi2": KVSpec(evict=SnapKV(ratio=0.5, window_size=8), quant=KIVI(bits=2, residual=32,
                                                                              group_size=16)),
}

CONTEXT = ids(150, seed=1)
QUESTIONS = [ids(5, seed=2), ids(9, seed=3), ids(3, seed=4)]


@pytest.mark.parametrize("name", list(SPECS))
def test_three_questions_match_three_separate_runs(model, name):
    spec = SPECS[name]
    separate = [answer(model, CONTEXT, q, spec, max_new_tokens=8, eos_token_ids=[]) for q in QUESTIONS]
    pipe = lmcompress.pipeline(model, None, spec)
    out = pipe(CONTEXT, questions=QUESTIONS, max_new_tokens=8, return_generations=True)
    shared = out["generations"]
    assert out["answers"] == [g.token_ids for g in separate]
    for one, many in zip(separate, shared):
        assert many.token_ids == one.token_ids
        assert many.held_tokens == one.held_tokens
        assert len(many.token_ids) == 8
    # the answers differ between questions (else the test could not see a leak from one to the next)
    assert len({tuple(g.token_ids) for g in separate}) > 1


def test_storage_kinds_are_exercised(model):
    """The specs above cover the uniform, ragged (AdaKV) and packed (KIVI) layouts."""
    kinds = {}
    for name, spec in SPECS.items():
        cache = CompressedCache(model, spec)
        model(CONTEXT, **cache_kwargs(cache))
        layer = cache.layers[0]
        kinds[name] = ("ragged" if layer.ragged else "uniform", layer.packed_length > 0)
    assert kinds["adakv"][0] == "ragged"
    assert kinds["kivi2"] == ("uniform", True)
    assert kinds["snapkv"] == ("uniform", False)


def test_the_compressed_context_is_untouched_by_answers(model):
    """Reusing the cache without restoring it would change the second answer: restore is what makes them
    equal (a check that the equality test above can fail)."""
    spec = SPECS["snapkv"]
    base = CompressedCache(model, spec, reserve=20)
    model(CONTEXT, **cache_kwargs(base))
    held, nbytes = base.held_tokens(), base.nbytes
    copy = base.copy()
    with copy.compression_paused():
        model(QUESTIONS[0], **cache_kwargs(copy))
    assert copy.held_tokens() != held
    assert base.held_tokens() == held and base.nbytes == nbytes
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(base.tensors(), copy.tensors()))
    # no restore: the second question sees the first one's tokens and answers differently
    leaky = answer_many(model, CONTEXT, [QUESTIONS[1]], spec, max_new_tokens=8, eos_token_ids=[])[0]
    with torch.inference_mode(), copy.compression_paused():
        logits = model(QUESTIONS[1], **cache_kwargs(copy)).logits[:, -1]
    assert int(logits.argmax(-1)) != leaky.token_ids[0] or copy.held_tokens() != leaky.held_tokens


def test_query_aware_prefills_each_question(model):
    spec = KVSpec(evict=StreamingLLM(ratio=0.5))
    pipe = lmcompress.pipeline(model, None, spec)
    out = pipe(CONTEXT, questions=QUESTIONS[:2], max_new_tokens=4, query_aware=True)
    expect = [answer(model, CONTEXT, q, spec, max_new_tokens=4, query_aware=True).token_ids for q in QUESTIONS[:2]]
    assert out["answers"] == expect


def test_single_question_and_bad_input(model):
    pipe = lmcompress.pipeline(model, None, SPECS["snapkv"])
    one = pipe(CONTEXT, question=QUESTIONS[0], max_new_tokens=4)
    assert one["answer"] == pipe(CONTEXT, questions=[QUESTIONS[0]], max_new_tokens=4)["answers"][0]
    with pytest.raises(LMCompressError, match="not both"):
        pipe(CONTEXT, question=QUESTIONS[0], questions=QUESTIONS)
    with pytest.raises(LMCompressError, match="questions is empty"):
        pipe(CONTEXT, questions=[])
    with pytest.raises(LMCompressError, match="need a tokenizer"):
        pipe("some text", question="why?")
    with pytest.raises(LMCompressError, match="is not a KVSpec"):
        pipe(CONTEXT, question=QUESTIONS[0], spec="snapkv")


def test_static_cache_cannot_be_copied(model):
    cache = CompressedCache(model, KVSpec())
    model(CONTEXT, **cache_kwargs(cache))
    cache.begin_static(4)
    with pytest.raises(LMCompressError, match="static decode mode"):
        cache.copy()
    cache.end_static()
    assert cache.copy().held_tokens() == cache.held_tokens()
