"""One example instance of every registered method, sized for the tiny test models (head_dim 16, prompts of
48-100 tokens), for the tests that must cover every registered method: a method that needs more than its
defaults (a wrapper's base, a window that fits the prompt, a calibration) gets its example here, once."""

from __future__ import annotations

import dataclasses

from lmcompress.kv import evict
from lmcompress.kv import quant as kvq
from lmcompress.registry import EVICTION_METHODS, KV_QUANTIZERS

W = 8  # scoring windows that fit the tests' prompts


def _policy_examples(num_layers: int) -> list:
    half = tuple(0.5 if i % 2 == 0 else 0.25 for i in range(num_layers))
    return [
        evict.AdaKV(base=evict.SnapKV(ratio=0.5, window_size=W)),
        evict.BlockPress(base=evict.KeyDiff(ratio=0.5), block_size=8),
        evict.ChunkPress(base=evict.SnapKV(ratio=0.5, window_size=W), chunk_length=16),
        evict.ChunkKV(base=evict.Knorm(ratio=0.5), chunk_length=8),
        evict.EntropyGatedChunkKV(base=evict.Knorm(ratio=0.5), chunk_length=8, low_entropy_chunk_length=3),
        evict.PerLayerCompression(base=evict.Knorm(), ratios=half),
        evict.ComposedPolicy(policies=(evict.SnapKV(ratio=0.5, window_size=W), evict.Knorm(ratio=0.5))),
        evict.LagKV(ratio=0.5, n_sink=4, lag_size=8),
        evict.LeverageScore(ratio=0.5, sketch_dimension=8),
        evict.NonCausalAttn(ratio=0.5, chunk_size=16),
        evict.KeyRerotation(base=evict.Knorm(ratio=0.5)),
        evict.Compactor(ratio=0.5, chunk_size=16, sketch_dimension=8),
        evict.Finch(ratio=0.5, window_size=W),
        evict.CompressionRatioDecoding(base=evict.Knorm(), interval=2, target_ratio=0.5),
        evict.PrefillDecoding(prefill=evict.SnapKV(ratio=0.5, window_size=W),
                              decoding=evict.DecodingCompression(base=evict.Knorm(), interval=2, target_size=20)),
        evict.DecodingCompression(base=evict.Knorm(), interval=4, target_size=40),
        evict.ThresholdEviction(base=evict.Knorm(), threshold=0.5, window=16),
        evict.KVzip(ratio=0.5, chunk_size=16, prompt_ids=(5, 6, 7)),
        evict.KVzipPlus(ratio=0.5, chunk_size=16, prompt_ids=(5, 6, 7)),
        evict.CriticalKV(base=evict.SnapKV(ratio=0.5, window_size=W)),
        evict.CriticalAdaKV(base=evict.SnapKV(ratio=0.5, window_size=W)),
        evict.DMS(window_size=4, alpha_scale=1.0, initial_alpha_offset=0.0),
        evict.SimLayerKV(lazy_threshold=0.0, n_recent=W, n_initial=4),  # every layer lazy: 4 + 8 tokens kept
        evict.ThinK(key_channel_compression_ratio=0.5, window_size=W),
    ]


#: methods that need a file made for the model (a calibration, a trained surrogate): covered by their own tests,
#: which make that file first; registry-wide tests skip them.
NEEDS_ARTIFACTS = {
    "duo_attention": "tests/kv/test_duo_attention.py, tests/kv/test_leaderboard_methods_models.py",
    "kvzap": "tests/kv/test_kvzap.py",
    "qfilter": "tests/kv/test_qfilter.py, tests/kv/test_leaderboard_methods_models.py",
}


def example_policy(name: str, num_layers: int = 4):  # -> EvictionPolicy | None
    """An instance of the eviction method registered as ``name`` (explicit example, else its defaults at ratio
    0.5 with a window of ``W`` and, for a wrapper, a Knorm base). None for the methods
    of :data:`NEEDS_ARTIFACTS`, which the caller leaves out (their own tests cover them)."""
    if name in NEEDS_ARTIFACTS:
        return None
    cls = EVICTION_METHODS.get(name)
    for policy in _policy_examples(num_layers):
        if type(policy) is cls:
            return policy
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict = {"base": evict.Knorm(ratio=0.5)} if "base" in fields else {"ratio": 0.5}
    if "window_size" in fields:
        kwargs["window_size"] = W
    return cls(**kwargs)


def example_quantizer(name: str):
    """An instance of the KV quantizer registered as ``name``, with 16-channel groups where it takes any."""
    cls = KV_QUANTIZERS.get(name)
    if cls is kvq.KIVI:
        return kvq.KIVI(bits=2, residual=32, group_size=16)
    if cls is kvq.Rotated:
        return kvq.Rotated(base=kvq.IntKV(bits=4, group_size=16))
    fields = {f.name for f in dataclasses.fields(cls)}
    if cls is kvq.TurboKV:
        return kvq.TurboKV(bits=4)
    return cls(group_size=16) if "group_size" in fields else cls()


#: policies with parameters sized for the 100-token test prompts where their defaults do not fit
_SIZED_FOR_100 = {
    "adakv": lambda: evict.AdaKV(base=evict.SnapKV(ratio=0.6, window_size=W)),
    "cake": lambda: evict.CAKE(ratio=0.5, window_size=W),
    "decoding": lambda: evict.DecodingCompression(base=evict.Knorm(), interval=4, target_size=48),
    "expected_attention": lambda: evict.ExpectedAttention(ratio=0.5, n_future_positions=16, n_sink=2),
    "h2o": lambda: evict.H2O(ratio=0.5),
    "keydiff": lambda: evict.KeyDiff(ratio=0.5),
    "knorm": lambda: evict.Knorm(ratio=0.5),
    "observed_attention": lambda: evict.ObservedAttention(ratio=0.5),
    "pyramidkv": lambda: evict.PyramidKV(ratio=0.5, window_size=W),
    "random": lambda: evict.Random(ratio=0.5, seed=3),
    "snapkv": lambda: evict.SnapKV(ratio=0.5, window_size=W),
    "streaming_llm": lambda: evict.StreamingLLM(ratio=0.5),
    "threshold": lambda: evict.ThresholdEviction(base=evict.Knorm(), threshold=0.5, window=16),
    "tova": lambda: evict.TOVA(ratio=0.5),
}


def every_spec():  # -> dict[str, KVSpec]
    """One ``KVSpec`` per registered eviction method (``evict:NAME``; not those of :data:`NEEDS_ARTIFACTS`) and KV
    quantizer (``quant:NAME``; IntKV at 4 bits), plus ``snapkv+kivi``, for 100-token prompts of the tiny models."""
    from lmcompress.kv import KVSpec

    def quantizer(name: str):
        return kvq.IntKV(bits=4, group_size=16) if name == "int" else example_quantizer(name)

    specs = {f"evict:{n}": KVSpec(evict=_SIZED_FOR_100[n]() if n in _SIZED_FOR_100 else example_policy(n))
             for n in EVICTION_METHODS.names() if n not in NEEDS_ARTIFACTS}
    specs.update({f"quant:{n}": KVSpec(quant=quantizer(n)) for n in KV_QUANTIZERS.names()})
    specs["snapkv+kivi"] = KVSpec(evict=evict.SnapKV(ratio=0.5, window_size=W), quant=quantizer("kivi"))
    return specs
