"""Context + question -> answer with a ``KVSpec`` (the kvpress-style pipeline), with costs measured.

Flow: the context is prefilled into a :class:`~lmcompress.kv.cache.CompressedCache` (compression happens
here); the question is appended with eviction paused (query-agnostic: the compressed cache never saw the
question); the answer is decoded greedily. With ``query_aware=True`` context and question are prefilled
together, so query-based scores see the question. TTFT covers everything up to the first answer token.

The prefill is one chunk; inside :func:`lmcompress.eval.shared_prefill.sharing_prefills` (grids do this) it is
replayed from a shared uncompressed recording, which leaves the same cache (answers unchanged; TTFT and peak
memory then do not measure a real prefill). Several questions over one compressed context:
:mod:`lmcompress.eval.context_pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._compat import cache_kwargs, max_positions
from ..errors import LMCompressError, check_choice
from ..kv.cache import CompressedCache
from ..kv.hooks import policy_hooks, scoring_hooks
from ..kv.spec import KVSpec
from .perf import PeakMemory, Stopwatch


@dataclass
class Generation:
    """Output of :func:`answer`.

    Attributes:
        token_ids: generated ids (EOS excluded).
        text: decoded answer (when a tokenizer was given).
        ttft_s: prefill of context and question plus the first token.
        decode_tok_s: decode forwards per second after the first token (None if there were none).
        kv_bytes: cache bytes after the prompt was processed (before decoding).
        kv_bytes_end: cache bytes at the end.
        held_tokens: tokens held per layer after the prompt.
        prompt_tokens: context + question length.
        peak_mem_bytes / mem_source: measured peak memory growth over the whole call.
    """

    token_ids: list[int]
    text: str
    ttft_s: float
    decode_tok_s: float | None
    kv_bytes: int
    kv_bytes_end: int
    held_tokens: list[int]
    prompt_tokens: int
    peak_mem_bytes: int
    mem_source: str
    extra: dict = field(default_factory=dict)


DECODE_MODES = ("auto", "eager", "static")


def _static_decoder(model, cache: CompressedCache, max_new_tokens: int, decode: str, device: torch.device):
    """A CUDA-graph decoder when ``decode`` asks for one and the cache can decode statically, else None
    (``auto`` falls back to eager where :func:`~lmcompress.kv.static.static_decode_supported` gives a reason;
    ``static`` raises it)."""
    if decode == "eager" or (decode == "auto" and device.type != "cuda") or max_new_tokens < 2:
        return None
    from .graph_decode import StaticDecoder

    try:
        return StaticDecoder(model, cache, max_new_tokens, use_graph=device.type == "cuda")
    except LMCompressError:
        if decode == "static":
            raise
        return None


def check_context_fits(model: torch.nn.Module, n_tokens: int) -> None:
    limit = max_positions(model.config)
    if limit and n_tokens > limit:
        raise LMCompressError(
            f"context of {n_tokens} tokens exceeds the model's {limit} positions; allowed: <= {limit}"
        )


def _forward(model, ids: torch.Tensor, cache: CompressedCache) -> torch.Tensor:
    out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


def default_eos(model: torch.nn.Module, tokenizer=None) -> list[int]:
    """Stop tokens: the tokenizer's EOS, else the model's generation config's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def prefill(model: torch.nn.Module, ids: torch.Tensor, cache: CompressedCache, tokenizer: Any = None
            ) -> torch.Tensor:
    """One prefill chunk ``ids: [1, n]`` into ``cache`` (compression applies); returns ``[1, vocab]`` logits of
    the last token (``tokenizer`` goes to policies that run the model again, e.g. KVzip's repeat prompt). Inside :func:`lmcompress.eval.shared_prefill.sharing_prefills` the chunk is replayed from
    a recorded uncompressed prefill instead of run (same cache state, see that module)."""
    from .shared_prefill import active_prefills

    shared = active_prefills()
    if shared is not None:
        logits = shared.replay(model, ids, cache)
        if logits is not None:
            return logits
    with scoring_hooks(model, cache, tokenizer):
        return _forward(model, ids, cache)


def finish_prompt(model: torch.nn.Module, cache: CompressedCache, question_ids: torch.Tensor | None,
                  first_logits: torch.Tensor | None) -> tuple[int, int, list[int]]:
    """Append ``question_ids`` with compression paused (if given; else ``first_logits [1, vocab]`` are the
    prompt's last logits); returns ``(first answer token, kv_bytes_after_prompt, held_after_prompt)``."""
    if question_ids is not None:
        with scoring_hooks(model, cache), cache.compression_paused():
            first_logits = _forward(model, question_ids, cache)
    return int(first_logits.argmax(-1)), cache.nbytes, cache.held_tokens()


def decode_greedy(model: torch.nn.Module, cache: CompressedCache, next_id: int, *, max_new_tokens: int,
                  eos_token_ids: list[int], decode: str,
                  stop_when: Callable[[list[int]], bool] | None = None) -> tuple[list[int], int]:
    """Greedy decoding from the first answer token ``next_id``; returns ``(tokens, decode_steps)`` (EOS not
    included; ``decode_steps`` counts forwards, each producing one token). ``stop_when(tokens)`` (optional) ends
    decoding early once it returns True for the tokens so far (the token it was called on is kept); EOS and
    ``max_new_tokens`` still end it as usual."""
    device = next(model.parameters()).device
    tokens: list[int] = []
    steps = 0
    decoder = _static_decoder(model, cache, max_new_tokens, decode, device)
    if decoder is not None:
        decoder.start(next_id, cache.get_seq_length())
    with policy_hooks(model, cache):  # DMS decides on every decoding step too
        while next_id not in eos_token_ids:
            tokens.append(next_id)
            if len(tokens) >= max_new_tokens or (stop_when is not None and stop_when(tokens)):
                break
            if decoder is not None:
                decoder.run(1)
                next_id = int(decoder.tok)
            else:
                logits = _forward(model, torch.tensor([[next_id]], device=device), cache)
                next_id = int(logits.argmax(-1))
            steps += 1
    if decoder is not None:
        decoder.close()
    return tokens, steps


def continue_greedy(model: torch.nn.Module, cache: CompressedCache, question_ids: torch.Tensor | None,
                    first_logits: torch.Tensor | None, *, max_new_tokens: int, eos_token_ids: list[int],
                    decode: str, clock: Stopwatch, stop_when: Callable[[list[int]], bool] | None = None
                    ) -> tuple[list[int], int, float, int, list[int], float]:
    """:func:`finish_prompt` then :func:`decode_greedy`.

    Returns ``(tokens, decode_steps, ttft_s, kv_bytes_after_prompt, held_after_prompt, decode_s)``; ``ttft_s``
    is the clock's reading at the first token (the caller started it before the prefill).
    """
    next_id, kv_bytes, held = finish_prompt(model, cache, question_ids, first_logits)
    ttft = clock.elapsed()
    clock.reset()
    tokens, steps = decode_greedy(model, cache, next_id, max_new_tokens=max_new_tokens,
                                  eos_token_ids=eos_token_ids, decode=decode, stop_when=stop_when)
    return tokens, steps, ttft, kv_bytes, held, clock.elapsed()


def new_answer_cache(model: torch.nn.Module, context_ids: torch.Tensor, question_ids: torch.Tensor,
                     spec: KVSpec, *, max_new_tokens: int, query_aware: bool) -> CompressedCache:
    """The cache an answer starts from, after checking that prompt plus ``max_new_tokens`` fit the model; its
    spare slots hold the question (unless ``query_aware``) and the answer."""
    check_context_fits(model, context_ids.shape[1] + question_ids.shape[1] + max_new_tokens)
    reserve = max_new_tokens + (0 if query_aware else question_ids.shape[1])
    return CompressedCache(model, spec, reserve=reserve)


def prefill_prompt(model: torch.nn.Module, cache: CompressedCache, context_ids: torch.Tensor,
                   question_ids: torch.Tensor, *, query_aware: bool, tokenizer=None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Prefill the context (with the question when ``query_aware``); returns ``(first_logits, rest)`` for
    :func:`finish_prompt`."""
    if query_aware:
        return prefill(model, torch.cat([context_ids, question_ids], dim=1), cache, tokenizer), None
    prefill(model, context_ids, cache, tokenizer)
    return None, question_ids


@torch.inference_mode()
def answer(
    model: torch.nn.Module,
    context_ids: torch.Tensor,
    question_ids: torch.Tensor,
    spec: KVSpec,
    *,
    tokenizer=None,
    max_new_tokens: int = 16,
    query_aware: bool = False,
    eos_token_ids: list[int] | None = None,
    decode: str = "auto",
    stop_when: Callable[[list[int]], bool] | None = None,
) -> Generation:
    """Greedy answer to ``question_ids`` after ``context_ids`` with a compressed cache.

    Args:
        context_ids: ``[1, n_ctx]`` token ids (compressed).
        question_ids: ``[1, n_q]`` token ids (appended after compression unless ``query_aware``).
        spec: the KV compression recipe.
        max_new_tokens: answer length limit.
        query_aware: prefill context and question together.
        eos_token_ids: stop tokens (defaults to the tokenizer's / model's EOS).
        decode: ``eager`` (one Python forward per token), ``static`` (fixed slots; replayed as a CUDA graph on
            CUDA; an error where the spec cannot decode statically) or ``auto`` (static on CUDA where the spec
            allows it, else eager).
        stop_when: optional early stop, called with the answer's tokens after each new token (see
            :func:`continue_greedy`); the RULER-style tasks stop once the answer already scores full marks.
    """
    check_choice("decode", decode, DECODE_MODES)
    device = next(model.parameters()).device
    context_ids, question_ids = context_ids.to(device), question_ids.to(device)
    n_prompt = context_ids.shape[1] + question_ids.shape[1]
    if eos_token_ids is None:
        eos_token_ids = default_eos(model, tokenizer)
    cache = new_answer_cache(model, context_ids, question_ids, spec, max_new_tokens=max_new_tokens,
                             query_aware=query_aware)
    clock = Stopwatch(device)
    with PeakMemory(device) as mem:
        clock.reset()
        logits, rest = prefill_prompt(model, cache, context_ids, question_ids, query_aware=query_aware,
                                      tokenizer=tokenizer)
        tokens, steps, ttft, kv_bytes, held, decode_s = continue_greedy(
            model, cache, rest, logits, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
            decode=decode, clock=clock, stop_when=stop_when)
    return Generation(
        token_ids=tokens,
        text=tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else "",
        ttft_s=ttft,
        decode_tok_s=(steps / decode_s) if steps > 0 and decode_s > 0 else None,
        kv_bytes=kv_bytes,
        kv_bytes_end=cache.nbytes,
        held_tokens=held,
        prompt_tokens=n_prompt,
        peak_mem_bytes=mem.reading.peak_bytes,
        mem_source=mem.reading.source,
    )
