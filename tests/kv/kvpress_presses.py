"""The kvpress presses of issue 11 (part b) at test sizes, with the kept counts they must give: shared by the
model runner and the memory tests."""

from __future__ import annotations

import math

from lmcompress.kv.evict import (
    CUR,
    AdaKV,
    BlockPress,
    CapPress,
    ChunkKV,
    ChunkPress,
    Compactor,
    ComposedPolicy,
    CompressionRatioDecoding,
    DecodingCompression,
    EntropyGatedChunkKV,
    Finch,
    KeyDiff,
    KeyRerotation,
    Knorm,
    LagKV,
    LeverageScore,
    NonCausalAttn,
    PerLayerCompression,
    PrefillDecoding,
    SnapKV,
)

W = 4  # SnapKV window at test sizes


def layer_ratios(num_layers: int) -> tuple[float, ...]:
    return tuple((0.25, 0.5, 0.75, 0.125)[i % 4] for i in range(num_layers))


def presses(num_layers: int, ratio: float = 0.5) -> dict:
    """Every method of this part at ``ratio`` (``num_layers`` sizes PerLayerCompression)."""
    return {
        "chunkkv_knorm": ChunkKV(base=Knorm(ratio=ratio), chunk_length=8),
        "chunkkv_snapkv": ChunkKV(base=SnapKV(ratio=ratio, window_size=W), chunk_length=8),
        "block_keydiff": BlockPress(base=KeyDiff(ratio=ratio), block_size=8),
        "block_snapkv": BlockPress(base=SnapKV(ratio=ratio, window_size=W), block_size=8),
        "chunk_snapkv": ChunkPress(base=SnapKV(ratio=ratio, window_size=W), chunk_length=16),
        "per_layer_knorm": PerLayerCompression(base=Knorm(), ratios=layer_ratios(num_layers)),
        "adakv_per_layer": AdaKV(base=PerLayerCompression(base=SnapKV(window_size=W),
                                                          ratios=layer_ratios(num_layers))),
        "composed": ComposedPolicy(policies=(SnapKV(ratio=ratio, window_size=W), Knorm(ratio=ratio))),
        "lagkv": LagKV(ratio=ratio, n_sink=4, lag_size=8),
        "cur": CUR(ratio=ratio),
        "leverage": LeverageScore(ratio=ratio, sketch_dimension=8),
        "non_causal_attn": NonCausalAttn(ratio=ratio, chunk_size=16),
        "key_rerotation": KeyRerotation(base=Knorm(ratio=ratio)),
        "compactor": Compactor(ratio=ratio, chunk_size=16, sketch_dimension=8),
        "cap": CapPress(ratio=ratio),
        "entropy_chunkkv": EntropyGatedChunkKV(base=Knorm(ratio=ratio), chunk_length=8, low_entropy_chunk_length=3),
        "finch": Finch(ratio=ratio, window_size=W),
        "finch_chunked": Finch(ratio=ratio, window_size=W, chunk_length=16, rerotate_keys=False),
        "ratio_decoding": CompressionRatioDecoding(base=Knorm(), interval=2, target_ratio=0.5),
        "prefill_decoding": PrefillDecoding(prefill=SnapKV(ratio=ratio, window_size=W),
                                            decoding=DecodingCompression(base=Knorm(), interval=2, target_size=20)),
    }


def kept(n: int, ratio: float) -> int:
    return n - math.floor(ratio * n + 1e-9)


def prefill_count(name: str, policy, n: int, layer_idx: int, num_layers: int) -> int | None:
    """Tokens each head keeps after a prompt of ``n`` (None: head-wise, only the layer total is fixed)."""
    r = 0.5
    if name.startswith("chunkkv"):  # whole chunks of 8: ceil(n / 8) chunks, half of them kept
        chunks = math.ceil(n / 8)
        assert n % 8 == 0
        return kept(chunks, r) * 8
    if name == "finch_chunked":
        return sum(kept(min(s + 16, n) - s, r) for s in range(0, n, 16))
    if name == "chunk_snapkv":
        return sum(kept(e - s, r) for s, e in policy.chunks(n))
    if name == "per_layer_knorm":
        return kept(n, layer_ratios(num_layers)[layer_idx])
    if name == "adakv_per_layer":
        return None
    if name == "composed":
        return kept(kept(n, r), r)
    if name == "ratio_decoding":
        return n
    return kept(n, r)


def decode_counts(name: str, held: int, seen: int, steps: int) -> int:
    """Tokens per head after ``steps`` decoding steps from ``held`` tokens at ``seen`` (simulated schedule)."""
    since = 0
    for _ in range(steps):
        held, seen, since = held + 1, seen + 1, since + 1
        if name in ("ratio_decoding", "prefill_decoding") and since == 2:
            since = 0
            target = kept(seen, 0.5) if name == "ratio_decoding" else 20
            held = min(held, target)
    return held
