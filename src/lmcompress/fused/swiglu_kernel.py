"""Triton SwiGLU: ``silu(gate) * up`` in one kernel (two elementwise kernels in torch).

Arithmetic as torch's on bf16/fp16: ``silu`` formed in fp32 and rounded to the input dtype, then the product in
fp32 rounded again. Approximate: ``exp`` is the hardware's, so a ``silu`` value can differ from torch's by one
unit in the last place of the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import round_to, rounding_mode


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, out_ptr, n_cols, g_stride, u_stride, o_stride, BLOCK: tl.constexpr,
                   ROUND: tl.constexpr, BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    act = g / (1.0 + tl.exp(-g))
    prod = act * u
    if ROUND:
        prod = round_to(round_to(act, BF16) * u, BF16)
    tl.store(out_ptr + row * o_stride + cols, prod.to(dt), mask=mask)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gate, up: [..., I]`` (same shape and dtype; last dim contiguous, rows may be strided views of one
    ``[..., 2I]`` projection) -> ``silu(gate) * up``, ``[..., I]`` contiguous."""
    inter = gate.shape[-1]
    g = gate.reshape(-1, inter)
    u = up.reshape(-1, inter)
    if g.stride(-1) != 1:
        g = g.contiguous()
    if u.stride(-1) != 1:
        u = u.contiguous()
    out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    block = min(1024, triton.next_power_of_2(inter))
    rnd, bf16 = rounding_mode(gate.dtype)
    if g.shape[0]:
        _swiglu_kernel[(g.shape[0], triton.cdiv(inter, block))](g, u, out, inter, g.stride(0), u.stride(0),
                                                               out.stride(0), BLOCK=block, num_warps=4,
                                                               ROUND=rnd, BF16=bf16)
    return out.view(gate.shape)
