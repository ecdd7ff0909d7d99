"""``round_to(x, BF16)``: fp32 -> the value rounded to bf16 (round to nearest even, by integer arithmetic) or to
fp16, returned as fp32.

Written with integer operations for bf16 because a ``.to(bf16).to(fp32)`` round trip is not a reliable rounding
step inside a Triton kernel (the compiler may fold the pair away; the interpreter truncates), and the fused
kernels (:mod:`.rope_kernel`, :mod:`.swiglu_kernel`) must round where torch's bf16 kernels round.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, BF16: tl.constexpr):
    """``x``: fp32 tensor; ``BF16``: round to bf16 (else fp16; fp32 inputs pass ``x`` through unchanged at the
    call site). NaN is not preserved (not produced by the callers' finite inputs)."""
    if BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float16).to(tl.float32)


def rounding_mode(dtype) -> tuple[bool, bool]:
    """``(ROUND, BF16)`` constexprs for a kernel writing ``dtype`` (no rounding for fp32)."""
    import torch

    return dtype != torch.float32, dtype == torch.bfloat16
