"""Triton: decode attention of one new token over static slots (split-K flash decoding, GQA-aware).

``query: [B, Hq, 1, D]`` attends over the first ``length`` of the ``C`` slots of ``k, v: [B, Hkv, C, D]``
(``length`` a one-element device tensor, so the launch is the same at every step and replays in a CUDA graph).
One program takes one KV head and one chunk of slots and processes all ``G = Hq / Hkv`` query heads of that KV
head together, so each key and value is read once (SDPA with ``enable_gqa`` and a mask over all slots reads
every slot, masked or not). A second kernel merges the chunks' partial softmax sums (merging them in the same
launch, in the last program of each KV head, was slower on the H200: BENCHMARKS.md 5.7).

Arithmetic: scores ``q . k`` in float32 from bf16/fp16 inputs, online softmax in float32 (base-2 exponentials of
pre-scaled scores), the probabilities rounded to the input dtype for the ``p . v`` product (as flash attention
does), float32 accumulators: the same function as SDPA up to rounding (within bf16 tolerance; checked against a
float64 reference in tests/kv/test_slot_attention.py and tests/gpu).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _partial_kernel(q_ptr, k_ptr, v_ptr, len_ptr, o_ptr, m_ptr, l_ptr, qk_scale,
                    q_sb, q_sh, C, S, CHUNK, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                    BN: tl.constexpr, HKV: tl.constexpr, STAGES: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    rows = tl.arange(0, GP)
    cols = tl.arange(0, D)
    rmask = rows < G
    q = tl.load(q_ptr + b * q_sb + (h * G + rows)[:, None] * q_sh + cols[None, :], mask=rmask[:, None], other=0.0)
    length = tl.load(len_ptr).to(tl.int32)
    lo = s * CHUNK
    hi = tl.minimum(lo + CHUNK, length)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    base = bh * C * D
    offs_n = tl.arange(0, BN)
    for start in tl.range(lo, hi, BN, num_stages=STAGES):
        n_idx = start + offs_n
        nmask = n_idx < hi
        kv_off = base + n_idx[:, None].to(tl.int64) * D + cols[None, :]
        k = tl.load(k_ptr + kv_off, mask=nmask[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=nmask[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # [GP, BN], base-2 logits
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = (bh * S + s) * G  # only the G real rows are stored
    tl.store(o_ptr + (out + rows)[:, None] * D + cols[None, :], acc, mask=rmask[:, None])
    tl.store(m_ptr + out + rows, m_i, mask=rmask)
    tl.store(l_ptr + out + rows, l_i, mask=rmask)


@triton.jit
def _merge_kernel(o_ptr, m_ptr, l_ptr, out_ptr, S, G: tl.constexpr, D: tl.constexpr,
                  SP: tl.constexpr, HKV: tl.constexpr, HQ: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    sidx = tl.arange(0, SP)
    smask = sidx < S
    cols = tl.arange(0, D)
    ml = (bh * S + sidx) * G + g
    m = tl.load(m_ptr + ml, mask=smask, other=float("-inf"))
    li = tl.load(l_ptr + ml, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(smask, tl.exp2(m - m_max), 0.0)  # chunks past the length have m = -inf: weight 0
    o = tl.load(o_ptr + ml[:, None] * D + cols[None, :], mask=smask[:, None], other=0.0)
    num = tl.sum(o * w[:, None], 0)
    den = tl.sum(li * w, 0)
    dst = (b * HQ + h * G + g) * D + cols
    tl.store(out_ptr + dst, (num / den).to(out_ptr.dtype.element_ty))


def plan_splits(batch_heads: int, capacity: int, block: int = 64, programs: int = 264,
                max_splits: int = 64) -> tuple[int, int]:
    """``(S, chunk)``: chunks of ``chunk`` slots (a multiple of ``block``) so that ``batch_heads * S`` programs
    cover ``capacity`` slots with about ``programs`` programs (two per multiprocessor of an H100/H200), at most
    ``max_splits`` chunks per head (the merge kernel reads them in one load)."""
    tiles = triton.cdiv(capacity, block)
    want = max(1, min(tiles, max_splits, triton.cdiv(programs, batch_heads)))
    chunk = triton.cdiv(tiles, want) * block
    return triton.cdiv(capacity, chunk), chunk


#: launch settings (block of slots per iteration, target programs, warps, pipeline stages); benchmarks vary them
CONFIG = {"block": 64, "programs": 264, "warps": 4, "stages": 2}


def slot_attention(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor,
                   scaling: float, splits: tuple[int, int] | None = None, config: dict | None = None
                   ) -> torch.Tensor:
    """Attention of ``query: [B, Hq, 1, D]`` over slots ``[0, length)`` of ``k, v: [B, Hkv, C, D]`` (contiguous;
    ``Hq`` a multiple of ``Hkv``; D a power of two >= 16), ``length``: one-element int64 device tensor >= 1.

    Returns ``[B, Hq, 1, D]`` in the query's dtype. ``splits``: ``(S, chunk)`` from :func:`plan_splits`
    (default: planned from the shapes; fixed for fixed shapes, so graph-capturable); ``config``: launch
    settings (default :data:`CONFIG`). Two launches: the chunks' partial sums, then their merge.
    """
    b, hq, q_len, d = query.shape
    hkv, cap = k.shape[1], k.shape[2]
    if q_len != 1 or hq % hkv or not (k.is_contiguous() and v.is_contiguous()) or d < 16 or d & (d - 1):
        raise ValueError(f"slot_attention takes one query token, Hq % Hkv == 0, contiguous K/V and a power-of-two "
                         f"head dim >= 16; got query {tuple(query.shape)}, keys {tuple(k.shape)}")
    if query.stride(-1) != 1:
        query = query.contiguous()
    cfg = CONFIG if config is None else {**CONFIG, **config}
    g = hq // hkv
    gp = max(16, triton.next_power_of_2(g))
    s, chunk = splits if splits is not None else plan_splits(b * hkv, cap, cfg["block"], cfg["programs"])
    if s > 64 or chunk % cfg["block"]:
        raise ValueError(f"splits {(s, chunk)}: at most 64 chunks of a multiple of {cfg['block']} slots")
    dev = query.device
    o_part = torch.empty((b * hkv, s, g, d), device=dev, dtype=torch.float32)
    m_part = torch.empty((b * hkv, s, g), device=dev, dtype=torch.float32)
    l_part = torch.empty((b * hkv, s, g), device=dev, dtype=torch.float32)
    out = torch.empty((b, hq, 1, d), device=dev, dtype=query.dtype)
    _partial_kernel[(b * hkv, s)](query, k, v, length, o_part, m_part, l_part, scaling * LOG2E,
                                  query.stride(0), query.stride(1), cap, s, chunk, G=g, GP=gp, D=d, BN=cfg["block"],
                                  HKV=hkv, STAGES=cfg["stages"], num_warps=cfg["warps"])
    _merge_kernel[(b * hkv, g)](o_part, m_part, l_part, out, s, G=g, D=d,
                                SP=triton.next_power_of_2(s), HKV=hkv, HQ=hq, num_warps=4)
    return out
