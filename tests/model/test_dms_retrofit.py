"""DMS retrofitting on a tiny model: the evicted fraction follows the rising target, the output folder is a
normal checkpoint with the DMS keys that the inference mechanism loads and runs, and a run interrupted after a
saved step resumes from it and ends where an uninterrupted run ends."""

from __future__ import annotations

import json

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, KVSpec, scoring_hooks
from lmcompress.kv.evict import DMS
from lmcompress.kv.evict.dms_load import load_dms_model
from lmcompress.kv.evict.dms_retrofit import STATE_FILE, RetrofitOptions, retrofit


@pytest.fixture(autouse=True)
def _grad():  # the model tier disables autograd; training needs it
    with torch.enable_grad():
        yield


def options(**kw):
    base = dict(ratio=4.0, steps=6, seq_len=48, lr=0.05, window_size=4, alpha_scale=1.0,
                initial_alpha_offset=2.0, save_every=2, seed=3, aux_weight=5.0)
    return RetrofitOptions(**{**base, **kw})


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("separate", [False, True])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, separate):
    opts = options(separate_alpha=separate)
    full = retrofit("tiny-qwen3", tmp_path / "full", opts, progress=False)
    assert full["steps"] == 6 and full["resumed_from"] == 0 and full["tokens"] == 6 * 48

    def stop(step, record):
        if step == 3:  # after the step-2 save, before the step-4 save
            raise Interrupt

    with pytest.raises(Interrupt):
        retrofit("tiny-qwen3", tmp_path / "cut", opts, progress=False, on_step=stop)
    assert torch.load(tmp_path / "cut" / STATE_FILE, weights_only=False)["step"] == 2
    resumed = retrofit("tiny-qwen3", tmp_path / "cut", opts, progress=False)
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 6
    a, _, _ = load_dms_model(tmp_path / "full")
    b, _, _ = load_dms_model(tmp_path / "cut")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, msg=name)
    hist_a = torch.load(tmp_path / "full" / STATE_FILE, weights_only=False)["history"]
    hist_b = torch.load(tmp_path / "cut" / STATE_FILE, weights_only=False)["history"]
    assert [r["loss"] for r in hist_a] == pytest.approx([r["loss"] for r in hist_b])


def test_only_decision_rows_change_and_checkpoint_runs(tmp_path):
    from lmcompress.models import tiny_model

    out = tmp_path / "dms"
    retrofit("tiny-llama", out, options(steps=8), progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["dms_window_size"] == 4 and config["dms_initial_alpha_offset"] == 2.0
    model, _, settings = load_dms_model(out)
    assert settings.window_size == 4
    base = tiny_model("llama")
    d, groups = 16, 2
    rows = {g * groups * d + d - 1 for g in range(2)}
    for (name, p), (_, q) in zip(model.state_dict().items(), base.state_dict().items()):
        if name.endswith("q_proj.weight"):
            changed = {i for i in range(p.shape[0]) if not torch.equal(p[i], q[i])}
            assert changed == rows, name
        else:
            assert torch.equal(p, q), name
    hist = torch.load(out / STATE_FILE, weights_only=False)["history"]
    assert hist[-1]["target"] == pytest.approx(0.75)
    assert [r["target"] for r in hist] == sorted(r["target"] for r in hist)
    assert hist[-1]["evicted"] > hist[0]["evicted"]  # decisions moved towards the target
    cache = CompressedCache(model, KVSpec(evict=DMS()))
    with torch.no_grad(), scoring_hooks(model, cache):
        out_logits = model(torch.arange(64)[None] % 256, **cache_kwargs(cache)).logits
    assert torch.isfinite(out_logits).all()


def test_resume_with_other_options_is_refused(tmp_path):
    from lmcompress.errors import LMCompressError

    retrofit("tiny-llama", tmp_path / "o", options(steps=2), progress=False)
    with pytest.raises(LMCompressError, match="other options"):
        retrofit("tiny-llama", tmp_path / "o", options(steps=4, window_size=8), progress=False)


def test_killed_process_resumes_from_its_last_saved_step(tmp_path):
    """A real kill (SIGKILL) of `lmcompress dms retrofit` after a checkpoint; the second run resumes there."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "lmcompress.cli", "dms", "retrofit", "tiny-llama", str(out), "--quiet",
            "--steps", "400", "--seq-len", "32", "--save-every", "2", "--window", "4", "--alpha-offset", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not (out / STATE_FILE).is_file():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = torch.load(out / STATE_FILE, weights_only=False)["step"]
    assert 2 <= saved < 400 and saved % 2 == 0
    argv[argv.index("400")] = str(saved + 2)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == saved and summary["steps"] == saved + 2
