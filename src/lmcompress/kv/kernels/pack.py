"""Triton quantize-and-pack: asymmetric uniform quantization of ``[B, H, T, D]`` states into the parts of
:class:`~lmcompress.kv.quant.uniform.UniformCodec` (same bytes as the torch codec: fp16 zero rounded down, fp16
scale rounded up, codes ``floor(v + 0.5)`` packed little-end-first along the channels).

Two layouts:

* per token (``token``/``head`` granularity): one program per ``BLOCK_T`` tokens of one (batch, head); the tile
  ``[BLOCK_T, groups, group/PER, PER]`` reduces over its last two axes for the statistics and over the last one
  to pack ``PER = 8 / bits`` codes per byte;
* per channel (``channel`` granularity, KIVI's keys): one program per block of ``TB`` tokens; the tile
  ``[TB, D/PER, PER]`` reduces over tokens for the statistics.

Divisions are IEEE round-to-nearest (``div_rn``; Triton's ``/`` may be off by an ulp on GPU), so the parts are
bitwise those of the torch codec.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...triton_support import on_tensor_device


@triton.jit
def _fp16_down(x):
    """Largest fp16 <= x (x float32)."""
    h = x.to(tl.float16)
    bits = h.to(tl.int16, bitcast=True)
    step = tl.where(h > 0, bits - 1, tl.where(h < 0, bits + 1, -32767))
    lower = step.to(tl.int16).to(tl.float16, bitcast=True)
    return tl.where(h.to(tl.float32) > x, lower, h)


@triton.jit
def _fp16_up(x):
    """Smallest fp16 >= x."""
    h = x.to(tl.float16)
    bits = h.to(tl.int16, bitcast=True)
    step = tl.where(h > 0, bits + 1, tl.where(h < 0, bits - 1, 1))
    upper = step.to(tl.int16).to(tl.float16, bitcast=True)
    return tl.where(h.to(tl.float32) < x, upper, h)


@triton.jit
def _params(lo, hi, QMAX: tl.constexpr):
    zero = _fp16_down(lo)
    scale = _fp16_up(tl.math.div_rn(hi - zero.to(tl.float32), tl.zeros_like(hi) + QMAX))
    scale = tl.where(scale > 0, scale, 1.0)
    return zero, scale


@triton.jit
def _pack_token_kernel(
    X, C, S, Z, T,
    sx_b, sx_h, sx_t, sc_b, sc_h, sc_t, ss_b, ss_h, ss_t,
    H: tl.constexpr, BLOCK_T: tl.constexpr, NG: tl.constexpr, GD: tl.constexpr, BITS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    PER: tl.constexpr = 8 // BITS
    GJ: tl.constexpr = GD // PER
    QMAX: tl.constexpr = (1 << BITS) - 1
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_g = tl.arange(0, NG)
    offs_j = tl.arange(0, GJ)
    offs_s = tl.arange(0, PER)
    t4 = offs_t[:, None, None, None]
    chan = offs_g[None, :, None, None] * GD + offs_j[None, None, :, None] * PER + offs_s[None, None, None, :]
    tmask = t4 < T
    x = tl.load(X + b * sx_b + h * sx_h + t4 * sx_t + chan, mask=tmask, other=0.0).to(tl.float32)
    lo = tl.min(tl.min(x, axis=3), axis=2)  # [BLOCK_T, NG]
    hi = tl.max(tl.max(x, axis=3), axis=2)
    zero, scale = _params(lo, hi, QMAX)
    v = tl.math.div_rn(x - zero.to(tl.float32)[:, :, None, None], scale.to(tl.float32)[:, :, None, None])
    codes = tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), QMAX).to(tl.int32)
    packed = tl.sum(codes << (offs_s * BITS)[None, None, None, :], axis=3).to(tl.uint8)  # [BLOCK_T, NG, GJ]
    byte = offs_g[None, :, None] * GJ + offs_j[None, None, :]
    t3 = offs_t[:, None, None]
    tl.store(C + b * sc_b + h * sc_h + t3 * sc_t + byte, packed, mask=t3 < T)
    t2 = offs_t[:, None]
    pmask = t2 < T
    tl.store(S + b * ss_b + h * ss_h + t2 * ss_t + offs_g[None, :], scale, mask=pmask)
    tl.store(Z + b * ss_b + h * ss_h + t2 * ss_t + offs_g[None, :], zero, mask=pmask)


@triton.jit
def _pack_channel_kernel(
    X, C, S, Z,
    sx_b, sx_h, sx_t, sc_b, sc_h, sc_t, ss_b, ss_h, ss_n,
    H: tl.constexpr, TB: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    blk = tl.program_id(1)
    PER: tl.constexpr = 8 // BITS
    DP: tl.constexpr = D // PER
    QMAX: tl.constexpr = (1 << BITS) - 1
    offs_t = blk * TB + tl.arange(0, TB)
    offs_j = tl.arange(0, DP)
    offs_s = tl.arange(0, PER)
    chan = offs_j[:, None] * PER + offs_s[None, :]  # [DP, PER]
    x = tl.load(X + b * sx_b + h * sx_h + offs_t[:, None, None] * sx_t + chan[None, :, :]).to(tl.float32)
    lo = tl.min(x, axis=0)  # [DP, PER]
    hi = tl.max(x, axis=0)
    zero, scale = _params(lo, hi, QMAX)
    v = tl.math.div_rn(x - zero.to(tl.float32)[None, :, :], scale.to(tl.float32)[None, :, :])
    codes = tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), QMAX).to(tl.int32)
    packed = tl.sum(codes << (offs_s * BITS)[None, None, :], axis=2).to(tl.uint8)  # [TB, DP]
    tl.store(C + b * sc_b + h * sc_h + offs_t[:, None] * sc_t + offs_j[None, :], packed)
    base = b * ss_b + h * ss_h + blk * ss_n
    tl.store(S + base + chan, scale)
    tl.store(Z + base + chan, zero)


@on_tensor_device
def quantize_pack(x: torch.Tensor, bits: int, granularity: str, group_size: int) -> dict[str, torch.Tensor]:
    """Asymmetric quantization of ``x: [B, H, T, D]`` (any strides with a unit channel stride) into packed parts.

    Returns ``codes`` uint8 ``[B, H, T, D*bits/8]`` (``[B, H, T/g, g, D*bits/8]`` for ``channel``), and fp16
    ``scale``/``zero`` ``[B, H, T, D/g]`` (``[B, H, T, 1]`` for ``head``; ``[B, H, T/g, D]`` for ``channel``).
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, h, t, d = x.shape
    per = 8 // bits
    p = d // per
    if granularity == "channel":
        tb = group_size
        codes = torch.empty((b, h, t // tb, tb, p), dtype=torch.uint8, device=x.device)
        scale = torch.empty((b, h, t // tb, d), dtype=torch.float16, device=x.device)
        zero = torch.empty_like(scale)
        _pack_channel_kernel[(b * h, t // tb)](
            x, codes, scale, zero,
            x.stride(0), x.stride(1), x.stride(2), codes.stride(0), codes.stride(1), codes.stride(3),
            scale.stride(0), scale.stride(1), scale.stride(2),
            H=h, TB=tb, D=d, BITS=bits,
        )
        return {"scale": scale, "zero": zero, "codes": codes}
    gd = d if granularity == "head" else group_size
    ng = d // gd
    codes = torch.empty((b, h, t, p), dtype=torch.uint8, device=x.device)
    scale = torch.empty((b, h, t, ng), dtype=torch.float16, device=x.device)
    zero = torch.empty_like(scale)
    block_t = max(1, min(64, 4096 // d, triton.next_power_of_2(t)))
    _pack_token_kernel[(b * h, triton.cdiv(t, block_t))](
        x, codes, scale, zero, t,
        x.stride(0), x.stride(1), x.stride(2), codes.stride(0), codes.stride(1), codes.stride(2),
        scale.stride(0), scale.stride(1), scale.stride(2),
        H=h, BLOCK_T=block_t, NG=ng, GD=gd, BITS=bits,
    )
    return {"scale": scale, "zero": zero, "codes": codes}
