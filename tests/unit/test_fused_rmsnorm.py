"""FusedRMSNorm: the Triton kernel (under the interpreter, in a subprocess) against transformers' LlamaRMSNorm;
the swap replaces exactly the Llama-family norms and keeps logits; the static decode path over a fused model
gives the eager path's tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.fused import FusedRMSNorm, fuse_rmsnorm
from lmcompress.models import tiny_model

ROOT = Path(__file__).resolve().parents[2]

KERNEL_CHECK = r"""
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from lmcompress.fused import FusedRMSNorm
torch.manual_seed(0)
for hidden, rows, dtype in ((64, 5, torch.bfloat16), (96, 3, torch.float16), (48, 4, torch.float32)):
    ref = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(hidden) * 0.5 + 1)
    fused = FusedRMSNorm(ref.weight, 1e-5)
    x = (torch.randn(rows, 2, hidden) * 3).to(dtype)
    a, b = fused(x), ref(x)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape)
    ulp = torch.finfo(dtype).eps * b.abs().clamp_min(1e-3) * 2
    bad = int(((a.float() - b.float()).abs() > ulp.float() + 1e-6).sum())
    assert bad == 0, (hidden, dtype, bad)
    strided = x.transpose(0, 1)  # rows not contiguous
    assert torch.allclose(fused(strided).float(), ref(strided).float(), atol=float(ulp.max()))
print("ok")
"""


def test_kernel_matches_llama_rmsnorm_in_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.parametrize(("arch", "expected"), [("llama", 9), ("qwen3", 17), ("gemma3", 0)])
def test_swap_replaces_llama_family_norms_and_keeps_logits(arch, expected):
    model = tiny_model(arch)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        assert fuse_rmsnorm(model) == expected
        after = model(ids).logits
    assert sum(isinstance(m, FusedRMSNorm) for m in model.modules()) == expected
    assert torch.equal(before, after)  # CPU: the same torch arithmetic
    assert fuse_rmsnorm(model) == 0  # already fused


def test_static_decode_over_a_fused_model_matches_eager():
    from lmcompress.eval.graph_decode import StaticDecoder
    from lmcompress.kv import CompressedCache, KVSpec, SnapKV

    model = tiny_model("llama")
    fuse_rmsnorm(model)
    spec = KVSpec(evict=SnapKV(ratio=0.875, window_size=8))
    prompt = torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dyn, sta = CompressedCache(model, spec), CompressedCache(model, spec)
        tok = model(prompt, **cache_kwargs(dyn)).logits[:, -1].argmax(-1, keepdim=True)
        model(prompt, **cache_kwargs(sta))
        dec = StaticDecoder(model, sta, 32)
        dec.start(int(tok), 64)
        static = dec.generate(32)
        dec.close()
        eager = []
        for _ in range(32):
            tok = model(tok, **cache_kwargs(dyn)).logits[:, -1].argmax(-1, keepdim=True)
            eager.append(int(tok))
    assert static == eager
