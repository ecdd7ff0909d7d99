"""Triton: write one decode token's key, value (and position) into its static slot in one kernel (three
``index_copy_`` kernels in torch). The slot index and the position are read from device tensors, so the launch is
the same at every step (CUDA-graph capturable). Exact (a copy)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _slot_write_kernel(k_ptr, v_ptr, kd_ptr, vd_ptr, pd_ptr, slot_ptr, pos_ptr, H, cap,
                       k_sb, k_sh, v_sb, v_sh, D: tl.constexpr, BD: tl.constexpr, HAS_POS: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    slot = tl.load(slot_ptr).to(tl.int64)
    cols = tl.arange(0, BD)
    m = cols < D
    dst = (bh * cap + slot) * D + cols
    tl.store(kd_ptr + dst, tl.load(k_ptr + b * k_sb + h * k_sh + cols, mask=m), mask=m)
    tl.store(vd_ptr + dst, tl.load(v_ptr + b * v_sb + h * v_sh + cols, mask=m), mask=m)
    if HAS_POS:
        tl.store(pd_ptr + bh * cap + slot, tl.load(pos_ptr))


def slot_write(k_dst: torch.Tensor, v_dst: torch.Tensor, pos_dst: torch.Tensor | None, slot: torch.Tensor,
               pos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """``k_dst, v_dst: [B, H, cap, D]`` contiguous, ``pos_dst: [B, H, cap]`` int32 contiguous or None,
    ``slot``: one-element int64, ``pos``: one-element int32, ``keys, values: [B, H, 1, D]`` (last dim
    contiguous): ``k_dst[:, :, slot] = keys``, ``v_dst[:, :, slot] = values``, ``pos_dst[:, :, slot] = pos``."""
    b, h, cap, d = k_dst.shape
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    if values.stride(-1) != 1:
        values = values.contiguous()
    _slot_write_kernel[(b * h,)](keys, values, k_dst, v_dst, pos_dst if pos_dst is not None else k_dst, slot, pos,
                                 h, cap, keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
                                 D=d, BD=triton.next_power_of_2(d), HAS_POS=pos_dst is not None, num_warps=1)
