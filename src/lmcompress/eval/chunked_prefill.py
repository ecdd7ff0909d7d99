"""Prefill a long prompt in chunks, so that its activations (the MLP's ``[n, intermediate]`` tensors, 0.9 GiB each
for 32k tokens of an 8B Llama) are bounded by the chunk instead of the prompt.

Every chunk but the last runs with compression paused (:meth:`~lmcompress.kv.cache.CompressedCache.
compression_paused`); the last runs normally, so a prompt-time policy scores and evicts once, over every prompt
token, with the last chunk's queries. Which methods this leaves exact (up to float rounding of the chunked
attention, which sums keys in other blocks):

* no compression: exact.
* prompt-time scorers whose scores use only the last ``window`` queries against all keys (SnapKV, PyramidKV's
  SnapKV scoring, StreamingLLM, Knorm, ...): exact when ``window <= min(chunk, n)``. Scorers that use
  every prompt query (H2O-style accumulated attention, TOVA's per-step decisions, KVzip's reconstruction) are
  not exact: they see only the last chunk's queries.
* KV quantization (KIVI, KVQuant, ...): not exact: earlier chunks are stored quantized as they arrive, and the
  later chunks attend over the quantized keys and values (the one-shot prefill attends in full precision).

The held KV before the last chunk is the full prompt's: this bounds activations, not the uncompressed KV of the
prompt. ``evict_each_chunk=True`` bounds that too: every chunk compresses what is held (the policy must keep a
fixed ``budget`` per head, or the ratio would compound), so at most ``budget + chunk`` tokens are held. That is
approximate for every policy against the one-shot prefill: later chunks attend only over the kept tokens, so their
keys and values (and the policy's scores) differ. For StreamingLLM it is the method's own streaming setting (a
model that has only ever seen sinks + a recent window) and keeps the same positions as the one-shot prefill.
"""

from __future__ import annotations

import contextlib
import itertools

import torch

from .._compat import cache_kwargs
from ..errors import LMCompressError, check_positive_int
from ..kv.cache import CompressedCache


@torch.inference_mode()
def chunked_prefill(model: torch.nn.Module, ids: torch.Tensor, cache: CompressedCache, chunk: int, *,
                    evict_each_chunk: bool = False) -> torch.Tensor:
    """Feed ``ids: [B, n]`` into ``cache`` ``chunk`` tokens at a time (the remainder ``n % chunk`` first, so the
    last chunk is a full one); returns the last token's logits, ``[B, vocab]``. Compression applies at the last
    chunk only, or at every chunk with ``evict_each_chunk`` (see the module docstring for exactness).

    Raises:
        LMCompressError: ``chunk`` is not a positive int, or ``evict_each_chunk`` with a policy that has no fixed
            ``budget``.
    """
    check_positive_int("chunk", chunk)
    evict = cache.spec.evict
    if evict_each_chunk and evict is not None and getattr(evict, "budget", None) is None:
        raise LMCompressError(f"evict_each_chunk needs a policy with a fixed budget (got {evict.name} with "
                              f"ratio={getattr(evict, 'ratio', None)}: a ratio would compound over chunks)")
    paused = contextlib.nullcontext if evict_each_chunk else cache.compression_paused
    n = ids.shape[1]
    starts = [0, *range(n % chunk or chunk, n, chunk)]  # the short chunk first: the last one is full
    for start, end in itertools.pairwise(starts):
        with paused():
            model(input_ids=ids[:, start:end], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    out = model(input_ids=ids[:, starts[-1]:], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]
