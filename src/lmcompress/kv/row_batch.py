"""``RowBatchCache``: several independent :class:`~lmcompress.kv.cache.CompressedCache` objects decoded as one batch.

Decoding a 135M model on a CPU reads every weight once per step whatever the batch, so answering several prompts
in one batched forward costs little more than one (SmolLM2-135M fp32 on 2 cores: 66 ms a step for one row, 123
ms for sixteen). The prompts' caches stay what they are: each row keeps its own compressed cache (its own held
tokens, ragged heads, packed codes, policy state), and attention runs row by row over that row's own storage.
Only the linear layers, norms and the LM head see the batch.

Usage (one new token per row per forward, ``input_ids [B, 1]``, each row at its own position)::

    batch = RowBatchCache([cache_a, cache_b])
    out = model(input_ids=ids, position_ids=batch.next_positions(), **cache_kwargs(batch), use_cache=True)

Rows are decoded exactly as their caches would decode alone except for floating-point rounding: a batched
matrix product may sum in another order than a one-row product, so logits can differ in the last bits and a
greedy choice between two near-equal tokens can, rarely, differ (tests compare tokens with the one-row path).
Not for policies that hook the model while decoding (DMS) or caches in static (graph) decode mode: the
constructor refuses them.
"""

from __future__ import annotations

import torch

from .._compat import Cache, CacheLayerMixin
from ..errors import LMCompressError
from .cache import CompressedCache
from .layer import CompressedLayer


class RowBatchHandle:
    """Returned by :meth:`RowBatchLayer.update` in place of key/value tensors; the ``lmcompress`` attention
    function runs each row's attention over that row's layer through it."""

    __slots__ = ("layer",)

    def __init__(self, layer: RowBatchLayer) -> None:
        self.layer = layer


class RowBatchLayer(CacheLayerMixin):
    """Layer ``layer_idx`` of every row's cache."""

    is_compileable = False
    is_croppable = False

    def __init__(self, rows: list[CompressedLayer]) -> None:
        super().__init__()
        self.rows = rows
        self.is_sliding = rows[0].is_sliding
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append row ``b`` of ``[B, Hkv, 1, D]`` states to row ``b``'s layer; returns ``(handle, handle)``."""
        if key_states.shape[0] != len(self.rows) or key_states.shape[2] != 1:
            raise LMCompressError(f"a row batch decodes one token per row: got states {tuple(key_states.shape)} "
                                  f"for {len(self.rows)} rows; allowed: [{len(self.rows)}, heads, 1, head_dim]")
        for b, row in enumerate(self.rows):
            row.update(key_states[b : b + 1], value_states[b : b + 1], *args, **kwargs)
        handle = RowBatchHandle(self)
        return handle, handle

    def attend(self, query: torch.Tensor, scaling: float, module: torch.nn.Module | None) -> torch.Tensor:
        """Row ``b`` of ``query: [B, Hq, 1, D]`` attends over row ``b``'s held tokens, then row ``b``'s policy
        observes it (as a one-row decode step would); returns ``[B, 1, Hq, D]``."""
        outs = []
        for b, row in enumerate(self.rows):
            qb = query[b : b + 1]
            outs.append(row.attend(qb, None, scaling))
            row.after_attention(qb, None, scaling, module)
        return torch.cat(outs, dim=0)

    def get_seq_length(self) -> int:
        return max(row.get_seq_length() for row in self.rows)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The attention ignores the model's mask for a row batch (each row attends over all it holds, as a
        # one-token decode step does); these sizes only have to be consistent.
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise LMCompressError("a row batch cannot be reset; reset the rows' own caches")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise LMCompressError("beam search is not supported by a row batch; use greedy or sampling")


def row_batch_refusal(cache: CompressedCache) -> str | None:
    """Why ``cache`` cannot decode as a row of a batch, or None."""
    if cache.is_static:
        return "the cache is in static (graph) decode mode"
    for layer in cache.layers:
        policy = layer.evict
        if policy is not None and any(hasattr(policy, name) for name in
                                      ("model_hooks", "before_attention", "visibility")):
            return f"{policy.name} hooks the model while decoding"
        if getattr(layer, "batch_size", 1) != 1:
            return f"a row's cache must hold one sequence, got batch {layer.batch_size}"
    return None


class RowBatchCache(Cache):
    """Row ``b`` of a ``[B, 1]`` decode step reads and extends ``caches[b]``.

    Args:
        caches: one-sequence caches of the same model, each past its prompt (a first chunk was processed).

    Raises:
        LMCompressError: no caches, caches of different depth, or a cache that cannot join a batch
            (:func:`row_batch_refusal`).
    """

    def __init__(self, caches: list[CompressedCache]) -> None:
        if not caches:
            raise LMCompressError("a row batch needs at least one cache")
        depth = {len(c.layers) for c in caches}
        if len(depth) != 1:
            raise LMCompressError(f"a row batch needs caches of one model; got layer counts {sorted(depth)}")
        for i, cache in enumerate(caches):
            reason = row_batch_refusal(cache)
            if reason is not None:
                raise LMCompressError(f"row {i} cannot decode in a batch: {reason}; decode it alone")
        self.caches = caches
        super().__init__(layers=[RowBatchLayer([c.layers[i] for c in caches]) for i in range(depth.pop())])

    def next_positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[B, 1]`` position of each row's next token (the tokens each row has seen so far)."""
        return torch.tensor([[c.get_seq_length()] for c in self.caches], dtype=torch.long, device=device)
