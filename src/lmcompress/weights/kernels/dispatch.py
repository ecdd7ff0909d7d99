"""Launching the W4A16 kernels, and choosing one per shape.

:func:`w4a16_matmul` runs ``x [M, K] @ W [K, N]`` for packed ``W``. The kernel family and its tile sizes come
from a per-shape tuner: on the first call for a (device, M bucket, N, K, group, dtype, bias) key every
candidate of :func:`candidates` is timed on the real inputs with ``triton.testing.do_bench`` (whole calls,
split-K reduction included) and the fastest is kept for the process. ``LMCOMPRESS_W4A16_TUNE=0`` skips tuning
and uses :func:`default_config`. Tune before capturing a CUDA graph (a first call does it). Results are also
kept on disk per device, versions and kernel code (:mod:`.tuning_cache`), so later processes skip the timing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton

from ...triton_support import on_tensor_device
from .gemm_t import gemm_t_kernel
from .gemv_wide import gemv_wide_kernel
from .w4a16 import dequant_kernel, gemm_kernel, gemm_repeat_kernel, gemv_kernel, splitk_reduce_kernel

KINDS = ("gemv", "gemv_wide", "gemm", "gemm_t", "gemm_repeat", "dequant")
GEMV_KERNELS = {"gemv": gemv_kernel, "gemv_wide": gemv_wide_kernel}
GEMM_KERNELS = {"gemm": gemm_kernel, "gemm_t": gemm_t_kernel, "gemm_repeat": gemm_repeat_kernel}
GEMV_KINDS = tuple(GEMV_KERNELS)


@dataclass(frozen=True)
class KernelConfig:
    """One way to run the product.

    Attributes:
        kind: ``gemv`` (CUDA-core FMA, any M, best for M of 1-2), ``gemv_wide`` (the same math with whole-group
            loads issued one group ahead, :mod:`.gemv_wide`), ``gemm`` (tensor cores, one dot per nibble
            plane), ``gemm_repeat`` (tensor cores, one interleaved B tile; narrow tiles for 32+ rows), ``dequant``
            (dequantize to the activation dtype, then ``torch.matmul``), ``gemm_t`` (the transposed product,
            weight on the 64-row side of Hopper's warp-group instruction, :mod:`.gemm_t`).
        block_m / block_n / block_k: tile sizes (``block_k`` must divide the group size).
        split_k: programs along K (each takes whole groups); > 1 adds a reduction kernel.
        num_warps / num_stages: Triton launch options; for ``gemv`` ``num_stages`` > 1 also pipelines the group
            loop (``tl.range(..., num_stages)``: the next groups' words are copied into shared memory while one
            is computed).
        fused_reduce: (split_k > 1) the last program of each output block adds the partial sums, instead of a
            second kernel.
        prefetch: (GEMV) load a group's scales and zeros before its weights rather than after them.
        maxnreg: cap on registers per thread (``None``: the compiler's choice); more programs fit on a
            multiprocessor, so more loads are in flight, at the risk of spills.
    """

    kind: str
    block_m: int = 16
    block_n: int = 256
    block_k: int = 32
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    fused_reduce: bool = False
    prefetch: bool = False
    maxnreg: int | None = None

    def label(self) -> str:
        """Short form, e.g. ``gemv n256 k16 s8 w4 st1 fused``."""
        m = f" m{self.block_m}" if self.kind.startswith("gemm") else ""
        fused = " fused" if self.fused_reduce and self.split_k > 1 else ""
        fused += " pf" if self.prefetch and self.kind == "gemv" else ""
        fused += f" r{self.maxnreg}" if self.maxnreg else ""
        return (
            f"{self.kind}{m} n{self.block_n} k{self.block_k} s{self.split_k} w{self.num_warps} "
            f"st{self.num_stages}{fused}"
        )


def kernel_options(cfg: KernelConfig) -> dict:
    """The constexpr arguments only one kernel family takes (``gemv``: ``PREFETCH``, ``STAGES``)."""
    return {"PREFETCH": cfg.prefetch, "STAGES": cfg.num_stages} if cfg.kind == "gemv" else {}


def launch_options(cfg: KernelConfig) -> dict:
    """Triton's launch/compile options for ``cfg``: warps, stages and, when set, the register cap."""
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.maxnreg:
        options["maxnreg"] = cfg.maxnreg
    return options


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (8 stands in elsewhere, e.g. under the interpreter)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_for(programs: int, n_groups: int, sms: int, waves: float) -> int:
    """Smallest power-of-two split giving at least ``waves * sms`` programs (at most one group per split)."""
    split = 1
    while programs * split < waves * sms and split * 2 <= n_groups:
        split *= 2
    return split


def _full_wave_split(programs: int, n_groups: int, sms: int, max_waves: int = 4) -> int:
    """The divisor of ``n_groups`` (so every split gets as many groups) whose ``programs * split`` fills its
    last wave of ``sms`` programs best, within ``max_waves`` waves; the smallest such split on a tie."""
    best, best_fill = 1, 0.0
    for split in range(1, n_groups + 1):
        total = programs * split
        if n_groups % split or total > max_waves * sms:
            continue
        fill = total / (-(-total // sms) * sms)
        if fill > best_fill + 1e-9:
            best, best_fill = split, fill
    return best


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def candidates(m: int, n: int, k: int, group: int, sms: int) -> list[KernelConfig]:
    """Configurations worth timing for an ``[m, k] x [k, n]`` product on a device with ``sms`` multiprocessors."""
    n_groups = k // group
    found: list[KernelConfig] = []
    if m <= 4:
        for block_n, block_k, warps in ((128, 32, 4), (256, 16, 4)):
            if block_k > group:
                continue
            programs = triton.cdiv(n, block_n) * m
            splits = sorted({_split_for(programs, n_groups, sms, w) for w in (2, 4, 8)})
            found += [KernelConfig("gemv", 1, block_n, block_k, s, warps, 1, s > 1) for s in splits]
            found += [KernelConfig("gemv", 1, block_n, block_k, s, warps, 1, s > 1, True) for s in splits[:2]]
        found.append(KernelConfig("gemv", 1, 256, min(16, group), splits[-1], 4, 1, False))
        # wider tiles, 8 warps: more bytes per load instruction and per program in flight (H200 call 10)
        for block_n, block_k in ((256, 32), (512, 16), (512, 32)):
            if block_k > group:
                continue
            programs = triton.cdiv(n, block_n) * m
            for s in sorted({_split_for(programs, n_groups, sms, w) for w in (2, 4, 8)}):
                found.append(KernelConfig("gemv", 1, block_n, block_k, s, 8, 1, s > 1))
        # the group loop software-pipelined (num_stages 3-4: the words of the next groups copied asynchronously
        # into shared memory); needs several groups per program, so fewer splits
        for block_n, block_k in ((256, 16), (128, 32)):
            if block_k > group:
                continue
            programs = triton.cdiv(n, block_n) * m
            for s in sorted({_split_for(programs, n_groups, sms, w) for w in (1, 2)}):
                found += [KernelConfig("gemv", 1, block_n, block_k, s, 4, st, s > 1) for st in (3, 4)]
        # gemv_wide: BLOCK_K is the rows one layer of threads covers (4 words per thread along N), so the
        # group's [GROUP, BLOCK_N / 8] load reshapes to [GROUP / BLOCK_K, BLOCK_K, BLOCK_N / 8] in place
        for block_n, warps in ((256, 4), (128, 4), (256, 8)):
            block_k = 32 // (block_n // 32) * warps
            if block_k > group:
                continue
            programs = triton.cdiv(n, block_n) * m
            for s in sorted({_split_for(programs, n_groups, sms, w) for w in (2, 4)}):
                found.append(KernelConfig("gemv_wide", 1, block_n, block_k, s, warps, 1, s > 1))
    if m == 1:  # a GEMM would waste 15 of its 16 MMA rows
        return found
    block_m = max(16, min(64, _next_pow2(m)))
    for block_n, block_k, warps, stages, deep in (
        (128, 64, 4, 3, False),
        (128, 128, 4, 2, False),
        (256, 64, 8, 3, False),
        (256, 128, 8, 2, False),
        # deeper pipelines: more weight bytes in flight per program (8 warps fit one program per SM)
        (256, 64, 8, 5, True),
        (256, 128, 8, 4, True),
    ):
        if block_k > group:
            continue
        programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
        splits = {1, _split_for(programs, n_groups, sms, 1), _split_for(programs, n_groups, sms, 3)}
        splits.add(_full_wave_split(programs, n_groups, sms))
        # split-K reduced by a second kernel, or by the last program of each tile (fused): both for the largest
        # split of the first tiles, fused only for the deeper pipelines (the tuner's compile time is bounded)
        for s in sorted(splits):
            if not deep or s == 1:
                found.append(KernelConfig("gemm", block_m, block_n, block_k, s, warps, stages))
            if s > 1 and (deep or s == max(splits)):
                found.append(KernelConfig("gemm", block_m, block_n, block_k, s, warps, stages, True))
    if block_m == 16:
        # gemm_t: the weight on the 64-row side of a warp-group product (512 columns = 64 per nibble plane); few
        # column blocks, so the splits fill the chip; sm_90: no spills at these two settings (BLOCK_M 32 spills)
        for block_k, stages in ((16, 4), (32, 1)):
            if block_k > group:
                continue
            programs = triton.cdiv(n, 512)
            splits = {_split_for(programs, n_groups, sms, 1), _full_wave_split(programs, n_groups, sms)}
            # split-K by a second kernel: a fused reduction's last program would read split x 16 x 512 x 4 bytes
            # alone (and spills at these settings)
            found += [KernelConfig("gemm_t", 16, 512, block_k, s, 4, stages) for s in sorted(splits)]
    if m >= 32:
        for block_n, block_k, warps, stages in ((64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 2)):
            if block_k > group:
                continue
            programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
            splits = {1, _split_for(programs, n_groups, sms, 1), _split_for(programs, n_groups, sms, 3)}
            found += [
                KernelConfig("gemm_repeat", block_m, block_n, block_k, s, warps, stages)
                for s in sorted(splits)
            ]
    if m >= 16:
        found.append(KernelConfig("dequant", block_n=128, block_k=min(32, group)))
    return found


def default_config(m: int, n: int, k: int, group: int, sms: int) -> KernelConfig:
    """The configuration used without tuning: GEMV for one row, GEMM up to 256 rows, dequantize + cuBLAS above."""
    n_groups = k // group
    if m <= 1:
        block_k = min(16, group)
        split = _split_for(triton.cdiv(n, 256), n_groups, sms, 4)
        return KernelConfig("gemv", 1, 256, block_k, split, 4, 1, split > 1)
    if m <= 256:
        block_m = max(16, min(64, _next_pow2(m)))
        programs = triton.cdiv(n, 128) * triton.cdiv(m, block_m)
        return KernelConfig(
            "gemm", block_m, 128, min(64, group), _split_for(programs, n_groups, sms, 1), 4, 3
        )
    return KernelConfig("dequant", block_n=128, block_k=min(32, group))


_COUNTERS: dict[tuple, torch.Tensor] = {}


def _zeroed_counters(device: torch.device, size: int) -> torch.Tensor:
    """An int32 buffer of at least ``size`` zeros for the fused split-K reduction, one per (device, stream).

    Kernels leave their counters at 0 when they finish, so the buffer is zeroed once, when allocated. Calls on
    one stream run one after another; each stream has its own buffer.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < size:
        buf = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


@on_tensor_device
def launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    cfg: KernelConfig,
) -> torch.Tensor:
    """Run one configuration. ``x``: ``[M, K]`` float16/bfloat16 -> ``[M, N]`` in ``x``'s dtype."""
    m, k = x.shape
    n = scales.shape[1]
    x = x.contiguous()
    if cfg.kind == "dequant":
        w = torch.empty(k, n, device=x.device, dtype=x.dtype)
        grid = (k // cfg.block_k, triton.cdiv(n, cfg.block_n))
        dequant_kernel[grid](
            qweight, qzeros, scales, w, n, n // 8, GROUP=group_size, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n
        )
        out = x @ w
        return out + bias.to(out.dtype) if bias is not None else out
    n_groups = k // group_size
    split = max(1, min(cfg.split_k, n_groups))
    groups_per_split = triton.cdiv(n_groups, split)
    split = triton.cdiv(n_groups, groups_per_split)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    target = torch.empty(split, m, n, device=x.device, dtype=torch.float32) if split > 1 else out
    has_bias = bias is not None
    bias_arg = bias if has_bias else out
    fused = cfg.fused_reduce and split > 1
    if cfg.kind in GEMV_KINDS:
        grid = (triton.cdiv(n, cfg.block_n), split, m)
        counters = _zeroed_counters(x.device, grid[0] * m) if fused else out
        mode = 2 if fused else int(split > 1)
        GEMV_KERNELS[cfg.kind][grid](
            x, qweight, qzeros, scales, out, bias_arg, target, counters, n, n // 8, k, x.stride(0), n, m * n,
            groups_per_split, GROUP=group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=mode,
            HAS_BIAS=has_bias, SPLIT_P2=_next_pow2(split) if fused else 1, **kernel_options(cfg),
            **launch_options(cfg),
        )  # fmt: skip
    elif cfg.kind in GEMM_KERNELS:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        counters = _zeroed_counters(x.device, grid[0]) if fused else out
        mode = 2 if fused else int(split > 1)
        GEMM_KERNELS[cfg.kind][grid](
            x, qweight, qzeros, scales, out, bias_arg, target, counters, m, n, n // 8, k, x.stride(0), n, m * n,
            groups_per_split, GROUP=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            SPLIT=mode, HAS_BIAS=has_bias, IS_BF16=x.dtype == torch.bfloat16, **launch_options(cfg),
        )  # fmt: skip
    else:
        raise ValueError(f"kernel kind {cfg.kind!r} is unknown; allowed: {', '.join(KINDS)}")
    if split > 1 and not fused:
        split_p2 = _next_pow2(split)
        block = max(64, min(1024, 8192 // split_p2))
        splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            target, out, bias_arg, m * n, n, split, HAS_BIAS=has_bias, BLOCK=block, SPLIT_P2=split_p2
        )
    return out


def _bench_ms(fn) -> float:
    from triton.testing import do_bench

    try:
        return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))
    except TypeError:  # older Triton without return_mode
        return float(do_bench(fn, warmup=5, rep=20))


_TUNED: dict[tuple, KernelConfig] = {}


def _bucket(m: int) -> int:
    return _next_pow2(m) if m <= 256 else 1 << 30


def tune(
    x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
    bias: torch.Tensor | None,
) -> tuple[KernelConfig, dict[KernelConfig, float]]:  # fmt: skip
    """Time every candidate on these inputs; returns the fastest and all timings (ms).

    Each candidate's output is first checked against the torch reference (dequantize, then matmul): one that
    fails to compile or run, or whose relative error reaches 1e-2, is left out.
    """
    from ..packing import dequantize_gemm

    m, k = x.shape
    n = scales.shape[1]
    reference = x.float() @ dequantize_gemm(qweight, qzeros, scales, group_size)
    if bias is not None:
        reference += bias.float()
    ref_norm = float(reference.norm()) or 1.0
    timings: dict[KernelConfig, float] = {}
    for cfg in candidates(m, n, k, group_size, sm_count(x.device)):
        try:
            out = launch(x, qweight, qzeros, scales, group_size, bias, cfg)
            if not float((out.float() - reference).norm()) / ref_norm < 1e-2:
                continue
            timings[cfg] = _bench_ms(
                lambda cfg=cfg: launch(x, qweight, qzeros, scales, group_size, bias, cfg)
            )
        except Exception:  # e.g. a tile that needs more shared memory than the device has
            continue
    if not timings:
        raise RuntimeError(f"no W4A16 kernel configuration ran correctly for M={m}, N={n}, K={k}")
    return min(timings, key=timings.get), timings


def _tuned_on_disk_or_now(x, qweight, qzeros, scales, group_size, bias, problem: tuple) -> KernelConfig:
    """The configuration tuned earlier on this device, code and problem (:mod:`.tuning_cache`), or a new
    tuning, stored there."""
    from . import tuning_cache

    versions = f"triton {triton.__version__} torch {torch.__version__}"
    disk_key = tuning_cache.make_key(torch.cuda.get_device_name(x.device), versions, problem)
    config = tuning_cache.load(disk_key, KernelConfig, KINDS)
    if config is None:
        config, _ = tune(x, qweight, qzeros, scales, group_size, bias)
        tuning_cache.store(disk_key, config)
    return config


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """``x [M, K] @ dequant(qweight) [K, N] (+ bias)`` in ``x``'s dtype (float16 or bfloat16), on CUDA or under
    ``TRITON_INTERPRET=1``."""
    m, k = x.shape
    n = scales.shape[1]
    if config is None:
        key = (x.device, _bucket(m), n, k, group_size, x.dtype, bias is not None)
        config = _TUNED.get(key)
        if config is None:
            if os.environ.get("LMCOMPRESS_W4A16_TUNE", "1") == "0" or x.device.type != "cuda":
                config = default_config(m, n, k, group_size, sm_count(x.device))
            else:
                config = _tuned_on_disk_or_now(x, qweight, qzeros, scales, group_size, bias, key[1:])
            _TUNED[key] = config
    if config.kind in GEMV_KINDS and config.block_m != 1:
        config = replace(config, block_m=1)
    return launch(x, qweight, qzeros, scales, group_size, bias, config)
