"""The Triton kernels against the torch reference on CPU, under ``TRITON_INTERPRET=1`` on tiny shapes. Run in a
subprocess so the interpreter setting stays out of this process (the GPU tier runs the same checks compiled)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def test_kernels_match_reference_in_triton_interpreter():
    pytest.importorskip("triton")
    path = os.pathsep.join([str(TESTS.parent / "src"), str(TESTS / "gpu"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, str(TESTS / "gpu" / "kernel_checks.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")
