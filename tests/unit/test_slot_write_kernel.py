"""The one-kernel static slot write (kv/kernels/slot_write.py) under the Triton interpreter equals the three
index_copy_ writes it replaces, with and without a positions buffer, for strided sources."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import torch
from lmcompress.kv.kernels.slot_write import slot_write
torch.manual_seed(0)
for b, h, cap, d, with_pos in ((1, 8, 40, 128, True), (3, 2, 17, 16, False)):
    kd, vd = torch.randn(b, h, cap, d).to(torch.bfloat16), torch.randn(b, h, cap, d).to(torch.bfloat16)
    pd = torch.randint(0, 100, (b, h, cap), dtype=torch.int32)
    src = torch.randn(b, 1, 2 * h, d).to(torch.bfloat16)   # [B, 1, 2H, D] projection view
    keys, values = src[:, :, :h].transpose(1, 2), src[:, :, h:].transpose(1, 2)  # [B, H, 1, D], strided
    slot, pos = torch.tensor([cap - 3]), torch.tensor([[[1234]]], dtype=torch.int32)
    rk, rv, rp = kd.clone(), vd.clone(), pd.clone()
    rk.index_copy_(2, slot, keys)
    rv.index_copy_(2, slot, values)
    rp.index_copy_(2, slot, pos.expand(b, h, 1))
    slot_write(kd, vd, pd if with_pos else None, slot, pos, keys, values)
    assert torch.equal(kd, rk) and torch.equal(vd, rv)
    assert torch.equal(pd, rp) if with_pos else not torch.equal(pd, rp)
print("ok")
"""


def test_slot_write_kernel_equals_index_copy_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")
