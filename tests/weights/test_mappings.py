"""The architecture table: coverage, unsupported architectures, and smoothing that leaves the float model's
function unchanged for every architecture (Gemma's (1 + weight) RMSNorm and Phi-3's fused projections included)."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, tiny
from lmcompress._compat import decoder_layers
from lmcompress.errors import LMCompressError
from lmcompress.weights.mappings import AWQ_MAPPINGS, mapping_for, supported_architectures
from lmcompress.weights.quantize import layer_linears
from lmcompress.weights.smooth import apply_group_scale, group_applies, group_modules

pytestmark = pytest.mark.model


@pytest.mark.parametrize("arch", ARCHS)
def test_every_group_resolves_and_covers_the_layer(arch):
    model = tiny(arch)
    mapping = mapping_for(model.config)
    layer = decoder_layers(model)[0]
    scaled = set()
    for group in mapping.groups:
        prev, linears = group_modules(layer, group)
        assert prev is not None and linears
        scaled.update(group.linears)
        if group.inspect:
            assert layer.get_submodule(group.inspect) is not None
    # every linear of the layer is scaled by some group (o_proj only when shapes allow)
    assert set(layer_linears(layer)) == scaled
    assert set(mapping.no_clip) <= scaled


def test_unknown_architecture_lists_supported():
    from transformers import GPT2Config

    with pytest.raises(LMCompressError) as err:
        mapping_for(GPT2Config())
    message = str(err.value)
    assert "'gpt2'" in message
    for arch in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"):
        assert arch in message
    assert set(supported_architectures()) == set(AWQ_MAPPINGS)


def _random_scales(n: int, seed: int) -> torch.Tensor:
    return torch.exp(torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.5)


@pytest.mark.parametrize("mha", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_smoothing_leaves_the_float_model_unchanged(arch, mha, tokens):
    model = tiny(arch, mha=mha)
    mapping = mapping_for(model.config)
    with torch.no_grad():
        for p in model.parameters():  # make norms non-trivial so a wrong norm rule shows
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        before = model(tokens).logits
        applied = 0
        for i, layer in enumerate(decoder_layers(model)):
            for j, group in enumerate(mapping.groups):
                if not group_applies(layer, group, model.config):
                    continue
                width = group_modules(layer, group)[1][0].in_features
                apply_group_scale(layer, group, _random_scales(width, 100 * i + j), mapping, model.config)
                applied += 1
        after = model(tokens).logits
    expected = 4 * len(mapping.groups) if mha else 4 * (len(mapping.groups) - 1)
    assert applied == expected  # with GQA, the v -> o group is skipped (shapes do not allow it)
    assert torch.allclose(after, before, atol=2e-4, rtol=1e-4), (after - before).abs().max()


def test_wrong_norm_rule_would_be_caught(tokens):
    """Control: treating Gemma's norm like Llama's (no +1 offset) changes the output, so the test above can fail."""
    from dataclasses import replace

    model = tiny("gemma3")
    mapping = replace(mapping_for(model.config), norm_offset=0.0)
    layer = decoder_layers(model)[0]
    with torch.no_grad():
        before = model(tokens).logits
        group = mapping.groups[0]
        apply_group_scale(layer, group, _random_scales(64, 0), mapping, model.config)
        after = model(tokens).logits
    assert not torch.allclose(after, before, atol=1e-3)
