"""FusedRMSNorm's compiled kernel against transformers' LlamaRMSNorm on CUDA, 8B hidden size, bf16."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lmcompress.fused import FusedRMSNorm

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("rows", [1, 8, 4099])
def test_fused_rmsnorm_matches_llama_on_cuda(rows):
    torch.manual_seed(rows)
    ref = LlamaRMSNorm(4096, eps=1e-5).to("cuda", torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(4096, device="cuda") * 0.5 + 1)
    fused = FusedRMSNorm(ref.weight, 1e-5)
    x = (torch.randn(rows, 4096, device="cuda") * 3).to(torch.bfloat16)
    with torch.no_grad():
        a, b = fused(x), ref(x)
    assert a.dtype == b.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * b.float().abs().clamp_min(1e-3) * 2
    assert int(((a.float() - b.float()).abs() > ulp).sum()) == 0
