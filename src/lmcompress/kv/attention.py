"""The ``lmcompress`` attention function, registered with transformers' ``AttentionInterface``.

With a :class:`~lmcompress.kv.cache.CompressedCache`, ``key``/``value`` are :class:`KVHandle` objects and the
attention reads the layer's storage (SDPA over full-precision tokens; block-wise reference or CUDA kernel over
packed tokens), then lets the layer compress. With any other cache (or none) it is exactly transformers' SDPA.
"""

from __future__ import annotations

import torch

from .. import _compat
from .layer import KVHandle
from .row_batch import RowBatchHandle


def lmcompress_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key,
    value,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over compressed storage.

    Args:
        query: ``[B, Hq, q, D]`` (after RoPE).
        key, value: :class:`KVHandle` (compressed cache), :class:`RowBatchHandle` (a row batch of them) or ``[B, Hkv, n, D]`` tensors (any other cache).
        attention_mask: SDPA-style bool mask ``[B, 1, q, n]`` or None.
        scaling: softmax scale (defaults to ``D**-0.5``).

    Returns:
        ``([B, q, Hq, D], None)``.
    """
    if isinstance(key, RowBatchHandle):  # several prompts' caches decoded as one batch (kv/row_batch.py)
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        return key.layer.attend(query, scaling, module), None
    if not isinstance(key, KVHandle):
        return _compat.sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = key.layer
    before = getattr(layer.evict, "before_attention", None)
    if before is not None:  # DMS: records decisions, zeroes the borrowed query channel
        query = before(layer, query)
    out = layer.attend(query, attention_mask, scaling)
    layer.after_attention(query, attention_mask, scaling, module)
    return out, None


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Register the ``lmcompress`` attention function (once) and select it on ``model``.

    For ordinary caches the function is transformers' SDPA path, so outputs do not change.
    """
    if not _compat.attention_is_registered():
        _compat.register_attention(lmcompress_attention)
    if _compat.attention_implementation(model) != _compat.ATTN_NAME:
        _compat.set_attention(model, _compat.ATTN_NAME)
    return model
