"""Fixtures of the model tier: inference only (no autograd), and the tiny random Llama."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def model(tiny_models):
    """The session's tiny random Llama (``tiny_model("llama")``)."""
    return tiny_models("llama")
