"""Kernel-vs-reference cases shared by the interpreter test (CPU, TRITON_INTERPRET=1) and the CUDA test.

Run as a script under ``TRITON_INTERPRET=1`` it checks the small cases and exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys

import torch

from lmcompress.weights.packing import dequantize_gemm, pack_gemm
from lmcompress.weights.quantizer import quantize_weight

# (M, N, K, group, kind, block_m, block_n, block_k, split_k, bias, fused split-K reduction[, GEMV prefetch])
SMALL_CASES = [
    (1, 64, 128, 32, "gemv", 1, 32, 16, 1, False, False),
    (3, 64, 256, 64, "gemv", 1, 32, 16, 2, True, False),
    (1, 48, 256, 64, "gemv", 1, 64, 32, 4, False, False),  # N not a multiple of the block
    (2, 64, 256, 32, "gemv", 1, 32, 16, 8, True, True),
    (1, 48, 256, 64, "gemv", 1, 32, 32, 3, False, True),
    (2, 64, 256, 32, "gemv", 1, 32, 16, 4, True, True, True),  # scales and zeros prefetched
    (1, 64, 256, 64, "gemv_wide", 1, 32, 16, 1, False, False),  # a whole group per load, one group ahead
    (2, 48, 256, 32, "gemv_wide", 1, 32, 16, 3, True, False),  # 8 groups split 3, 3, 2; bias
    (1, 64, 512, 64, "gemv_wide", 1, 64, 32, 2, True, True),  # fused split-K, N not a multiple of the block
    (5, 64, 128, 32, "gemm", 16, 128, 16, 1, False, False),
    (17, 48, 256, 64, "gemm", 16, 128, 32, 3, True, False),
    (9, 48, 256, 32, "gemm", 16, 32, 16, 5, True, True),  # fused split-K: 8 groups as 2,2,2,2 (4 splits)
    (3, 64, 512, 32, "gemm", 16, 64, 32, 16, False, True),  # 16 splits: four [4, BLOCK_M, BLOCK_N] chunks
    (5, 192, 256, 64, "gemm_t", 16, 128, 16, 1, True, False),  # transposed product; N not a multiple of the block
    (16, 128, 512, 64, "gemm_t", 16, 128, 32, 4, False, True),  # fused split-K
    (33, 64, 128, 32, "gemm_repeat", 32, 32, 16, 2, True, False),
    (40, 64, 256, 32, "gemm_repeat", 32, 32, 16, 8, True, True),  # fused split-K, two row blocks
    (20, 64, 128, 32, "dequant", 16, 32, 16, 1, True, False),
]


def random_problem(m, n, k, group, dtype, bias, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    q = quantize_weight(w, 4, group)
    qweight, qzeros, scales = (t.to(device) for t in pack_gemm(q.codes, q.zeros, q.scales))
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = (torch.randn(n, generator=gen) * 0.1).to(device=device, dtype=dtype) if bias else None
    reference = x.float() @ dequantize_gemm(qweight, qzeros, scales, group)
    if b is not None:
        reference = reference + b.float()
    return x, qweight, qzeros, scales, b, reference


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference).norm() / reference.norm())


def run_case(case, dtype, device):
    from lmcompress.weights.kernels.dispatch import KernelConfig, launch

    m, n, k, group, kind, bm, bn, bk, split, bias, fused = case[:11]
    prefetch = case[11] if len(case) > 11 else False
    x, qweight, qzeros, scales, b, reference = random_problem(m, n, k, group, dtype, bias, device)
    cfg = KernelConfig(kind, bm, bn, bk, split, 4, 2, fused, prefetch)
    out = launch(x, qweight, qzeros, scales, group, b, cfg)
    assert out.dtype == dtype and out.shape == (m, n)
    err = relative_error(out, reference)
    if fused:  # a second call reuses the counters the first one left at zero
        err = max(err, relative_error(launch(x, qweight, qzeros, scales, group, b, cfg), reference))
    return err


def interpret_main() -> int:
    """Small cases under the interpreter. bfloat16 tl.dot is wrong in Triton's CPU interpreter (it multiplies
    the raw bits), so the bfloat16 GEMM kernel is checked on CUDA only."""
    failures = 0
    for dtype in (torch.float16, torch.bfloat16):
        for case in SMALL_CASES:
            if dtype == torch.bfloat16 and case[4].startswith("gemm"):
                continue
            err = run_case(case, dtype, "cpu")
            ok = err < 1e-2
            failures += not ok
            print(f"{'ok ' if ok else 'BAD'} {dtype} {case} rel err {err:.2e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(interpret_main())
