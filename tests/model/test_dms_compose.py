"""DMS composed with KV quantization and with 4-bit weights, on tiny models.

* ``dms+int4`` (``parse_method``): the tokens DMS keeps are stored packed, and ``nbytes`` is exactly their packed
  bytes (4-bit codes two per byte, an fp16 scale and zero per group, int32 positions, float32 marks), counted here
  from the held tokens per head;
* a DMS checkpoint quantized to 4-bit weights (RTN) and saved: the ``dms_*`` keys survive in ``config.json``, the
  separate-alpha projection stays in float and is loaded back, and the decisions still apply: layer 0's held
  tokens match the marks computed by hand from the 4-bit model's own decision logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, scoring_hooks
from lmcompress.kv.evict.dms_hooks import attach_separate_alpha
from lmcompress.kv.parse import parse_method
from lmcompress.models import load_model, tiny_model

pytestmark = pytest.mark.model

WINDOW, SCALE, OFFSET = 3, 1.5, 0.25
D, LAYERS, KV_HEADS, HQ = 16, 4, 2, 4


def dms_model(arch: str = "llama", *, separate: bool = False, seed: int = 0):
    """A tiny model with DMS keys and hand-set decision weights (about half the decisions positive)."""
    model = tiny_model(arch, seed=seed)
    model.config.update({"dms_window_size": WINDOW, "dms_alpha_scale": SCALE, "dms_initial_alpha_offset": OFFSET,
                         "dms_separate_alpha": separate, "dms_alpha_per": "head"})
    g = torch.Generator().manual_seed(seed + 1)
    hidden = model.config.hidden_size
    with torch.no_grad():
        if separate:
            for attn in attach_separate_alpha(model):
                attn.dms_proj_alpha.weight.copy_(torch.randn(KV_HEADS, hidden, generator=g))
        else:
            for layer in model.model.layers:
                for h in range(0, HQ, HQ // KV_HEADS):
                    layer.self_attn.q_proj.weight[h * D + D - 1] = 3 * torch.randn(hidden, generator=g)
    return model


def prefill(model, spec_text: str, ids: torch.Tensor) -> CompressedCache:
    cache = CompressedCache(model, parse_method(spec_text))
    with torch.no_grad(), scoring_hooks(model, cache):
        model(ids, **cache_kwargs(cache))
    return cache


@pytest.mark.parametrize("bits", [4, 2])
def test_dms_plus_int_stores_kept_tokens_packed_and_counts_packed_bytes(bits):
    model = dms_model()
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(5))
    cache = prefill(model, f"dms+int{bits}:group_size=16", ids)
    plain = prefill(model, "dms", ids)
    held = [c[0] for c in cache.held_per_head()]  # per layer [Hkv]
    assert [h.tolist() for h in held] == [c[0].tolist() for c in plain.held_per_head()]  # same decisions
    total = int(sum(h.sum() for h in held))
    assert 0 < total < LAYERS * KV_HEADS * 96  # tokens were released
    # per held token and head: keys and values as D*bits/8 bytes of codes + an fp16 scale and zero per 16
    # channels, one int32 position and one float32 mark
    per_token = 2 * (D * bits // 8 + (D // 16) * 2 * 2) + 4 + 4
    # plus each (layer, head) segment's empty full-precision staging slots for the next tokens (fp32 K and V)
    segments = [seg for layer in cache.layers for seg in layer.segments]
    assert all(seg.fp_length == 0 for seg in segments)
    staging = sum(seg.fp_k.capacity + seg.fp_v.capacity for seg in segments) * D * 4
    assert staging <= len(segments) * 2 * D * 4 * 2  # at most two slots each
    assert cache.nbytes == total * per_token + staging
    assert plain.nbytes == total * (2 * D * 4 + 4 + 4)
    for layer in cache.layers:
        for seg in layer.segments:
            codes = [t for t in seg.store.parts("keys").values() if t.dtype == torch.uint8]
            assert codes and all(t.shape[-1] == D * bits // 8 for t in codes)  # packed, not one code per byte


def layer0_expected_held(model, ids: torch.Tensor, separate: bool) -> list[int]:
    """Held tokens per KV head of layer 0 after a prefill of ``ids``, from decision logits computed by hand
    from the (4-bit) model's own modules: the input of layer 0 is the embedding, whatever DMS does."""
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        emb = model.model.embed_tokens(ids)  # [1, n, hidden]
        if separate:
            x = attn.dms_proj_alpha(attn.dms_proj_alpha_norm(emb))[0]  # [n, Hkv]
        else:
            q = attn.q_proj(model.model.layers[0].input_layernorm(emb))[0].view(ids.shape[1], HQ, D)
            x = q[:, :: HQ // KV_HEADS, D - 1]  # [n, Hkv]
    logits = x.float() * SCALE - OFFSET
    n = ids.shape[1]
    held = []
    for h in range(KV_HEADS):
        marked = [bool(logits[j + 1, h] > 0) if j + 1 < n else False for j in range(n)]  # t's decision marks t-1
        held.append(sum(1 for j in range(n) if not (marked[j] and j <= n - 1 - WINDOW)))
    return held


@pytest.mark.parametrize("separate", [False, True])
def test_dms_checkpoint_with_4bit_weights_keeps_its_keys_and_decisions(tmp_path, separate):
    from lmcompress.weights import RTNConfig, WQLinear, quantize_, save_quantized

    model = dms_model(separate=separate)
    quantize_(model, RTNConfig(group_size=32), progress=False)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, WQLinear)
    if separate:  # the decision projection is not a model weight: it stays in float
        assert type(attn.dms_proj_alpha) is torch.nn.Linear
    folder = save_quantized(model, tmp_path / "dms4")
    config = json.loads((folder / "config.json").read_text())
    assert config["dms_window_size"] == WINDOW and config["dms_separate_alpha"] is separate
    assert config["quantization_config"]["bits"] == 4

    loaded, _ = load_model(str(folder))
    lattn = loaded.model.layers[0].self_attn
    assert isinstance(lattn.q_proj, WQLinear)
    if separate:
        torch.testing.assert_close(lattn.dms_proj_alpha.weight, attn.dms_proj_alpha.weight)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(9))
    cache = prefill(loaded, "dms", ids)
    got = cache.held_per_head()[0][0].tolist()
    assert got == layer0_expected_held(loaded, ids, separate)
    assert all(h < 64 for h in got)  # decisions evicted tokens
    float_held = layer0_expected_held(dms_model(separate=separate), ids, separate)
    assert sum(abs(a - b) for a, b in zip(got, float_held)) <= 4  # 4-bit q_proj: (almost) the float decisions


class ByteTokenizer:
    """A stand-in tokenizer for the tiny models (vocab 256): one token per UTF-8 byte."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.tensor([list(text.encode("utf-8"))], dtype=torch.long) % 256)


def test_perplexity_task_runs_dms_on_the_scored_tokens_too():
    """The perplexity protocol (compressed prefix, then scored chunks with compression paused) runs DMS's decision
    hooks in both phases: it used to fail in the scored chunks ("dms needs its decision hooks")."""
    from lmcompress.eval.tasks.base import RunContext
    from lmcompress.eval.tasks.perplexity import Perplexity

    model = dms_model()
    task = Perplexity(context_tokens=96, eval_tokens=32, chunk=16)
    dms = task.run(RunContext(model, ByteTokenizer(), parse_method("dms")))
    none = task.run(RunContext(model, ByteTokenizer(), parse_method("none")))
    assert 1.0 < dms.metrics["perplexity"] < float("inf")
    assert dms.costs["kv_bytes"] < none.costs["kv_bytes"]  # the prefix was compressed
    assert dms.metrics["perplexity"] != none.metrics["perplexity"]  # marked tokens hidden in the scored chunks
