"""The W4A16 tuner's results on disk: round trips, stale or broken entries, and one timing per problem."""

from __future__ import annotations

import json

import pytest
import torch

from lmcompress.weights.kernels import dispatch, tuning_cache
from lmcompress.weights.kernels.dispatch import KINDS, KernelConfig


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LMCOMPRESS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LMCOMPRESS_W4A16_TUNE_CACHE", raising=False)
    return tmp_path


def test_store_then_load_gives_the_same_config_and_keeps_other_entries(_cache_dir):
    a = KernelConfig("gemv_wide", 1, 256, 16, 8, 4, 1, True)
    b = KernelConfig("gemm", 16, 256, 64, 4, 8, 5, True, maxnreg=168)
    tuning_cache.store("key-a", a)
    tuning_cache.store("key-b", b)
    assert tuning_cache.load("key-a", KernelConfig, KINDS) == a
    assert tuning_cache.load("key-b", KernelConfig, KINDS) == b
    assert tuning_cache.load("key-c", KernelConfig, KINDS) is None
    on_disk = json.loads((_cache_dir / tuning_cache.FILE_NAME).read_text())
    assert set(on_disk) == {"key-a", "key-b"} and on_disk["key-b"]["maxnreg"] == 168
    assert not [p for p in _cache_dir.iterdir() if p.name.endswith(".tmp")]


def test_turned_off_it_neither_reads_nor_writes(_cache_dir, monkeypatch):
    tuning_cache.store("k", KernelConfig("gemv"))
    monkeypatch.setenv("LMCOMPRESS_W4A16_TUNE_CACHE", "0")
    assert tuning_cache.load("k", KernelConfig, KINDS) is None
    tuning_cache.store("k2", KernelConfig("gemv"))
    assert "k2" not in json.loads((_cache_dir / tuning_cache.FILE_NAME).read_text())


def test_a_malformed_file_is_ignored_with_a_warning_and_replaced(_cache_dir):
    path = _cache_dir / tuning_cache.FILE_NAME
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the W4A16 tuning cache"):
        assert tuning_cache.load("k", KernelConfig, KINDS) is None
    with pytest.warns(UserWarning):
        tuning_cache.store("k", KernelConfig("gemm_t", 16, 512, 16, 16, 4, 4))
    assert tuning_cache.load("k", KernelConfig, KINDS) == KernelConfig("gemm_t", 16, 512, 16, 16, 4, 4)


@pytest.mark.parametrize(
    "entry",
    [
        {"kind": "gemv_v9"},  # a kind this code no longer has
        {"kind": "gemv", "block_q": 3},  # a field it does not know
        ["gemv"],
    ],
)
def test_an_entry_that_is_not_a_valid_config_is_ignored(_cache_dir, entry):
    (_cache_dir / tuning_cache.FILE_NAME).write_text(json.dumps({"k": entry}))
    with pytest.warns(UserWarning, match="ignoring W4A16 tuning cache entry"):
        assert tuning_cache.load("k", KernelConfig, KINDS) is None


def test_the_key_changes_with_device_versions_code_and_problem(monkeypatch):
    base = tuning_cache.make_key("H100", "triton 3.6", (1, 4096, 4096, 128, torch.bfloat16, False))
    assert base != tuning_cache.make_key("H200", "triton 3.6", (1, 4096, 4096, 128, torch.bfloat16, False))
    assert base != tuning_cache.make_key("H100", "triton 3.7", (1, 4096, 4096, 128, torch.bfloat16, False))
    assert base != tuning_cache.make_key("H100", "triton 3.6", (2, 4096, 4096, 128, torch.bfloat16, False))
    monkeypatch.setattr(tuning_cache, "code_hash", lambda: "0" * 16)
    assert base != tuning_cache.make_key("H100", "triton 3.6", (1, 4096, 4096, 128, torch.bfloat16, False))


def test_dispatch_times_a_problem_once_across_processes(monkeypatch):
    """The second 'process' (a fresh in-memory table) finds the result on disk and does not tune again."""
    calls = []
    chosen = KernelConfig("gemv", 1, 128, 32, 16, 4, 1, True)

    def fake_tune(*args):
        calls.append(args)
        return chosen, {chosen: 0.01}

    monkeypatch.setattr(dispatch, "tune", fake_tune)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    problem = (1, 128, 256, 64, x.dtype, False)
    for _ in range(2):
        got = dispatch._tuned_on_disk_or_now(x, None, None, None, 64, None, problem)
        assert got == chosen
    assert len(calls) == 1
    other = (2, 128, 256, 64, x.dtype, False)
    dispatch._tuned_on_disk_or_now(x, None, None, None, 64, None, other)
    assert len(calls) == 2
