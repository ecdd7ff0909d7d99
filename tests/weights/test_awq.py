"""AWQ search: the grid holds the identity, the best point is kept, salient channels are protected,
clipping never hurts its own objective, and the whole run is deterministic."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, calibration, tiny
from lmcompress._compat import decoder_layers
from lmcompress.weights import AWQConfig, RTNConfig, WQLinear, quantize_
from lmcompress.weights.awq import candidate_scales, channel_abs_mean, collect_inputs, search_scale
from lmcompress.weights.calibration import capture_layer_inputs
from lmcompress.weights.clip import search_clip
from lmcompress.weights.mappings import mapping_for
from lmcompress.weights.quantizer import fake_quantize

pytestmark = pytest.mark.model

FAST = dict(group_size=32, n_grid=5, clip_grid=10)


def _first_layer_inputs(model, n=4, seq=32):
    hidden, kwargs = capture_layer_inputs(model, calibration(n, seq))
    layer = decoder_layers(model)[0]
    inputs, _ = collect_inputs(layer, hidden, kwargs[0], batch=2)
    return layer, inputs, kwargs[0]


def test_grid_starts_at_identity_and_keeps_the_best_point():
    model = tiny("llama")
    layer, inputs, kwargs = _first_layer_inputs(model)
    group = mapping_for(model.config).groups[2]  # post_attention_layernorm -> gate/up, inspected on the MLP
    x = inputs[group.linears[0]]
    config = AWQConfig(group_size=32, n_grid=20)
    scales, alpha, losses = search_scale(layer, group, x, kwargs, config)
    assert len(losses) == 20
    assert torch.equal(candidate_scales(channel_abs_mean(x), None, 0.0), torch.ones(64))
    # alpha = 0 is plain RTN of the group: recompute that loss by hand
    mlp = layer.mlp
    with torch.no_grad():
        reference = mlp(x)
        saved = [mlp.gate_proj.weight.data, mlp.up_proj.weight.data]
        for fc in (mlp.gate_proj, mlp.up_proj):
            fc.weight.data = fake_quantize(fc.weight.data, 4, 32)
        rtn_loss = float((mlp(x) - reference).pow(2).mean())
        mlp.gate_proj.weight.data, mlp.up_proj.weight.data = saved
    assert losses[0] == pytest.approx(rtn_loss, rel=1e-4)
    assert min(losses) == losses[round(alpha * 20)]
    assert torch.equal(scales, candidate_scales(channel_abs_mean(x), None, alpha))
    # the search restored the float weights
    assert torch.equal(mlp.gate_proj.weight.data, saved[0])


def test_scales_are_normalized_and_follow_activation_magnitude():
    x_mean = torch.tensor([0.1, 1.0, 10.0, 100.0])
    s = candidate_scales(x_mean, None, 0.5)
    assert s.max() * s.min() == pytest.approx(1.0)
    assert torch.all(s[1:] > s[:-1])
    duo = candidate_scales(x_mean, torch.tensor([0.5, 0.5, 0.5, 0.5]), 0.5)
    assert torch.allclose(duo, s, rtol=1e-3)  # equal weight magnitudes: the duo form only rescales


def test_clip_search_never_increases_its_objective():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    w[:, 3] *= 8  # an outlier weight per row makes clipping worthwhile
    x = torch.randn(600, 128, generator=gen)
    bounds = search_clip(w, x, bits=4, group_size=32, zero_point=True, grid=20, max_shrink=0.5, n_tokens=512)
    org_max = w.abs().reshape(64, 4, 32).amax(-1)
    assert bounds.shape == (64, 4)
    assert torch.all(bounds <= org_max + 1e-6) and torch.all(bounds >= 0.55 * org_max - 1e-6)
    assert (bounds < org_max).any()  # clipping was chosen somewhere

    def group_err(weight):
        q = fake_quantize(weight, 4, 32)
        xs = x[:: max(1, 600 // 512)].reshape(-1, 4, 32)
        return torch.einsum("tgk,ngk->ntg", xs, (q - w).reshape(64, 4, 32)).pow(2).mean(1)

    clipped = torch.maximum(
        torch.minimum(w.reshape(64, 4, 32), bounds[..., None]), -bounds[..., None]
    ).reshape(64, 128)
    assert torch.all(group_err(clipped) <= group_err(w) * (1 + 1e-5) + 1e-7)


def _salient_model(arch):
    model = tiny(arch)
    with torch.no_grad():  # two input channels 20x larger than the rest: the case AWQ exists for
        model.get_input_embeddings().weight[:, [5, 17]] *= 20
    return model


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
def test_awq_beats_rtn_when_some_channels_are_salient(arch, tokens):
    model = _salient_model(arch)
    with torch.no_grad():
        reference = model(tokens).logits

    def rel_err(config, **kw):
        m = _salient_model(arch)
        quantize_(m, config, progress=False, **kw)
        with torch.no_grad():
            return float((m(tokens).logits - reference).pow(2).mean() / reference.pow(2).mean())

    rtn = rel_err(RTNConfig(group_size=32))
    awq = rel_err(AWQConfig(group_size=32), calibration=calibration(4, 32))
    assert awq < 0.9 * rtn, (awq, rtn)


@pytest.mark.parametrize("arch", ARCHS)
def test_awq_packs_every_decoder_linear(arch, tokens):
    model = tiny(arch)
    with torch.no_grad():
        reference = model(tokens).logits
    report = quantize_(model, AWQConfig(**FAST), calibration=calibration(2, 16), progress=False)
    per_layer = 4 if arch == "phi3" else 7
    assert report.layers == 4 and report.linears == 4 * per_layer
    assert model.config.quantization_config["group_size"] == 32
    for layer in decoder_layers(model):
        assert not any(type(m) is torch.nn.Linear for m in layer.modules())
        assert sum(isinstance(m, WQLinear) for m in layer.modules()) == per_layer
    assert type(model.lm_head) is torch.nn.Linear  # the head stays in full precision
    with torch.no_grad():
        out = model(tokens).logits
    assert torch.isfinite(out).all()
    assert float((out - reference).pow(2).mean() / reference.pow(2).mean()) < 0.5


def test_awq_is_deterministic():
    def run(seed_model):
        m = tiny("qwen3", seed=seed_model)
        quantize_(m, AWQConfig(**FAST), calibration=calibration(2, 16), progress=False)
        return m.state_dict()

    a, b = run(0), run(0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_awq_uses_the_seeded_calibration_text():
    from lmcompress.weights.calibration import calibration_tokens

    class ByteTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode("latin-1", "replace"))}

    tok = ByteTokenizer()
    try:
        a = calibration_tokens(tok, "lee", 4, 64, seed=0)
    except Exception as exc:  # gensim's data files are an install-time dependency
        pytest.skip(f"lee corpus unavailable: {exc}")
    assert a.shape == (4, 64)
    assert torch.equal(a, calibration_tokens(tok, "lee", 4, 64, seed=0))
    assert not torch.equal(a, calibration_tokens(tok, "lee", 4, 64, seed=1))
    from lmcompress.errors import LMCompressError

    with pytest.raises(LMCompressError, match="allowed: calib_samples <="):
        calibration_tokens(tok, "lee-test", 10_000, 512, seed=0)
    with pytest.raises(LMCompressError, match="needs a tokenizer"):
        calibration_tokens(None, "lee", 4, 64, seed=0)


def test_capture_records_every_layer_and_restores_them():
    model = tiny("gemma3")  # sliding and full layers get different masks and rotary tables
    layers_before = list(decoder_layers(model))
    tokens = calibration(3, 24)
    hidden, kwargs = capture_layer_inputs(model, tokens, batch=2)
    assert list(decoder_layers(model)) == layers_before
    assert hidden.shape == (3, 24, 64)
    with torch.no_grad():
        assert torch.equal(hidden, model.get_input_embeddings()(tokens))
    assert len(kwargs) == 4 and all("past_key_values" not in k and "cache" not in k for k in kwargs)
    cos_sliding = kwargs[0]["position_embeddings"][0]
    cos_full = kwargs[3]["position_embeddings"][0]
    assert cos_sliding.shape[0] == 1 and not torch.equal(cos_sliding, cos_full)


def test_start_tokens_prefix_every_block_and_window():
    from lmcompress.weights.calibration import calibration_tokens
    from lmcompress.weights.evaluate import evaluate_lm, start_tokens

    class BosTokenizer:  # adds <bos>=2 by default, like Gemma's
        def __call__(self, text, add_special_tokens=True):
            ids = [3 + (b % 200) for b in text.encode("latin-1", "replace")]
            return {"input_ids": ([2] if add_special_tokens else []) + ids}

    tok = BosTokenizer()
    assert start_tokens(tok) == [2]
    try:
        blocks = calibration_tokens(tok, "lee", 3, 16, seed=0)
    except Exception as exc:
        pytest.skip(f"lee corpus unavailable: {exc}")
    assert blocks.shape == (3, 16) and (blocks[:, 0] == 2).all() and (blocks[:, 1:] != 2).all()
    model = tiny("llama")
    ids = torch.arange(3, 3 + 40)
    quality = evaluate_lm(model, ids, window=11, prefix=[2])
    assert quality.windows == 4 and quality.tokens == 40  # every text token scored, the prefix never
    assert evaluate_lm(model, ids, window=10).tokens == 4 * 9  # no prefix: a window's first token is context
