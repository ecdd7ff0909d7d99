"""LongBench metrics against hand-computed values (each fails on a plausible wrong implementation)."""

from __future__ import annotations

import pytest

from lmcompress.eval.tasks import longbench_metrics as lm


def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert lm.normalize_answer("The  Cat, an apple & A dog!") == "cat apple dog"
    assert lm.normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_qa_f1_hand_computed():
    # "cat sat" vs "cat sat on mat": 2 common, P = 1, R = 1/2 -> F1 = 2/3
    assert lm.qa_f1("The cat sat.", "a cat sat on the mat") == pytest.approx(2 / 3)
    # repeated tokens count with multiplicity: pred [x x y], ref [x y y] -> common 2, P = R = 2/3
    assert lm.qa_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert lm.qa_f1("nothing", "else") == 0.0


def test_rouge_l_hand_computed():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" = 5 of 6 tokens each -> F = 5/6
    assert lm.rouge("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS (not bag of words): "b a" vs "a b" share one in order -> P = R = 1/2
    assert lm.rouge("b a", "a b") == pytest.approx(0.5)
    assert lm.rouge("", "a b") == 0.0


def test_classification_shares_credit_and_drops_names_inside_the_reference():
    classes = ["LOC", "NUM", "HUM"]
    assert lm.classification("LOC or NUM", "NUM", all_classes=classes) == pytest.approx(0.5)
    assert lm.classification("HUM", "NUM", all_classes=classes) == 0.0
    # "Entity" is inside the reference "Entity name" and is dropped: full credit
    assert lm.classification("Entity name", "Entity name", all_classes=["Entity", "Entity name"]) == 1.0
    # LongBench's removal while iterating skips the element after a removed one ("ab" stays): 1/2, not 1
    classes = ["a", "ab", "abc"]
    assert lm.classification("abc", "abc", all_classes=classes) == pytest.approx(0.5)


def test_retrieval_and_count_share_of_numbers():
    assert lm.retrieval("Paragraph 12, or maybe 3", "Paragraph 12") == pytest.approx(0.5)
    assert lm.retrieval("Paragraph 1", "Paragraph 12") == 0.0  # whole numbers, not prefixes
    assert lm.retrieval("no idea", "Paragraph 12") == 0.0
    assert lm.count("7 or 8 or 7", "7") == pytest.approx(2 / 3)
    assert lm.count("There are 17", "7") == 0.0


def test_code_sim_first_plain_line_and_indel_ratio():
    # first line without a comment/fence marker is "x = foo(1)"; Indel distance 2 over 20 chars -> 0.9
    assert lm.code_sim("\n# comment\n```\nx = foo(1)\nmore", "x = foo(2)") == pytest.approx(0.9)
    assert lm.code_sim("abc", "abc") == 1.0


def test_score_rules_first_line_and_best_reference():
    # trec is cut to its first line: the second line's class is not seen
    assert lm.score("trec", "LOC\nNUM", ["NUM"], ["LOC", "NUM"]) == 0.0
    assert lm.score("hotpotqa", "Paris", ["London", "Paris France"]) == pytest.approx(2 / 3)
