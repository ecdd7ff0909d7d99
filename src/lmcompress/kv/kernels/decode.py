"""Triton split-sequence (flash-decoding) attention of one query token over packed 2/4/8-bit keys and values.

Inputs are the parts of :class:`~lmcompress.kv.quant.uniform.UniformCodec` (asymmetric, fp16 scale and zero):

* codes ``[B, Hkv, T, D*bits/8]`` uint8 (a token's bytes contiguous; KIVI's ``[B, Hkv, T/g, g, ...]`` blocks are
  the same memory), code ``PER*j + s`` of a token at bits ``[s*bits, (s+1)*bits)`` of byte ``j``;
* keys either per token (scale ``[B, Hkv, T, D/g]``) or per channel over blocks of ``KEY_TB`` tokens (scale
  ``[B, Hkv, T/KEY_TB, D]``, KIVI); values per token (``[B, Hkv, T, D/g]``).

Grid: ``(B * Hkv, splits)``. Each program owns one KV head and a contiguous range of tokens, and computes all
``G = Hq / Hkv`` query heads of the group at once (each packed block is loaded once per group). Per block of
``BLOCK_N`` tokens it loads the codes with wide row loads and, for each of the ``PER`` codes in a byte, unpacks
a ``[BLOCK_N, D/PER]`` slice of channels ``{PER*j + s}`` and multiplies it with the matching slice of the query
(``tl.dot`` on ``[16, D/PER]`` tiles, the ``G`` heads padded to 16 rows). An online softmax (exp2) keeps ``m``,
``l`` and ``PER`` output slices. A second kernel combines the splits and returns the output and the log-sum-exp
(natural log), so that full-precision tokens can be merged in afterwards.

The kernel is bound by instruction issue, not memory (2-bit codes are 1/8 of the bf16 bytes), so the inner loop
is kept short:

* codes become fp16 without int-to-float conversions (a quarter-rate instruction on H100): in PTX, four bytes
  per register are shifted and masked at once, and ``prmt`` places each code under the exponent bits ``0x64``,
  giving the fp16 ``1024 + c``; one paired subtraction leaves ``c`` exactly (``_slot``);
* bf16/fp16 queries (approximate, error ~1e-3 of the output scale): the query, pre-multiplied by the softmax
  scale, is rounded to fp16 once (bf16 values are exact in fp16 if within its range); keys and values are
  dequantized in fp16 (``c * scale + zero``, one rounding, scale and zero are stored in fp16 anyway), and the
  tensor-core dots accumulate in fp32. The probabilities are rounded to fp16 for the value product.
* fp32 queries (``PRECISE``) keep near-fp32 scores: operands split in fp16 high and low halves (two or three
  dots), per-channel key scales folded into the query (``q * scale``, plus ``q . zero`` per block).

:func:`choose_config` picks the launch configuration (one warp per program for 2/4-bit codes, the split count
that fills one wave of resident programs); ``benchmarks/gpu_kv_kernel_sweep.py`` is the measurement behind it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...triton_support import on_tensor_device

LOG2E = 1.4426950408889634
def _unpack_asm(shift: int, bits: int) -> str:
    """PTX for four packed bytes (one 32-bit register) -> their code at ``shift`` as four fp16 integers."""
    mask = ((1 << bits) - 1) * 0x01010101
    return (
        "{ .reg .b32 t, c, m; "
        f"shr.b32 t, $2, {shift}; and.b32 t, t, {mask}; mov.b32 c, 0x64646464; mov.b32 m, 0x64006400; "
        "prmt.b32 $0, t, c, 0x5150; prmt.b32 $1, t, c, 0x5352; sub.f16x2 $0, $0, m; sub.f16x2 $1, $1, m; }"
    )


_A2_0 = tl.constexpr(_unpack_asm(0, 2))
_A2_1 = tl.constexpr(_unpack_asm(2, 2))
_A2_2 = tl.constexpr(_unpack_asm(4, 2))
_A2_3 = tl.constexpr(_unpack_asm(6, 2))
_A4_0 = tl.constexpr(_unpack_asm(0, 4))
_A4_1 = tl.constexpr(_unpack_asm(4, 4))
_A8_0 = tl.constexpr(_unpack_asm(0, 8))


@triton.jit
def _asm4(codes, text: tl.constexpr):
    return tl.inline_asm_elementwise(text, "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _slot(codes, S: tl.constexpr, BITS: tl.constexpr, UNPACK: tl.constexpr):
    """Code slot ``S`` of the packed bytes ``codes`` (uint8 tile) as exact fp16 integers ``0 .. 2**BITS - 1``.

    ``UNPACK`` 1 and 2 use the exponent trick instead of an int-to-float conversion: the fp16 bit pattern
    ``0x6400 | c`` is ``1024 + c``, so ``c = half(0x6400 | c) - 1024`` exactly. 2 does it in PTX on four bytes
    per 32-bit register (a shift, a mask, two byte permutes, two paired subtractions per four codes); 0 is a
    plain integer-to-float conversion."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if UNPACK == 2:
        if BITS == 2:
            if S == 0:
                out = _asm4(codes, _A2_0)
            elif S == 1:
                out = _asm4(codes, _A2_1)
            elif S == 2:
                out = _asm4(codes, _A2_2)
            else:
                out = _asm4(codes, _A2_3)
        elif BITS == 4:
            if S == 0:
                out = _asm4(codes, _A4_0)
            else:
                out = _asm4(codes, _A4_1)
        else:
            out = _asm4(codes, _A8_0)
    elif UNPACK == 1:
        x = ((codes.to(tl.int16) >> (S * BITS)) & MASK) | 0x6400
        out = x.to(tl.float16, bitcast=True) - 1024.0
    else:
        out = ((codes >> (S * BITS)) & MASK).to(tl.float16)
    return out


@triton.jit
def _lut32(codes, L, USE: tl.constexpr):
    """Codes (exact fp16 integers) -> float32 values: the codebook entry ``L[code]`` (``USE``), else the code."""
    if USE:
        out = tl.load(L + codes.to(tl.int32))
    else:
        out = codes.to(tl.float32)
    return out


@triton.jit
def _lut16(codes, L, USE: tl.constexpr):
    """As :func:`_lut32`, in fp16 (the fp16 dequantization of the bf16/fp16 path)."""
    if USE:
        out = tl.load(L + codes.to(tl.int32)).to(tl.float16)
    else:
        out = codes
    return out


@triton.jit
def _dot_qk(a, b):
    """``a [H, K] @ b[N, K]^T`` with fp32 ``a`` split into two fp16 halves (hi + lo, ~22 mantissa bits) on the
    tensor cores; ``b`` must be exact in fp16 (codes) or is split by the caller."""
    hi = a.to(tl.float16)
    lo = (a - hi.to(tl.float32)).to(tl.float16)
    bt = tl.trans(b)
    return tl.dot(hi, bt, out_dtype=tl.float32) + tl.dot(lo, bt, out_dtype=tl.float32)


@triton.jit
def _pick(x0, x1, x2, x3, S: tl.constexpr):
    if S == 0:
        out = x0
    elif S == 1:
        out = x1
    elif S == 2:
        out = x2
    else:
        out = x3
    return out


@triton.jit
def _decode_kernel(
    Q, KC, KS, KZ, VC, VS, VZ, KL, VL, PO, PML,
    T, tokens_per_split, qk_scale,
    sq_b, sq_h,
    skc_b, skc_h, skc_t, sks_b, sks_h, sks_t, sks_d,
    svc_b, svc_h, svc_t, svs_b, svs_h, svs_t, svs_d,
    spo_b, spo_h, spo_s, spm_b, spm_h, spm_s,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    BITS: tl.constexpr, KEY_TB: tl.constexpr, KEY_GD: tl.constexpr, VAL_GD: tl.constexpr,
    PRECISE: tl.constexpr, UNPACK: tl.constexpr, KEY_LUT: tl.constexpr, VAL_LUT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    PER: tl.constexpr = 8 // BITS
    DP: tl.constexpr = D // PER

    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < G
    offs_j = tl.arange(0, DP)
    heads = h * G + offs_h
    # the query, pre-multiplied by the softmax scale (log2 domain), one [BLOCK_H, D/PER] slice per code slot
    q_base = Q + b * sq_b + heads[:, None] * sq_h + offs_j[None, :] * PER
    q0 = tl.load(q_base + 0, mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
    q1 = q0
    q2 = q0
    q3 = q0
    if PER >= 2:
        q1 = tl.load(q_base + 1, mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
    if PER >= 4:
        q2 = tl.load(q_base + 2, mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
        q3 = tl.load(q_base + 3, mask=hmask[:, None], other=0.0).to(tl.float32) * qk_scale
    h0 = q0.to(tl.float16)
    h1 = q1.to(tl.float16)
    h2 = q2.to(tl.float16)
    h3 = q3.to(tl.float16)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_H, DP], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_H, DP], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_H, DP], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_H, DP], dtype=tl.float32)

    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, T)
    kc_base = KC + b * skc_b + h * skc_h
    ks_base = KS + b * sks_b + h * sks_h
    kz_base = KZ + b * sks_b + h * sks_h
    vc_base = VC + b * svc_b + h * svc_h
    vs_base = VS + b * svs_b + h * svs_h
    vz_base = VZ + b * svs_b + h * svs_h
    vgrp = (offs_j * PER) // VAL_GD
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        kc = tl.load(kc_base + offs_n[:, None] * skc_t + offs_j[None, :], mask=nmask[:, None], other=0)
        qk = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
        if KEY_TB == BLOCK_N and not PRECISE:
            # per-channel scales of this block, dequantized in fp16 (broadcast along the tokens)
            row = (n0 // KEY_TB) * sks_t
            for s in tl.static_range(PER):
                col = (offs_j * PER + s) * sks_d
                ks = tl.load(ks_base + row + col)
                kz = tl.load(kz_base + row + col)
                codes = _slot(kc, s, BITS, UNPACK)
                qk = tl.dot(_pick(h0, h1, h2, h3, s), tl.trans(codes * ks[None, :] + kz[None, :]), qk)
        elif KEY_TB == BLOCK_N:
            # fp32 queries: the per-channel scales of this block folded into the query,
            # q . (c * s + z) = (q * s) . c + q . z, with q * s split in fp16 halves
            row = (n0 // KEY_TB) * sks_t
            bias = tl.zeros([BLOCK_H, DP], dtype=tl.float32)
            for s in tl.static_range(PER):
                col = (offs_j * PER + s) * sks_d
                ks = tl.load(ks_base + row + col)
                kz = tl.load(kz_base + row + col)
                bias += _pick(q0, q1, q2, q3, s) * kz.to(tl.float32)[None, :]
                codes = _slot(kc, s, BITS, UNPACK)
                qk += _dot_qk(_pick(q0, q1, q2, q3, s) * ks.to(tl.float32)[None, :], codes)
            qk += tl.sum(bias, axis=1)[:, None]
        else:
            # per-element scales: per token (groups of KEY_GD channels) or per channel over several key groups
            rows = (offs_n // KEY_TB)[:, None] * sks_t
            ks = tl.load(ks_base + rows + ((offs_j * PER) // KEY_GD)[None, :] * sks_d, mask=nmask[:, None],
                         other=0.0)
            kz = tl.load(kz_base + rows + ((offs_j * PER) // KEY_GD)[None, :] * sks_d, mask=nmask[:, None],
                         other=0.0)
            for s in tl.static_range(PER):
                if KEY_GD < PER:  # the group changes with the code slot (per-channel scales)
                    cols = ((offs_j * PER + s) // KEY_GD)[None, :] * sks_d
                    ks = tl.load(ks_base + rows + cols, mask=nmask[:, None], other=0.0)
                    kz = tl.load(kz_base + rows + cols, mask=nmask[:, None], other=0.0)
                codes = _slot(kc, s, BITS, UNPACK)
                if PRECISE:
                    k_s = _lut32(codes, KL, KEY_LUT) * ks.to(tl.float32) + kz.to(tl.float32)
                    k_hi = k_s.to(tl.float16)
                    k_lo = (k_s - k_hi.to(tl.float32)).to(tl.float16)
                    qs = _pick(q0, q1, q2, q3, s)
                    qk += _dot_qk(qs, k_hi) + tl.dot(qs.to(tl.float16), tl.trans(k_lo), out_dtype=tl.float32)
                else:  # dequantized in fp16 (scale and zero are fp16; one rounding)
                    qk = tl.dot(_pick(h0, h1, h2, h3, s), tl.trans(_lut16(codes, KL, KEY_LUT) * ks + kz), qk)
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha
        m_i = m_new
        p = tl.exp2(qk - m_i[:, None])
        l_i = l_i + tl.sum(p, axis=1)
        p_hi = p.to(tl.float16)

        vc = tl.load(vc_base + offs_n[:, None] * svc_t + offs_j[None, :], mask=nmask[:, None], other=0)
        vs = tl.load(vs_base + offs_n[:, None] * svs_t + vgrp[None, :] * svs_d, mask=nmask[:, None], other=0.0)
        vz = tl.load(vz_base + offs_n[:, None] * svs_t + vgrp[None, :] * svs_d, mask=nmask[:, None], other=0.0)
        for s in tl.static_range(PER):
            codes = _slot(vc, s, BITS, UNPACK)
            if PRECISE:  # fp32 queries: split p and v in fp16 halves (~fp32 accuracy)
                v_s = _lut32(codes, VL, VAL_LUT) * vs.to(tl.float32) + vz.to(tl.float32)
                v_hi = v_s.to(tl.float16)
                v_lo = (v_s - v_hi.to(tl.float32)).to(tl.float16)
                p_lo = (p - p_hi.to(tl.float32)).to(tl.float16)
                pv = tl.dot(p_hi, v_hi, out_dtype=tl.float32)
                pv += tl.dot(p_lo, v_hi, out_dtype=tl.float32) + tl.dot(p_hi, v_lo, out_dtype=tl.float32)
            else:
                pv = tl.dot(p_hi, _lut16(codes, VL, VAL_LUT) * vs + vz, out_dtype=tl.float32)
            if s == 0:
                acc0 = acc0 * alpha[:, None] + pv
            elif s == 1:
                acc1 = acc1 * alpha[:, None] + pv
            elif s == 2:
                acc2 = acc2 * alpha[:, None] + pv
            else:
                acc3 = acc3 * alpha[:, None] + pv

    po = PO + b * spo_b + heads[:, None] * spo_h + split * spo_s + offs_j[None, :] * PER
    tl.store(po + 0, acc0, mask=hmask[:, None])
    if PER >= 2:
        tl.store(po + 1, acc1, mask=hmask[:, None])
    if PER >= 4:
        tl.store(po + 2, acc2, mask=hmask[:, None])
        tl.store(po + 3, acc3, mask=hmask[:, None])
    pml = PML + b * spm_b + heads * spm_h + split * spm_s
    tl.store(pml, m_i, mask=hmask)
    tl.store(pml + 1, l_i, mask=hmask)


@triton.jit
def _combine_kernel(
    PO, PML, OUT, LSE, S,
    spo_b, spo_h, spo_s, spm_b, spm_h, spm_s, so_b, so_h,
    HQ: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    smask = offs_s < S
    offs_d = tl.arange(0, D)
    pml = PML + b * spm_b + hq * spm_h + offs_s * spm_s
    m = tl.load(pml, mask=smask, other=float("-inf"))
    l_part = tl.load(pml + 1, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(smask & (l_part > 0), tl.exp2(m - m_max), 0.0)
    l_sum = tl.sum(w * l_part, axis=0)
    po = tl.load(PO + b * spo_b + hq * spo_h + offs_s[:, None] * spo_s + offs_d[None, :], mask=smask[:, None],
                 other=0.0)
    out = tl.sum(po * w[:, None], axis=0) / l_sum
    tl.store(OUT + b * so_b + hq * so_h + offs_d, out)
    tl.store(LSE + b * HQ + hq, (m_max + tl.log2(l_sum)) / 1.4426950408889634)


def default_unpack() -> int:
    """PTX unpacking when compiled; the portable bit trick under the Triton interpreter (it runs no PTX)."""
    return 1 if os.environ.get("TRITON_INTERPRET", "") == "1" else 2


def choose_config(batch_heads: int, tokens: int, bits: int, key_token_block: int, precise: bool,
                  sms: int) -> dict:
    """Launch configuration measured fastest on an H100 (``benchmarks/gpu_kv_kernel_sweep.py``, Llama-3.1-8B
    decode shape, 8k-128k tokens, batch 1 and 8): one warp per program, 32-token blocks; 2-bit codes with at
    most 168 registers per thread (some spilling, 12 programs resident per SM instead of 8: faster); 8-bit codes
    and fp32 queries (wider tiles) with 4 warps. ``programs_per_sm`` sets the split count (one wave)."""
    if precise or bits == 8:
        return {"block_n": 32 if key_token_block > 1 else 64, "num_warps": 4, "maxnreg": None, "programs_per_sm": 8}
    if bits == 2:
        return {"block_n": 32, "num_warps": 1, "maxnreg": 168, "programs_per_sm": 12}
    return {"block_n": 32, "num_warps": 1, "maxnreg": None, "programs_per_sm": 8}


def num_splits(batch_heads: int, tokens: int, block: int, slots: int) -> int:
    """Splits of the sequence: as many as fill ``slots`` resident programs in one wave (a partial second wave
    would leave most of the GPU idle), at least one and at most one block per split."""
    return max(1, min(triton.cdiv(tokens, block), slots // batch_heads))


@on_tensor_device
def decode_attention(
    query: torch.Tensor,
    keys: dict[str, torch.Tensor],
    values: dict[str, torch.Tensor],
    *,
    bits: int,
    key_token_block: int,
    key_group: int,
    value_group: int,
    scaling: float,
    splits: int | None = None,
    block_n: int | None = None,
    tokens: int | None = None,
    unpack: int | None = None,
    num_warps: int | None = None,
    maxnreg: int | None = None,
    num_stages: int | None = None,
    key_lut: torch.Tensor | None = None,
    value_lut: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query: [B, Hq, 1, D]`` over packed keys/values (parts of the uniform codec).

    Args:
        keys, values: ``codes``/``scale``/``zero`` parts; codes ``[B, Hkv, T, P]`` or ``[B, Hkv, T/g, g, P]``.
        bits: 2, 4 or 8 (keys and values alike).
        key_token_block: 1 (per-token key scales) or the tokens per key group (per-channel, KIVI).
        key_group, value_group: channels per scale group (``D`` for one per head; ignored for per-channel keys).
        scaling: softmax scale.
        tokens: attend over the first ``tokens`` tokens only (default: all the key codes hold).
        key_lut, value_lut: float32 codebooks ``[2**bits]`` (codebook codes, e.g. Lloyd-Max: the value of code
            ``c`` is ``lut[c] * scale + zero``; per-token keys only), or None for uniform codes.
        splits, block_n, unpack, num_warps, maxnreg, num_stages: override :func:`choose_config`'s launch
            configuration (benchmarks, tests); ``unpack`` 0/1/2 as in ``_slot``.

    Returns:
        ``(out [B, Hq, 1, D] in query.dtype, lse [B, Hq, 1] float32)``.
    """
    b, hq, _, d = query.shape
    kc, vc = keys["codes"], values["codes"]
    if kc.dim() == 5:
        kc = kc.reshape(kc.shape[0], kc.shape[1], -1, kc.shape[-1])
    hkv, t = kc.shape[1], tokens if tokens is not None else kc.shape[2]
    g = hq // hkv
    ks, kz, vs, vz = keys["scale"], keys["zero"], values["scale"], values["zero"]
    precise = query.dtype == torch.float32
    sms = torch.cuda.get_device_properties(query.device).multi_processor_count if query.is_cuda else 4
    cfg = choose_config(b * hkv, t, bits, key_token_block, precise, sms)
    block_n = block_n or cfg["block_n"]
    if key_token_block > 1 and block_n % key_token_block:
        raise ValueError(f"block_n={block_n} must be a multiple of the key group {key_token_block}")
    if splits is None:
        splits = num_splits(b * hkv, t, block_n, cfg["programs_per_sm"] * sms)
    launch = {"num_warps": num_warps or cfg["num_warps"]}
    if maxnreg or (num_warps is None and cfg["maxnreg"]):
        launch["maxnreg"] = maxnreg or cfg["maxnreg"]
    if num_stages is not None:
        launch["num_stages"] = num_stages
    tokens_per_split = triton.cdiv(triton.cdiv(t, splits), block_n) * block_n
    splits = triton.cdiv(t, tokens_per_split)
    partial = torch.empty((b, hq, splits, d), dtype=torch.float32, device=query.device)
    pml = torch.empty((b, hq, splits, 2), dtype=torch.float32, device=query.device)
    q = query[:, :, 0]
    # stride of the token axis of the scales (per block for per-channel keys), and of their group axis
    ks_t = ks.stride(2)
    ks_d = ks.stride(3) if ks.shape[3] > 1 else 0
    vs_d = vs.stride(3) if vs.shape[3] > 1 else 0
    if key_lut is not None and key_token_block != 1:
        raise ValueError("codebook keys must be quantized per token (key_token_block=1)")
    kl = ks if key_lut is None else key_lut.float().contiguous()  # any pointer when unused
    vl = vs if value_lut is None else value_lut.float().contiguous()
    _decode_kernel[(b * hkv, splits)](
        q, kc, ks, kz, vc, vs, vz, kl, vl, partial, pml,
        t, tokens_per_split, scaling * LOG2E,
        q.stride(0), q.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), ks.stride(0), ks.stride(1), ks_t, ks_d,
        vc.stride(0), vc.stride(1), vc.stride(2), vs.stride(0), vs.stride(1), vs.stride(2), vs_d,
        partial.stride(0), partial.stride(1), partial.stride(2), pml.stride(0), pml.stride(1), pml.stride(2),
        HKV=hkv, G=g, BLOCK_H=max(16, triton.next_power_of_2(g)), BLOCK_N=block_n, D=d, BITS=bits,
        KEY_TB=key_token_block, KEY_GD=key_group if key_token_block == 1 else 1, VAL_GD=value_group,
        PRECISE=precise, UNPACK=default_unpack() if unpack is None else unpack,
        KEY_LUT=key_lut is not None, VAL_LUT=value_lut is not None, **launch,
    )
    out = torch.empty((b, hq, 1, d), dtype=torch.float32, device=query.device)
    lse = torch.empty((b, hq, 1), dtype=torch.float32, device=query.device)
    _combine_kernel[(b * hq,)](
        partial, pml, out, lse, splits,
        partial.stride(0), partial.stride(1), partial.stride(2), pml.stride(0), pml.stride(1), pml.stride(2),
        out.stride(0), out.stride(1),
        HQ=hq, BLOCK_S=triton.next_power_of_2(splits), D=d,
    )
    return out.to(query.dtype), lse


def merge_full_precision(out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Add attention over full-precision tokens ``[B, Hkv, m, D]`` to a packed-part result ``(out, lse)``."""
    if keys.shape[2] == 0:
        return out
    b, hq, _, d = query.shape
    hkv = keys.shape[1]
    qg = query.reshape(b, hkv, hq // hkv, 1, d).float()
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, keys.float()).reshape(b, hq, 1, -1) * scaling
    lse_fp = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse_fp.unsqueeze(-1)).reshape(b, hkv, hq // hkv, 1, -1)
    out_fp = torch.einsum("bhgqk,bhkd->bhgqd", p, values.float()).reshape(b, hq, 1, d)
    total = torch.logaddexp(lse, lse_fp)
    w_packed = torch.exp(lse - total).unsqueeze(-1)
    w_fp = torch.exp(lse_fp - total).unsqueeze(-1)
    return (out.float() * w_packed + out_fp * w_fp).to(query.dtype)

