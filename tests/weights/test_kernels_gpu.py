"""W4A16 kernels on CUDA: every kernel family against the reference (relative error < 1e-2) for both
activation dtypes, the tuned dispatch, and WQLinear's CUDA path against its CPU path."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import SMALL_CASES, random_problem, relative_error, run_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DTYPES = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SMALL_CASES)
def test_small_cases(case, dtype):
    assert run_case(case, dtype, "cuda") < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 4, 16, 64, 300])
@pytest.mark.parametrize(("n", "k", "group"), [(4096, 4096, 128), (1536, 576, 64), (2048, 14336, 128)])
def test_default_dispatch(m, n, k, group, dtype, monkeypatch):
    from lmcompress.weights.kernels import dispatch

    monkeypatch.setenv("LMCOMPRESS_W4A16_TUNE", "0")
    monkeypatch.setattr(dispatch, "_TUNED", {})
    x, qweight, qzeros, scales, b, reference = random_problem(m, n, k, group, dtype, True, "cuda")
    out = dispatch.w4a16_matmul(x, qweight, qzeros, scales, group, b)
    assert relative_error(out, reference) < 1e-2


@pytest.mark.parametrize("m", [1, 16])
def test_tuner_keeps_a_correct_fast_config(m, monkeypatch):
    from lmcompress.weights.kernels import dispatch

    monkeypatch.setattr(dispatch, "_TUNED", {})
    x, qweight, qzeros, scales, _, reference = random_problem(
        m, 4096, 4096, 128, torch.bfloat16, False, "cuda"
    )
    best, timings = dispatch.tune(x, qweight, qzeros, scales, 128, None)
    assert timings[best] == min(timings.values())
    out = dispatch.w4a16_matmul(x, qweight, qzeros, scales, 128)
    assert relative_error(out, reference) < 1e-2


@pytest.mark.parametrize("kind", ["gemv", "gemv_wide", "gemm", "gemm_t", "gemm_repeat", "dequant"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_candidate_of_a_shape(kind, dtype):
    from lmcompress.weights.kernels.dispatch import candidates, launch, sm_count

    m = 1 if kind.startswith("gemv") else 16 if kind == "gemm_t" else 32
    x, qweight, qzeros, scales, b, reference = random_problem(m, 1024, 2048, 128, dtype, False, "cuda")
    configs = [c for c in candidates(m, 1024, 2048, 128, sm_count(x.device)) if c.kind == kind]
    assert configs
    for cfg in configs:
        assert relative_error(launch(x, qweight, qzeros, scales, 128, b, cfg), reference) < 1e-2, cfg


def test_wqlinear_cuda_matches_cpu():
    from lmcompress.weights import WQLinear
    from lmcompress.weights.quantizer import quantize_weight

    w = torch.randn(512, 1024) * 0.05
    layer = WQLinear.from_quantized(quantize_weight(w, 4, 128), torch.randn(512) * 0.1)
    x = torch.randn(2, 3, 1024)
    cpu = layer(x)
    gpu = layer.cuda()(x.cuda().half()).float().cpu()
    assert relative_error(gpu, cpu) < 1e-2
