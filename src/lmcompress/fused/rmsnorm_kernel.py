"""Triton RMSNorm in one kernel: one program per row of ``[rows, hidden]``.

The arithmetic follows transformers' Llama-family RMSNorm: the row in fp32, ``x * rsqrt(mean(x^2) + eps)``
rounded to the input dtype, then multiplied by the weight in fp32 and rounded to the output dtype (what a bf16 x
bf16 product does in torch). Approximate: the mean is summed in another order and ``rsqrt`` is the hardware's,
so a normalized value can differ from torch's by one unit in the last place of the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_support import on_tensor_device


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, n_cols, x_stride, out_stride, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    y = (x * tl.math.rsqrt(var + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


@on_tensor_device
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x: [..., hidden]``, ``weight: [hidden]`` -> ``[..., hidden]`` in ``promote(weight, x)`` dtype."""
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    block = triton.next_power_of_2(hidden)
    warps = max(1, min(16, block // 256))
    if rows.shape[0]:
        _rmsnorm_kernel[(rows.shape[0],)](rows, weight, out, hidden, rows.stride(0), out.stride(0), eps,
                                          BLOCK=block, num_warps=warps)
    return out.view(x.shape)
