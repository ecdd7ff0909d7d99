"""``fuse_rmsnorm(model)``: swap a model's Llama-family RMSNorm modules for :class:`FusedRMSNorm`, one Triton
kernel per call instead of ~8 elementwise and reduction kernels (65 norms per step of an 8B Llama).

The swap replaces module instances (as the AWQ path swaps ``nn.Linear`` for ``WQLinear``); the model classes are
untouched. Which modules qualify is decided in :func:`lmcompress._compat.llama_rmsnorm_modules`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .._compat import llama_rmsnorm_modules
from ..triton_support import triton_available


class FusedRMSNorm(nn.Module):
    """RMSNorm over the last dim: ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``; one Triton kernel on CUDA
    (approximate to one unit in the last place of ``x``'s dtype, see :mod:`.rmsnorm_kernel`), the same torch
    arithmetic as transformers elsewhere.

    Args:
        weight: ``[hidden]`` (shared with the module it replaces).
        eps: the variance epsilon.
    """

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = float(eps)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
        return on_device and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and triton_available()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[..., hidden]`` -> ``[..., hidden]``."""
        if self._use_kernel(hidden_states):
            from .rmsnorm_kernel import rmsnorm

            return rmsnorm(hidden_states, self.weight, self.variance_epsilon)
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused"


def fuse_rmsnorm(model: nn.Module) -> int:
    """Replace every Llama-family RMSNorm of ``model`` by a :class:`FusedRMSNorm` sharing its weight; returns
    how many were replaced (0 for architectures with another norm, e.g. Gemma's ``1 + weight``)."""
    count = 0
    for parent, name, module in llama_rmsnorm_modules(model):
        setattr(parent, name, FusedRMSNorm(module.weight, module.variance_epsilon))
        count += 1
    return count
