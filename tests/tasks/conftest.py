"""Fixtures of the task tests: byte-level tokenizers (plain and chat) that fit the tiny models' 256 ids."""

from __future__ import annotations

import pytest
import torch

from .byte_tokenizer import ByteTokenizer, ChatByteTokenizer


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(params=["base", "chat"])
def tokenizer(request):
    return ByteTokenizer() if request.param == "base" else ChatByteTokenizer()


@pytest.fixture
def base_tokenizer():
    return ByteTokenizer()


@pytest.fixture
def model(tiny_models):
    """The session's tiny random Llama (4096 positions, vocabulary 256)."""
    return tiny_models("llama")
