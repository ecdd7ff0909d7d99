"""Answer several prompts with one spec, decoding up to ``batch`` answers together (:mod:`lmcompress.kv.row_batch`).

Each prompt is prefilled and compressed alone, exactly as :func:`lmcompress.eval.pipeline.answer` does it (same
cache, same kept tokens, same TTFT and KV bytes); only the greedy decoding of the answers runs as one batched
forward per step over the rows still decoding, so the weights are read once a step for all of them. A row leaves
the batch at its EOS, its ``max_new_tokens`` or its ``stop_when``.

What differs from answering one by one:

* tokens: equal except for floating-point rounding of batched matrix products (a near-tie between two tokens can,
  rarely, break the other way; the tests compare tokens with the one-row path);
* ``decode_tok_s`` of a row: its decode steps over the wall time from the batch's first step to the row's last
  (the rate one stream sees while sharing the batch); ``extra["decode_batch"]`` records the rows that started
  together;
* ``peak_mem_bytes``: the growth while the row's own prompt was processed (the prompt phase is the peak of a
  compressed answer; the decode phase holds the other rows' caches too and is not attributed to a row).

Policies that hook the model while decoding (DMS), static (graph) decoding and CUDA ``decode="auto"`` answer one
by one (:func:`~lmcompress.kv.row_batch.row_batch_refusal`); the result records ``decode_batch = 1`` then.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .._compat import cache_kwargs
from ..errors import check_choice, check_positive_int
from ..kv.cache import CompressedCache
from ..kv.row_batch import RowBatchCache, row_batch_refusal
from ..kv.spec import KVSpec
from .perf import PeakMemory, Stopwatch
from .pipeline import (
    DECODE_MODES,
    Generation,
    decode_greedy,
    default_eos,
    finish_prompt,
    new_answer_cache,
    prefill_prompt,
)

StopFn = Callable[[list[int]], bool] | None


@dataclass
class PromptDone:
    """One prompt after its prefill and question, before decoding: the cache and the first answer token."""

    cache: CompressedCache
    first_id: int
    ttft_s: float
    kv_bytes: int
    held_tokens: list[int]
    prompt_tokens: int
    peak_mem_bytes: int
    mem_source: str
    stop_when: StopFn


def process_prompt(model: torch.nn.Module, context_ids: torch.Tensor, question_ids: torch.Tensor, spec: KVSpec, *,
                   tokenizer=None, max_new_tokens: int, query_aware: bool, stop_when: StopFn = None
                   ) -> PromptDone:
    """Prefill ``context_ids [1, n_ctx]`` (compressed) and ``question_ids [1, n_q]`` as
    :func:`~lmcompress.eval.pipeline.answer` does, up to the first answer token."""
    device = next(model.parameters()).device
    context_ids, question_ids = context_ids.to(device), question_ids.to(device)
    cache = new_answer_cache(model, context_ids, question_ids, spec, max_new_tokens=max_new_tokens,
                             query_aware=query_aware)
    clock = Stopwatch(device)
    with PeakMemory(device) as mem:
        clock.reset()
        logits, rest = prefill_prompt(model, cache, context_ids, question_ids, query_aware=query_aware,
                                      tokenizer=tokenizer)
        first_id, kv_bytes, held = finish_prompt(model, cache, rest, logits)
        ttft = clock.elapsed()
    return PromptDone(cache, first_id, ttft, kv_bytes, held, context_ids.shape[1] + question_ids.shape[1],
                      mem.reading.peak_bytes, mem.reading.source, stop_when)


def _decode_together(model: torch.nn.Module, rows: list[PromptDone], *, max_new_tokens: int,
                     eos_token_ids: list[int]) -> list[tuple[list[int], int, float]]:
    """Greedy decoding of ``rows`` as one batch; per row ``(tokens, decode_steps, decode_s)`` with the same
    stopping rules as :func:`~lmcompress.eval.pipeline.decode_greedy`."""
    device = next(model.parameters()).device
    tokens: list[list[int]] = [[] for _ in rows]
    steps = [0] * len(rows)
    ends = [0.0] * len(rows)
    next_ids = [r.first_id for r in rows]
    clock = Stopwatch(device)
    clock.reset()

    def keeps_going(i: int) -> bool:  # the checks decode_greedy makes before each forward
        if next_ids[i] in eos_token_ids:
            return False
        tokens[i].append(next_ids[i])
        stop = rows[i].stop_when
        return len(tokens[i]) < max_new_tokens and not (stop is not None and stop(tokens[i]))

    active = [i for i in range(len(rows)) if keeps_going(i)]
    while active:
        batch = RowBatchCache([rows[i].cache for i in active])
        ids = torch.tensor([[next_ids[i]] for i in active], device=device)
        out = model(input_ids=ids, position_ids=batch.next_positions(device), **cache_kwargs(batch),
                    use_cache=True, logits_to_keep=1)
        chosen = out.logits[:, -1].argmax(-1).tolist()
        now = clock.elapsed()
        still = []
        for i, tok in zip(active, chosen):
            steps[i] += 1
            ends[i] = now
            next_ids[i] = int(tok)
            if keeps_going(i):
                still.append(i)
        active = still
    return [(tokens[i], steps[i], ends[i]) for i in range(len(rows))]


def _generation(row: PromptDone, tokens: list[int], steps: int, decode_s: float, tokenizer, batch: int
                ) -> Generation:
    return Generation(
        token_ids=tokens,
        text=tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else "",
        ttft_s=row.ttft_s,
        decode_tok_s=(steps / decode_s) if steps > 0 and decode_s > 0 else None,
        kv_bytes=row.kv_bytes,
        kv_bytes_end=row.cache.nbytes,
        held_tokens=row.held_tokens,
        prompt_tokens=row.prompt_tokens,
        peak_mem_bytes=row.peak_mem_bytes,
        mem_source=row.mem_source,
        extra={"decode_batch": batch},
    )


def batches_rows(model: torch.nn.Module, decode: str) -> bool:
    """Whether ``decode`` lets answers decode as a row batch on ``model``'s device (eager decoding only)."""
    device = next(model.parameters()).device
    return decode == "eager" or (decode == "auto" and device.type != "cuda")


@torch.inference_mode()
def answer_prompts(model: torch.nn.Module, prompts: Sequence[tuple[torch.Tensor, torch.Tensor]], spec: KVSpec, *,
                   tokenizer=None, max_new_tokens: int = 16, query_aware: bool = False,
                   eos_token_ids: list[int] | None = None, decode: str = "auto", batch: int = 8,
                   stop_when: Sequence[StopFn] | None = None) -> list[Generation]:
    """Greedy answers to ``prompts`` (``(context_ids [1, n_ctx], question_ids [1, n_q])`` each), in order.

    Args:
        batch: answers decoded together at most (1: one by one, as :func:`~lmcompress.eval.pipeline.answer`).
            The prompts of a batch are all prefilled before it decodes, so their caches are held at once.
        stop_when: one early stop per prompt (or None), as in :func:`~lmcompress.eval.pipeline.answer`.
        Other arguments: as :func:`~lmcompress.eval.pipeline.answer`.
    """
    check_choice("decode", decode, DECODE_MODES)
    check_positive_int("batch", batch)
    stops = list(stop_when) if stop_when is not None else [None] * len(prompts)
    if len(stops) != len(prompts):
        raise ValueError(f"stop_when has {len(stops)} entries for {len(prompts)} prompts; allowed: one per prompt")
    if eos_token_ids is None:
        eos_token_ids = default_eos(model, tokenizer)
    together = batch if batches_rows(model, decode) else 1
    out: list[Generation] = []
    for start in range(0, len(prompts), together):
        rows = [process_prompt(model, ctx, q, spec, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                               query_aware=query_aware, stop_when=stops[start + j])
                for j, (ctx, q) in enumerate(prompts[start : start + together])]
        if len(rows) > 1 and all(row_batch_refusal(r.cache) is None for r in rows):
            decoded = _decode_together(model, rows, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids)
            out.extend(_generation(r, *d, tokenizer, len(rows)) for r, d in zip(rows, decoded))
            continue
        for r in rows:  # one by one (a lone prompt, or a policy that cannot share a batch)
            clock = Stopwatch(next(model.parameters()).device)
            clock.reset()
            toks, steps = decode_greedy(model, r.cache, r.first_id, max_new_tokens=max_new_tokens,
                                        eos_token_ids=eos_token_ids, decode=decode, stop_when=r.stop_when)
            out.append(_generation(r, toks, steps, clock.elapsed(), tokenizer, 1))
    return out
