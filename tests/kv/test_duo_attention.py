"""DuoAttention: the calibrated head scores against an independent re-computation (Llama: q/k projections and
RoPE rebuilt by hand), exact kept positions of streaming and retrieval heads, the calibration file round trip
and its clear errors (missing, not JSON, wrong kind, made for another model)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lmcompress._compat import cache_kwargs
from lmcompress.errors import LMCompressError
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.kv.evict import DuoAttention
from lmcompress.kv.evict.calibration_files import model_identity, save_calibration
from lmcompress.kv.evict.duo_calibration import KIND, head_scores
from lmcompress.models import tiny_model

pytestmark = pytest.mark.model


def _samples(k: int = 2, n: int = 30) -> list[torch.Tensor]:
    torch.manual_seed(3)
    return [torch.randint(3, 256, (1, n)) for _ in range(k)]


def test_head_scores_match_independent_computation():
    model = tiny_model("llama")
    cfg = model.config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q_len = 40
    expected = torch.zeros(cfg.num_hidden_layers, hkv, dtype=torch.float64)
    samples = _samples()
    for ids in samples:
        seen = {}

        def hook(mod, args, kwargs, _seen=seen):
            _seen[mod.layer_idx] = kwargs["hidden_states"]

        handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
        with torch.no_grad():
            model(ids)
            for h in handles:
                h.remove()
            pos = torch.arange(q_len)[None]
            for li, layer in enumerate(model.model.layers):
                h = seen[li]
                q = layer.self_attn.q_proj(h).view(1, -1, hq, d).mean(1, keepdim=True).expand(1, q_len, hq, d)
                k = layer.self_attn.k_proj(h).view(1, -1, hkv, d).mean(1, keepdim=True).expand(1, q_len, hkv, d)
                cos, sin = model.model.rotary_emb(h, pos)
                q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
                k = k.repeat_interleave(hq // hkv, dim=1)
                attn = (q[:, :, -1:] @ k.transpose(2, 3) / d ** 0.5).softmax(-1)[0, :, 0]  # [Hq, q_len]
                expected[li] += attn.cumsum(-1).mean(-1).view(hkv, -1).mean(-1).double() / len(samples)
    torch.testing.assert_close(head_scores(model, samples, q_len), expected, rtol=1e-5, atol=1e-6)


def write_pattern(path, model, scores, sink=4, recent=8):
    return save_calibration(path, KIND, model_identity(model),
                            {"scores": scores, "sink_size": sink, "recent_size": recent})


def test_streaming_heads_keep_sinks_and_recent_exactly(tmp_path):
    model = tiny_model("llama")  # 4 layers x 2 KV heads
    scores = [[0.9, 0.1], [0.2, 0.8], [0.7, 0.6], [0.3, 0.95]]
    path = write_pattern(tmp_path / "p.json", model, scores)
    policy = DuoAttention(pattern=str(path), ratio=0.5)  # the 4 lowest: 0.1, 0.2, 0.3, 0.6
    assert policy.streaming_heads.tolist() == [[False, True], [True, False], [False, True], [True, False]]
    cache = CompressedCache(model, KVSpec(evict=policy))
    n = 40
    with torch.no_grad():
        model(torch.randint(3, 256, (1, n)), **cache_kwargs(cache), use_cache=True)
    streaming = set(range(4)) | set(range(n - 8, n))
    for li, layer in enumerate(cache.layers):
        for h in range(2):
            kept = {p for p in layer.positions()[0, h].tolist() if p >= 0}
            assert kept == (streaming if policy.streaming_heads[li, h] else set(range(n)))
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())
    assert sum(int(layer.held_per_head().sum()) for layer in cache.layers) == 4 * n + 4 * 12
    # the file's sizes can be overridden
    wide = DuoAttention(pattern=str(path), ratio=0.25, sink_size=2, recent_size=3)
    assert wide.sizes == (2, 3) and int(wide.streaming_heads.sum()) == 2


def test_calibration_file_errors(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(LMCompressError, match="needs a calibration file"):
        DuoAttention()
    with pytest.raises(LMCompressError, match="does not exist"):
        DuoAttention(pattern=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LMCompressError, match="is not valid JSON"):
        DuoAttention(pattern=str(tmp_path / "bad.json"))
    (tmp_path / "other.json").write_text(json.dumps({"kind": "kvzap_surrogate"}))
    with pytest.raises(LMCompressError, match="is not a duo_attention_pattern file"):
        DuoAttention(pattern=str(tmp_path / "other.json"))
    path = write_pattern(tmp_path / "p.json", model, [[0.1, 0.2]] * 4)
    other = tiny_model("llama", seed=1)  # same architecture, other weights
    cache = CompressedCache(other, KVSpec(evict=DuoAttention(pattern=str(path), ratio=0.5)))
    with pytest.raises(LMCompressError, match="made for another model"), torch.no_grad():
        other(torch.randint(3, 256, (1, 20)), **cache_kwargs(cache), use_cache=True)
    gemma = tiny_model("gemma3")
    cache = CompressedCache(gemma, KVSpec(evict=DuoAttention(pattern=str(path), ratio=0.5)))
    with pytest.raises(LMCompressError, match="another model"), torch.no_grad():
        gemma(torch.randint(3, 256, (1, 20)), **cache_kwargs(cache), use_cache=True)
    for bad in ({"ratio": 1.0}, {"ratio": "x"}, {"sink_size": -1}, {"budget": 5}):
        with pytest.raises(LMCompressError):
            DuoAttention(pattern=str(path), **bad)
