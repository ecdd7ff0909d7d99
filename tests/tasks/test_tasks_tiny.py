"""Every task end-to-end on the tiny random Llama with the byte tokenizer: a few samples at short lengths,
through the context + question pipeline with real KV specs (a random model answers nonsense, so these check
the plumbing, the scoring of what was answered and the bytes held, not accuracy)."""

from __future__ import annotations

import json

import pytest

from lmcompress.errors import LMCompressError
from lmcompress.eval.tasks.base import RunContext
from lmcompress.eval.tasks.longbench import LongBench, longbench_prompt, middle_truncate, read_longbench
from lmcompress.eval.tasks.longbench_metrics import score as longbench_score
from lmcompress.eval.tasks.needle_grid import NeedleGrid, auto_lengths, needle_matrix
from lmcompress.eval.tasks.ruler_data import string_match_all, string_match_part
from lmcompress.eval.tasks.ruler_suite import SYNTHETIC, RulerSuite
from lmcompress.kv.parse import parse_method
from lmcompress.kv.spec import KVSpec
from lmcompress.registry import TASKS

pytestmark = pytest.mark.model  # fixtures `model`, the byte tokenizers and no-grad: conftest.py


@pytest.mark.parametrize("name", SYNTHETIC)
def test_ruler_task_runs_and_scores_its_answers(name, model, base_tokenizer):
    extra = {"icl_noise_lines": 4} if name == "vt" else {}  # the byte tokenizer spends 90 tokens per noise line
    task = TASKS.get(name)(length=2500, samples=2, max_new_tokens=4, **extra)
    full = task.run(RunContext(model, base_tokenizer, KVSpec()))
    evicted = task.run(RunContext(model, base_tokenizer, parse_method("snapkv", ratio=0.5)))
    for res in (full, evicted):
        samples = res.details["samples"]
        assert len(samples) == 2
        for s in samples:
            assert s["score"] == string_match_all(s["answer"], s["outputs"])
        assert res.metrics["score"] == pytest.approx(100 * sum(s["score"] for s in samples) / 2)
        assert res.costs["prompt_tokens"] + 4 <= 2500
    # the same prompts; eviction at ratio 0.5 holds about half the bytes
    assert [s["outputs"] for s in full.details["samples"]] == [s["outputs"] for s in evicted.details["samples"]]
    assert evicted.costs["kv_bytes"] < 0.6 * full.costs["kv_bytes"]


def test_ruler_chat_framing_and_query_aware(model):
    from .byte_tokenizer import ChatByteTokenizer

    tok = ChatByteTokenizer()
    task = TASKS.get("niah_single_1")(length=1500, samples=1, max_new_tokens=4, query_aware=True)
    (sample, prompt), = task.build_samples(tok)
    text_q = tok.decode(prompt.question_ids[0].tolist())
    assert text_q.endswith("?\n<assistant>\n")  # chat: no answer prefix ("auto"), generation prompt last
    assert tok.decode(prompt.context_ids[0].tolist()).startswith("<user>\nA special magic number")
    res = task.run(RunContext(model, tok, parse_method("snapkv", ratio=0.5)))
    assert res.details["samples"][0]["prompt_tokens"] == prompt.n_tokens
    base = TASKS.get("niah_single_1")(length=1500, samples=1, answer_prefix="always")
    (_, p2), = base.build_samples(tok)
    assert tok.decode(p2.question_ids[0].tolist()).endswith("<assistant>\n" + sample.answer_prefix)


def test_ruler_length_beyond_the_model_positions_is_an_error(model, base_tokenizer):
    with pytest.raises(LMCompressError, match="length=5000 exceeds the model's 4096 positions"):
        TASKS.get("vt")(length=5000).run(RunContext(model, base_tokenizer, KVSpec()))


def test_ruler_group_reports_the_mean_of_its_members(model, base_tokenizer, tmp_path):
    qa = tmp_path / "squad.jsonl"
    docs = "\n\n".join(f"Document {i}:\nThe capital of land {i} is city {i}." for i in range(20))
    record = {"index": 0, "input": "Answer the question based on the given documents. Only give me the answer and do "
              "not output any other words.\n\nThe following are given documents.\n\n" + docs + "\n\nAnswer the "
              "question based on the given documents. Only give me the answer and do not output any other words."
              "\n\nQuestion: What is the capital of land 3?", "outputs": ["city 3", "City 3"], "length": 300}
    qa.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    group = RulerSuite(length=3000, samples=1, tasks="niah_single_1,vt,qa_1", qa_1=str(qa))
    res = group.run(RunContext(model, base_tokenizer, KVSpec()))
    members = [res.metrics[n] for n in ("niah_single_1", "vt", "qa_1")]
    assert res.metrics["score"] == pytest.approx(sum(members) / 3)
    qa_sample = res.details["qa_1"]["samples"][0]
    assert qa_sample["score"] == string_match_part(qa_sample["answer"], ["city 3", "City 3"])


def _longbench_file(tmp_path, records):
    path = tmp_path / "lb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _record(dataset, context, question, answers, classes=None):
    return {"input": question, "context": context, "answers": answers, "all_classes": classes,
            "length": len(context.split()), "dataset": dataset, "_id": "x"}


def test_longbench_runs_truncates_in_the_middle_and_scores(model, base_tokenizer, tmp_path):
    long_ctx = "START " + "filler text. " * 300 + " END"
    path = _longbench_file(tmp_path, [
        _record("hotpotqa", long_ctx, "Where?", ["Paris"]),
        _record("trec", "Q: who? A: HUM", "What year?", ["NUM"], ["HUM", "NUM", "LOC"]),
        _record("passage_count", "Paragraph 1: a\n\nParagraph 2: b", "", [2]),
        _record("lcc", "def f():\n    return 1\n", "", ["    return 2"]),
    ])
    recs = read_longbench(path)
    prompt = longbench_prompt(base_tokenizer, recs[0], max_length=600)
    text_c = base_tokenizer.decode(prompt.context_ids[0].tolist())
    text_q = base_tokenizer.decode(prompt.question_ids[0].tolist())
    assert prompt.n_tokens == 600
    assert "START" in text_c and "END" in text_c  # the middle went, both ends stayed
    assert text_q.endswith("Question: Where?\nAnswer:")
    res = LongBench(path=path, max_length=600, max_new_tokens=4).run(RunContext(model, base_tokenizer, KVSpec()))
    samples = res.details["samples"]
    assert [s["dataset"] for s in samples] == ["hotpotqa", "trec", "passage_count", "lcc"]
    for s, rec in zip(samples, recs):
        assert s["score"] == longbench_score(rec["dataset"], s["answer"], rec["answers"], rec["all_classes"])
        assert s["prompt_tokens"] <= 600
    assert set(res.metrics) == {"score", "hotpotqa", "trec", "passage_count", "lcc"}


def test_middle_truncate_keeps_both_ends_and_the_question():
    ctx, q = list(range(100)), [900, 901]
    c2, q2 = middle_truncate(ctx, q, 10)
    assert c2 + q2 == [0, 1, 2, 3, 4, 97, 98, 99, 900, 901]
    assert q2 == q
    assert middle_truncate(ctx, q, 200) == (ctx, q)


def test_longbench_file_problems_are_named(tmp_path):
    rec = _record("hotpotqa", "c", "q", ["a"])
    del rec["all_classes"]
    with pytest.raises(LMCompressError, match=r"line 1 of .* lacks field 'all_classes'"):
        LongBench(path=_longbench_file(tmp_path, [rec]))
    with pytest.raises(LMCompressError, match="dataset='dureader' is not supported"):
        LongBench(path=_longbench_file(tmp_path, [_record("dureader", "c", "q", ["a"])]))
    with pytest.raises(LMCompressError, match="needs path=FILE"):
        LongBench()


def test_needle_grid_cells_and_matrix(model, base_tokenizer):
    task = NeedleGrid(lengths=(300, 600), depths=(0.95, 0.05), needles=2)
    res = task.run(RunContext(model, base_tokenizer, KVSpec()))
    cells = res.details["cells"]
    assert len(cells) == 4 and len(res.details["samples"]) == 8
    matrix = needle_matrix(res)
    assert matrix["lengths"] == [300, 600] and matrix["depths"] == [0.05, 0.95]
    for c in cells:
        row, col = matrix["lengths"].index(c["length"]), matrix["depths"].index(c["depth"])
        assert matrix["accuracy"][row][col] == c["accuracy"]
        hits = [s["correct"] for s in res.details["samples"] if (s["length"], s["depth"]) == (c["length"], c["depth"])]
        assert c["accuracy"] == sum(hits) / 2
    assert needle_matrix(res.to_dict()) == matrix == needle_matrix({"result": res.to_dict()})
    assert auto_lengths(4096, 10) == (1024, 2048, 4086)
    with pytest.raises(LMCompressError, match=r"depth=1\.5 is out of range"):
        NeedleGrid(depths=(0.5, 1.5))


def test_user_files_are_pinned_by_content(tmp_path):
    path = _longbench_file(tmp_path, [_record("hotpotqa", "c", "q", ["a"])])
    task = LongBench(path=path)
    assert len(task.sha256) == 16 and LongBench(**task.params()) == task  # a stored run rebuilds
    _longbench_file(tmp_path, [_record("hotpotqa", "c", "q", ["b"])])
    assert LongBench(path=path).sha256 != task.sha256  # new content, new result key
    with pytest.raises(LMCompressError, match="changed since it was recorded"):
        LongBench(**task.params())
