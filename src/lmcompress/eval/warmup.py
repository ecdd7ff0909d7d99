"""Warm-up: one short unmeasured prefill + decode after a model is loaded, before its first measured cell.

The first forward passes of a freshly loaded model pay one-time costs (lazy initialisation of kernels, thread
pools and allocator pools, first-touch of pages) that otherwise land in the first cell's time and peak memory
(issue 9: 547 MB peak for the first cell after a load against 67 MB for the same cell later). Executors call
:func:`warm_up` once per model load, with the KV spec and decode mode of the first cell to run.
"""

from __future__ import annotations

import torch

from .._compat import text_config
from ..errors import LMCompressError
from ..kv.spec import KVSpec


def warm_up(model: torch.nn.Module, spec: KVSpec | None = None, *, context_tokens: int = 256,
            question_tokens: int = 8, new_tokens: int = 4, decode: str = "auto") -> KVSpec:
    """Run :func:`lmcompress.eval.pipeline.answer` once on ``context_tokens + question_tokens`` random token ids
    (``[1, n]``, fixed seed) with ``spec``, decoding ``new_tokens`` tokens; nothing is measured or returned but
    the spec used. A spec that cannot run on so short a prompt (an :class:`LMCompressError`, e.g. a budget above
    the prompt length) falls back to the uncompressed ``KVSpec()``."""
    from .pipeline import answer

    spec = spec or KVSpec()
    vocab = int(text_config(model.config).vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, context_tokens + question_tokens), generator=gen)
    ctx, question = ids[:, :context_tokens], ids[:, context_tokens:]
    for candidate in (spec, KVSpec()):
        try:
            answer(model, ctx, question, candidate, max_new_tokens=new_tokens, eos_token_ids=[], decode=decode)
            return candidate
        except LMCompressError:
            if candidate == KVSpec():
                raise
    return KVSpec()
