"""Triton RoPE for the query and the key of one attention call in one kernel: one program per token row.

Input layout is the projections' own (``[B, S, H, D]`` views, any strides), output is attention's
(``[B, H, S, D]``, contiguous), so the transposes cost nothing extra. The arithmetic is transformers'
``apply_rotary_pos_emb`` in the input dtype: ``round(round(x * cos) + round(rotate_half(x) * sin))`` with every
product and the sum formed in fp32 and rounded to the input dtype (:mod:`.rounding`), as torch's bf16/fp16
elementwise kernels do, so the results equal transformers' bit for bit (checked under the interpreter in
``tests/unit/test_fused_decoder.py`` and on CUDA in ``tests/gpu/test_fused_decoder_gpu.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import round_to, rounding_mode


@triton.jit
def _r(x, ROUND: tl.constexpr, BF16: tl.constexpr):
    if ROUND:
        return round_to(x, BF16)
    else:
        return x


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, S, HQ, HK,
                 q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, c_sb, c_ss, HALF: tl.constexpr, BH: tl.constexpr,
                 ROUND: tl.constexpr, BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * S + s
    b = row // S
    s = row % S
    heads = tl.arange(0, BH)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    c1 = tl.load(cos_ptr + b * c_sb + s * c_ss + cols).to(tl.float32)
    c2 = tl.load(cos_ptr + b * c_sb + s * c_ss + HALF + cols).to(tl.float32)
    s1 = tl.load(sin_ptr + b * c_sb + s * c_ss + cols).to(tl.float32)
    s2 = tl.load(sin_ptr + b * c_sb + s * c_ss + HALF + cols).to(tl.float32)
    dt = qo_ptr.dtype.element_ty
    # query heads
    qm = heads < HQ
    qa = q_ptr + b * q_sb + s * q_ss + heads * q_sh + cols
    x1 = tl.load(qa, mask=qm, other=0.0).to(tl.float32)
    x2 = tl.load(qa + HALF, mask=qm, other=0.0).to(tl.float32)
    o1 = _r(_r(x1 * c1, ROUND, BF16) + _r(-x2 * s1, ROUND, BF16), ROUND, BF16)
    o2 = _r(_r(x2 * c2, ROUND, BF16) + _r(x1 * s2, ROUND, BF16), ROUND, BF16)
    qo = qo_ptr + ((b * HQ + heads) * S + s) * (2 * HALF) + cols
    tl.store(qo, o1.to(dt), mask=qm)
    tl.store(qo + HALF, o2.to(dt), mask=qm)
    # key heads
    km = heads < HK
    ka = k_ptr + b * k_sb + s * k_ss + heads * k_sh + cols
    y1 = tl.load(ka, mask=km, other=0.0).to(tl.float32)
    y2 = tl.load(ka + HALF, mask=km, other=0.0).to(tl.float32)
    p1 = _r(_r(y1 * c1, ROUND, BF16) + _r(-y2 * s1, ROUND, BF16), ROUND, BF16)
    p2 = _r(_r(y2 * c2, ROUND, BF16) + _r(y1 * s2, ROUND, BF16), ROUND, BF16)
    ko = ko_ptr + ((b * HK + heads) * S + s) * (2 * HALF) + cols
    tl.store(ko, p1.to(dt), mask=km)
    tl.store(ko + HALF, p2.to(dt), mask=km)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``q: [B, S, Hq, D]``, ``k: [B, S, Hkv, D]`` (last dim contiguous), ``cos``/``sin``: ``[B or 1, S, D]`` ->
    rotated ``([B, Hq, S, D], [B, Hkv, S, D])``, contiguous, in ``q``'s dtype."""
    bsz, seq, hq, dim = q.shape
    hk = k.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos = cos.to(q.dtype).expand(bsz, seq, dim)
    sin = sin.to(q.dtype).expand(bsz, seq, dim)
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    qo = torch.empty((bsz, hq, seq, dim), dtype=q.dtype, device=q.device)
    ko = torch.empty((bsz, hk, seq, dim), dtype=q.dtype, device=q.device)
    if bsz * seq:
        bh = triton.next_power_of_2(max(hq, hk))
        rnd, bf16 = rounding_mode(q.dtype)
        _rope_kernel[(bsz * seq,)](q, k, cos, sin, qo, ko, seq, hq, hk,
                                   q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                                   cos.stride(0), cos.stride(1), HALF=dim // 2, BH=bh, ROUND=rnd, BF16=bf16,
                                   num_warps=4 if bh * dim <= 4096 else 8)
    return qo, ko
