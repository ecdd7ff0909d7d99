"""Compile every W4A16 kernel configuration the tuner may pick for Hopper (sm_90) without a GPU, and report
registers, spills, shared memory and the width of the global loads (Triton's bundled ptxas/cuobjdump).

    PYTHONPATH=src python benchmarks/aot_w4a16.py

A configuration that fails to compile here would be skipped by the tuner on the GPU; spills or 32-bit loads of
the packed weights point at slow configurations.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lmcompress.weights.kernels import w4a16 as kernels
from lmcompress.weights.kernels.dispatch import (
    GEMM_KERNELS,
    GEMV_KERNELS,
    candidates,
    kernel_options,
    launch_options,
)

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _sig(names: list[str], types: dict[str, str]) -> dict[str, str]:
    return {n: types.get(n, "i32") for n in names}


def compile_config(cfg, dtype: str = "bf16", group: int = 128):
    split = cfg.split_k > 1
    mode = (2 if cfg.fused_reduce else 1) if split else 0
    common = {"x_ptr": f"*{dtype}", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*fp16", "out_ptr": f"*{dtype}",
              "bias_ptr": f"*{dtype}", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}  # fmt: skip
    if cfg.kind in GEMV_KERNELS:
        fn = GEMV_KERNELS[cfg.kind]
        consts = {
            "GROUP": group,
            "BLOCK_N": cfg.block_n,
            "BLOCK_K": cfg.block_k,
            "SPLIT": mode,
            "HAS_BIAS": False,
            "SPLIT_P2": 1 << max(0, (cfg.split_k - 1).bit_length()),
        }
        consts.update(kernel_options(cfg))
    elif cfg.kind in GEMM_KERNELS:
        fn = GEMM_KERNELS[cfg.kind]
        consts = {"GROUP": group, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                  "SPLIT": mode, "HAS_BIAS": False, "IS_BF16": dtype == "bf16"}  # fmt: skip
    else:
        fn = kernels.dequant_kernel
        common = {"qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*fp16", "w_ptr": f"*{dtype}"}
        consts = {"GROUP": group, "BLOCK_K": cfg.block_k, "BLOCK_N": cfg.block_n}
    names = fn.arg_names
    sig = {n: ("constexpr" if n in consts else common.get(n, "i32")) for n in names}
    aligned = {"N", "n_words", "K", "stride_xm", "stride_om"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in common or n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options=launch_options(cfg))


def resource_usage(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run(
            [str(BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True
        ).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    return f"regs {m.group(1)} stack {m.group(2)} smem {m.group(3)}" if m else out.strip()[:80]


def main() -> None:
    seen = set()
    for m, n, k in ((1, 14336, 4096), (4, 4096, 14336), (16, 14336, 4096), (64, 4096, 4096)):
        for cfg in candidates(m, n, k, 128, sms=132):
            key = (
                cfg.kind,
                cfg.block_m,
                cfg.block_n,
                cfg.block_k,
                cfg.split_k > 1,
                cfg.fused_reduce,
                cfg.num_warps,
                cfg.num_stages,
            )
            if key in seen:
                continue
            seen.add(key)
            for dtype in ("bf16", "fp16"):
                try:
                    compiled = compile_config(cfg, dtype)
                except Exception as exc:
                    print(f"FAIL {dtype} {key}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    continue
                ptx = compiled.asm["ptx"]
                loads = sorted(
                    set(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32|ld\.global(?:\.\w+)*\.b32", ptx))
                )
                print(f"ok   {dtype} {key}: {resource_usage(compiled.asm['cubin'])}; int32 loads {loads}")


if __name__ == "__main__":
    main()
