"""LongBench's metrics (THUDM/LongBench ``metrics.py``), written anew, for one prediction and one reference,
each in [0, 1]:

* ``qa_f1``: token F1 after SQuAD-style normalisation (lower case, punctuation and English articles removed,
  white space collapsed);
* ``rouge``: ROUGE-L F-measure through the ``rouge-score`` library (LongBench calls the ``rouge`` package,
  whose tokenisation differs slightly: rouge-score lower-cases and splits on non-alphanumerics);
* ``classification``: 1 / (number of class names found in the prediction) when the right class is among them,
  with LongBench's rule that drops a found name contained in the reference (its in-place removal while
  iterating is kept, so scores match LongBench's);
* ``retrieval``: the share of the numbers in the prediction equal to the reference's ``Paragraph N``;
* ``count``: the share of the numbers in the prediction equal to the reference count;
* ``code_sim``: fuzzy similarity (``rapidfuzz.fuzz.ratio`` / 100; LongBench uses fuzzywuzzy's ratio, the
  same normalised Indel similarity up to rounding) of the first prediction line that has no comment or code
  fence marker.

:func:`score` applies LongBench's per-data-set rules: the first line only for trec/triviaqa/samsum/lsht, and
the best score over the references.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from .longbench_config import FIRST_LINE, METRIC

_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


@lru_cache(maxsize=1)
def _rouge_l():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge(prediction: str, reference: str, **_) -> float:
    if not prediction.strip() or not reference.strip():
        return 0.0
    return float(_rouge_l().score(reference, prediction)["rougeL"].fmeasure)


def classification(prediction: str, reference: str, *, all_classes: Sequence[str] | None = None, **_) -> float:
    found = [c for c in (all_classes or []) if c in prediction]
    _longbench_prune(found, reference)
    return 1.0 / len(found) if reference in found else 0.0


def _longbench_prune(found: list[str], reference: str) -> None:
    """LongBench's ``for t in found: if t in reference and t != reference: found.remove(t)`` (the removal
    shifts the list under the loop, so an element right after a removed one is not examined)."""
    i = 0
    while i < len(found):
        term = found[i]
        if term in reference and term != reference:
            found.remove(term)
        i += 1


def _share_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str, **_) -> float:
    match = re.findall(r"Paragraph (\d+)", reference)
    return _share_equal(prediction, match[0]) if match else 0.0


def count(prediction: str, reference: str, **_) -> float:
    return _share_equal(prediction, str(reference))


def code_sim(prediction: str, reference: str, **_) -> float:
    from rapidfuzz import fuzz

    line = next((x for x in prediction.lstrip("\n").split("\n") if "`" not in x and "#" not in x and "//" not in x),
                "")
    return fuzz.ratio(line, reference) / 100


METRICS = {"qa_f1": qa_f1, "rouge": rouge, "classification": classification, "retrieval": retrieval,
           "count": count, "code_sim": code_sim}


def score(dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None) -> float:
    """LongBench's score of one prediction, in [0, 1]: the best over ``answers`` of the data set's metric."""
    if dataset in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[METRIC[dataset]]
    return max((metric(prediction, str(a), all_classes=all_classes) for a in answers), default=0.0)
