"""Perplexity of English text continued after a compressed prefix.

Each window of ``context_tokens + eval_tokens`` tokens: the first ``context_tokens`` are prefilled into a
compressed cache (eviction happens here); the next ``eval_tokens`` are scored, fed in chunks of ``chunk`` tokens
with eviction paused, so every chunk attends to the compressed (and quantized) prefix and to earlier chunks as
the cache holds them (quantizers commit each chunk after it is processed). With the identity spec this is the
model's ordinary perplexity on those tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..._compat import cache_kwargs
from ...errors import LMCompressError, check_choice, check_positive_int
from ...kv.cache import CompressedCache
from ...kv.hooks import policy_hooks, scoring_hooks
from ...registry import TASKS
from ..perf import PeakMemory, Stopwatch
from ..pipeline import check_context_fits
from ..text import TEXT_SOURCES, english_text
from .base import RunContext, Task, TaskResult


def text_token_ids(tokenizer, source: str) -> torch.Tensor:
    """All tokens of a text source, ``[n]`` int64."""
    return tokenizer(english_text(source), add_special_tokens=False, return_tensors="pt").input_ids[0]


@TASKS.register("perplexity")
@dataclass(frozen=True)
class Perplexity(Task):
    """Attributes:
    source: text source (``lee``, ``lee-test``, ``jargon``).
    context_tokens: compressed prefix length.
    eval_tokens: scored continuation length.
    chunk: continuation chunk size.
    windows: number of consecutive, non-overlapping windows averaged.
    """

    name = "perplexity"
    primary_metric = "perplexity"
    higher_is_better = False

    source: str = "lee"
    context_tokens: int = 1536
    eval_tokens: int = 512
    chunk: int = 64
    windows: int = 1

    def __post_init__(self) -> None:
        check_choice("source", self.source, TEXT_SOURCES)
        check_positive_int("context_tokens", self.context_tokens)
        check_positive_int("eval_tokens", self.eval_tokens)
        check_positive_int("chunk", self.chunk)
        check_positive_int("windows", self.windows)

    @torch.inference_mode()
    def run(self, ctx: RunContext) -> TaskResult:
        if ctx.tokenizer is None:
            raise LMCompressError("the perplexity task needs a model with a tokenizer (not a tiny test model)")
        model, device = ctx.model, ctx.device
        span = self.context_tokens + self.eval_tokens
        check_context_fits(model, span)
        ids = text_token_ids(ctx.tokenizer, self.source)
        if ids.numel() < span * self.windows:
            raise LMCompressError(
                f"text source {self.source!r} has {ids.numel()} tokens, fewer than windows x span = "
                f"{self.windows} x {span}"
            )
        nll_sum, count, kv_bytes, ttft, peak = 0.0, 0, [], [], 0
        source = ""
        for w in range(self.windows):
            window = ids[w * span : (w + 1) * span].unsqueeze(0).to(device)
            cache = CompressedCache(model, ctx.spec, reserve=self.eval_tokens)
            clock = Stopwatch(device)
            with PeakMemory(device) as mem:
                clock.reset()
                with scoring_hooks(model, cache):
                    out = model(input_ids=window[:, : self.context_tokens], **cache_kwargs(cache),
                                use_cache=True, logits_to_keep=1)
                ttft.append(clock.elapsed())
                kv_bytes.append(cache.nbytes)
                logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
                nll_sum -= float(logp[0, window[0, self.context_tokens]])
                count += 1
                with cache.compression_paused(), policy_hooks(model, cache):  # DMS decides on scored tokens too
                    for s in range(self.context_tokens, span - 1, self.chunk):
                        e = min(s + self.chunk, span - 1)
                        out = model(input_ids=window[:, s:e], **cache_kwargs(cache), use_cache=True)
                        logp = torch.log_softmax(out.logits[0].float(), dim=-1)
                        targets = window[0, s + 1 : e + 1]
                        nll_sum -= float(logp.gather(1, targets[:, None]).sum())
                        count += targets.numel()
            peak = max(peak, mem.reading.peak_bytes)
            source = mem.reading.source
        mean_nll = nll_sum / count
        return TaskResult(
            metrics={"perplexity": math.exp(mean_nll), "nll": mean_nll},
            costs={
                "kv_bytes": sum(kv_bytes) / len(kv_bytes),
                "ttft_s": sum(ttft) / len(ttft),
                "peak_mem_bytes": peak,
                "mem_source": source,
                "scored_tokens": count,
            },
        )
