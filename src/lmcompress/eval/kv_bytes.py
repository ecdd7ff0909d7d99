"""KV bytes as a bf16/fp16 model would hold them, for compression ratios measured on a CPU that runs fp32.

A quantized cache holds packed codes, fp16 scales/zeros and integer metadata whose size does not depend on the
model's dtype, and full-precision tensors (residual windows, outliers, ...) in the model's dtype. On this CPU the
model runs in fp32; counting those float32 tensors at 2 bytes per element gives the bytes the same cache would
hold in a bf16 model, and the ratio to a bf16 cache of the same tokens is then the deployable compression.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .._compat import kv_geometry


def bf16_equivalent_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors`` with every float32 tensor counted at 2 bytes per element."""
    return sum(t.numel() * (2 if t.dtype == torch.float32 else t.element_size()) for t in tensors)


def uncompressed_bf16_bytes(model: torch.nn.Module, tokens: int, batch: int = 1) -> int:
    """Bytes of a bf16 K/V cache of ``tokens`` tokens for ``model`` (every layer, keys and values)."""
    layers, _, kv_heads, head_dim = kv_geometry(model.config)
    return 2 * layers * kv_heads * head_dim * tokens * batch * 2
