"""The static decode path never changes what a method does (issue 9, item 6).

Every registered eviction method (ratio 0.5, otherwise its defaults; wrappers around a scorer, with sizes that
make them act within the test's decode steps) and every registered KV quantizer runs on a tiny Llama on CPU
through the eager path and, where :func:`static_decode_supported` allows it, the static one: held tokens per
layer after every step and the greedy tokens must be identical. Where it does not, ``decode="static"`` is
refused with the reason and ``decode="auto"`` falls back to eager (also when the device is CUDA).
"""

from __future__ import annotations

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.errors import LMCompressError
from lmcompress.eval.graph_decode import StaticDecoder
from lmcompress.eval.pipeline import _static_decoder, answer
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.kv.evict import CAKE, AdaKV, DecodingCompression, Knorm, Random, SnapKV, ThresholdEviction
from lmcompress.kv.hooks import scoring_hooks
from lmcompress.kv.static import static_decode_supported
from lmcompress.models import tiny_model
from lmcompress.registry import EVICTION_METHODS, KV_QUANTIZERS
from method_examples import NEEDS_ARTIFACTS, example_policy, example_quantizer

pytestmark = pytest.mark.model

N = 100  # prompt tokens (more than SnapKV's default 64-token window)
STEPS = 12
PROMPT = torch.randint(3, 256, (1, N), generator=torch.Generator().manual_seed(0))

#: wrappers (and methods without a usable default size) with the parameters the test gives them.
EXPLICIT = {
    "adakv": [AdaKV(base=Knorm(ratio=0.5)), AdaKV(base=SnapKV(ratio=0.5))],
    "decoding": [DecodingCompression(base=Knorm(ratio=0.5), interval=4, target_size=40),
                 DecodingCompression(base=SnapKV(window_size=4), interval=4, target_size=45)],
    "threshold": [ThresholdEviction(base=Random(), threshold=0.5, window=8)],
    "cake": [CAKE(ratio=0.5)],
}


def specs() -> dict[str, KVSpec]:
    out = {"none": KVSpec()}
    for name in EVICTION_METHODS.names():
        if name in NEEDS_ARTIFACTS and name not in EXPLICIT:
            continue
        policies = EXPLICIT.get(name) or [example_policy(name)]
        for i, policy in enumerate(policies):
            out[f"{name}-{i}"] = KVSpec(evict=policy)
    for name in KV_QUANTIZERS.names():
        out[name] = KVSpec(quant=example_quantizer(name))
    out["snapkv+int4"] = KVSpec(evict=SnapKV(ratio=0.5), quant=KV_QUANTIZERS.get("int")(bits=4, group_size=16))
    return out


SPECS = specs()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def eager_run(model, spec) -> tuple[list[int], list[list[int]]]:
    cache = CompressedCache(model, spec)
    with torch.no_grad(), scoring_hooks(model, cache):
        token = int(model(PROMPT, **cache_kwargs(cache)).logits[:, -1].argmax(-1))
        tokens, held = [token], []
        for _ in range(STEPS):
            logits = model(torch.tensor([[token]]), **cache_kwargs(cache)).logits[:, -1]
            token = int(logits.argmax(-1))
            tokens.append(token)
            held.append([int(h.max()) for h in cache.held_per_head()])
    return tokens, held


def static_run(model, spec) -> tuple[list[int], list[list[int]]]:
    cache = CompressedCache(model, spec)
    with torch.no_grad(), scoring_hooks(model, cache):
        token = int(model(PROMPT, **cache_kwargs(cache)).logits[:, -1].argmax(-1))
    dec = StaticDecoder(model, cache, STEPS, use_graph=False)
    dec.start(token, N)
    tokens, held = [token], []
    for _ in range(STEPS):
        dec.run(1)
        tokens.append(int(dec.tok))
        held.append([int(layer.static.length) for layer in cache.layers])
    dec.close()
    return tokens, held


def test_every_registered_method_is_covered():
    names = {key.split("-")[0] for key in SPECS} | set(NEEDS_ARTIFACTS)
    assert set(EVICTION_METHODS.names()) <= names and set(KV_QUANTIZERS.names()) <= names


def test_the_issue_cases_are_refused():
    assert "acts on decoding steps" in static_decode_supported(SPECS["decoding-0"])
    assert "acts on decoding steps" in static_decode_supported(SPECS["cake-0"])
    assert "ragged" in static_decode_supported(SPECS["adakv-0"])
    assert "quantized" in static_decode_supported(SPECS["int"])
    assert static_decode_supported(SPECS["snapkv-0"]) is None
    assert static_decode_supported(KVSpec()) is None


@pytest.mark.parametrize("key", list(SPECS))
def test_static_path_equals_eager_or_refuses(model, key):
    spec = SPECS[key]
    tokens, held = eager_run(model, spec)
    reason = static_decode_supported(spec)
    if reason is None:
        s_tokens, s_held = static_run(model, spec)
        assert s_held == held, key
        assert s_tokens == tokens, key
        return
    cache = CompressedCache(model, spec)
    with torch.no_grad(), scoring_hooks(model, cache):
        model(PROMPT, **cache_kwargs(cache))
    with pytest.raises(LMCompressError, match="static decode cannot run"):
        StaticDecoder(model, cache, STEPS, use_graph=False)
    assert not cache.is_static
    # decode="auto" on a CUDA device would pick the static path: for this spec it falls back to eager
    assert _static_decoder(model, cache, STEPS, "auto", torch.device("cuda")) is None
    with pytest.raises(LMCompressError, match="static decode cannot run"):
        _static_decoder(model, cache, STEPS, "static", torch.device("cpu"))


@pytest.mark.parametrize("key", ["decoding-0", "cake-0", "snapkv-0", "streaming_llm-0"])
def test_pipeline_answers(model, key):
    spec = SPECS[key]
    ctx, question = PROMPT[:, :90], PROMPT[:, 90:]
    eager = answer(model, ctx, question, spec, max_new_tokens=STEPS, decode="eager", eos_token_ids=[])
    auto = answer(model, ctx, question, spec, max_new_tokens=STEPS, decode="auto", eos_token_ids=[])
    assert auto.token_ids == eager.token_ids and auto.kv_bytes_end == eager.kv_bytes_end
    if static_decode_supported(spec) is None:
        static = answer(model, ctx, question, spec, max_new_tokens=STEPS, decode="static", eos_token_ids=[])
        assert static.token_ids == eager.token_ids
    else:
        with pytest.raises(LMCompressError, match="static decode cannot run"):
            answer(model, ctx, question, spec, max_new_tokens=STEPS, decode="static", eos_token_ids=[])
