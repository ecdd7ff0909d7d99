"""The split-K slot decode attention (kv/kernels/slot_attention.py) under the Triton interpreter: equal to a
float64 masked-attention reference within 16-bit tolerance (fp16 inputs: the interpreter mis-handles bf16 dots;
bf16 is checked on the GPU, tests/gpu/test_slot_attention_gpu.py), for GQA groups of 1-4, several split counts (chunks
past the length included), lengths from 1 to the capacity; every output element written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import math, torch
from lmcompress.kv.kernels.slot_attention import plan_splits, slot_attention
torch.manual_seed(0)
cases = [(1, 8, 2, 200, 16, 137, None), (2, 4, 4, 96, 32, 96, (3, 64)), (1, 2, 2, 130, 16, 1, (5, 64)),
         (1, 3, 1, 64, 16, 40, None)]
for b, hq, hkv, cap, d, length, splits in cases:
    q = torch.randn(b, hq, 1, d).to(torch.float16)
    k = torch.randn(b, hkv, cap, d).to(torch.float16)
    v = torch.randn(b, hkv, cap, d).to(torch.float16)
    k[:, :, length:] = float("nan")  # slots past the length must never be read into the result
    v[:, :, length:] = float("nan")
    scale = 1 / math.sqrt(d)
    out = slot_attention(q, k, v, torch.tensor([length]), scale, splits)
    g = hq // hkv
    kk = k[:, :, :length].double().repeat_interleave(g, 1)
    vv = v[:, :, :length].double().repeat_interleave(g, 1)
    ref = ((q.double() @ kk.transpose(-1, -2)) * scale).softmax(-1) @ vv
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.shape == (b, hq, 1, d) and out.dtype == torch.float16
    assert torch.isfinite(out).all(), (b, hq, hkv, cap, length)
    assert err < 1e-2, (err, b, hq, hkv, cap, length, splits)
    print(b, hq, hkv, cap, length, splits or plan_splits(b * hkv, cap), f"{err:.2e}")
print("ok")
"""


def test_slot_attention_kernel_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
