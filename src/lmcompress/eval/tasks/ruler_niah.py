"""RULER's needle-in-a-haystack family: ``niah_single_1/2/3``, ``niah_multikey_1/2/3``, ``niah_multivalue``,
``niah_multiquery`` (configurations of NVIDIA/RULER's ``scripts/synthetic.yaml``).

Needles read "One of the special magic {numbers} for {key} is: {value}."; keys are adjective-noun words or
UUIDs, values 7-digit numbers or UUIDs. Haystacks: ``noise`` (RULER's repeated sentence, one per line),
``essay`` (words of ``haystack_source``: the Lee corpus by default where RULER uses Paul Graham's essays, with
the needles at sentence boundaries at RULER's depths), ``needle`` (distractor needles with random keys and
values, one per line). The question asks for the values of ``num_queries`` of the ``num_keys`` keys; the score
is RULER's ``string_match_all`` (fraction of the expected values in the answer), 0..100.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ...errors import LMCompressError, check_choice, check_positive_int
from ...registry import TASKS
from .ruler_base import RulerSample, RulerTask
from .ruler_data import (
    HAYSTACK_TYPES,
    NEEDLE_TYPES,
    NOISE,
    essay_with_inserts,
    essay_words,
    lines_with_inserts,
)
from .ruler_data import random_value as _value

NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
HEAD = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_v} afterwards.\n")
QUESTION = "\nWhat are all the special magic {type_v} for {query} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"


def _singular(text: str) -> str:
    """RULER's rewording of the template when one value is asked for."""
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


@dataclass(frozen=True)
class Niah(RulerTask):
    """RULER needle-in-a-haystack (see the module docstring).

    Attributes:
        haystack: ``noise``, ``essay`` or ``needle``.
        key_type / value_type: ``numbers``, ``words`` or ``uuids``.
        num_keys: needles with distinct keys (at least ``num_queries``).
        num_values: values per key (one needle each).
        num_queries: keys asked for.
        haystack_source: essay text: ``lee``, ``lee-test``, ``jargon`` or a text file.
    """

    name = "niah"
    max_new_tokens: int = 128

    haystack: str = "essay"
    key_type: str = "words"
    value_type: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    haystack_source: str = "lee"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("haystack", self.haystack, HAYSTACK_TYPES)
        check_choice("key_type", self.key_type, NEEDLE_TYPES)
        check_choice("value_type", self.value_type, NEEDLE_TYPES)
        for field in ("num_keys", "num_values", "num_queries"):
            check_positive_int(field, getattr(self, field))
        if self.num_queries > self.num_keys:
            raise LMCompressError(
                f"num_queries={self.num_queries} exceeds num_keys={self.num_keys}; allowed: <= num_keys"
            )
        if self.haystack == "essay":
            essay_words(self.haystack_source)  # a missing or empty source fails before anything runs

    def size_hint(self) -> int:
        return 500 if self.haystack == "essay" else 25

    def make_sample(self, rng: random.Random, size: int) -> RulerSample:
        keys, values, needles = [], [], []
        for _ in range(self.num_keys):
            keys.append(_value(rng, self.key_type))
            values.append([_value(rng, self.value_type) for _ in range(self.num_values)])
            needles += [NEEDLE.format(type_v=self.value_type, key=keys[-1], value=v) for v in values[-1]]
        rng.shuffle(needles)
        if self.haystack == "essay":
            context = essay_with_inserts(rng, self.haystack_source, size, needles)
        elif self.haystack == "noise":
            context = lines_with_inserts(rng, [NOISE] * size, needles)
        else:
            distractors = [NEEDLE.format(type_v=self.value_type, key=_value(rng, self.key_type),
                                         value=_value(rng, self.value_type)) for _ in range(size)]
            context = lines_with_inserts(rng, distractors, needles)
        asked = rng.sample(range(self.num_keys), self.num_queries)
        queries = [keys[i] for i in asked]
        outputs = [v for i in asked for v in values[i]]
        query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
        type_v, head, question, prefix = self.value_type, HEAD, QUESTION, ANSWER_PREFIX
        if self.num_queries * self.num_values == 1:
            head, question, prefix = _singular(head), _singular(question), _singular(prefix)
            type_v = type_v[:-1]
        return RulerSample(
            context=head.format(type_v=type_v) + context,
            question=question.format(type_v=type_v, query=query),
            answer_prefix=prefix.format(type_v=type_v, query=query),
            outputs=outputs,
        )


def _variant(task_name: str, doc: str, **defaults):
    """Register a subclass of :class:`Niah` whose defaults are RULER's configuration ``task_name``."""
    namespace = {"__annotations__": {k: type(v).__name__ for k, v in defaults.items()}, **defaults,
                 "name": task_name, "__doc__": doc, "__module__": __name__, "__qualname__": task_name}
    cls = dataclass(frozen=True)(type(task_name, (Niah,), namespace))
    return TASKS.register(task_name)(cls)


NiahSingle1 = _variant("niah_single_1", "RULER niah_single_1: one number under one word key in noise.",
                       haystack="noise", key_type="words", value_type="numbers")
NiahSingle2 = _variant("niah_single_2", "RULER niah_single_2: one number under one word key in essay text.",
                       haystack="essay", key_type="words", value_type="numbers")
NiahSingle3 = _variant("niah_single_3", "RULER niah_single_3: one UUID under one word key in essay text.",
                       haystack="essay", key_type="words", value_type="uuids")
NiahMultikey1 = _variant("niah_multikey_1", "RULER niah_multikey_1: four word keys in essay text, one asked.",
                         haystack="essay", key_type="words", value_type="numbers", num_keys=4)
NiahMultikey2 = _variant("niah_multikey_2", "RULER niah_multikey_2: one word key among distractor needles.",
                         haystack="needle", key_type="words", value_type="numbers")
NiahMultikey3 = _variant("niah_multikey_3", "RULER niah_multikey_3: one UUID key among UUID distractor needles.",
                         haystack="needle", key_type="uuids", value_type="uuids")
NiahMultivalue = _variant("niah_multivalue", "RULER niah_multivalue: four numbers under one key in essay text.",
                          haystack="essay", key_type="words", value_type="numbers", num_values=4)
NiahMultiquery = _variant("niah_multiquery", "RULER niah_multiquery: four keys in essay text, all four asked.",
                          haystack="essay", key_type="words", value_type="numbers", num_keys=4, num_queries=4)

NIAH_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
              "niah_multikey_3", "niah_multivalue", "niah_multiquery")
