"""Answers decoded as a row batch (kv/row_batch.py, eval/batched_answers.py) equal answers decoded one by one,
for every registered eviction method and KV quantizer: tokens, KV bytes and held tokens after the prompt and at
the end, and every row's kept positions."""

from __future__ import annotations

import pytest
import torch
from random_ids import ids

from lmcompress.errors import LMCompressError
from lmcompress.eval.batched_answers import answer_prompts, process_prompt
from lmcompress.eval.pipeline import answer
from lmcompress.kv import KVSpec, SnapKV
from lmcompress.kv.evict import DMS
from lmcompress.kv.row_batch import RowBatchCache
from method_examples import every_spec

pytestmark = pytest.mark.model

#: three prompts of different lengths (the rows sit at different positions and hold different token counts)
PROMPTS = [(ids(100, seed=21), ids(6, seed=22)), (ids(84, seed=23), ids(9, seed=24)),
           (ids(93, seed=25), ids(5, seed=26))]


def _refuses_batches(spec: KVSpec) -> bool:
    return isinstance(spec.evict, DMS)


@pytest.mark.parametrize("name", list(every_spec()))
@pytest.mark.parametrize("query_aware", [False, True])
def test_row_batch_answers_equal_one_by_one(model, name, query_aware):
    spec = every_spec()[name]
    alone = [answer(model, c, q, spec, max_new_tokens=12, query_aware=query_aware, eos_token_ids=[],
                    decode="eager") for c, q in PROMPTS]
    together = answer_prompts(model, PROMPTS, spec, max_new_tokens=12, query_aware=query_aware, eos_token_ids=[],
                              decode="eager", batch=3)
    for a, b in zip(alone, together):
        assert b.token_ids == a.token_ids
        assert (b.kv_bytes, b.kv_bytes_end, b.held_tokens) == (a.kv_bytes, a.kv_bytes_end, a.held_tokens)
        assert b.extra["decode_batch"] == (1 if _refuses_batches(spec) else 3)


def test_rows_leave_the_batch_at_their_own_stop(model):
    """A row that stops early (its stop rule, EOS) leaves; the others go on to their own end."""
    spec = KVSpec(evict=SnapKV(ratio=0.5, window_size=8))
    alone = [answer(model, c, q, spec, max_new_tokens=10, eos_token_ids=[], decode="eager") for c, q in PROMPTS]
    eos = alone[1].token_ids[3]  # row 1 meets it at its 4th token (or earlier)
    stops = [lambda t: len(t) >= 2, None, None]
    want = [answer(model, c, q, spec, max_new_tokens=10, eos_token_ids=[eos], decode="eager", stop_when=s)
            for (c, q), s in zip(PROMPTS, stops)]
    got = answer_prompts(model, PROMPTS, spec, max_new_tokens=10, eos_token_ids=[eos], decode="eager", batch=3,
                         stop_when=stops)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert len(got[0].token_ids) == 2 and len(got[1].token_ids) <= 3 and eos not in got[1].token_ids


def test_batch_larger_than_prompts_and_batch_one(model):
    spec = KVSpec(evict=SnapKV(ratio=0.5, window_size=8))
    one = answer_prompts(model, PROMPTS, spec, max_new_tokens=5, eos_token_ids=[], decode="eager", batch=1)
    many = answer_prompts(model, PROMPTS, spec, max_new_tokens=5, eos_token_ids=[], decode="eager", batch=16)
    assert [g.token_ids for g in one] == [g.token_ids for g in many]
    assert {g.extra["decode_batch"] for g in one} == {1} and {g.extra["decode_batch"] for g in many} == {3}


def test_row_batch_refuses_what_it_cannot_run(model):
    with torch.inference_mode():
        rows = [process_prompt(model, c, q, KVSpec(), max_new_tokens=4, query_aware=False) for c, q in PROMPTS[:2]]
        dms = process_prompt(model, *PROMPTS[2], KVSpec(evict=DMS(window_size=4, alpha_scale=1.0, initial_alpha_offset=0.0)),
                             max_new_tokens=4,
                             query_aware=False)
    with pytest.raises(LMCompressError, match="at least one cache"):
        RowBatchCache([])
    with pytest.raises(LMCompressError, match="row 2 cannot decode in a batch: dms hooks the model"):
        RowBatchCache([rows[0].cache, rows[1].cache, dms.cache])
    batch = RowBatchCache([r.cache for r in rows])
    with pytest.raises(LMCompressError, match=r"one token per row: got states \(2, 2, 3, 16\)"):
        batch.layers[0].update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16))
    assert batch.next_positions().tolist() == [[106], [93]]
    with pytest.raises(ValueError, match="stop_when has 1 entries for 3 prompts"):
        answer_prompts(model, PROMPTS, KVSpec(), stop_when=[None])
