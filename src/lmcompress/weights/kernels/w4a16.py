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
  kernels can instead reduce in the same launch (``SPLIT == 2``): each program counts itself in with an atomic
  on a per-output-tile int32 counter and the last one sums the partials and resets the counter to 0.
  The GEMV's and the separate reductions read all ``split`` partials of an output in one ``[SPLIT_P2, ...]``
  load (one memory round trip; a loop over the splits costs one round trip each); the GEMMs' fused reduction
  reads up to 4 splits of its ``[BLOCK_M, BLOCK_N]`` tile per load.
* ``gemm_repeat_kernel``: the same GEMM on one ``[BLOCK_K, BLOCK_N]`` B tile built with ``tl.interleave``
  (each word repeated 8 times, shifted per column): a layout shuffle per tile, but narrow tiles (``BLOCK_N = 64``)
  that suit 32+ rows.
* ``dequant_kernel``: weight ``[K, N]`` in the activation dtype, for large batches where a cuBLAS GEMM wins.

``n_words = N // 8`` is passed separately so that Triton sees its divisibility and issues wide (16-byte) loads.
Packed words are loaded ``[BLOCK_K, BLOCK_N // 8]`` (contiguous along N, 16-byte loads) and stay in that layout:
the GEMV and GEMM keep one accumulator per nibble position ``P`` (output columns ``8 w + AWQ_ORDER[P]``), so no
element moves between threads before the math; scales are loaded and outputs stored at those permuted columns.
``gemm_repeat_kernel`` and ``dequant_kernel`` instead repeat each word 8 times with ``tl.interleave``.
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
def _nibble_cols(base, PACKED_N: tl.constexpr, P: tl.constexpr):
    """Output columns of nibble ``P`` for the words ``base / 8 + [0, PACKED_N)``: ``base + 8 w + AWQ_ORDER[P]``."""
    return base + tl.arange(0, PACKED_N) * 8 + (P % 4) * 2 + P // 4


@triton.jit
def _code_f32(half, Q: tl.constexpr):
    """``code * 16**Q`` as fp32 for the nibble at bits ``4Q`` of ``half`` (any shape).

    ``(half & (0xF << 4Q)) | 0x4B000000`` read as fp32 is ``2**23 + code * 16**Q``; removing ``2**23`` is exact."""
    bits = (half & (0xF << (4 * Q))) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _gemv_fma(acc, half, xk, Q: tl.constexpr):
    """``acc += x_k * code * 16**Q`` for the nibble at bits ``4Q`` of ``half`` (``[BLOCK_K, PACKED_N]``)."""
    return acc + xk[:, None] * _code_f32(half, Q)


@triton.jit
def _zeros8(ROWS: tl.constexpr, COLS: tl.constexpr):
    """Eight fp32 ``[ROWS, COLS]`` zero tiles: one accumulator per nibble plane."""
    z = tl.zeros((ROWS, COLS), dtype=tl.float32)
    return z, z, z, z, z, z, z, z


@triton.jit
def _gemv_group_consts(s_ptr, zwords, row_base, base, mask, PACKED_N: tl.constexpr, P: tl.constexpr):
    """Nibble ``P`` of one group: ``scale / 16**(P%4)`` and ``zero * 16**(P%4)``, both ``[PACKED_N]`` fp32."""
    place: tl.constexpr = 1 << (4 * (P % 4))
    cols = _nibble_cols(base, PACKED_N, P)
    scale = tl.load(s_ptr + row_base + cols, mask=mask, other=0.0).to(tl.float32) * (1.0 / place)
    zero = ((zwords >> (4 * P)) & 0xF).to(tl.float32) * place
    return scale, zero


@triton.jit
def _gemv_group_end(acc, part, x_part, scale, zero):
    """``acc += (part - x_part * zero) * scale`` (scale and zero from :func:`_gemv_group_consts`).

    ``part[k, w] = sum_i x[i] * code[i, n] * 16**(P%4)`` over the group's rows ``i`` that fall on tile row ``k``,
    and ``x_part[k]`` the sum of those ``x[i]``."""
    return acc + (part - x_part[:, None] * zero[None, :]) * scale[None, :]


@triton.jit
def _gemv_store(
    ptr, acc, bias_ptr, base, mask, PACKED_N: tl.constexpr, P: tl.constexpr, ADD_BIAS: tl.constexpr
):
    """Sum ``acc`` over K (axis 0, once per program) and store it at nibble ``P``'s columns (plus their bias)."""
    cols = _nibble_cols(base, PACKED_N, P)
    out = tl.sum(acc, axis=0)
    if ADD_BIAS:
        out += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr + cols, out.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_epilogue(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, out_ptr, bias_ptr, ws_ptr, cnt_ptr, N,
                   stride_om, stride_split, base, w_mask, pid_n, pid_k, pid_m, BLOCK_N: tl.constexpr,
                   SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_P2: tl.constexpr):  # fmt: skip
    """Sum the eight ``[BLOCK_K, PACKED_N]`` nibble accumulators over K and store them: into ``out`` (``SPLIT`` 0),
    or as this split's fp32 partial sums (``SPLIT`` 1: a second kernel adds them up; ``SPLIT`` 2: the last
    program of this row and column block adds them up here)."""
    PACKED_N: tl.constexpr = BLOCK_N // 8
    ADD_BIAS: tl.constexpr = HAS_BIAS and SPLIT == 0
    if SPLIT == 0:
        dst = out_ptr + pid_m * stride_om
    else:
        dst = ws_ptr + pid_k * stride_split + pid_m * stride_om
    _gemv_store(dst, acc0, bias_ptr, base, w_mask, PACKED_N, 0, ADD_BIAS)
    _gemv_store(dst, acc1, bias_ptr, base, w_mask, PACKED_N, 1, ADD_BIAS)
    _gemv_store(dst, acc2, bias_ptr, base, w_mask, PACKED_N, 2, ADD_BIAS)
    _gemv_store(dst, acc3, bias_ptr, base, w_mask, PACKED_N, 3, ADD_BIAS)
    _gemv_store(dst, acc4, bias_ptr, base, w_mask, PACKED_N, 4, ADD_BIAS)
    _gemv_store(dst, acc5, bias_ptr, base, w_mask, PACKED_N, 5, ADD_BIAS)
    _gemv_store(dst, acc6, bias_ptr, base, w_mask, PACKED_N, 6, ADD_BIAS)
    _gemv_store(dst, acc7, bias_ptr, base, w_mask, PACKED_N, 7, ADD_BIAS)
    if SPLIT == 2:
        # The last program of this (row, column block) to finish adds the partial sums up, then resets the
        # counter for the next call. The barrier orders all threads' stores before the release.
        tl.debug_barrier()
        cols = base + tl.arange(0, BLOCK_N)
        n_mask = cols < N
        counter = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
        n_split = tl.num_programs(1)
        if tl.atomic_add(counter, 1, sem="acq_rel") == n_split - 1:
            # all partial sums in one [SPLIT_P2, BLOCK_N] load: one memory round trip, not one per split
            offs_s = tl.arange(0, SPLIT_P2)
            parts = ws_ptr + offs_s[:, None] * stride_split + pid_m * stride_om + cols[None, :]
            part_mask = (offs_s[:, None] < n_split) & n_mask[None, :]
            total = tl.sum(tl.load(parts, mask=part_mask, other=0.0, cache_modifier=".cg"), axis=0)
            if HAS_BIAS:
                total += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + pid_m * stride_om + cols, total.to(out_ptr.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(counter, 0, sem="relaxed")


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
    SPLIT_P2: tl.constexpr = 1,
    PREFETCH: tl.constexpr = False,
    STAGES: tl.constexpr = 1,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    PACKED_N: tl.constexpr = BLOCK_N // 8
    offs_w = pid_n * PACKED_N + tl.arange(0, PACKED_N)
    w_mask = offs_w < n_words  # N == 8 * n_words, so this masks the columns of every nibble too
    base = pid_n * BLOCK_N
    offs_k = tl.arange(0, BLOCK_K)
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, K // GROUP)
    x_row = x_ptr + pid_m * stride_xm
    # One accumulator per nibble position P (columns 8 w + AWQ_ORDER[P]), each [BLOCK_K, PACKED_N] in the layout
    # of the loaded words, so the unpacking needs no data movement between threads.
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _zeros8(BLOCK_K, PACKED_N)
    # STAGES > 1: the compiler pipelines the group loop, copying the words of the next STAGES - 1 groups into
    # shared memory asynchronously while this one is computed (more bytes in flight, no registers held)
    for g in tl.range(g_start, g_end, num_stages=STAGES):
        # PREFETCH: scales and zeros load with the group's words (one memory round trip per group, more registers)
        if PREFETCH:
            zw = tl.load(qz_ptr + g * n_words + offs_w, mask=w_mask, other=0)
            s0, z0 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 0)
            s1, z1 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 1)
            s2, z2 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 2)
            s3, z3 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 3)
            s4, z4 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 4)
            s5, z5 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 5)
            s6, z6 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 6)
            s7, z7 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 7)
        a0, a1, a2, a3, a4, a5, a6, a7 = _zeros8(BLOCK_K, PACKED_N)
        x_part = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for kk in tl.static_range(0, GROUP, BLOCK_K):
            rows = g * GROUP + kk + offs_k
            words = tl.load(qw_ptr + rows[:, None] * n_words + offs_w[None, :], mask=w_mask[None, :], other=0)
            xk = tl.load(x_row + rows).to(tl.float32)
            high = words >> 16  # nibbles 4-7 in the low half-word (the sign bits above are masked off)
            a0 = _gemv_fma(a0, words, xk, 0)
            a1 = _gemv_fma(a1, words, xk, 1)
            a2 = _gemv_fma(a2, words, xk, 2)
            a3 = _gemv_fma(a3, words, xk, 3)
            a4 = _gemv_fma(a4, high, xk, 0)
            a5 = _gemv_fma(a5, high, xk, 1)
            a6 = _gemv_fma(a6, high, xk, 2)
            a7 = _gemv_fma(a7, high, xk, 3)
            x_part += xk
        if not PREFETCH:
            zw = tl.load(qz_ptr + g * n_words + offs_w, mask=w_mask, other=0)
            s0, z0 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 0)
            s1, z1 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 1)
            s2, z2 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 2)
            s3, z3 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 3)
            s4, z4 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 4)
            s5, z5 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 5)
            s6, z6 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 6)
            s7, z7 = _gemv_group_consts(s_ptr, zw, g * N, base, w_mask, PACKED_N, 7)
        acc0 = _gemv_group_end(acc0, a0, x_part, s0, z0)
        acc1 = _gemv_group_end(acc1, a1, x_part, s1, z1)
        acc2 = _gemv_group_end(acc2, a2, x_part, s2, z2)
        acc3 = _gemv_group_end(acc3, a3, x_part, s3, z3)
        acc4 = _gemv_group_end(acc4, a4, x_part, s4, z4)
        acc5 = _gemv_group_end(acc5, a5, x_part, s5, z5)
        acc6 = _gemv_group_end(acc6, a6, x_part, s6, z6)
        acc7 = _gemv_group_end(acc7, a7, x_part, s7, z7)
    _gemv_epilogue(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, out_ptr, bias_ptr, ws_ptr, cnt_ptr, N,
                   stride_om, stride_split, base, w_mask, pid_n, pid_k, pid_m, BLOCK_N, SPLIT, HAS_BIAS,
                   SPLIT_P2)  # fmt: skip


@triton.jit
def _gemm_group_consts(s_ptr, zwords, row_base, base, mask, OFFSET: tl.constexpr, PACKED_N: tl.constexpr,
                       P: tl.constexpr):  # fmt: skip
    """Nibble ``P`` of one group: ``scale`` and ``OFFSET + zero``, both ``[PACKED_N]`` fp32."""
    cols = _nibble_cols(base, PACKED_N, P)
    scale = tl.load(s_ptr + row_base + cols, mask=mask, other=0.0).to(tl.float32)
    zero = ((zwords >> (4 * P)) & 0xF).to(tl.float32) + OFFSET
    return scale, zero


@triton.jit
def _gemm_dot(acc, a, words, P: tl.constexpr, IS_BF16: tl.constexpr):
    """``acc += a @ (OFFSET + code)`` for nibble ``P`` of ``words`` (``[BLOCK_K, PACKED_N]``), the codes made 16-bit
    floats with one bitwise op: ``0x4300 | code`` is bfloat16 ``128 + code``, ``0x6400 | code`` float16
    ``1024 + code``, both exact."""
    nibbles = (words >> (4 * P)) & 0xF
    if IS_BF16:
        b = (nibbles | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        b = (nibbles | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    return tl.dot(a, b, acc)


@triton.jit
def _gemm_store(ptr, acc, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N: tl.constexpr,
                P: tl.constexpr, ADD_BIAS: tl.constexpr):  # fmt: skip
    cols = _nibble_cols(base, PACKED_N, P)
    if ADD_BIAS:
        acc += tl.load(bias_ptr + cols, mask=w_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & w_mask[None, :]
    tl.store(ptr + offs_m[:, None] * stride_om + cols[None, :], acc.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_splitk_finish(ws_ptr, out_ptr, bias_ptr, cnt_ptr, offs_m, m_mask, base, N, stride_om, stride_split,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """Fused split-K reduction of a GEMM (``SPLIT == 2``), called after a program stored its fp32 partial sums
    ``ws[pid_k, offs_m, base:base + BLOCK_N]``: the last program of this output tile (an atomic count on
    ``cnt[program_id(0)]``) adds all the splits' partial sums, ``CHUNK`` splits per ``[CHUNK, BLOCK_M, BLOCK_N]``
    load, stores ``out`` (plus bias) and resets the counter to 0 for the next call."""
    # at most 8192 partial sums per load (32 registers per thread at 8 warps, 64 at 4)
    CHUNK: tl.constexpr = 4 if BLOCK_M * BLOCK_N <= 2048 else (2 if BLOCK_M * BLOCK_N <= 4096 else 1)
    tl.debug_barrier()  # every thread's partial sums are stored before the release below
    counter = cnt_ptr + tl.program_id(0)
    n_split = tl.num_programs(1)
    if tl.atomic_add(counter, 1, sem="acq_rel") == n_split - 1:
        offs_n = base + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        tile = offs_m[:, None] * stride_om + offs_n[None, :]
        tile_mask = m_mask[:, None] & n_mask[None, :]
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s0 in range(0, n_split, CHUNK):
            offs_s = s0 + tl.arange(0, CHUNK)
            parts = tl.load(
                ws_ptr + offs_s[:, None, None] * stride_split + tile[None, :, :],
                mask=(offs_s < n_split)[:, None, None] & tile_mask[None, :, :],
                other=0.0,
                cache_modifier=".cg",
            )
            total += tl.sum(parts, axis=0)
        if HAS_BIAS:
            total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + tile, total.to(out_ptr.dtype.element_ty), mask=tile_mask)
        tl.atomic_xchg(counter, 0, sem="relaxed")


@triton.jit
def _gemm_program(M, N, n_words, K, groups_per_split, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):  # fmt: skip
    """What a GEMM program covers: ``program_id(0)`` is (row block, column block), ``program_id(1)`` the split.

    Returns ``pid_k``, rows ``offs_m`` ``[BLOCK_M]``, packed-word columns ``offs_w`` ``[BLOCK_N / 8]``, their
    masks, and the groups ``[g_start, g_end)`` of this split."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    PACKED_N: tl.constexpr = BLOCK_N // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_w = pid_n * PACKED_N + tl.arange(0, PACKED_N)
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, K // GROUP)
    return pid_k, offs_m, offs_w, offs_m < M, offs_w < n_words, g_start, g_end


@triton.jit(do_not_specialize=["M", "stride_split", "groups_per_split"])
def gemm_kernel(
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
    pid_k, offs_m, offs_w, m_mask, w_mask, g_start, g_end = _gemm_program(
        M, N, n_words, K, groups_per_split, GROUP, BLOCK_M, BLOCK_N
    )
    PACKED_N: tl.constexpr = BLOCK_N // 8
    OFFSET: tl.constexpr = 128.0 if IS_BF16 else 1024.0
    base = tl.program_id(0) % tl.cdiv(N, BLOCK_N) * BLOCK_N
    offs_k = tl.arange(0, BLOCK_K)
    # One [BLOCK_M, PACKED_N] accumulator per nibble position P (columns 8 w + AWQ_ORDER[P]): each nibble plane
    # of the loaded words is a B operand of its own, so no element changes place before the dot.
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _zeros8(BLOCK_M, PACKED_N)
    for g in range(g_start, g_end):
        zw = tl.load(qz_ptr + g * n_words + offs_w, mask=w_mask, other=0)
        a0, a1, a2, a3, a4, a5, a6, a7 = _zeros8(BLOCK_M, PACKED_N)
        x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for kk in tl.static_range(0, GROUP, BLOCK_K):
            rows = g * GROUP + kk + offs_k
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :], mask=m_mask[:, None], other=0.0)
            words = tl.load(qw_ptr + rows[:, None] * n_words + offs_w[None, :], mask=w_mask[None, :], other=0)
            a0 = _gemm_dot(a0, a, words, 0, IS_BF16)
            a1 = _gemm_dot(a1, a, words, 1, IS_BF16)
            a2 = _gemm_dot(a2, a, words, 2, IS_BF16)
            a3 = _gemm_dot(a3, a, words, 3, IS_BF16)
            a4 = _gemm_dot(a4, a, words, 4, IS_BF16)
            a5 = _gemm_dot(a5, a, words, 5, IS_BF16)
            a6 = _gemm_dot(a6, a, words, 6, IS_BF16)
            a7 = _gemm_dot(a7, a, words, 7, IS_BF16)
            x_sum += tl.sum(a.to(tl.float32), axis=1)
        s0, z0 = _gemm_group_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 0)
        s1, z1 = _gemm_group_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 1)
        s2, z2 = _gemm_group_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 2)
        s3, z3 = _gemm_group_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 3)
        s4, z4 = _gemm_group_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 4)
        s5, z5 = _gemm_group_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 5)
        s6, z6 = _gemm_group_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 6)
        s7, z7 = _gemm_group_consts(s_ptr, zw, g * N, base, w_mask, OFFSET, PACKED_N, 7)
        acc0 += (a0 - x_sum[:, None] * z0[None, :]) * s0[None, :]
        acc1 += (a1 - x_sum[:, None] * z1[None, :]) * s1[None, :]
        acc2 += (a2 - x_sum[:, None] * z2[None, :]) * s2[None, :]
        acc3 += (a3 - x_sum[:, None] * z3[None, :]) * s3[None, :]
        acc4 += (a4 - x_sum[:, None] * z4[None, :]) * s4[None, :]
        acc5 += (a5 - x_sum[:, None] * z5[None, :]) * s5[None, :]
        acc6 += (a6 - x_sum[:, None] * z6[None, :]) * s6[None, :]
        acc7 += (a7 - x_sum[:, None] * z7[None, :]) * s7[None, :]
    ADD_BIAS: tl.constexpr = HAS_BIAS and SPLIT == 0
    dst = ws_ptr + pid_k * stride_split if SPLIT else out_ptr
    _gemm_store(dst, acc0, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 0, ADD_BIAS)
    _gemm_store(dst, acc1, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 1, ADD_BIAS)
    _gemm_store(dst, acc2, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 2, ADD_BIAS)
    _gemm_store(dst, acc3, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 3, ADD_BIAS)
    _gemm_store(dst, acc4, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 4, ADD_BIAS)
    _gemm_store(dst, acc5, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 5, ADD_BIAS)
    _gemm_store(dst, acc6, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 6, ADD_BIAS)
    _gemm_store(dst, acc7, bias_ptr, offs_m, m_mask, stride_om, base, w_mask, PACKED_N, 7, ADD_BIAS)
    if SPLIT == 2:
        _gemm_splitk_finish(ws_ptr, out_ptr, bias_ptr, cnt_ptr, offs_m, m_mask, base, N, stride_om, stride_split,
                            BLOCK_M, BLOCK_N, HAS_BIAS)  # fmt: skip


@triton.jit(do_not_specialize=["M", "stride_split", "groups_per_split"])
def gemm_repeat_kernel(
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
    """The GEMM with one ``[BLOCK_K, BLOCK_N]`` B tile: each packed word repeated 8 times (``tl.interleave``) and
    shifted per column. Costs a layout shuffle per tile, but allows ``BLOCK_N = 64``; it beat
    :func:`gemm_kernel` at 64 rows on the H100 (see BENCHMARKS.md, section 4)."""
    pid_k, offs_m, offs_w, m_mask, w_mask, g_start, g_end = _gemm_program(
        M, N, n_words, K, groups_per_split, GROUP, BLOCK_M, BLOCK_N
    )
    base = tl.program_id(0) % tl.cdiv(N, BLOCK_N) * BLOCK_N
    offs_n = base + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    shifts = _nibble_shifts(BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
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
            ws_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=mask
        )
        if SPLIT == 2:
            _gemm_splitk_finish(ws_ptr, out_ptr, bias_ptr, cnt_ptr, offs_m, m_mask, base, N, stride_om,
                                stride_split, BLOCK_M, BLOCK_N, HAS_BIAS)  # fmt: skip
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=mask)


@triton.jit
def splitk_reduce_kernel(
    ws_ptr,
    out_ptr,
    bias_ptr,
    MN,
    N,
    split,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLIT_P2: tl.constexpr,
):
    """``out[i] = sum_s ws[s, i] (+ bias)``; the ``split <= SPLIT_P2`` partial sums come in one 2D load."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    offs_s = tl.arange(0, SPLIT_P2)
    parts = tl.load(
        ws_ptr + offs_s[:, None] * MN + offs[None, :],
        mask=(offs_s[:, None] < split) & mask[None, :],
        other=0.0,
    )
    acc = tl.sum(parts, axis=0)
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
