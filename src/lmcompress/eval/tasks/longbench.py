"""LongBench (Bai et al., 2023) on user-supplied files: one task over a LongBench jsonl file.

Each line is a LongBench record: ``input`` (the question or instruction), ``context`` (the long document),
``answers`` (references), ``all_classes`` (class names, or null), ``length`` (LongBench's word count) and
``dataset`` (which of LongBench's data sets it belongs to; it picks the prompt template, the answer length and
the metric: see :mod:`.longbench_config`, :mod:`.longbench_metrics`).

The prompt is LongBench's template with the record filled in. When it exceeds ``max_length`` tokens it is cut
in the middle as LongBench's ``pred.py`` does (the first and the last ``max_length // 2`` tokens are kept; here
cut at token level instead of LongBench's decode and re-encode). The context part (template head + document)
is compressed; the rest (the tail of the template with ``input``) is the question. Chat models get the chat
template except on LongBench's few-shot and code data sets (trec, triviaqa, samsum, lcc, repobench-p), as
LongBench does. Score: LongBench's metric, 0..100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import LMCompressError, check_choice, check_positive_int
from ...registry import TASKS
from ..pipeline import DECODE_MODES, check_context_fits
from .base import RunContext, Task, TaskResult
from .jsonl import pin_file, read_jsonl
from .longbench_config import DATASETS, MAX_NEW_TOKENS, NO_CHAT, PROMPTS
from .longbench_metrics import score
from .prompting import (
    Prompt,
    answer_prompt,
    encode_ids,
    frame_ids,
    generation_record,
    mean_costs,
    need_tokenizer,
)

FIELDS: dict[str, type | tuple[type, ...]] = {
    "input": str, "context": str, "answers": list, "all_classes": (list, type(None)), "length": int, "dataset": str,
}


def read_longbench(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Records of a LongBench jsonl file (every field checked; see the module docstring)."""
    records = read_jsonl(path, FIELDS, "LongBench", limit=limit)
    for rec in records:
        if rec["dataset"] not in PROMPTS:
            raise LMCompressError(
                f"line {rec['_line']} of {path}: dataset={rec['dataset']!r} is not supported; allowed: "
                f"{', '.join(DATASETS)}"
            )
    return records


def split_template(dataset: str, context: str, question: str) -> tuple[str, str]:
    """``(context part, question part)`` of LongBench's prompt for one record."""
    template = PROMPTS[dataset]
    at = template.index("{context}")
    return template[:at] + context, template[at + len("{context}") :].replace("{input}", question)


def middle_truncate(ctx_ids: list[int], q_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """LongBench's middle truncation of ``ctx_ids + q_ids`` to ``max_length`` tokens (first and last
    ``max_length // 2`` kept), returned as (context, question) again: the question stays whole when it fits in
    the kept tail."""
    if len(ctx_ids) + len(q_ids) <= max_length:
        return ctx_ids, q_ids
    half = max_length // 2
    full = ctx_ids + q_ids
    if len(q_ids) <= half:
        kept = full[:half] + full[len(full) - half :]
        return kept[: len(kept) - len(q_ids)], q_ids
    return full[:half], full[len(full) - half :]


def longbench_prompt(tokenizer, rec: dict[str, Any], max_length: int, chat: str = "auto") -> Prompt:
    ctx_text, q_text = split_template(rec["dataset"], rec["context"], rec["input"])
    ctx_ids, q_ids = middle_truncate(encode_ids(tokenizer, ctx_text), encode_ids(tokenizer, q_text), max_length)
    use_chat = chat == "auto" and rec["dataset"] not in NO_CHAT
    return frame_ids(tokenizer, ctx_ids, q_ids, chat=use_chat)


@TASKS.register("longbench")
@dataclass(frozen=True)
class LongBench(Task):
    """LongBench records from a user file, scored with LongBench's metrics (see the module docstring).

    Attributes:
        path: the LongBench jsonl file.
        samples: the first ``samples`` records (0: all).
        max_length: prompt token budget before the chat frame (LongBench's 3500 for 4k-position models).
        max_new_tokens: answer room (0: LongBench's per-data-set maximum).
        chat: ``auto`` (LongBench's rule) or ``never``.
        query_aware: compress context and question together.
        decode: ``auto``, ``eager`` or ``static``.
        sha256: the file's digest (filled in from the file; part of the result-store key).
    """

    name = "longbench"
    primary_metric: ClassVar[str] = "score"

    path: str = ""
    samples: int = 0
    max_length: int = 3500
    max_new_tokens: int = 0
    chat: str = "auto"
    query_aware: bool = False
    decode: str = "auto"
    sha256: str = ""

    def __post_init__(self) -> None:
        check_positive_int("samples", self.samples, allow_zero=True)
        check_positive_int("max_length", self.max_length)
        check_positive_int("max_new_tokens", self.max_new_tokens, allow_zero=True)
        check_choice("chat", self.chat, ("auto", "never"))
        check_choice("decode", self.decode, DECODE_MODES)
        read_longbench(self.path, self.samples or None)  # a bad file fails before anything runs
        pin_file(self, self.path, self.sha256)

    def max_sequence_tokens(self) -> int:
        return self.max_length + (self.max_new_tokens or max(MAX_NEW_TOKENS.values()))

    def run(self, ctx: RunContext) -> TaskResult:
        tokenizer = need_tokenizer(ctx, self.name)
        records, per_dataset = [], {}
        for rec in read_longbench(self.path, self.samples or None):
            room = self.max_new_tokens or MAX_NEW_TOKENS[rec["dataset"]]
            prompt = longbench_prompt(tokenizer, rec, self.max_length, self.chat)
            check_context_fits(ctx.model, prompt.n_tokens + room)
            gen = answer_prompt(ctx, prompt, max_new_tokens=room, query_aware=self.query_aware, decode=self.decode)
            out = generation_record(gen)
            out.update(dataset=rec["dataset"], answers=rec["answers"],
                       score=score(rec["dataset"], gen.text, rec["answers"], rec["all_classes"]))
            records.append(out)
            per_dataset.setdefault(rec["dataset"], []).append(out["score"])
        metrics = {"score": 100.0 * sum(r["score"] for r in records) / len(records)}
        if len(per_dataset) > 1:
            metrics.update({d: 100.0 * sum(s) / len(s) for d, s in per_dataset.items()})
        return TaskResult(metrics=metrics, costs=mean_costs(records), details={"samples": records})
