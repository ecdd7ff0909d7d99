"""The shared run loop of the RULER-style tasks.

A task makes one sample from a ``random.Random`` and a haystack size (:meth:`RulerTask.make_sample`); the loop
finds the largest size whose prompt plus ``max_new_tokens`` fits ``length`` tokens of the model's tokenizer
(RULER's ``max_seq_length`` includes the answer room), builds ``samples`` samples at that size (shrinking one
that comes out too long, as RULER does), answers each through :func:`lmcompress.eval.pipeline.answer` and
scores it with RULER's string match. The score is 0..100, as RULER reports it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

from ..._compat import max_positions
from ...errors import LMCompressError, check_choice, check_positive_int
from ..batched_answers import answer_prompts
from ..pipeline import DECODE_MODES
from .base import RunContext, Task, TaskResult
from .prompting import (
    ANSWER_PREFIX_MODES,
    Prompt,
    encode_prompt,
    generation_record,
    mean_costs,
    need_tokenizer,
    wants_answer_prefix,
)
from .ruler_data import METRICS, grow_bound, largest_fitting


@dataclass(frozen=True)
class RulerSample:
    """One sample: ``context`` (compressed), ``question``, RULER's ``answer_prefix`` and expected ``outputs``."""

    context: str
    question: str
    answer_prefix: str
    outputs: list[str]


@dataclass(frozen=True)
class RulerTask(Task):
    """Common parameters of the RULER-style tasks.

    Attributes:
        length: target sequence length in the model's tokens, prompt plus ``max_new_tokens`` (RULER's
            ``max_seq_length``); at most the model's positions.
        samples: samples generated and answered.
        seed: sample generator seed (samples are identical for the same seed, length and tokenizer).
        query_aware: compress context and question together.
        answer_prefix: ``auto`` (base models get RULER's answer prefix, chat models answer after the chat
            template's generation prompt, as the pass-key task does), ``always`` or ``never``.
        decode: ``auto``, ``eager`` or ``static`` (see :func:`lmcompress.eval.pipeline.answer`).
        max_new_tokens: answer room (RULER's ``tokens_to_generate`` for the task).
        stop_at_full_score: end an answer's decoding as soon as its text already contains every expected value
            (RULER decodes all ``max_new_tokens``). The score is unchanged: both RULER metrics only count
            expected values found in the text, so text appended after full marks cannot lower or raise it (exact
            as long as the decoded text of a token prefix is a prefix of the full decoded text, which holds for
            the byte-level BPE tokenizers here). The stored answer is then the shorter text; ``False`` decodes
            RULER's full length.
        answer_batch: answers decoded together as one batch (:mod:`lmcompress.eval.batched_answers`: each
            sample is prefilled and compressed alone, only the greedy decoding is batched; tokens equal the
            one-by-one answers up to floating-point rounding, and a sample's ``decode_tok_s`` is then its rate
            inside the batch). 1 answers one by one. Eager decoding only (CPU, or ``decode="eager"``).
    """

    primary_metric: ClassVar[str] = "score"
    group: ClassVar[str] = "ruler"
    chance: ClassVar[float | None] = 0.0
    #: RULER's metric: ``all`` (fraction of the expected values found) or ``part`` (any of them).
    match: ClassVar[str] = "all"

    length: int = 4096
    samples: int = 5
    seed: int = 42
    query_aware: bool = False
    answer_prefix: str = "auto"
    decode: str = "auto"
    max_new_tokens: int = 128
    stop_at_full_score: bool = True
    answer_batch: int = 1

    def __post_init__(self) -> None:
        check_positive_int("length", self.length)
        check_positive_int("samples", self.samples)
        check_positive_int("max_new_tokens", self.max_new_tokens)
        check_positive_int("answer_batch", self.answer_batch)
        check_choice("answer_prefix", self.answer_prefix, ANSWER_PREFIX_MODES)
        check_choice("decode", self.decode, DECODE_MODES)
        if self.max_new_tokens >= self.length:
            raise LMCompressError(
                f"length={self.length} leaves no room for a prompt after max_new_tokens={self.max_new_tokens}; "
                f"allowed: length > {self.max_new_tokens}"
            )

    def max_sequence_tokens(self) -> int:
        return self.length

    # ------------------------------------------------------------------------------------------ per task
    def make_sample(self, rng: random.Random, size: int) -> RulerSample:
        """A sample with a haystack of ``size`` units (words, sentences, list entries: the task's own)."""
        raise NotImplementedError

    def size_hint(self) -> int:
        """A haystack size that surely fits (the sizing search doubles it until the prompt is too long)."""
        return 8

    # ------------------------------------------------------------------------------------------ the loop
    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{self.name}-{self.seed}-{self.length}-{index}")

    def encode(self, tokenizer, sample: RulerSample) -> Prompt:
        prefix = sample.answer_prefix if wants_answer_prefix(tokenizer, self.answer_prefix) else ""
        return encode_prompt(tokenizer, sample.context, sample.question, prefix)

    def _fits(self, tokenizer, index: int, size: int) -> bool:
        prompt = self.encode(tokenizer, self.make_sample(self._rng(index), size))
        return prompt.n_tokens + self.max_new_tokens <= self.length

    def build_samples(self, tokenizer) -> list[tuple[RulerSample, Prompt]]:
        """The task's samples and their token ids (deterministic for the parameters and the tokenizer)."""
        def fits(n: int) -> bool:
            return self._fits(tokenizer, 0, n)

        if not fits(1):
            raise LMCompressError(
                f"length={self.length} is too short for {self.name}: even the smallest haystack exceeds it; "
                f"allowed: a longer length"
            )
        size = largest_fitting(fits, 1, grow_bound(fits, self.size_hint())) or 1
        out = []
        for i in range(self.samples):
            n = size
            while n > 1 and not self._fits(tokenizer, i, n):
                n = max(1, n - max(1, size // 50))
            sample = self.make_sample(self._rng(i), n)
            out.append((sample, self.encode(tokenizer, sample)))
        return out

    def check_length(self, model) -> None:
        limit = max_positions(model.config)
        if limit and self.max_sequence_tokens() > limit:
            raise LMCompressError(
                f"length={self.max_sequence_tokens()} exceeds the model's {limit} positions; allowed: <= {limit}"
            )

    def samples_for(self, ctx: RunContext) -> list[tuple[RulerSample, Prompt]]:
        self.check_length(ctx.model)
        return self.build_samples(need_tokenizer(ctx, self.name))

    @staticmethod
    def _full_score_stop(ctx: RunContext, score_fn, outputs: list[str]):
        """The early stop of ``stop_at_full_score``: True once the decoded answer scores 1."""
        tokenizer = ctx.tokenizer

        def stop(tokens: list[int]) -> bool:
            return score_fn(tokenizer.decode(tokens, skip_special_tokens=True), outputs) >= 1.0

        return stop

    def run(self, ctx: RunContext) -> TaskResult:
        score_fn = METRICS[self.match]
        samples = self.samples_for(ctx)
        stops = [self._full_score_stop(ctx, score_fn, sample.outputs) if self.stop_at_full_score else None
                 for sample, _ in samples]
        gens = answer_prompts(ctx.model, [(p.context_ids, p.question_ids) for _, p in samples], ctx.spec,
                              tokenizer=ctx.tokenizer, max_new_tokens=self.max_new_tokens,
                              query_aware=self.query_aware, decode=self.decode, batch=self.answer_batch,
                              stop_when=stops)
        records: list[dict[str, Any]] = []
        for (sample, _), gen in zip(samples, gens):
            rec = generation_record(gen)
            rec.update(outputs=sample.outputs, score=score_fn(gen.text, sample.outputs),
                       answer_tokens=len(gen.token_ids), decode_batch=gen.extra.get("decode_batch", 1))
            records.append(rec)
        costs = mean_costs(records)
        costs["decode_batch"] = max(r["decode_batch"] for r in records)
        return TaskResult(
            metrics={"score": 100.0 * sum(r["score"] for r in records) / len(records)},
            costs=costs,
            details={"samples": records},
        )
