from __future__ import annotations

import dataclasses

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.errors import LMCompressError, ModelFileError, UnknownNameError
from lmcompress.kv import CompressedCache, KVSpec, scoring_hooks
from lmcompress.kv.evict.base import EvictionPolicy
from lmcompress.models import TINY_ARCHS, load_model, tiny_model

pytestmark = pytest.mark.model


def test_tiny_models_are_deterministic_and_cover_the_architectures():
    assert set(TINY_ARCHS) == {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3"}
    a, b = tiny_model("qwen3", seed=3), tiny_model("qwen3", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    model, tok = load_model("tiny-gemma3")
    assert tok is None and model.config.model_type == "gemma3_text"


def test_local_folder_round_trip(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(str(tmp_path / "m"))
    assert tok is None  # weights-only folder
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_unknown_missing_and_unsupported_models_get_clear_errors(tmp_path):
    with pytest.raises(UnknownNameError, match=r"unknown model 'nope'.*smollm2-135m"):
        load_model("nope")
    with pytest.raises(ModelFileError, match=r"GGUF file .* does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match=r"has no config\.json"):
        load_model(str(tmp_path / "empty"))
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(LMCompressError, match="architecture 'gpt2', which is not supported; supported: llama"):
        load_model(str(tmp_path / "gpt2"))


@dataclasses.dataclass(frozen=True)
class HiddenNorm(EvictionPolicy):
    """Test policy scoring tokens by the norm of their attention input (needs hidden states)."""

    name = "hidden_norm"
    needs_hidden_states = True

    def score(self, inputs):
        h = inputs.hidden_states  # [B, n, hidden]
        assert h.shape[1] == inputs.keys.shape[2]
        return h.norm(dim=-1)[:, None, :].expand(*inputs.keys.shape[:3])


def test_scoring_hooks_hand_hidden_states_to_layers_and_are_removed():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 40))
    spec = KVSpec(evict=HiddenNorm(ratio=0.5))
    cache = CompressedCache(model, spec)
    with pytest.raises(LMCompressError, match="needs the attention inputs"), torch.no_grad():
        model(ids, **cache_kwargs(cache))
    cache = CompressedCache(model, spec)
    attn = model.model.layers[0].self_attn
    with scoring_hooks(model, cache), torch.no_grad():
        assert len(attn._forward_pre_hooks) == 1
        model(ids, **cache_kwargs(cache))
    assert len(attn._forward_pre_hooks) == 0
    assert cache.held_tokens() == [20] * 4
    assert all(layer.hidden_states is None for layer in cache.layers)
