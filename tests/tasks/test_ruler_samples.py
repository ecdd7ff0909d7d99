"""RULER-style samples: sized to the target length in the tokenizer's tokens, deterministic for a seed, and
built as RULER defines each task (needles, chains, word frequencies), checked on the generated text."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from lmcompress.errors import LMCompressError
from lmcompress.eval.tasks.ruler_data import string_match_all, string_match_part
from lmcompress.eval.tasks.ruler_fwe import zeta
from lmcompress.eval.tasks.ruler_suite import SYNTHETIC, RulerSuite
from lmcompress.registry import TASKS


@pytest.mark.parametrize("name", SYNTHETIC)
def test_samples_fill_the_length_and_repeat_for_a_seed(name, tokenizer):
    task = TASKS.get(name)(length=3000, samples=2, max_new_tokens=16)
    built = task.build_samples(tokenizer)
    assert len(built) == 2
    for sample, prompt in built:
        assert prompt.n_tokens + 16 <= 3000
        assert prompt.n_tokens + 16 >= 3000 * 0.9  # filled close to the target, not just under it
        assert sample.outputs
    again = TASKS.get(name)(length=3000, samples=2, max_new_tokens=16).build_samples(tokenizer)
    assert [s.context for s, _ in again] == [s.context for s, _ in built]
    other = TASKS.get(name)(length=3000, samples=2, max_new_tokens=16, seed=7).build_samples(tokenizer)
    assert [s.outputs for s, _ in other] != [s.outputs for s, _ in built]
    assert built[0][0].outputs != built[1][0].outputs  # samples differ from one another


def _needles(text: str) -> list[tuple[str, str]]:
    return re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", text)


def test_niah_single_1_one_number_needle_in_noise(base_tokenizer):
    sample, _ = TASKS.get("niah_single_1")(length=2000, samples=1).build_samples(base_tokenizer)[0]
    (key, value), = _needles(sample.context)
    assert sample.outputs == [value] and re.fullmatch(r"\d{7}", value)
    assert re.fullmatch(r"[a-z]+-[a-z]+", key)
    assert sample.context.startswith("A special magic number is hidden within the following text.")
    assert sample.question == f"\nWhat is the special magic number for {key} mentioned in the provided text?"
    assert sample.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    lines = sample.context.split("\n")[1:]
    assert sum(line.startswith("The grass is green.") for line in lines) == len(lines) - 1


def test_niah_multikey_and_multivalue_and_multiquery(base_tokenizer):
    s, _ = TASKS.get("niah_multikey_1")(length=3000, samples=1).build_samples(base_tokenizer)[0]
    needles = _needles(s.context)
    assert len(needles) == 4 and len(s.outputs) == 1
    asked = re.search(r"for (\S+) mentioned", s.question).group(1)
    assert dict(needles)[asked] == s.outputs[0]

    s, _ = TASKS.get("niah_multivalue")(length=3000, samples=1).build_samples(base_tokenizer)[0]
    needles = _needles(s.context)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 1
    assert sorted(s.outputs) == sorted(v for _, v in needles)
    assert s.context.startswith("Some special magic numbers are hidden")

    s, _ = TASKS.get("niah_multiquery")(length=3000, samples=1).build_samples(base_tokenizer)[0]
    needles = dict(_needles(s.context))
    assert len(needles) == 4 and len(s.outputs) == 4
    assert ", and " in s.question and all(k in s.question for k in needles)


def test_niah_needle_haystack_is_distractor_needles(base_tokenizer):
    s, _ = TASKS.get("niah_multikey_3")(length=3000, samples=1).build_samples(base_tokenizer)[0]
    lines = s.context.split("\n")[1:]
    assert all(line.startswith("One of the special magic uuids for ") for line in lines)
    key = re.search(r"for (\S+) mentioned", s.question).group(1)
    assert [v for k, v in _needles(s.context) if k == key] == s.outputs
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s.outputs[0])


def test_vt_answer_is_the_chain_holding_the_value(base_tokenizer):
    s, _ = TASKS.get("vt")(length=3000, samples=1).build_samples(base_tokenizer)[0]
    main = s.context.split("Memorize and track")[-1]  # after the solved example
    value = re.search(r"assigned the value (\d+)", s.question).group(1)
    holds = {m.group(1) for m in re.finditer(rf"VAR (\w+) = {value}\b", main)}
    changed = True
    while changed:
        new = {m.group(1) for m in re.finditer(r"VAR (\w+) = VAR (\w+)", main) if m.group(2) in holds}
        changed = not new <= holds
        holds |= new
    assert holds == set(s.outputs) and len(s.outputs) == 5
    assert "5 variables are assigned the value" in s.answer_prefix
    assert s.context.count("Answer: According to the chain(s)") == 1  # the one solved example


def test_cwe_common_words_repeat_freq_cw_times(base_tokenizer):
    s, _ = TASKS.get("cwe")(length=8000, samples=1).build_samples(base_tokenizer)[0]
    main = s.context.split("Memorize the ones that appear most often.\n")[-1]
    counts = Counter(re.findall(r"\d+\. (\S+)", main))
    assert len(s.outputs) == 10
    assert all(counts[w] == 30 for w in s.outputs)
    assert {c for w, c in counts.items() if w not in s.outputs} == {3}


def test_fwe_answer_is_ranks_two_to_four(base_tokenizer):
    s, _ = TASKS.get("fwe")(length=3000, samples=1).build_samples(base_tokenizer)[0]
    counts = Counter(s.context.split("coded words. ", 1)[1].split())
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[0] == "..."
    assert counts[s.outputs[0]] > counts[s.outputs[1]] > counts[s.outputs[2]]
    assert all(counts[s.outputs[2]] > c for w, c in counts.items() if w not in ("...", *s.outputs))
    assert zeta(2.0) == pytest.approx(3.141592653589793**2 / 6, rel=1e-10)


def test_string_match_scores():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_all("ABC-def", ["abc-DEF"]) == 1.0  # case-insensitive
    assert string_match_part("it is 456", ["123", "456"]) == 1.0
    assert string_match_part("none", ["123", "456"]) == 0.0


def test_bad_parameters_raise_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(LMCompressError, match="is empty"):
        TASKS.get("niah_single_2")(haystack_source=str(empty))
    with pytest.raises(LMCompressError, match="neither a text source nor a file"):
        TASKS.get("niah_single_2")(haystack_source="no-such-source")
    with pytest.raises(LMCompressError, match="num_queries=4 exceeds num_keys=1"):
        TASKS.get("niah_single_1")(num_queries=4)
    with pytest.raises(LMCompressError, match="leaves no room"):
        TASKS.get("vt")(length=30)


def test_ruler_group_members_and_qa_files(tmp_path):
    group = RulerSuite(length=2048, samples=2)
    assert [t.name for t in group.members()] == list(SYNTHETIC)
    assert all(t.length == 2048 and t.samples == 2 for t in group.members())
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"input": "Document 1:\\nx\\n\\nAnswer the question based on the given documents. Q?", '
                  '"outputs": ["x"]}\n')
    names = [t.name for t in RulerSuite(qa_1=str(qa), qa_2=str(qa)).members()]
    assert names[-2:] == ["qa_1", "qa_2"]
    assert [t.name for t in RulerSuite(tasks="vt,cwe").members()] == ["vt", "cwe"]
    with pytest.raises(LMCompressError, match="not a member of the ruler group"):
        RulerSuite(tasks="qa_1")
