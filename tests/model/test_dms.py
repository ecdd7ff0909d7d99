"""DMS (learned delayed eviction) against an independent step-by-step reference written here: plain torch
attention over the whole sequence with an explicit visibility mask, decision logits read from the raw query
projection by hand. Checked: the logits (prefill of the whole sequence in one chunk, and prefill + token-by-token
decoding), which tokens each head holds after every step, when storage is released (held tokens per head and
``nbytes``), the layer-wide and separate-alpha variants, and composition with KIVI-2."""

from __future__ import annotations

import math

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.kv import CompressedCache, KVSpec, scoring_hooks
from lmcompress.kv.evict import DMS
from lmcompress.kv.evict.dms_hooks import attach_separate_alpha
from lmcompress.kv.quant.kivi import KIVI
from lmcompress.models import tiny_model

WINDOW = 3
SCALE, OFFSET = 1.5, 0.25
T = 20  # tokens: prompt + decoded


def dms_model(arch: str, *, separate: bool = False, alpha_per: str = "head", seed: int = 0):
    """A tiny model with DMS config keys and hand-set decision weights: the query rows that feed each group's
    decision channel are set to fixed random vectors (about half the decisions positive)."""
    model = tiny_model(arch, seed=seed)
    cfg = model.config
    cfg.dms_window_size, cfg.dms_alpha_scale, cfg.dms_initial_alpha_offset = WINDOW, SCALE, OFFSET
    cfg.dms_separate_alpha, cfg.dms_alpha_per = separate, alpha_per
    g = torch.Generator().manual_seed(seed + 1)
    d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    with torch.no_grad():
        if separate:
            for attn in attach_separate_alpha(model):
                attn.dms_proj_alpha.weight.copy_(torch.randn(hkv, cfg.hidden_size, generator=g))
                attn.dms_proj_alpha_norm.weight.copy_(1 + 0.1 * torch.randn(cfg.hidden_size, generator=g))
        else:
            for layer in model.model.layers:
                w = layer.self_attn.q_proj.weight  # [Hq * D, hidden]
                for h in range(0, hq, hq // hkv):
                    w[h * d + d - 1] = 3 * torch.randn(cfg.hidden_size, generator=g)
    return model


# ------------------------------------------------------------------------------------------ the reference
def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def reference(model, ids: torch.Tensor, *, separate: bool, alpha_per: str):
    """Plain-torch DMS forward over ``ids: [T]``: ``(logits [T, V], marks per layer [Hkv, T] bool)``."""
    cfg = model.config
    d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    groups = hq // hkv
    n = ids.shape[0]
    inv_freq = model.model.rotary_emb.inv_freq.float()
    freqs = torch.arange(n).float()[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [T, 1, D]
    x = model.model.embed_tokens(ids)  # [T, hidden]
    all_marks = []
    for layer in model.model.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = (h @ attn.q_proj.weight.T).view(n, hq, d)
        k = (h @ attn.k_proj.weight.T).view(n, hkv, d)
        v = (h @ attn.v_proj.weight.T).view(n, hkv, d)
        if hasattr(attn, "q_norm"):
            q = rms(q, attn.q_norm.weight, attn.q_norm.variance_epsilon)
            k = rms(k, attn.k_norm.weight, attn.k_norm.variance_epsilon)
        if separate:
            raw = rms(x, attn.dms_proj_alpha_norm.weight, attn.dms_proj_alpha_norm.eps) @ attn.dms_proj_alpha.weight.T
        else:
            raw = q[:, ::groups, -1].clone()
            q[:, ::groups, -1] = 0
        logit = raw * SCALE - OFFSET  # [T, Hkv]
        decision = logit > 0
        if alpha_per == "layer":
            decision = decision[:, :1].expand(n, hkv)
        marks = torch.zeros(hkv, n, dtype=torch.bool)
        marks[:, :-1] = decision[1:].T  # the decision of token t marks t - 1
        all_marks.append(marks)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if not separate:
            q[:, ::groups, -1] = 0
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None]
        out = torch.empty(n, hq, d)
        for head in range(hq):
            kv = head // groups
            visible = (j <= i) & ((i - j <= WINDOW) | ~marks[kv][None])
            s = (q[:, head] @ k[:, kv].T) / math.sqrt(d)
            p = torch.softmax(s.masked_fill(~visible, -math.inf), dim=-1)
            out[:, head] = p @ v[:, kv]
        x = x + out.reshape(n, hq * d) @ attn.o_proj.weight.T
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x)), all_marks


def expected_held(marks: torch.Tensor, newest: int) -> list[list[int]]:
    """Per KV head, the positions held after the token at ``newest`` was processed."""
    return [[j for j in range(newest + 1) if not (bool(marks[h, j]) and j <= newest - WINDOW)]
            for h in range(marks.shape[0])]


def held_positions(layer) -> list[list[int]]:
    pos = layer.positions()[0]  # [Hkv, held], ragged rows left-padded with -1
    return [[int(p) for p in row if p >= 0] for row in pos]


def exact_bytes(cache, model) -> int:
    """fp32 keys + values, int32 positions and float32 marks for every held token and head."""
    d = model.config.head_dim
    return sum(int(c.sum()) for c in cache.held_per_head()) * (2 * d * 4 + 4 + 4)


VARIANTS = [("llama", False, "head"), ("qwen3", False, "head"), ("qwen3", False, "layer"),
            ("llama", True, "head"), ("qwen3", True, "head")]


@pytest.mark.parametrize(("arch", "separate", "alpha_per"), VARIANTS)
def test_prefill_matches_reference(arch, separate, alpha_per):
    model = dms_model(arch, separate=separate, alpha_per=alpha_per)
    ids = torch.randint(0, 256, (T,), generator=torch.Generator().manual_seed(5))
    ref_logits, marks = reference(model, ids, separate=separate, alpha_per=alpha_per)
    # the hand-set decisions mark some tokens beyond the window, but not all
    hidden = sum(int(m[:, : T - 1 - WINDOW].sum()) for m in marks)
    assert 0 < hidden < sum(m[:, : T - 1 - WINDOW].numel() for m in marks)
    cache = CompressedCache(model, KVSpec(evict=DMS()))
    with scoring_hooks(model, cache):
        out = model(ids[None], **cache_kwargs(cache))
    torch.testing.assert_close(out.logits[0], ref_logits, atol=2e-5, rtol=1e-4)
    for layer, m in zip(cache.layers, marks):
        assert held_positions(layer) == expected_held(m, T - 1)
    assert cache.nbytes == exact_bytes(cache, model)


@pytest.mark.parametrize(("arch", "separate", "alpha_per"), VARIANTS)
def test_decode_steps_match_reference(arch, separate, alpha_per):
    model = dms_model(arch, separate=separate, alpha_per=alpha_per)
    n = 48
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(6))
    ref_logits, marks = reference(model, ids, separate=separate, alpha_per=alpha_per)
    prompt = 6
    cache = CompressedCache(model, KVSpec(evict=DMS()))
    vanilla = CompressedCache(model, KVSpec())
    released_at = []
    with scoring_hooks(model, cache):
        out = model(ids[None, :prompt], **cache_kwargs(cache))
        torch.testing.assert_close(out.logits[0], ref_logits[:prompt], atol=2e-5, rtol=1e-4)
        model(ids[None, :prompt], **cache_kwargs(vanilla))
        for t in range(prompt, n):
            before = [layer.held_per_head().clone() for layer in cache.layers]
            out = model(ids[None, t : t + 1], **cache_kwargs(cache))
            model(ids[None, t : t + 1], **cache_kwargs(vanilla))
            torch.testing.assert_close(out.logits[0, -1], ref_logits[t], atol=2e-5, rtol=1e-4)
            for li, (layer, m) in enumerate(zip(cache.layers, marks)):
                exp = expected_held(m, t)
                assert held_positions(layer) == exp, (li, t)
                # one token in, the marked token that just left the window out
                counts = layer.held_per_head()[0]
                left = torch.tensor([int(m[h, t - WINDOW]) for h in range(m.shape[0])])
                assert torch.equal(counts, before[li][0] + 1 - left)
                if bool(left.any()):
                    released_at.append(t)
    assert released_at  # storage was released during decoding
    # released slots are reused by the next tokens (decode-time eviction keeps capacity): the bytes are those of
    # the held tokens plus spare capacity, and below the uncompressed cache's
    assert exact_bytes(cache, model) <= cache.nbytes < vanilla.nbytes


def test_decision_channel_takes_no_part_in_attention():
    """Changing the borrowed channel's query weight changes only the decisions: with decisions forced off (a huge
    offset) the logits do not depend on it."""
    outs = []
    for seed in (0, 1):
        model = dms_model("llama", seed=0)
        model.config.dms_initial_alpha_offset = 1e6
        g = torch.Generator().manual_seed(seed + 10)
        with torch.no_grad():
            for layer in model.model.layers:
                w = layer.self_attn.q_proj.weight
                w[15] = torch.randn(w.shape[1], generator=g)
                w[2 * 16 + 15] = torch.randn(w.shape[1], generator=g)
        cache = CompressedCache(model, KVSpec(evict=DMS()))
        ids = torch.arange(12)[None]
        with torch.no_grad(), scoring_hooks(model, cache):
            outs.append(model(ids, **cache_kwargs(cache)).logits)
        assert cache.held_tokens() == [12] * 4
    torch.testing.assert_close(outs[0], outs[1])


def run_steps(model, cache, ids, prompt, hooks=True):
    import contextlib

    with scoring_hooks(model, cache) if hooks else contextlib.nullcontext():
        out = model(ids[:, :prompt], **cache_kwargs(cache))
        for t in range(prompt, ids.shape[1]):
            out = model(ids[:, t : t + 1], **cache_kwargs(cache))
    return out


def test_composes_with_kivi2():
    """DMS + KIVI-2 runs, the tokens DMS keeps are stored packed, and the cache is smaller than KIVI-2 alone on
    the same tokens. (KIVI keeps its window inside its store, so a release re-packs the kept tokens.)"""
    model = dms_model("llama")
    prompt, n = 256, 288
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(7))
    quant = KIVI(bits=2, group_size=16, residual=16)
    both = CompressedCache(model, KVSpec(evict=DMS(), quant=quant))
    kivi_only = CompressedCache(model, KVSpec(quant=quant))
    out = run_steps(model, both, ids, prompt)
    run_steps(model, kivi_only, ids, prompt, hooks=False)
    assert torch.isfinite(out.logits).all()
    assert all(layer.packed_length > 0 for layer in both.layers)  # kept tokens are stored packed
    held = torch.stack([c[0] for c in both.held_per_head()])
    assert int(held.max()) < n and int(held.min()) > WINDOW
    assert both.nbytes < kivi_only.nbytes


def test_releases_inside_the_residual_window_leave_packed_tokens_untouched():
    """With a quantizer whose full-precision window is in the layer (int, residual 8 > window 3), DMS releases
    only full-precision tokens: the codes packed at prefill are unchanged after 32 decode steps."""
    from lmcompress.kv.quant.int_token import IntKV

    model = dms_model("qwen3")
    prompt, n = 64, 96
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(8))
    cache = CompressedCache(model, KVSpec(evict=DMS(), quant=IntKV(bits=4, group_size=16, residual=8)))
    with scoring_hooks(model, cache):
        model(ids[:, :prompt], **cache_kwargs(cache))
        stores = [[seg.store for seg in layer.segments] for layer in cache.layers]
        codes = [[{k: v.clone() for k, v in seg.store.parts("keys").items()} for seg in layer.segments]
                 for layer in cache.layers]
        events = sum(layer.eviction_events for layer in cache.layers)
        for t in range(prompt, n):
            model(ids[:, t : t + 1], **cache_kwargs(cache))
    assert sum(layer.eviction_events for layer in cache.layers) > events  # releases happened while decoding
    for layer, before, kept_stores in zip(cache.layers, codes, stores):
        for seg, parts, store in zip(layer.segments, before, kept_stores):
            assert seg.store is store  # never emptied and re-packed
            after = seg.store.parts("keys")
            assert all(torch.equal(after[k][:, :, : v.shape[2]], v) for k, v in parts.items())


def test_without_hooks_is_a_clear_error():
    from lmcompress.errors import LMCompressError

    model = dms_model("llama")
    cache = CompressedCache(model, KVSpec(evict=DMS()))
    with pytest.raises(LMCompressError, match="scoring_hooks"):
        model(torch.arange(8)[None], **cache_kwargs(cache))


def test_config_without_dms_keys_is_a_clear_error():
    from lmcompress.errors import LMCompressError

    model = tiny_model("llama")
    cache = CompressedCache(model, KVSpec(evict=DMS()))
    with pytest.raises(LMCompressError, match="lacks dms_window_size"), scoring_hooks(model, cache):
        pass


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_prefill_matches_reference(arch):
    """Prefill in chunks of 7: the first decision of a chunk marks the last token of the previous one, and held
    marked tokens are hidden from the chunk's queries outside their window."""
    model = dms_model(arch)
    n = 35
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(9))
    ref_logits, marks = reference(model, ids, separate=False, alpha_per="head")
    cache = CompressedCache(model, KVSpec(evict=DMS()))
    with scoring_hooks(model, cache):
        for start in range(0, n, 7):
            out = model(ids[None, start : start + 7], **cache_kwargs(cache))
            torch.testing.assert_close(out.logits[0], ref_logits[start : start + 7], atol=2e-5, rtol=1e-4)
            for layer, m in zip(cache.layers, marks):
                assert held_positions(layer) == expected_held(m, start + 6)


def test_method_string_takes_no_sweep_ratio():
    from lmcompress.kv.parse import has_eviction, parse_method

    assert not has_eviction("dms") and not has_eviction("dms+kivi2")
    spec = parse_method("dms:window_size=8+kivi2", ratio=0.5)
    assert spec.evict == DMS(window_size=8) and spec.quant is not None
    assert DMS().settings({"dms_window_size": 4, "dms_alpha_scale": 2.0, "dms_initial_alpha_offset": 1.0}) \
        .window_size == 4
    assert DMS(window_size=8).settings({"dms_window_size": 4, "dms_alpha_scale": 2.0,
                                        "dms_initial_alpha_offset": 1.0}).window_size == 8


def test_pipeline_answer_runs_dms_in_prefill_and_decoding():
    """`answer` (the bench's path): DMS decides in the prefill and on every decoding step (the tokens it
    generates are those of the plain reference, fed back greedily), and the shared prefill is not used for it
    (its prefill is not the uncompressed one)."""
    from lmcompress.eval.pipeline import answer
    from lmcompress.eval.shared_prefill import sharing_prefills

    model = dms_model("qwen3")
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(11))
    with sharing_prefills() as shared:
        gen = answer(model, ids[:, :20], ids[:, 20:], KVSpec(evict=DMS()), max_new_tokens=12, eos_token_ids=[],
                     decode="eager")
    assert shared.replayed == 0
    full = torch.cat([ids[0], torch.tensor(gen.token_ids[:-1])])
    ref_logits, _ = reference(model, full, separate=False, alpha_per="head")
    assert gen.token_ids == ref_logits[23:].argmax(-1).tolist()
