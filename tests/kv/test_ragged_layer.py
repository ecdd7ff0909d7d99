"""The ragged layout: heads holding different tokens attend exactly like masked attention over the full cache,
hold only their kept entries, and compose with quantization."""

from __future__ import annotations

import math

import pytest
import torch

from lmcompress.kv import IntKV
from lmcompress.kv.evict import Knorm
from lmcompress.kv.layer import CompressedLayer


def filled_layer(n: int, quant=None, b: int = 1, h: int = 2, d: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    layer = CompressedLayer(0, 1, evict=Knorm(ratio=0.5), quant=quant)
    k, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    layer.update(k, v)
    return layer, k, v


def masked_reference(query, keys, values, visible, scaling):
    """Dense attention of ``query: [B, Hq, q, D]`` with ``visible: [B, Hkv, q, n]`` bool."""
    hq = query.shape[1]
    g = hq // keys.shape[1]
    keys = keys.repeat_interleave(g, dim=1)
    values = values.repeat_interleave(g, dim=1)
    vis = visible.repeat_interleave(g, dim=1)
    logits = (query @ keys.transpose(-1, -2)) * scaling
    return logits.masked_fill(~vis, -math.inf).softmax(-1) @ values


def test_ragged_attention_equals_masked_attention():
    n, d = 30, 16
    layer, k, v = filled_layer(n, d=d)
    kept = torch.rand(1, 2, n) > 0.4
    kept[..., -1] = True
    layer.keep(kept)
    assert layer.ragged
    assert layer.held_per_head().tolist() == kept.sum(-1).tolist()
    # one decoding step: a new token for every head
    k1, v1 = torch.randn(1, 2, 1, d), torch.randn(1, 2, 1, d)
    layer.update(k1, v1)
    query = torch.randn(1, 4, 1, d)
    out = layer.attend(query, None, d**-0.5).transpose(1, 2)
    visible = torch.cat([kept, torch.ones(1, 2, 1, dtype=torch.bool)], dim=-1).unsqueeze(2)
    ref = masked_reference(query, torch.cat([k, k1], 2), torch.cat([v, v1], 2), visible, d**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # a prefill chunk of 3 tokens: causal among themselves
    k3, v3 = torch.randn(1, 2, 3, d), torch.randn(1, 2, 3, d)
    layer.update(k3, v3)
    query = torch.randn(1, 4, 3, d)
    out = layer.attend(query, None, d**-0.5).transpose(1, 2)
    past = visible.expand(1, 2, 3, n + 1)
    causal = torch.ones(3, 3, dtype=torch.bool).tril().expand(1, 2, 3, 3)
    ref = masked_reference(query, torch.cat([k, k1, k3], 2), torch.cat([v, v1, v3], 2),
                           torch.cat([past, causal], -1), d**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_ragged_storage_holds_only_kept_entries():
    n, d = 64, 16
    layer, _, _ = filled_layer(n, d=d)
    full = layer.nbytes
    kept = torch.zeros(1, 2, n, dtype=torch.bool)
    kept[0, 0, :48] = True
    kept[0, 1, :8] = True
    layer.keep(kept)
    per_entry = 2 * d * 4 + 4  # fp32 K and V, int32 position
    assert layer.nbytes == (48 + 8) * per_entry
    assert full == 2 * n * per_entry
    assert [seg.fp_k.data.shape[2] for seg in layer.segments] == [48, 8]


def test_ragged_with_quantization_stores_only_kept_tokens_packed():
    n, d = 64, 16
    quant = IntKV(bits=4, group_size=16)
    layer, k, _ = filled_layer(n, quant=quant, d=d)
    kept = torch.zeros(1, 2, n, dtype=torch.bool)
    kept[0, 0, ::2] = True  # 32 tokens
    kept[0, 1, ::4] = True  # 16 tokens
    layer.keep(kept)
    for seg in layer.segments:
        seg.commit()
    assert [seg.packed_length for seg in layer.segments] == [32, 16]
    assert [seg.fp_length for seg in layer.segments] == [0, 0]
    # per token and tensor: 16 4-bit codes (8 bytes) + fp16 scale + fp16 zero; plus the int32 position
    per_entry = 2 * (8 + 2 + 2) + 4
    spare = 2 * 2 * d * 4  # each head keeps one spare full-precision slot for K and V (the commit headroom)
    assert layer.nbytes == (32 + 16) * per_entry + spare
    # the kept tokens come back within the 4-bit error bound
    keys, _ = layer.segments[1].all_tokens()
    ref = k[0, 1, ::4]
    step = (ref.amax(-1) - ref.amin(-1)) / 15
    assert bool(((keys[0, 0] - ref).abs() <= step.unsqueeze(-1) * 0.5 + 1e-2).all())


def test_uniform_keep_frees_to_exact_size():
    n, d = 50, 16
    layer, k, _ = filled_layer(n, d=d)
    idx = torch.tensor([[[0, 3, 7, 20, 49], [1, 2, 3, 4, 5]]])
    layer.keep(idx)
    assert not layer.ragged
    assert layer.fp_k.data.shape[2] == 5
    torch.testing.assert_close(layer.fp_k.view()[0, 0], k[0, 0, [0, 3, 7, 20, 49]])
    assert layer.positions()[0, 1].tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("b", [2])
def test_ragged_batch_rows_are_independent(b):
    n, d = 20, 8
    layer, k, v = filled_layer(n, b=b, d=d)
    kept = torch.ones(b, 2, n, dtype=torch.bool)
    kept[1, 0, :10] = False
    layer.keep(kept)
    assert layer.held_per_head().tolist() == [[20, 20], [10, 20]]
    query = torch.randn(b, 2, 1, d)
    layer.update(torch.zeros(b, 2, 1, d), torch.zeros(b, 2, 1, d))
    out = layer.attend(query, None, 1.0).transpose(1, 2)
    visible = torch.cat([kept, torch.ones(b, 2, 1, dtype=torch.bool)], -1).unsqueeze(2)
    ref = masked_reference(query, torch.cat([k, torch.zeros(b, 2, 1, d)], 2),
                           torch.cat([v, torch.zeros(b, 2, 1, d)], 2), visible, 1.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
