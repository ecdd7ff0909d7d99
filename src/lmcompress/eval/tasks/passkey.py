"""Pass-key retrieval (needle in a haystack): a random number stated twice inside filler text at a given depth;
the model must reply with it.

The default model (SmolLM2-135M-Instruct) finds the key at 1k-4k tokens with a repeated synthetic filler, its
chat template and "Reply with the number only"; base models get a plain prompt ending in "The pass key is".
Filler ``lee`` uses natural news text instead (harder for small models).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from ...errors import LMCompressError, check_choice, check_positive_int, check_range
from ...registry import TASKS
from ..pipeline import DECODE_MODES, answer
from ..text import documents
from .base import RunContext, Task, TaskResult

SYNTHETIC_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
QUESTION = "What is the pass key? Reply with the number only."


def _filler_sentences(kind: str) -> list[str]:
    if kind == "synthetic":
        return [s.strip() + "." for s in SYNTHETIC_FILLER.split(".") if s.strip()]
    sentences: list[str] = []
    for doc in documents("lee"):
        sentences += [s.strip() + "." for s in re.split(r"(?<=[.!?])\s+", doc) if len(s.strip()) > 3]
    return sentences


@dataclass(frozen=True)
class PromptParts:
    context_ids: torch.Tensor  # [1, n_ctx]
    question_ids: torch.Tensor  # [1, n_q]
    key: str


def build_prompt(tokenizer, length: int, depth: float, key: str, filler: str = "synthetic") -> PromptParts:
    """Token ids of a pass-key prompt of about ``length`` tokens with the needle at ``depth`` (0..1).

    The split between context and question is at the question text, so a query-agnostic pipeline can compress
    the context without seeing the question.
    """
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    chat = getattr(tokenizer, "chat_template", None) is not None
    marker = "\u0000QUESTION\u0000"

    def render(haystack: str) -> str:
        body = f"{haystack}\n\n{marker}"
        if chat:
            messages = [{"role": "user", "content": body.replace(marker, QUESTION)}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return text.replace(QUESTION, marker, 1)
        return body.replace(marker, marker + "\nThe pass key is")

    sentences = _filler_sentences(filler)
    overhead = len(tokenizer(render(needle), add_special_tokens=False).input_ids) + len(
        tokenizer(QUESTION, add_special_tokens=False).input_ids
    )
    sample = sentences[:50]
    per_sentence = max(1.0, len(tokenizer(" ".join(sample), add_special_tokens=False).input_ids) / len(sample))
    n_sent = max(1, int((length - overhead) / per_sentence))
    for _ in range(8):  # adjust to the exact token budget
        hay = [sentences[i % len(sentences)] for i in range(n_sent)]
        hay.insert(round(depth * n_sent), needle)
        text = render(" ".join(hay))
        n = len(tokenizer(text.replace(marker, QUESTION), add_special_tokens=False).input_ids)
        if abs(n - length) <= per_sentence or n_sent == 1:
            break
        n_sent = max(1, n_sent + int((length - n) / per_sentence))
    before, after = text.split(marker)
    context_ids = tokenizer(before, add_special_tokens=False, return_tensors="pt").input_ids
    if tokenizer.bos_token_id is not None and not chat and not before.startswith(tokenizer.bos_token or "\0"):
        context_ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), context_ids], dim=1)
    question_ids = tokenizer(QUESTION + after, add_special_tokens=False, return_tensors="pt").input_ids
    return PromptParts(context_ids, question_ids, key)


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


@TASKS.register("passkey")
@dataclass(frozen=True)
class Passkey(Task):
    """One pass-key retrieval cell.

    Attributes:
        length: prompt length in tokens (context + question), approximately (within one filler sentence).
        depth: needle position as a fraction of the haystack, in [0, 1].
        samples: number of keys tried (each a different random key).
        seed: key generator seed.
        digits: key length.
        query_aware: compress context and question together.
        filler: "synthetic" (repeated sentences) or "lee" (news text).
        max_new_tokens: answer room (digits tokenize one per token).
        decode: ``auto``, ``eager`` or ``static`` (see :func:`lmcompress.eval.pipeline.answer`).
    """

    name = "passkey"
    primary_metric = "accuracy"

    length: int = 1024
    depth: float = 0.5
    samples: int = 1
    seed: int = 0
    digits: int = 5
    query_aware: bool = False
    filler: str = "synthetic"
    max_new_tokens: int = 10
    decode: str = "auto"

    def __post_init__(self) -> None:
        check_positive_int("length", self.length)
        check_range("depth", self.depth, 0.0, 1.0, high_open=False)
        check_positive_int("samples", self.samples)
        check_positive_int("digits", self.digits)
        check_choice("filler", self.filler, ("synthetic", "lee"))
        check_positive_int("max_new_tokens", self.max_new_tokens)
        check_choice("decode", self.decode, DECODE_MODES)
        if self.max_new_tokens < self.digits:
            raise LMCompressError(
                f"max_new_tokens={self.max_new_tokens} leaves no room for a {self.digits}-digit key; allowed: >= digits"
            )

    def run(self, ctx: RunContext) -> TaskResult:
        if ctx.tokenizer is None:
            raise LMCompressError("the passkey task needs a model with a tokenizer (not a tiny test model)")
        rng = random.Random(f"{self.seed}-{self.length}-{self.depth}")
        records = []
        for _ in range(self.samples):
            key = str(rng.randrange(10 ** (self.digits - 1), 10**self.digits))
            parts = build_prompt(ctx.tokenizer, self.length, self.depth, key, self.filler)
            gen = answer(
                ctx.model, parts.context_ids, parts.question_ids, ctx.spec, tokenizer=ctx.tokenizer,
                max_new_tokens=self.max_new_tokens, query_aware=self.query_aware, decode=self.decode,
            )
            records.append({
                "key": key, "answer": gen.text, "correct": first_number(gen.text) == key,
                "prompt_tokens": gen.prompt_tokens, "ttft_s": gen.ttft_s, "decode_tok_s": gen.decode_tok_s,
                "kv_bytes": gen.kv_bytes, "held_tokens": gen.held_tokens, "peak_mem_bytes": gen.peak_mem_bytes,
                "mem_source": gen.mem_source,
            })
        n = len(records)
        decode = [r["decode_tok_s"] for r in records if r["decode_tok_s"]]
        return TaskResult(
            metrics={"accuracy": sum(r["correct"] for r in records) / n},
            costs={
                "prompt_tokens": sum(r["prompt_tokens"] for r in records) / n,
                "kv_bytes": sum(r["kv_bytes"] for r in records) / n,
                "ttft_s": sum(r["ttft_s"] for r in records) / n,
                "decode_tok_s": sum(decode) / len(decode) if decode else None,
                "peak_mem_bytes": max(r["peak_mem_bytes"] for r in records),
                "mem_source": records[0]["mem_source"],
            },
            details={"samples": records},
        )
