"""Prompt framing and answering shared by the text tasks (RULER-style, LongBench, needle grid).

A prompt is two token sequences: the context (compressed by the spec under test) and the question (appended
after compression unless the run is query-aware). Framing follows the pass-key task: a tokenizer with a chat
template gets the whole text as one user turn plus the generation prompt (the template's own BOS, if any); a
base model gets the plain text with the tokenizer's BOS prepended. An answer prefix (RULER's "The special magic
number for ... is", LongBench's trailing "Answer:") goes after the question, and for chat models after the
generation prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import LMCompressError
from ..pipeline import Generation, answer
from .base import RunContext

ANSWER_PREFIX_MODES = ("auto", "always", "never")
_MARK = "\u0000CONTENT\u0000"


@dataclass(frozen=True)
class Prompt:
    """Token ids of one sample: ``context_ids [1, n_ctx]``, ``question_ids [1, n_q]``."""

    context_ids: torch.Tensor
    question_ids: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return self.context_ids.shape[1] + self.question_ids.shape[1]


def uses_chat(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def chat_frame(tokenizer) -> tuple[str, str]:
    """``(before, after)``: the text a chat template puts around one user message (with the generation prompt);
    ``("", "")`` for a tokenizer without a chat template."""
    if not uses_chat(tokenizer):
        return "", ""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(_MARK, 1)
    return before, after


def wants_answer_prefix(tokenizer, mode: str) -> bool:
    """``auto``: base models get the answer prefix, chat models not (as the pass-key task does)."""
    if mode == "auto":
        return not uses_chat(tokenizer)
    return mode == "always"


def encode_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def frame_ids(tokenizer, context_ids: list[int], question_ids: list[int], answer_prefix: str = "",
              chat: bool = True) -> Prompt:
    """Wrap already-tokenized context and question in the chat frame (or BOS) and append ``answer_prefix``;
    ``chat=False`` frames as for a base model even when the tokenizer has a chat template."""
    chat = chat and uses_chat(tokenizer)
    before, after = chat_frame(tokenizer) if chat else ("", "")
    head = encode_ids(tokenizer, before) if before else []
    bos = getattr(tokenizer, "bos_token_id", None)
    if not chat and bos is not None and (not context_ids or context_ids[0] != bos):
        head = [bos]
    tail = encode_ids(tokenizer, after + answer_prefix) if (after or answer_prefix) else []
    ctx = torch.tensor([head + context_ids], dtype=torch.long)
    q = torch.tensor([question_ids + tail], dtype=torch.long)
    return Prompt(ctx, q)


def encode_prompt(tokenizer, context_text: str, question_text: str, answer_prefix: str = "") -> Prompt:
    """Token ids of ``context_text`` (compressed) and ``question_text`` + frame + ``answer_prefix``."""
    return frame_ids(tokenizer, encode_ids(tokenizer, context_text), encode_ids(tokenizer, question_text),
                     answer_prefix)


def need_tokenizer(ctx: RunContext, task: str) -> Any:
    if ctx.tokenizer is None:
        raise LMCompressError(f"the {task} task needs a model with a tokenizer (not a tiny test model)")
    return ctx.tokenizer


def answer_prompt(ctx: RunContext, prompt: Prompt, *, max_new_tokens: int, query_aware: bool,
                  decode: str, stop_when: Callable[[list[int]], bool] | None = None) -> Generation:
    return answer(ctx.model, prompt.context_ids, prompt.question_ids, ctx.spec, tokenizer=ctx.tokenizer,
                  max_new_tokens=max_new_tokens, query_aware=query_aware, decode=decode, stop_when=stop_when)


def generation_record(gen: Generation) -> dict[str, Any]:
    """The JSON-able per-sample costs of one answer."""
    return {"answer": gen.text, "prompt_tokens": gen.prompt_tokens, "ttft_s": gen.ttft_s,
            "decode_tok_s": gen.decode_tok_s, "kv_bytes": gen.kv_bytes, "peak_mem_bytes": gen.peak_mem_bytes,
            "mem_source": gen.mem_source}


def mean_costs(records: list[dict[str, Any]]) -> dict[str, float | str | None]:
    """Costs over samples as the pass-key task reports them: means, the decode rate over samples that decoded,
    the largest peak."""
    n = len(records)
    decode = [r["decode_tok_s"] for r in records if r["decode_tok_s"]]
    return {
        "samples": n,
        "prompt_tokens": sum(r["prompt_tokens"] for r in records) / n,
        "kv_bytes": sum(r["kv_bytes"] for r in records) / n,
        "ttft_s": sum(r["ttft_s"] for r in records) / n,
        "decode_tok_s": sum(decode) / len(decode) if decode else None,
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in records),
        "mem_source": records[0]["mem_source"],
    }
