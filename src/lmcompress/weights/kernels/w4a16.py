"""Triton W4A16 kernels for the AutoAWQ GEMM layout (see :mod:`lmcompress.weights.packing`).

``out[m, n] = sum_k x[m, k] * (code[k, n] - zero[g, n]) * scale[g, n]`` with ``g = k // GROUP``.

* ``gemv_kernel``: small batches. One program per (block of ``BLOCK_N`` outputs, slice of K, row m). Each
  thread keeps a ``[BLOCK_K, BLOCK_N]`` fp32 partial-sum tile and reduces it once at the end; codes become
  floats with the exponent trick (``code | 0x4B000000`` read as fp32 is ``2**23 + code``, exactly), the zero
  point (plus ``2**23``) is subtracted per element and the scale applied once per group.
* ``gemm_kernel``: larger batches, tensor cores. Codes become 16-bit floats the same way (``0x4300`` for
  bfloat16: ``128 + code``; ``0x6400`` for float16: ``1024 + code``, both exact), ``tl.dot`` accumulates
  ``x . (offset + code)`` in fp32 per group (products exact) and the epilogue applies
  ``(acc - (zero + offset) * sum(x)) * scale``.
* Split-K: programs with ``pid_k`` take whole groups ``[pid_k * gps, (pid_k + 1) * gps)``; with ``SPLIT`` they
  write fp32 partial sums ``[split, M, N]`` that ``splitk_reduce_kernel`` adds up (bias and cast there).
* ``dequant_kernel``: weight ``[K, N]`` in the activation dtype, for large batches where a cuBLAS GEMM wins.

Packed words are loaded ``[BLOCK_K, BLOCK_N // 8]`` (contiguous along N) and each word is repeated 8 times
with ``tl.interleave``; column ``j`` of a block of 8 takes nibble ``AWQ_NIBBLE_OF_COLUMN[j] = (j % 2) * 4 + j // 2``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _repeat8(words):
    """``[..., n]`` -> ``[..., 8n]``, each word repeated 8 times in place."""
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    return tl.interleave(words, words)


@triton.jit
def _nibble_shifts(BLOCK_N: tl.constexpr):
    j = tl.arange(0, BLOCK_N) % 8
    return ((j % 2) * 4 + j // 2) * 4


@triton.jit
def gemv_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    out_ptr,
    bias_ptr,
    N,
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
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    PACKED_N: tl.constexpr = BLOCK_N // 8
    n_words = N // 8
    offs_w = pid_n * PACKED_N + tl.arange(0, PACKED_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_mask = offs_w < n_words
    n_mask = offs_n < N
    shifts = _nibble_shifts(BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, K // GROUP)
    x_row = x_ptr + pid_m * stride_xm
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for g in range(g_start, g_end):
        scale = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zwords = _repeat8(tl.load(qz_ptr + g * n_words + offs_w, mask=w_mask, other=0))
        zero = ((zwords >> shifts) & 0xF).to(tl.float32) + 8388608.0
        acc_g = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for kk in tl.static_range(0, GROUP, BLOCK_K):
            rows = g * GROUP + kk + offs_k
            words = tl.load(qw_ptr + rows[:, None] * n_words + offs_w[None, :], mask=w_mask[None, :], other=0)
            bits = ((_repeat8(words) >> shifts[None, :]) & 0xF) | 0x4B000000
            w = bits.to(tl.float32, bitcast=True) - zero[None, :]
            xk = tl.load(x_row + rows).to(tl.float32)
            acc_g += xk[:, None] * w
        acc += acc_g * scale[None, :]
    out = tl.sum(acc, axis=0)
    if SPLIT:
        tl.store(out_ptr + pid_k * stride_split + pid_m * stride_om + offs_n, out, mask=n_mask)
    else:
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + pid_m * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def gemm_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    out_ptr,
    bias_ptr,
    M,
    N,
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
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    PACKED_N: tl.constexpr = BLOCK_N // 8
    n_words = N // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_w = pid_n * PACKED_N + tl.arange(0, PACKED_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    w_mask = offs_w < n_words
    n_mask = offs_n < N
    shifts = _nibble_shifts(BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, K // GROUP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(g_start, g_end):
        scale = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zwords = _repeat8(tl.load(qz_ptr + g * n_words + offs_w, mask=w_mask, other=0))
        # b below holds OFFSET + code; the offset joins the zero point here
        if IS_BF16:
            zero = ((zwords >> shifts) & 0xF).to(tl.float32) + 128.0
        else:
            zero = ((zwords >> shifts) & 0xF).to(tl.float32) + 1024.0
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for kk in tl.static_range(0, GROUP, BLOCK_K):
            rows = g * GROUP + kk + offs_k
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :], mask=m_mask[:, None], other=0.0)
            words = tl.load(qw_ptr + rows[:, None] * n_words + offs_w[None, :], mask=w_mask[None, :], other=0)
            nibbles = (_repeat8(words) >> shifts[None, :]) & 0xF
            if IS_BF16:
                b = (nibbles | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 128 + code, exact
            else:
                b = (nibbles | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)  # 1024 + code, exact
            acc_g = tl.dot(a, b, acc_g)
            x_sum += tl.sum(a.to(tl.float32), axis=1)
        acc += (acc_g - x_sum[:, None] * zero[None, :]) * scale[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        tl.store(
            out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=mask
        )
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=mask)


@triton.jit
def splitk_reduce_kernel(
    ws_ptr, out_ptr, bias_ptr, MN, N, split, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(split):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dequant_kernel(
    qw_ptr, qz_ptr, s_ptr, w_ptr, N, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    PACKED_N: tl.constexpr = BLOCK_N // 8
    n_words = N // 8
    rows = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_w = pid_n * PACKED_N + tl.arange(0, PACKED_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_mask = offs_w < n_words
    n_mask = offs_n < N
    shifts = _nibble_shifts(BLOCK_N)
    g = (pid_k * BLOCK_K) // GROUP
    scale = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    zwords = _repeat8(tl.load(qz_ptr + g * n_words + offs_w, mask=w_mask, other=0))
    zero = ((zwords >> shifts) & 0xF).to(tl.float32)
    words = tl.load(qw_ptr + rows[:, None] * n_words + offs_w[None, :], mask=w_mask[None, :], other=0)
    codes = ((_repeat8(words) >> shifts[None, :]) & 0xF).to(tl.float32)
    w = (codes - zero[None, :]) * scale[None, :]
    tl.store(w_ptr + rows[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=n_mask[None, :])
