"""W4A16 kernels (Triton) for the AutoAWQ GEMM layout, and their dispatch.

Importing this package does not import Triton; :func:`w4a16_matmul` does, on first use.
"""

from __future__ import annotations

from typing import Any

import torch

from ...triton_support import triton_available


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: Any = None,
) -> torch.Tensor:
    """``x [M, K]`` (float16/bfloat16) times the packed weight ``[K, N]`` (+ bias) -> ``[M, N]``; see
    :func:`lmcompress.weights.kernels.dispatch.w4a16_matmul`."""
    from .dispatch import w4a16_matmul as run

    return run(x, qweight, qzeros, scales, group_size, bias, config)


__all__ = ["triton_available", "w4a16_matmul"]
