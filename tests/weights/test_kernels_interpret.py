"""The Triton W4A16 kernels against the dequantize-then-matmul reference, on the CPU under TRITON_INTERPRET=1
(in a subprocess, since the interpreter is chosen when Triton kernels are defined)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_match_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    src = str(HERE.parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, str(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(HERE / "kernel_cases.py")], env=env, capture_output=True, text=True, timeout=600
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == 28, proc.stdout
