"""A W4A16 GEMM for small batches with the weight as the wide operand: ``out^T = W^T x^T``.

:func:`lmcompress.weights.kernels.w4a16.gemm_kernel` puts the batch (2-32 rows) on the matrix instruction's M
side, so with 16 rows it runs Ampere-style ``mma.sync`` tiles of 16 rows. Here the product is transposed: the
dequantized weight tile ``[BLOCK_N / 8, BLOCK_K]`` (one nibble plane, see ``w4a16``) is the left operand, whose
rows (output columns) fill the 64-row side of Hopper's warp-group instruction, and ``x^T`` ``[BLOCK_K, BLOCK_M]``
is the narrow right operand. The weight is dequantized in registers (the left operand of a warp-group product
may come from registers; the right one goes through shared memory, and it is only the small activation tile).

Unlike ``gemm_kernel`` the weight is fully dequantized before the product: codes become 16-bit floats
``OFFSET + code`` with one bitwise op (exact), then ``* scale - (OFFSET + zero) * scale`` in fp32, rounded once
to the activation dtype (the rounding of a bf16/fp16 weight, as in ``F.linear`` on the dequantized weight).
The tensor cores then accumulate across groups in fp32: one ``[BLOCK_N / 8, BLOCK_M]`` accumulator per nibble
plane and no per-group partial sums or ``sum(x)``, which leaves the registers to the loads. Split-K as in
``w4a16`` (``SPLIT`` 0, 1 or 2).
Whether it is faster is the tuner's call on the device.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .w4a16 import _gemm_group_consts, _gemm_program, _gemm_splitk_finish, _nibble_cols, _zeros8


@triton.jit
def _plane_consts(s_ptr, zwords, row_base, base, mask, OFFSET: tl.constexpr, PACKED_N: tl.constexpr,
                  P: tl.constexpr):  # fmt: skip
    """Nibble ``P`` of one group: ``scale`` and ``-(OFFSET + zero) * scale``, both ``[PACKED_N]`` fp32, so that
    ``(OFFSET + code) * scale + shift`` is the dequantized weight."""
    scale, zero = _gemm_group_consts(s_ptr, zwords, row_base, base, mask, OFFSET, PACKED_N, P)
    return scale, -zero * scale


@triton.jit
def _dot_t(acc, words, xt, scale, shift, P: tl.constexpr, IS_BF16: tl.constexpr):
    """``acc [PACKED_N, BLOCK_M] += W_P^T @ x^T``: nibble ``P`` of ``words`` ``[BLOCK_K, PACKED_N]`` dequantized
    to the activation dtype (``OFFSET + code`` made a 16-bit float with one bitwise op, exact; then
    ``* scale + shift`` in fp32 and one rounding to 16 bits, like the bf16 reference weight)."""
    nibbles = (words >> (4 * P)) & 0xF
    if IS_BF16:
        code = (nibbles | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        code = (nibbles | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    w = (code.to(tl.float32) * scale[None, :] + shift[None, :]).to(xt.dtype)
    return tl.dot(tl.trans(w), xt, acc)


@triton.jit
def _store_t(ptr, acc, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N: tl.constexpr,
             P: tl.constexpr, ADD_BIAS: tl.constexpr):  # fmt: skip
    """Store ``acc [PACKED_N, BLOCK_M]`` at ``ptr[m, col]`` for nibble ``P``'s columns (plus their bias)."""
    cols = _nibble_cols(base, PACKED_N, P)
    if ADD_BIAS:
        acc += tl.load(bias_ptr + cols, mask=w_mask, other=0.0).to(tl.float32)[:, None]
    mask = w_mask[:, None] & m_mask[None, :]
    tl.store(ptr + offs_m[None, :] * stride_om + cols[:, None], acc.to(ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "stride_split", "groups_per_split"])
def gemm_t_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    out_ptr,
    bias_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    n_words,
    K,
    stride_xm,
    stride_om,
    stride_split,
    groups_per_split,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_BF16: tl.constexpr,
):
    """Same arguments and output as :func:`lmcompress.weights.kernels.w4a16.gemm_kernel`."""
    pid_k, offs_m, offs_w, m_mask, w_mask, g_start, g_end = _gemm_program(
        M, N, n_words, K, groups_per_split, GROUP, BLOCK_M, BLOCK_N
    )
    PACKED_N: tl.constexpr = BLOCK_N // 8
    OFFSET: tl.constexpr = 128.0 if IS_BF16 else 1024.0
    base = tl.program_id(0) % tl.cdiv(N, BLOCK_N) * BLOCK_N
    offs_k = tl.arange(0, BLOCK_K)
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _zeros8(PACKED_N, BLOCK_M)
    for g in range(g_start, g_end):
        zw = tl.load(qz_ptr + g * n_words + offs_w, mask=w_mask, other=0)
        s0, h0 = _plane_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 0)
        s1, h1 = _plane_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 1)
        s2, h2 = _plane_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 2)
        s3, h3 = _plane_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 3)
        s4, h4 = _plane_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 4)
        s5, h5 = _plane_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 5)
        s6, h6 = _plane_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 6)
        s7, h7 = _plane_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 7)
        for kk in tl.static_range(0, GROUP, BLOCK_K):
            rows = g * GROUP + kk + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :], mask=m_mask[:, None], other=0.0)
            xt = tl.trans(x)  # [BLOCK_K, BLOCK_M]
            words = tl.load(qw_ptr + rows[:, None] * n_words + offs_w[None, :], mask=w_mask[None, :], other=0)
            acc0 = _dot_t(acc0, words, xt, s0, h0, 0, IS_BF16)
            acc1 = _dot_t(acc1, words, xt, s1, h1, 1, IS_BF16)
            acc2 = _dot_t(acc2, words, xt, s2, h2, 2, IS_BF16)
            acc3 = _dot_t(acc3, words, xt, s3, h3, 3, IS_BF16)
            acc4 = _dot_t(acc4, words, xt, s4, h4, 4, IS_BF16)
            acc5 = _dot_t(acc5, words, xt, s5, h5, 5, IS_BF16)
            acc6 = _dot_t(acc6, words, xt, s6, h6, 6, IS_BF16)
            acc7 = _dot_t(acc7, words, xt, s7, h7, 7, IS_BF16)
    ADD_BIAS: tl.constexpr = HAS_BIAS and SPLIT == 0
    dst = ws_ptr + pid_k * stride_split if SPLIT else out_ptr
    _store_t(dst, acc0, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 0, ADD_BIAS)
    _store_t(dst, acc1, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 1, ADD_BIAS)
    _store_t(dst, acc2, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 2, ADD_BIAS)
    _store_t(dst, acc3, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 3, ADD_BIAS)
    _store_t(dst, acc4, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 4, ADD_BIAS)
    _store_t(dst, acc5, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 5, ADD_BIAS)
    _store_t(dst, acc6, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 6, ADD_BIAS)
    _store_t(dst, acc7, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 7, ADD_BIAS)
    if SPLIT == 2:
        _gemm_splitk_finish(ws_ptr, out_ptr, bias_ptr, cnt_ptr, offs_m, m_mask, base, N, stride_om, stride_split,
                            BLOCK_M, BLOCK_N, HAS_BIAS)  # fmt: skip
