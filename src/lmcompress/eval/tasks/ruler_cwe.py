"""RULER's common words extraction (``cwe``): a numbered list of words in which ``num_cw`` words appear
``freq_cw`` times and the others ``freq_ucw`` times; the model must name the common ones.

As in NVIDIA/RULER (``common_words_extraction.py``): words from wonderwords' noun, adjective and verb lists,
``num_fewshot`` solved examples in front (40 words at 10/3 repeats; for lengths under 4096, 20 words at 3/1
and the task itself at 6/1 repeats), the list written ``1. word 2. word ...``. Score: ``string_match_all`` over
the common words, 0..100.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ...errors import LMCompressError, check_positive_int
from ...registry import TASKS
from .ruler_base import RulerSample, RulerTask
from .ruler_data import common_words

HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n")
QUESTION = "\nQuestion: What are the {num_cw} most common words in the above list?"
ANSWER_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


@TASKS.register("cwe")
@dataclass(frozen=True)
class CommonWords(RulerTask):
    """RULER common words extraction (see the module docstring).

    Attributes:
        freq_cw / freq_ucw: repeats of each common / uncommon word (lengths >= 4096).
        num_cw: common words.
        num_fewshot: solved examples in front.
    """

    name = "cwe"
    max_new_tokens: int = 120

    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    num_fewshot: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("freq_cw", self.freq_cw)
        check_positive_int("freq_ucw", self.freq_ucw)
        check_positive_int("num_cw", self.num_cw)
        check_positive_int("num_fewshot", self.num_fewshot, allow_zero=True)

    def size_hint(self) -> int:
        return max(20, self.num_cw + 1)

    def _example(self, rng: random.Random, num_words: int, common: int, uncommon: int) -> tuple[str, list[str]]:
        vocab = common_words()
        if num_words > len(vocab):
            raise LMCompressError(
                f"cwe at length={self.length} needs {num_words} distinct words, more than the {len(vocab)} of the "
                f"word lists; allowed: a shorter length"
            )
        words = rng.sample(vocab, num_words)
        top = words[: self.num_cw]
        items = top * common + words[self.num_cw :] * uncommon
        rng.shuffle(items)
        return numbered(items), top

    def make_sample(self, rng: random.Random, size: int) -> RulerSample:
        short = self.length < 4096
        shots = []
        for _ in range(self.num_fewshot):
            ctx, top = self._example(rng, 20 if short else 40, 3 if short else 10, 1 if short else 3)
            shots.append(HEAD + ctx + QUESTION.format(num_cw=self.num_cw)
                         + ANSWER_PREFIX.format(num_cw=self.num_cw) + " " + numbered(top))
        n = max(size, self.num_cw + 1)
        ctx, top = self._example(rng, n, 6 if short else self.freq_cw, 1 if short else self.freq_ucw)
        head = ("\n".join(shots) + "\n" if shots else "") + HEAD
        return RulerSample(context=head + ctx, question=QUESTION.format(num_cw=self.num_cw),
                           answer_prefix=ANSWER_PREFIX.format(num_cw=self.num_cw), outputs=top)
