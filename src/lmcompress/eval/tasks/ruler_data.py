"""Building blocks of the RULER-style tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"; task definitions of NVIDIA/RULER's ``scripts/data/synthetic``), written anew.

* word lists: wonderwords' noun/adjective/verb lists (the lists RULER samples its keys and common words from);
* needle values: 7-digit numbers, adjective-noun words, UUID4 strings;
* haystacks: RULER's noise sentence, essay text (here a text source of :mod:`lmcompress.eval.text` or a text
  file instead of Paul Graham's essays), or distractor needles;
* sizing: the largest haystack whose prompt plus answer room fits the target length in the model's own tokens
  (a binary search, as RULER does);
* scoring: RULER's ``string_match_all`` / ``string_match_part``.

Differences from RULER, by necessity: sentences are split with a regular expression (NLTK's punkt model is a
download), and every random choice comes from one ``random.Random`` per sample so samples are reproducible.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ...errors import LMCompressError
from ..text import TEXT_SOURCES, documents

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
#: RULER's insertion depths (percent): 40 evenly spaced integers in [0, 100].
DEPTHS = [round(i * 100 / 39) for i in range(40)]
NEEDLE_TYPES = ("numbers", "words", "uuids")
HAYSTACK_TYPES = ("noise", "essay", "needle")


@lru_cache(maxsize=4)
def wordlist(name: str) -> tuple[str, ...]:
    """A wonderwords list (``nounlist``, ``adjectivelist``, ``verblist``): lower-case words, file order."""
    try:
        text = (resources.files("wonderwords") / "assets" / f"{name}.txt").read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise LMCompressError("the RULER-style tasks need the wonderwords package (`pip install wonderwords`)") from None
    return tuple(w.strip() for w in text.splitlines() if w.strip())


@lru_cache(maxsize=2)
def sorted_words(name: str) -> tuple[str, ...]:
    return tuple(sorted(set(wordlist(name))))


@lru_cache(maxsize=1)
def common_words() -> tuple[str, ...]:
    """RULER's cwe vocabulary: nouns, adjectives and verbs, de-duplicated and sorted."""
    return tuple(sorted(set(wordlist("nounlist") + wordlist("adjectivelist") + wordlist("verblist"))))


def random_value(rng: random.Random, kind: str) -> str:
    """One needle key or value of ``kind`` (numbers: 7 digits; words: adjective-noun; uuids: UUID4)."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":  # uniform over RULER's adjective-noun pairs, without listing all of them
        adjs, nouns = sorted_words("adjectivelist"), sorted_words("nounlist")
        return f"{adjs[rng.randrange(len(adjs))]}-{nouns[rng.randrange(len(nouns))]}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise LMCompressError(f"needle type {kind!r} is not supported; allowed: {', '.join(NEEDLE_TYPES)}")


def split_sentences(text: str) -> list[str]:
    """Sentences of running text (split after ``.``, ``!`` or ``?`` followed by white space)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


@lru_cache(maxsize=8)
def essay_words(source: str) -> tuple[str, ...]:
    """The words of a haystack text: a text source (``lee``, ``lee-test``, ``jargon``) or a UTF-8 text file.

    Raises:
        LMCompressError: an unknown source, or one with no words.
    """
    if source in TEXT_SOURCES:
        text = " ".join(documents(source))
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise LMCompressError(
                f"haystack source {source!r} is neither a text source nor a file; allowed: "
                f"{', '.join(TEXT_SOURCES)} or the path of a non-empty text file"
            )
        text = path.read_text(encoding="utf-8", errors="replace")
    words = tuple(text.split())
    if not words:
        raise LMCompressError(
            f"haystack source {source!r} is empty; allowed: {', '.join(TEXT_SOURCES)} or a non-empty text file"
        )
    return words


def essay_with_inserts(rng: random.Random, source: str, n_words: int, inserts: list[str]) -> str:
    """The first ``n_words`` words of ``source`` (repeated as needed), split into sentences, with ``inserts``
    placed at sentence boundaries at depths drawn without replacement from :data:`DEPTHS` (RULER's essay
    haystack)."""
    words = essay_words(source)
    reps = -(-n_words // len(words))
    sentences = split_sentences(" ".join((words * reps)[:n_words]))
    cuts = sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(inserts)))
    pieces, start = [], 0
    for cut, insert in zip(cuts, inserts):
        pieces.append(" ".join(sentences[start:cut]))
        pieces.append(insert)
        start = cut
    pieces.append(" ".join(sentences[start:]))
    return " ".join(p for p in pieces if p)


def lines_with_inserts(rng: random.Random, lines: list[str], inserts: list[str]) -> str:
    """``lines`` with ``inserts`` put at distinct random line indices (RULER's noise and needle haystacks),
    joined by newlines."""
    lines = list(lines)
    for index, item in zip(sorted(rng.sample(range(len(lines)), len(inserts)), reverse=True), inserts):
        lines.insert(index, item)
    return "\n".join(lines)


def largest_fitting(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest ``n`` in ``[low, high]`` with ``fits(n)`` (``fits`` monotone: true up to some n), or None."""
    best = None
    while low <= high:
        mid = (low + high) // 2
        if fits(mid):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def grow_bound(fits: Callable[[int], bool], start: int) -> int:
    """An upper bound: ``start`` doubled until ``fits`` fails."""
    n = max(1, start)
    while fits(n):
        n *= 2
        if n > 1 << 24:
            raise LMCompressError("haystack sizing did not converge (the prompt does not grow with the haystack)")
    return n


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's per-sample ``string_match_all``: the fraction of references found (case-insensitive) in the
    prediction."""
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """RULER's per-sample ``string_match_part``: 1 if any reference occurs (case-insensitive) in the
    prediction, else 0."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


METRICS = {"all": string_match_all, "part": string_match_part}
