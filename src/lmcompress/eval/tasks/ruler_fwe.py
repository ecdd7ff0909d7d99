"""RULER's frequent words extraction (``fwe``): coded words drawn with Zipf frequencies (exponent ``alpha``);
the model must name the three most frequent ones (the most frequent, ``...``, is noise to ignore).

As in NVIDIA/RULER (``freq_words_extraction.py``): a vocabulary of ``(length - max_new_tokens) // 50`` random
6-letter words, the word of rank k repeated ``int(n * k**-alpha / zeta(alpha))`` times, shuffled. Score:
``string_match_all`` over the words of ranks 2-4, 0..100.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from ...errors import check_positive_int, check_range
from ...registry import TASKS
from .ruler_base import RulerSample, RulerTask

HEAD = ("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
        "appeared coded words. ")
QUESTION = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
            "frequently appeared words in the above coded text?")
ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta(alpha) for alpha > 1 (partial sum plus the Euler-Maclaurin tail; error < 1e-12 at 2.0)."""
    n = terms
    head = sum(k**-alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n**-alpha + alpha * n ** (-alpha - 1) / 12


@TASKS.register("fwe")
@dataclass(frozen=True)
class FrequentWords(RulerTask):
    """RULER frequent words extraction (see the module docstring).

    Attributes:
        alpha: Zipf exponent (> 1).
        coded_wordlen: letters per coded word.
        vocab_size: coded words (0: ``(length - max_new_tokens) // 50``, RULER's default).
    """

    name = "fwe"
    max_new_tokens: int = 50

    alpha: float = 2.0
    coded_wordlen: int = 6
    vocab_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("alpha", self.alpha, 1.0, float("inf"), low_open=True)
        check_positive_int("coded_wordlen", self.coded_wordlen)
        check_positive_int("vocab_size", self.vocab_size, allow_zero=True)

    def size_hint(self) -> int:
        return max(16, (self.length - self.max_new_tokens) // self.coded_wordlen // 4)

    def make_sample(self, rng: random.Random, size: int) -> RulerSample:
        n_vocab = max(5, self.vocab_size or (self.length - self.max_new_tokens) // 50)
        vocab: set[str] = set()
        while len(vocab) < n_vocab:
            vocab.add("".join(rng.choice(string.ascii_lowercase) for _ in range(self.coded_wordlen)))
        words = sorted(vocab)
        rng.shuffle(words)
        words[0] = "..."  # the top rank is noise
        z = zeta(self.alpha)
        text = [w for k, w in enumerate(words, start=1) for _ in range(int(size * k**-self.alpha / z))]
        rng.shuffle(text)
        return RulerSample(context=HEAD + " ".join(text), question=QUESTION, answer_prefix=ANSWER_PREFIX,
                           outputs=words[1:4])
