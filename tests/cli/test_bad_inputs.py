"""Bad inputs through the CLI (issue 9, item 5; the --out/--store cases are in test_bad_store_inputs.py).

Each case of the issue runs ``python -m lmcompress.cli`` in a subprocess and asserts exit status 2, exactly one
line on stderr naming the bad value and what is allowed, and no traceback. Variants of a case run the same
checks in-process through ``lmcompress.cli.main`` (a subprocess costs seconds of imports). Every case is caught
before a model loads: no result store or output folder appears, and the bad model files are never loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "lmcompress.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def check_one_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def run_main(*args: str) -> subprocess.CompletedProcess:
    """The same as :func:`run_cli`, in this process (exceptions other than bad input propagate to pytest)."""
    import contextlib
    import io

    from lmcompress.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = exc.code
    return subprocess.CompletedProcess(list(args), code, "", err.getvalue())


def bench(tmp_path: Path, *args: str, subprocess_run: bool = True) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    argv = ("bench", "--model", "tiny-llama", "--lengths", "64", "--depths", "0.5", "--no-ppl", "--quiet",
            "--out", str(out), *args)
    result = run_cli(*argv, cwd=tmp_path) if subprocess_run else run_main(*argv)
    assert not (out / "results.sqlite").exists()  # rejected before the store opened, so before any model
    return result


# ------------------------------------------------------------------------------------------------ devices


@pytest.mark.parametrize(("device", "fragments"), [
    ("tpu", ("--device='tpu'", "allowed: cpu, cuda, cuda:N")),
    ("cuda", ("--device='cuda'", "no CUDA GPU", "allowed: cpu")),  # the subprocess hides any GPU
])
def test_bench_unknown_or_unavailable_device(tmp_path, device, fragments):
    check_one_line(bench(tmp_path, "--device", device), *fragments)


def test_device_variants(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # (in this process: no GPU either)
    check_one_line(bench(tmp_path, "--device", "cuda:3", subprocess_run=False), "--device='cuda:3'", "allowed: cpu")
    check_one_line(bench(tmp_path, "--executor", "local", "--devices", "cpu,tpu", subprocess_run=False),
                   "--devices='tpu'", "allowed")
    out = tmp_path / "ckpt"
    result = run_main("awq", "quantize", "tiny-llama", str(out), "--group-size", "32", "--device", "tpu", "--quiet")
    check_one_line(result, "--device='tpu'", "allowed")
    assert not out.exists()
    result = run_main("awq", "eval", str(tmp_path), "--device", "xla")
    check_one_line(result, "--device='xla'", "allowed")


# ------------------------------------------------------------------------------------------------ model files


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory) -> Path:
    """A real (small) Hugging Face model folder: tiny-llama saved with save_pretrained."""
    from lmcompress.models import tiny_model

    folder = tmp_path_factory.mktemp("real") / "tiny"
    tiny_model("llama").save_pretrained(folder)
    return folder


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_safetensors(tmp_path, real_folder):
    folder = _copy_folder(real_folder, tmp_path / "trunc")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    check_one_line(bench(tmp_path, "--model", str(folder)), "model.safetensors", "truncated")


def test_garbage_safetensors(tmp_path, real_folder):
    folder = _copy_folder(real_folder, tmp_path / "garbage")
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    check_one_line(bench(tmp_path, "--model", str(folder)), "model.safetensors", "corrupt")


@pytest.fixture(scope="module")
def gguf_head(tmp_path_factory) -> Path:
    """The first 3 MB of the embedded SmolLM2 GGUF file (its whole header and the start of its tensors)."""
    from lmcompress.models import embedded_model_path

    try:
        path = embedded_model_path("smollm2-135m")
    except Exception as exc:  # pragma: no cover - the package is part of the dev set-up
        pytest.skip(f"embedded model unavailable: {exc}")
    out = tmp_path_factory.mktemp("gguf") / "truncated.gguf"
    with path.open("rb") as f:
        out.write_bytes(f.read(3 << 20))
    return out


def test_truncated_gguf(tmp_path, gguf_head):
    check_one_line(bench(tmp_path, "--model", str(gguf_head)), "truncated.gguf", "truncated", "re-download")


def test_gguf_with_a_truncated_header(tmp_path, gguf_head):
    short = tmp_path / "short.gguf"
    short.write_bytes(gguf_head.read_bytes()[:100_000])  # ends inside the tokenizer metadata
    check_one_line(bench(tmp_path, "--model", str(short), subprocess_run=False), "short.gguf", "truncated")


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(os.urandom(4096))
    check_one_line(bench(tmp_path, "--model", str(bad)), "garbage.gguf", "not a GGUF file")


def test_awq_quantize_checks_model_files_first(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    out = tmp_path / "ckpt"
    check_one_line(run_main("awq", "quantize", str(bad), str(out), "--device", "cpu", "--quiet"), "garbage.gguf")
    assert not out.exists()


def test_awq_eval_of_a_truncated_checkpoint(tmp_path):
    from lmcompress.weights.cli import main as awq_main

    out = tmp_path / "ckpt"
    assert awq_main(["awq", "quantize", "tiny-llama", str(out), "--method", "rtn", "--group-size", "32",
                     "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    check_one_line(run_main("awq", "eval", str(out), "--device", "cpu"), "model.safetensors", "truncated")


# ------------------------------------------------------------------------------------------------ awq


def test_awq_output_that_is_a_file(tmp_path):
    target = tmp_path / "taken.txt"
    target.write_text("keep me\n")
    result = run_cli("awq", "quantize", "tiny-llama", str(target), "--group-size", "32", "--quiet",
                     cwd=tmp_path)
    check_one_line(result, "taken.txt", "is a file", "allowed")
    assert target.read_text() == "keep me\n"


def test_awq_group_size_that_does_not_divide_the_widths(tmp_path):
    out = tmp_path / "ckpt"
    result = run_cli("awq", "quantize", "tiny-llama", str(out), "--group-size", "128", "--device", "cpu",
                     "--quiet", cwd=tmp_path)
    check_one_line(result, "--group-size=128", "hidden_size=64", "allowed for this model: 32, 64")
    assert not out.exists()


def test_awq_group_size_read_from_gguf_metadata(tmp_path):
    """SmolLM2 (hidden 576) with the default group size 128: refused from the GGUF header, before loading."""
    out = tmp_path / "ckpt"
    result = run_main("awq", "quantize", "smollm2-135m", str(out), "--device", "cpu", "--quiet")
    check_one_line(result, "--group-size=128", "hidden_size=576", "allowed for this model: 32, 64")
    assert not out.exists()


def test_awq_eval_window_of_zero(tmp_path):
    (tmp_path / "ckpt").mkdir()
    result = run_cli("awq", "eval", str(tmp_path / "ckpt"), "--window", "0", "--device", "cpu", cwd=tmp_path)
    check_one_line(result, "--window=0", "integer >= 2")


@pytest.mark.parametrize("window", ["1", "-5"])
def test_awq_eval_window_variants(tmp_path, window):
    result = run_main("awq", "eval", str(tmp_path), "--window", window, "--device", "cpu")
    check_one_line(result, f"--window={window}", "integer >= 2")


# ------------------------------------------------------------------------------------------------ methods


def test_ratio_without_an_eviction_method(tmp_path):
    result = bench(tmp_path, "--methods", "none,int4", "--ratios", "0.5")
    check_one_line(result, "--ratios=0.5", "no effect", "allowed")


def test_ratio_when_every_eviction_method_sets_its_own(tmp_path):
    result = bench(tmp_path, "--methods", "snapkv:ratio=0.3", "--ratios", "0.5", subprocess_run=False)
    check_one_line(result, "--ratios=0.5", "no effect")


def test_empty_part_of_a_method(tmp_path):
    check_one_line(bench(tmp_path, "--methods", "snapkv+"), "'snapkv+'", "the part after '+' is empty", "allowed")


@pytest.mark.parametrize(("method", "where"), [("+int4", "before"), ("snapkv++int4", "after")])
def test_empty_part_variants(tmp_path, method, where):
    result = bench(tmp_path, "--methods", method, subprocess_run=False)
    check_one_line(result, repr(method), f"the part {where} '+' is empty", "allowed")
