"""A W4A16 GEMV that keeps more weight bytes in flight: whole-group loads, issued one group ahead.

Same math and output as :func:`lmcompress.weights.kernels.w4a16.gemv_kernel` (see that module for the layout,
the fp32 magic-number unpacking and the split-K modes); what changes is when the packed words are loaded.

``gemv_kernel`` loads a group in ``GROUP / BLOCK_K`` separate ``[BLOCK_K, BLOCK_N / 8]`` tiles and uses each
right after its load; the compiled code (sm_90, ``benchmarks/aot_w4a16.py``) keeps about two 16-byte loads per
thread in flight, which by Little's law caps a program's streaming rate, and the group loop waits for its first
load at every group. Here:

* a group's words come in **one** ``[GROUP / BLOCK_K, BLOCK_K, BLOCK_N / 8]`` load (``GROUP / BLOCK_K``
  16-byte loads per thread issued back to back), and the products are summed over the leading axis, which the
  blocked layout keeps inside each thread (no shuffles), into the same ``[BLOCK_K, BLOCK_N / 8]`` partial sums;
* the next group's words and activations are loaded **before** the current group's math (register double
  buffering), so each program has a whole group in flight while it computes;
* scales and zeros of the current group are loaded after its products (the compiler may issue them earlier;
  written first, they made ``BLOCK_N = 256`` spill on sm_90).

Costs twice the registers of the words tile; ``BLOCK_N`` and ``num_warps`` trade that against occupancy.
Whether it is faster is the tuner's call on the device (it times it next to ``gemv_kernel``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .w4a16 import _code_f32, _gemv_epilogue, _gemv_group_consts, _gemv_group_end, _zeros8


@triton.jit
def _tile_sum(words, xk, Q: tl.constexpr):
    """``sum_r x[r, k] * code[r, k, w] * 16**Q`` over the leading axis: ``[R, BLOCK_K, P]`` -> ``[BLOCK_K, P]``."""
    return tl.sum(xk[:, :, None] * _code_f32(words, Q), axis=0)


@triton.jit
def _load_group(qw_ptr, x_row, g, g_end, n_words, rows, w_offs, w_mask, GROUP: tl.constexpr):
    """Group ``g``'s words ``[GROUP, PACKED_N]`` and activations ``[GROUP]``; all masked off (nothing read) when
    ``g`` is past the program's last group ``g_end - 1``."""
    live = rows < tl.where(g < g_end, GROUP, 0)
    words = tl.load(qw_ptr + g * GROUP * n_words + w_offs, mask=live[:, None] & w_mask[None, :], other=0)
    x = tl.load(x_row + g * GROUP + rows, mask=live, other=0.0)
    return words, x


@triton.jit(do_not_specialize=["stride_split", "groups_per_split"])
def gemv_wide_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    out_ptr,
    bias_ptr,
    ws_ptr,
    cnt_ptr,
    N,
    n_words,
    K,
    stride_xm,
    stride_om,
    stride_split,
    groups_per_split,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_P2: tl.constexpr = 1,
):
    """``out[m, n] = sum_k x[m, k] W[k, n]`` for one row ``m`` (``program_id(2)``), ``BLOCK_N`` columns
    (``program_id(0)``) and the groups ``[pid_k * groups_per_split, ...)`` (``program_id(1)``)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    PACKED_N: tl.constexpr = BLOCK_N // 8
    R: tl.constexpr = GROUP // BLOCK_K
    offs_w = pid_n * PACKED_N + tl.arange(0, PACKED_N)
    w_mask = offs_w < n_words
    base = pid_n * BLOCK_N
    rows = tl.arange(0, GROUP)
    w_offs = rows[:, None] * n_words + offs_w[None, :]  # [GROUP, PACKED_N]
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, K // GROUP)
    x_row = x_ptr + pid_m * stride_xm
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _zeros8(BLOCK_K, PACKED_N)
    next_words, next_x = _load_group(qw_ptr, x_row, g_start, g_end, n_words, rows, w_offs, w_mask, GROUP)
    for g in range(g_start, g_end):
        # row r * BLOCK_K + k of the group goes to [r, k]: the leading axis, summed over, stays in each thread
        words = tl.reshape(next_words, (R, BLOCK_K, PACKED_N))
        xk = tl.reshape(next_x.to(tl.float32), (R, BLOCK_K))
        next_words, next_x = _load_group(qw_ptr, x_row, g + 1, g_end, n_words, rows, w_offs, w_mask, GROUP)
        high = words >> 16  # nibbles 4-7 in the low half-word (the sign bits above are masked off)
        x_part = tl.sum(xk, axis=0)
        p0 = _tile_sum(words, xk, 0)
        p1 = _tile_sum(words, xk, 1)
        p2 = _tile_sum(words, xk, 2)
        p3 = _tile_sum(words, xk, 3)
        p4 = _tile_sum(high, xk, 0)
        p5 = _tile_sum(high, xk, 1)
        p6 = _tile_sum(high, xk, 2)
        p7 = _tile_sum(high, xk, 3)
        zw = tl.load(qz_ptr + g * n_words + offs_w, mask=w_mask, other=0)
        s0, z0 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 0)
        s1, z1 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 1)
        s2, z2 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 2)
        s3, z3 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 3)
        s4, z4 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 4)
        s5, z5 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 5)
        s6, z6 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 6)
        s7, z7 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 7)
        acc0 = _gemv_group_end(acc0, p0, x_part, s0, z0)
        acc1 = _gemv_group_end(acc1, p1, x_part, s1, z1)
        acc2 = _gemv_group_end(acc2, p2, x_part, s2, z2)
        acc3 = _gemv_group_end(acc3, p3, x_part, s3, z3)
        acc4 = _gemv_group_end(acc4, p4, x_part, s4, z4)
        acc5 = _gemv_group_end(acc5, p5, x_part, s5, z5)
        acc6 = _gemv_group_end(acc6, p6, x_part, s6, z6)
        acc7 = _gemv_group_end(acc7, p7, x_part, s7, z7)
    _gemv_epilogue(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, out_ptr, bias_ptr, ws_ptr, cnt_ptr, N,
                   stride_om, stride_split, base, w_mask, pid_n, pid_k, pid_m, BLOCK_N, SPLIT, HAS_BIAS,
                   SPLIT_P2)  # fmt: skip
