"""``lmcompress.pipeline(model, tokenizer, spec)``: compress a context once, answer several questions about it.

Usage::

    pipe = lmcompress.pipeline(model, tokenizer, KVSpec(evict=SnapKV(ratio=0.5)))
    pipe(context, question="Who?")["answer"]
    pipe(context, questions=["Who?", "When?"], max_new_tokens=32)["answers"]

Query-agnostic (the default): the context is prefilled and compressed once; the compressed cache is kept aside
and every question is answered on a copy of it (:meth:`~lmcompress.kv.cache.CompressedCache.copy`), so each
answer starts from the compressed context and nothing a previous question or answer added (tokens, policy
state, decoding-time evictions) carries over. Answers are identical to separate :func:`~.pipeline.answer` runs.
The copy works for every storage kind (uniform, ragged per-head, packed quantized) and costs one extra
compressed-size copy while a question is answered; a cache in static decode mode cannot be copied (an error).

``query_aware=True`` compresses context and question together, so the question is part of what the method
scores: each question then needs its own prefill of the whole context (nothing is shared between questions).

Prompts: with a chat template the context and the question go in one user message (the context first), the
assistant turn follows and ``answer_prefix`` starts it; without a template the text is ``context + question +
answer_prefix`` with the tokenizer's BOS first. Token-id tensors (``[1, n]``) are accepted in place of strings
(for models without a tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LMCompressError, check_choice, check_positive_int
from ..kv.cache import CompressedCache
from ..kv.spec import KVSpec
from .perf import PeakMemory, Stopwatch
from .pipeline import (
    DECODE_MODES,
    Generation,
    answer,
    check_context_fits,
    continue_greedy,
    default_eos,
    prefill,
)

_MARKER = "\u0000QUESTION\u0000"


def encode_prompt(tokenizer, context: str | torch.Tensor, question: str | torch.Tensor, answer_prefix: str = ""
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(context_ids [1, n_ctx], question_ids [1, n_q])``; the split is where the question text starts."""
    if isinstance(context, torch.Tensor) or isinstance(question, torch.Tensor):
        if not (isinstance(context, torch.Tensor) and isinstance(question, torch.Tensor)):
            raise LMCompressError("give context and question both as strings or both as [1, n] token-id tensors")
        if answer_prefix:
            raise LMCompressError("answer_prefix needs string inputs (a tokenizer); got token-id tensors")
        return _ids(context, "context"), _ids(question, "question")
    if tokenizer is None:
        raise LMCompressError("string inputs need a tokenizer; pass token-id tensors for a model without one")
    if getattr(tokenizer, "chat_template", None) is not None:
        messages = [{"role": "user", "content": context + _MARKER}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, after = text.split(_MARKER)
        question_text = question + after + answer_prefix
    else:
        before = (tokenizer.bos_token or "") + context
        question_text = question + answer_prefix
    ctx = tokenizer(before, add_special_tokens=False, return_tensors="pt").input_ids
    q = tokenizer(question_text, add_special_tokens=False, return_tensors="pt").input_ids
    if ctx.shape[1] == 0:
        raise LMCompressError("the context is empty; give at least one token of context")
    return ctx, q


def _ids(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] != 1 or t.shape[1] == 0:
        raise LMCompressError(f"{name} ids of shape {tuple(t.shape)} are not allowed; give [1, n] with n >= 1")
    return t.to(torch.long)


@torch.inference_mode()
def answer_many(model: torch.nn.Module, context_ids: torch.Tensor, questions_ids: list[torch.Tensor],
                spec: KVSpec, *, tokenizer=None, max_new_tokens: int = 16, eos_token_ids: list[int] | None = None,
                decode: str = "auto") -> list[Generation]:
    """Greedy answers to each of ``questions_ids`` (``[1, n_q]`` each) after one compressed prefill of
    ``context_ids: [1, n_ctx]`` (query-agnostic).

    ``ttft_s`` of the first answer includes the context prefill; later answers' ``ttft_s`` covers the cache copy,
    the question and the first token only (the context was compressed once); ``extra["context_prefill_s"]``
    gives the prefill's time in every answer, ``peak_mem_bytes`` is measured per question.
    """
    check_choice("decode", decode, DECODE_MODES)
    if not questions_ids:
        raise LMCompressError("questions is empty; give at least one question")
    device = next(model.parameters()).device
    context_ids = context_ids.to(device)
    questions_ids = [q.to(device) for q in questions_ids]
    longest = max(q.shape[1] for q in questions_ids)
    check_context_fits(model, context_ids.shape[1] + longest + max_new_tokens)
    if eos_token_ids is None:
        eos_token_ids = default_eos(model, tokenizer)
    clock = Stopwatch(device)
    base = CompressedCache(model, spec, reserve=max_new_tokens + longest)
    clock.reset()
    context_logits = prefill(model, context_ids, base)
    prefill_s = clock.elapsed()
    out = []
    for i, q in enumerate(questions_ids):
        with PeakMemory(device) as mem:
            clock.reset()
            cache = base.copy()
            rest, first = (q, None) if q.shape[1] else (None, context_logits)  # no question: answer the context
            tokens, steps, ttft, kv_bytes, held, decode_s = continue_greedy(
                model, cache, rest, first, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                decode=decode, clock=clock)
        out.append(Generation(
            token_ids=tokens,
            text=tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else "",
            ttft_s=ttft + (prefill_s if i == 0 else 0.0),
            decode_tok_s=(steps / decode_s) if steps > 0 and decode_s > 0 else None,
            kv_bytes=kv_bytes, kv_bytes_end=cache.nbytes, held_tokens=held,
            prompt_tokens=context_ids.shape[1] + q.shape[1],
            peak_mem_bytes=mem.reading.peak_bytes, mem_source=mem.reading.source,
            extra={"context_prefill_s": prefill_s, "context_kv_bytes": base.nbytes},
        ))
        del cache
    return out


@dataclass
class ContextPipeline:
    """Callable returned by :func:`pipeline`; see the module docstring.

    Attributes:
        model, tokenizer: what runs (tokenizer None: token-id tensors only).
        spec: the default KV recipe (a call's ``spec=`` overrides it).
        decode: ``auto``, ``eager`` or ``static`` (see :func:`lmcompress.eval.pipeline.answer`).
    """

    model: torch.nn.Module
    tokenizer: Any = None
    spec: KVSpec | None = None
    decode: str = "auto"

    def __call__(self, context: str | torch.Tensor, question: str | torch.Tensor | None = None,
                 questions: list | None = None, *, max_new_tokens: int = 32, answer_prefix: str = "",
                 query_aware: bool = False, spec: KVSpec | None = None,
                 return_generations: bool = False) -> dict[str, Any]:
        """Answer ``question`` (-> ``{"answer": str}``) or each of ``questions`` (-> ``{"answers": [...]}``).

        With ``return_generations`` the dict also holds ``"generations"``: the :class:`Generation` objects
        (token ids, TTFT, KV bytes, ...). Empty ``question`` with no ``questions`` answers from the context
        alone (the prompt's tail: chat template end / answer prefix).
        """
        spec = spec if spec is not None else (self.spec or KVSpec())
        if not isinstance(spec, KVSpec):
            raise LMCompressError(f"spec={spec!r} is not a KVSpec; build one with KVSpec(...) or parse_method()")
        check_positive_int("max_new_tokens", max_new_tokens)
        if question is not None and questions is not None:
            raise LMCompressError("give question= or questions=, not both")
        single = questions is None
        qs = [question if question is not None else ("" if not isinstance(context, torch.Tensor) else None)] \
            if single else list(questions)
        if not qs:
            raise LMCompressError("questions is empty; give at least one question")
        if any(q is None for q in qs):
            raise LMCompressError("with token-id input give question= as a [1, n] tensor")
        pairs = [encode_prompt(self.tokenizer, context, q, answer_prefix) for q in qs]
        context_ids = pairs[0][0]
        if query_aware:
            gens = [answer(self.model, ctx, q, spec, tokenizer=self.tokenizer, max_new_tokens=max_new_tokens,
                           query_aware=True, decode=self.decode) for ctx, q in pairs]
        else:
            gens = answer_many(self.model, context_ids, [q for _, q in pairs], spec, tokenizer=self.tokenizer,
                               max_new_tokens=max_new_tokens, decode=self.decode)
        texts = [g.text if self.tokenizer is not None else g.token_ids for g in gens]
        out: dict[str, Any] = {"answer": texts[0]} if single else {"answers": texts}
        if return_generations:
            out["generations"] = gens
        return out


def pipeline(model: torch.nn.Module, tokenizer=None, spec: KVSpec | None = None, *, decode: str = "auto"
             ) -> ContextPipeline:
    """A :class:`ContextPipeline` over ``model`` and ``tokenizer`` with ``spec`` as its default KV recipe."""
    check_choice("decode", decode, DECODE_MODES)
    if spec is not None and not isinstance(spec, KVSpec):
        raise LMCompressError(f"spec={spec!r} is not a KVSpec; build one with KVSpec(...) or parse_method()")
    return ContextPipeline(model, tokenizer, spec, decode)
