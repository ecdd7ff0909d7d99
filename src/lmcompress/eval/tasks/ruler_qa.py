"""RULER's ``qa_1`` (SQuAD) and ``qa_2`` (HotpotQA) over user-supplied files in RULER's jsonl format.

The data sets are not installable here, so these tasks read the files RULER's ``prepare.py`` writes (generated
with its ``base`` model template, i.e. no chat markup in ``input``): one object per line with ``input`` (the
task template with the documents and the question), ``outputs`` (the reference answers) and optionally
``answer_prefix`` (default RULER's `` Answer:``). The input is split into context (the documents) and question
at the last repetition of RULER's instruction ("Answer the question based on the given documents."), else at
the last "Question:". Score: RULER's ``string_match_part`` (any reference in the answer), 0..100.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import LMCompressError
from ...registry import TASKS
from .base import RunContext
from .jsonl import pin_file, read_jsonl
from .prompting import Prompt, need_tokenizer
from .ruler_base import RulerSample, RulerTask

INSTRUCTION = "Answer the question based on the given documents."
ANSWER_PREFIX = " Answer:"


def split_qa_input(text: str) -> tuple[str, str] | None:
    """``(context, question)`` of a RULER qa input, or None when neither split marker occurs."""
    for marker in (INSTRUCTION, "Question:"):
        at = text.rfind(marker)
        if at > 0:
            return text[:at], text[at:]
    return None


@TASKS.register("qa_1")
@dataclass(frozen=True)
class RulerQA(RulerTask):
    """RULER qa over a RULER-format jsonl file (see the module docstring).

    Attributes:
        path: the jsonl file.
        samples: the first ``samples`` records are answered.
        length: the length the file was generated for; a record longer than it is an error.
        sha256: the file's digest (filled in from the file; part of the result-store key).
    """

    name = "qa_1"
    match = "part"
    max_new_tokens: int = 32

    path: str = ""
    sha256: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.read()  # a missing or malformed file fails before anything runs
        pin_file(self, self.path, self.sha256)

    def read(self) -> list[RulerSample]:
        records = read_jsonl(self.path, {"input": str, "outputs": list}, f"RULER {self.name}", limit=self.samples)
        out = []
        for rec in records:
            parts = split_qa_input(rec["input"])
            if parts is None or not rec["outputs"]:
                raise LMCompressError(
                    f"line {rec['_line']} of {self.path}: 'input' has no question marker or 'outputs' is empty; "
                    f"allowed: RULER qa records ({INSTRUCTION!r} or 'Question:' before the question)"
                )
            out.append(RulerSample(parts[0], parts[1], str(rec.get("answer_prefix", ANSWER_PREFIX)),
                                   [str(o) for o in rec["outputs"]]))
        return out

    def samples_for(self, ctx: RunContext) -> list[tuple[RulerSample, Prompt]]:
        self.check_length(ctx.model)
        tokenizer = need_tokenizer(ctx, self.name)
        out = []
        for i, sample in enumerate(self.read()):
            prompt = self.encode(tokenizer, sample)
            if prompt.n_tokens + self.max_new_tokens > self.length:
                raise LMCompressError(
                    f"record {i + 1} of {self.path} has {prompt.n_tokens} tokens + {self.max_new_tokens} answer "
                    f"tokens, more than length={self.length}; allowed: records within length (raise length=)"
                )
            out.append((sample, prompt))
        return out


@TASKS.register("qa_2")
@dataclass(frozen=True)
class RulerQA2(RulerQA):
    """RULER qa_2 (HotpotQA) over a RULER-format jsonl file; as ``qa_1``."""

    name = "qa_2"
