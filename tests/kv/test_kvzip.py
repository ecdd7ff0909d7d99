"""KVzip / KVzip+: scores and kept sets against an independent re-computation on an ordinary cache, exact counts
(global and layer-wise), repeat tokens leave no trace, bytes, and bad parameters."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lmcompress._compat import cache_kwargs
from lmcompress.errors import LMCompressError
from lmcompress.kv import CompressedCache, KVSpec, scoring_hooks
from lmcompress.kv.evict import KVzip, KVzipPlus
from lmcompress.kv.evict.kvzip import reconstruction_scores
from lmcompress.models import tiny_model

pytestmark = pytest.mark.model

N = 40
PROMPT = (5, 6, 7)
CHUNK = 16


def _ids(n: int = N) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(3, 256, (1, n))


def reference_scores(model, ids: torch.Tensor, plus: bool, n_sink: int = 4) -> list[torch.Tensor]:
    """KVzip(+) scores per layer ``[Hkv, n]`` from a DynamicCache, with the queries rebuilt from the attention
    inputs (Llama: q_proj + RoPE) and the attention computed entry by entry in float64."""
    cfg = model.config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = hq // hkv
    n = ids.shape[1]
    base = DynamicCache(config=cfg)
    with torch.no_grad():
        model(ids, **cache_kwargs(base), use_cache=True)
    scores = [torch.zeros(hkv, n, dtype=torch.float64) for _ in range(cfg.num_hidden_layers)]
    for s in scores:
        s[:, :n_sink] = 1.0
    for i, start in enumerate(range(0, n, CHUNK)):
        end = min(n, start + CHUNK)
        lead = list(PROMPT) + ([] if i == 0 else ids[0, max(0, start - 8) : start].tolist())
        rep = torch.cat([torch.tensor([lead]), ids[:, start:end]], dim=1)
        q = rep.shape[1]
        cache = copy.deepcopy(base)
        seen = {}

        def hook(mod, args, kwargs, _seen=seen):
            _seen[mod.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

        handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
        with torch.no_grad():
            model(rep, **cache_kwargs(cache), use_cache=True)
        for h in handles:
            h.remove()
        sink = min(n_sink, start)
        for li, layer in enumerate(model.model.layers):
            hidden, (cos, sin) = seen[li]
            attn = layer.self_attn
            qs = attn.q_proj(hidden).view(1, q, hq, d).transpose(1, 2)
            qs, _ = apply_rotary_pos_emb(qs, qs, cos, sin)
            keys = cache.layers[li].keys[0].double()  # [Hkv, n + q, D]
            values = cache.layers[li].values[0].double()
            cols = list(range(sink)) + list(range(start, end)) + list(range(n, n + q))
            wo = attn.o_proj.weight.double()
            for hh in range(hq):
                kv = hh // g
                for t in range(q):
                    visible = cols[: sink + end - start] + cols[sink + end - start : sink + end - start + t + 1]
                    logit = torch.stack([qs[0, hh, t].double() @ keys[kv, j] for j in visible]) * d ** -0.5
                    p = logit.softmax(0)
                    for c, j in enumerate(range(start, end)):
                        a = p[sink + c]
                        if plus:
                            a = a / hidden[0, t].double().norm() * (wo[:, hh * d : (hh + 1) * d] @ values[kv, j]).norm()
                        scores[li][kv, j] = max(scores[li][kv, j], a) if (t or hh % g) else a
    return scores


def run(model, policy, ids, quant=None) -> CompressedCache:
    cache = CompressedCache(model, KVSpec(evict=policy, quant=quant))
    with torch.no_grad(), scoring_hooks(model, cache):
        model(ids, **cache_kwargs(cache), use_cache=True)
    return cache


def kept(cache) -> list[list[set[int]]]:
    return [[{p for p in layer.positions()[0, h].tolist() if p >= 0} for h in range(layer.num_heads)]
            for layer in cache.layers]


@pytest.mark.parametrize("cls", [KVzip, KVzipPlus])
@pytest.mark.parametrize("layerwise", [False, True])
def test_kept_sets_match_independent_scores(cls, layerwise):
    model = tiny_model("llama")
    ids = _ids()
    ref = reference_scores(model, ids, plus=cls.plus)
    cache = run(model, cls(ratio=0.6, layerwise=layerwise, chunk_size=CHUNK, prompt_ids=PROMPT), ids)
    hkv = ref[0].shape[0]
    if layerwise:
        keep = hkv * N - math.floor(0.6 * hkv * N + 1e-9)
        expected = [set(s.flatten().topk(keep).indices.tolist()) for s in ref]
    else:
        flat = torch.cat([s.flatten() for s in ref])
        keep = flat.numel() - math.floor(0.6 * flat.numel() + 1e-9)
        top = flat.topk(keep).indices
        expected = [{int(i) - li * hkv * N for i in top if li * hkv * N <= i < (li + 1) * hkv * N}
                    for li in range(len(ref))]
    got = [{h * N + p for h, ps in enumerate(layer) for p in ps} for layer in kept(cache)]
    assert got == expected
    counts = [int(layer.held_per_head().sum()) for layer in cache.layers]
    assert sum(counts) == keep * (len(ref) if layerwise else 1)
    if layerwise:
        assert counts == [keep] * len(ref)
    assert cache.get_seq_length() == N  # the repeat tokens left no trace
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())


def test_reconstruction_scores_on_hand_built_tensors():
    # one KV head, one query head, D=1: logits = q * k; keys = [sink 0, chunk 0 1, repeat 0 0]
    keys = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]).view(1, 1, 5, 1)
    queries = torch.tensor([1.0, 2.0]).view(1, 1, 2, 1)
    out = reconstruction_scores(queries, keys, 1.0, sink=1, chunk=2)
    # query 0 sees 4 keys (not the second repeat key): exp([0,0,q,0]); query 1 sees all 5
    p0 = torch.tensor([1.0, 1.0, math.e, 1.0]) / (3 + math.e)
    p1 = torch.tensor([1.0, 1.0, math.e ** 2, 1.0, 1.0]) / (4 + math.e ** 2)
    expected = torch.stack([torch.maximum(p0[1], p1[1]), torch.maximum(p0[2], p1[2])])
    torch.testing.assert_close(out[0, 0], expected)
    plus = reconstruction_scores(queries, keys, 1.0, sink=1, chunk=2, hidden_norm=torch.tensor([[1.0, 4.0]]),
                                 wov_norm=torch.tensor([1.0, 3.0, 2.0, 1.0, 1.0]).view(1, 1, 1, 5))
    torch.testing.assert_close(plus[0, 0], torch.stack([torch.maximum(3 * p0[1], 3 * p1[1] / 4),
                                                        torch.maximum(2 * p0[2], 2 * p1[2] / 4)]))


def test_budget_and_protection():
    model = tiny_model("qwen2")
    ids = _ids()
    cache = run(model, KVzip(budget=10, chunk_size=CHUNK, prompt_ids=PROMPT, protect_sinks=2), ids)
    layers = cache.layers
    heads = layers[0].held_per_head().numel()
    assert sum(int(layer.held_per_head().sum()) for layer in layers) == len(layers) * heads * 10
    for layer in layers:
        assert bool((layer.positions()[0][:, :] >= 0).sum(-1).ge(2).all())
        pos = layer.positions()
        for h in range(layer.num_heads):
            assert {0, 1} <= set(pos[0, h].tolist())


def test_without_hooks_or_ids_clear_errors():
    model = tiny_model("llama")
    cache = CompressedCache(model, KVSpec(evict=KVzip(ratio=0.5, prompt_ids=PROMPT)))
    with pytest.raises(LMCompressError, match="scoring_hooks"), torch.no_grad():
        model(_ids(), **cache_kwargs(cache), use_cache=True)
    cache = CompressedCache(model, KVSpec(evict=KVzip(ratio=0.5, prompt_ids=PROMPT)))
    embeds = model.get_input_embeddings()(_ids())
    with pytest.raises(LMCompressError, match="input_ids"), torch.no_grad(), scoring_hooks(model, cache):
        model(inputs_embeds=embeds, **cache_kwargs(cache), use_cache=True)


@pytest.mark.parametrize("kwargs", [{"chunk_size": 0}, {"chunk_size": 2.5}, {"n_sink": -1},
                                    {"layerwise": "yes"}, {"prompt_ids": "abc"}, {"prompt_ids": [1, -2]},
                                    {"ratio": "half"}, {"prefix_tokens": -3}])
def test_bad_parameters(kwargs):
    with pytest.raises(LMCompressError, match=next(iter(kwargs))):
        KVzip(**kwargs)


def test_no_tokenizer_warns_and_tokenizer_prompt():
    model = tiny_model("llama")
    cache = CompressedCache(model, KVSpec(evict=KVzip(ratio=0.5)))
    with pytest.warns(UserWarning, match="no tokenizer"), torch.no_grad(), scoring_hooks(model, cache):
        model(_ids(), **cache_kwargs(cache), use_cache=True)
    assert cache.get_seq_length() == N

    class Tok:  # a tokenizer without chat template: one id per character
        chat_template = None

        def encode(self, text, add_special_tokens=False):
            return [3 + ord(c) % 200 for c in text]

    first, later, suffix = KVzip(ratio=0.5).repeat_prompts(Tok())
    assert len(first) == len("\n\nRepeat the previous context exactly.") and suffix == [3 + 10]
    assert len(later) > len(first)


def test_second_prefill_keeps_old_tokens_and_scores_new_ones():
    """A second compressed prefill forward reconstructs only its own tokens; the ragged heads stay aligned."""
    model = tiny_model("llama")
    ids = _ids(60)
    policy = KVzip(ratio=0.5, chunk_size=CHUNK, prompt_ids=PROMPT)
    cache = CompressedCache(model, KVSpec(evict=policy))
    with torch.no_grad(), scoring_hooks(model, cache):
        model(ids[:, :40], **cache_kwargs(cache), use_cache=True)
        before = [layer.held_per_head().clone() for layer in cache.layers]
        model(ids[:, 40:], **cache_kwargs(cache), use_cache=True)
    total = sum(int(b.sum()) for b in before)
    after = sum(int(layer.held_per_head().sum()) for layer in cache.layers)
    heads = sum(b.numel() for b in before)
    assert after == total + heads * 20 - math.floor(0.5 * heads * 20)
    assert cache.get_seq_length() == 60
    for layer, b in zip(cache.layers, before):  # every token kept by the first round is still held
        pos = layer.positions()
        assert torch.equal(((pos >= 0) & (pos < 40)).sum(-1), b)


def test_pipeline_answer_compresses_with_kvzip():
    """The evaluation pipeline runs KVzip's reconstruction (its scoring hooks carry the tokenizer) and the
    question is appended uncompressed."""
    from lmcompress.eval.pipeline import answer

    model = tiny_model("llama")
    ids = _ids()
    question = torch.tensor([[11, 12, 13]])
    full = answer(model, ids, question, KVSpec(), max_new_tokens=2, eos_token_ids=[])
    gen = answer(model, ids, question, KVSpec(evict=KVzip(ratio=0.5, prompt_ids=PROMPT, chunk_size=CHUNK)),
                 max_new_tokens=2, eos_token_ids=[])
    assert gen.prompt_tokens == N + 3 and len(gen.token_ids) == 2
    assert gen.kv_bytes < 0.8 * full.kv_bytes


@pytest.mark.parametrize("cls", [KVzip, KVzipPlus])
def test_grid_reuses_reconstruction_scores_across_ratios(cls):
    """Inside shared prefills the reconstruction runs once per prompt and policy: a second ratio reuses the
    scores (counted as a replay) and keeps exactly what a run of its own keeps."""
    from lmcompress.eval.pipeline import answer
    from lmcompress.eval.shared_prefill import sharing_prefills

    model = tiny_model("llama")
    ids, question = _ids(), torch.tensor([[11, 12, 13]])

    def go(ratio: float):
        spec = KVSpec(evict=cls(ratio=ratio, prompt_ids=PROMPT, chunk_size=CHUNK))
        return answer(model, ids, question, spec, max_new_tokens=4, eos_token_ids=[])

    alone = {r: go(r) for r in (0.3, 0.7)}
    calls = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    with sharing_prefills() as shared:
        grid = {r: go(r) for r in (0.3, 0.7)}
        assert shared.replayed == 1
        other = {r: go(r) for r in (0.3,)}  # a third run of the same prompt: another hit
        assert shared.replayed == 2
    handle.remove()
    # each run: prefill, question, 3 decode steps; the 3 reconstruction chunks (40 tokens, chunks of 16) once
    assert len(calls) == 3 * 5 + 3
    for r in (0.3, 0.7):
        assert grid[r].token_ids == alone[r].token_ids
        assert grid[r].held_tokens == alone[r].held_tokens
        assert grid[r].kv_bytes == alone[r].kv_bytes
    assert other[0.3].token_ids == alone[0.3].token_ids
