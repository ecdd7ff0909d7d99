"""Shared helpers for the weight-quantization tests: tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch

from lmcompress.models import tiny_model

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3")


def tiny(arch: str, *, seed: int = 0, mha: bool = False) -> torch.nn.Module:
    """A tiny model of ``arch``; ``mha=True`` gives as many KV heads as query heads (so v -> o smoothing applies)."""
    if not mha:
        return tiny_model(arch, seed=seed)
    from transformers import AutoModelForCausalLM

    config = tiny_model(arch, seed=seed).config
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def calibration(n: int = 4, seq: int = 32, seed: int = 1) -> torch.Tensor:
    """``[n, seq]`` random token ids for the tiny models' 256-token vocabulary."""
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run faster on one thread; on a busy 2-core CI machine, two threads spin and crawl."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(7))
