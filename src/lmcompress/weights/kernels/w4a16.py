"""Triton W4A16 kernels for the AutoAWQ GEMM layout (see :mod:`lmcompress.weights.packing`).

``out[m, n] = sum_k x[m, k] * (code[k, n] - zero[g, n]) * scale[g, n]`` with ``g = k // GROUP``.

* ``gemv_kernel``: small batches. One program per (block of ``BLOCK_N`` outputs, slice of K, row m). Each
  thread keeps a ``[BLOCK_K, BLOCK_N]`` fp32 partial-sum tile and reduces it once at the end. Codes become
  floats with one bitwise op each: nibble ``p`` is masked in place in the low or high half-word
  (``word >> 16`` once per word) and or-ed with ``0x4B000000``, which read as fp32 is ``2**23 + code * 16**(p%4)``
  exactly; subtracting ``2**23 + zero * 16**(p%4)`` is exact too, and ``scale / 16**(p%4)`` is applied once
  per group. Elements come out in the packed order (nibble ``p`` is column ``AWQ_ORDER[p]``), so scales are
  loaded and outputs stored at permuted column offsets.
* ``gemm_kernel``: larger batches, tensor cores. Codes become 16-bit floats the same way (``0x4300`` for
  bfloat16: ``128 + code``; ``0x6400`` for float16: ``1024 + code``, both exact), ``tl.dot`` accumulates
  ``x . (offset + code)`` in fp32 per group (products exact) and the epilogue applies
  ``(acc - (zero + offset) * sum(x)) * scale``.
* Split-K: programs with ``pid_k`` take whole groups ``[pid_k * gps, (pid_k + 1) * gps)``; with ``SPLIT`` they
  write fp32 partial sums ``[split, M, N]`` that ``splitk_reduce_kernel`` adds up (bias and cast there). The
  GEMV can instead reduce in the same launch (``SPLIT == 2``): each program counts itself in with an atomic on
  a per-(row, column block) int32 counter and the last one sums the partials and resets the counter to 0.
* ``dequant_kernel``: weight ``[K, N]`` in the activation dtype, for large batches where a cuBLAS GEMM wins.

``n_words = N // 8`` is passed separately so that Triton sees its divisibility and issues wide (16-byte) loads.
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


@triton.jit(do_not_specialize=["stride_split", "groups_per_split"])
def gemv_kernel(
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
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    PACKED_N: tl.constexpr = BLOCK_N // 8
    offs_w = pid_n * PACKED_N + tl.arange(0, PACKED_N)
    w_mask = offs_w < n_words
    # Element j of a tile is nibble p = j % 8 of word j // 8, i.e. output column 8 * (j // 8) + AWQ_ORDER[p].
    j = tl.arange(0, BLOCK_N)
    p = j % 8
    cols = pid_n * BLOCK_N + (j // 8) * 8 + (p % 4) * 2 + p // 4
    n_mask = cols < N
    masks = 0xF << (4 * (p % 4))  # nibble p sits at bits 4 * (p % 4) of the low (p < 4) or high half-word
    place = (1 << (4 * (p % 4))).to(tl.float32)  # the masked code is code * place
    offs_k = tl.arange(0, BLOCK_K)
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, K // GROUP)
    x_row = x_ptr + pid_m * stride_xm
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for g in range(g_start, g_end):
        scale = tl.load(s_ptr + g * N + cols, mask=n_mask, other=0.0).to(tl.float32) / place
        zwords = _repeat8(tl.load(qz_ptr + g * n_words + offs_w, mask=w_mask, other=0))
        zero = ((zwords >> (4 * p)) & 0xF).to(tl.float32) * place + 8388608.0
        acc_g = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for kk in tl.static_range(0, GROUP, BLOCK_K):
            rows = g * GROUP + kk + offs_k
            words = tl.load(qw_ptr + rows[:, None] * n_words + offs_w[None, :], mask=w_mask[None, :], other=0)
            halves = tl.reshape(tl.join(words, words >> 16), (BLOCK_K, 2 * PACKED_N))  # low, high, low, ...
            halves = tl.interleave(halves, halves)
            halves = tl.interleave(halves, halves)  # each half-word 4 times: nibbles 0-3, then 4-7
            bits = (halves & masks[None, :]) | 0x4B000000  # 2**23 + code * place, as fp32 bits
            w = bits.to(tl.float32, bitcast=True) - zero[None, :]  # (code - zero) * place, exact
            xk = tl.load(x_row + rows).to(tl.float32)
            acc_g += xk[:, None] * w
        acc += acc_g * scale[None, :]
    out = tl.sum(acc, axis=0)
    if SPLIT == 0:
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + pid_m * stride_om + cols, out.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(ws_ptr + pid_k * stride_split + pid_m * stride_om + cols, out, mask=n_mask)
        if SPLIT == 2:
            # The last program of this (row, column block) to finish adds the partial sums up, then resets the
            # counter for the next call. The barrier orders all threads' stores before the release.
            tl.debug_barrier()
            counter = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
            n_split = tl.num_programs(1)
            if tl.atomic_add(counter, 1, sem="acq_rel") == n_split - 1:
                total = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for s in range(0, n_split):
                    part = ws_ptr + s * stride_split + pid_m * stride_om + cols
                    total += tl.load(part, mask=n_mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
                tl.store(out_ptr + pid_m * stride_om + cols, total.to(out_ptr.dtype.element_ty), mask=n_mask)
                tl.atomic_xchg(counter, 0, sem="relaxed")


@triton.jit(do_not_specialize=["M", "stride_split", "groups_per_split"])
def gemm_kernel(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    out_ptr,
    bias_ptr,
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
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    PACKED_N: tl.constexpr = BLOCK_N // 8
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
    qw_ptr,
    qz_ptr,
    s_ptr,
    w_ptr,
    N,
    n_words,
    GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    PACKED_N: tl.constexpr = BLOCK_N // 8
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
