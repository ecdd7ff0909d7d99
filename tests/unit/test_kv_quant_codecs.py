"""Codecs of KV quantization: packing, uniform, normal codebook, FP8, outliers (property tests)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcompress.errors import LMCompressError
from lmcompress.kv.quant import granularity as gr
from lmcompress.kv.quant.fp8 import FP8Codec
from lmcompress.kv.quant.normal import NormalCodec, normal_codebook
from lmcompress.kv.quant.outliers import OutlierCodec
from lmcompress.kv.quant.packing import pack, packed_size, unpack
from lmcompress.kv.quant.uniform import UniformCodec

SETTINGS = settings(max_examples=40, deadline=None)


def states(seed: int, shape=(2, 3, 8, 16), scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    return x + torch.randn(shape[-1], generator=g)  # channel offsets, as real keys have


@SETTINGS
@given(bits=st.integers(1, 8), n=st.integers(1, 40), rows=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_packing_round_trips_exactly(bits, n, rows, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.int64)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_size(n, bits))
    assert torch.equal(unpack(packed, bits, n).long(), codes)


def test_two_bit_codes_are_four_per_byte():
    codes = torch.tensor([[1, 2, 3, 0]])
    assert pack(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4]]


def test_three_bit_codes_are_eight_per_three_bytes():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]])
    stream = sum(int(c) << (3 * j) for j, c in enumerate(codes[0]))
    assert pack(codes, 3).tolist() == [[stream & 0xFF, (stream >> 8) & 0xFF, stream >> 16]]
    assert packed_size(64, 3) == 24


@SETTINGS
@given(
    bits=st.integers(1, 8),
    symmetric=st.booleans(),
    granularity=st.sampled_from(gr.GRANULARITIES),
    group_size=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 10_000),
)
def test_uniform_round_trip_error_at_most_half_a_scale(bits, symmetric, granularity, group_size, seed):
    if symmetric and bits < 2:
        bits = 2
    codec = UniformCodec(bits, group_size, symmetric, granularity)
    x = states(seed, shape=(2, 3, 32, 16))
    parts = codec.encode(x)
    x_hat = codec.decode(parts, 16, torch.float32)
    scale = gr.expand(parts["scale"].float(), granularity, group_size, x.shape)
    err = (x_hat - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5) + 1e-6).all()), float((err - scale / 2).max())


def test_uniform_parameters_are_fp16_and_codes_packed():
    codec = UniformCodec(2, 8)
    parts = codec.encode(states(0))
    assert parts["scale"].dtype == parts["zero"].dtype == torch.float16
    assert parts["codes"].shape == (2, 3, 8, 4)  # 16 channels of 2 bits = 4 bytes


def test_channel_granularity_groups_tokens():
    codec = UniformCodec(4, 4, granularity="channel")
    parts = codec.encode(states(1))
    assert parts["scale"].shape == (2, 3, 2, 16)  # 8 tokens / 4 per group, one scale per channel
    assert parts["codes"].shape == (2, 3, 2, 4, 8)
    assert codec.token_block == 4


def test_layer_granularity_shares_parameters_across_heads():
    parts = UniformCodec(4, 16, granularity="layer").encode(states(2))
    assert parts["scale"].shape == (2, 1, 8, 1)


def test_normal_codebook_sorted_and_every_code_used():
    for bits in range(1, 9):
        centres, bounds = normal_codebook(bits)
        assert centres.shape == (1 << bits,) and bounds.shape == ((1 << bits) - 1,)
        assert bool((centres[1:] > centres[:-1]).all())
        assert bool((bounds > centres[:-1]).all() and (bounds < centres[1:]).all())
        assert torch.allclose(centres, -centres.flip(0), atol=1e-5)  # symmetric about 0
    codec = NormalCodec(4, granularity="head")
    x = torch.randn(1, 2, 4096, 64, generator=torch.Generator().manual_seed(3))
    parts = codec.encode(x)
    codes = unpack(parts["codes"], 4, 64)
    assert set(codes.unique().tolist()) == set(range(16))
    # equiprobable buckets: each code holds about 1/16 of normal data
    counts = torch.bincount(codes.flatten().long(), minlength=16).float() / codes.numel()
    assert bool(((counts - 1 / 16).abs() < 0.01).all())


def test_normal_codec_reconstructs_bucket_centres():
    codec = NormalCodec(3, granularity="head", symmetric=True)
    x = torch.randn(1, 1, 4, 32, generator=torch.Generator().manual_seed(4))
    parts = codec.encode(x)
    x_hat = codec.decode(parts, 32, torch.float32)
    std = parts["std"].float()
    centres, _ = normal_codebook(3)
    # every reconstructed value is a centre times its group's std
    ratios = (x_hat / std).flatten()
    assert bool(torch.isclose(ratios.unsqueeze(-1), centres, atol=1e-4).any(-1).all())
    assert float((x_hat - x).abs().mean()) < 0.2


@SETTINGS
@given(granularity=st.sampled_from(gr.GRANULARITIES), seed=st.integers(0, 10_000))
def test_fp8_relative_error(granularity, seed):
    codec = FP8Codec(8, granularity)
    x = states(seed)
    parts = codec.encode(x)
    assert parts["codes"].dtype == torch.float8_e4m3fn
    x_hat = codec.decode(parts, 16, torch.float32)
    scale = gr.expand(parts["scale"].float(), granularity, 8, x.shape)
    # 3 mantissa bits: relative error <= 2**-4 in the normal range, absolute 2**-10 * scale below it
    assert bool(((x_hat - x).abs() <= x.abs() * 2**-4 + scale * 2**-10 + 1e-7).all())


@SETTINGS
@given(
    alpha=st.floats(0.01, 0.49),
    inner=st.sampled_from(["uniform", "normal", "fp8", "uniform-channel"]),
    seed=st.integers(0, 10_000),
)
def test_outliers_are_restored_exactly(alpha, inner, seed):
    codecs = {
        "uniform": UniformCodec(2, 8),
        "normal": NormalCodec(2, granularity="head"),
        "fp8": FP8Codec(8),
        "uniform-channel": UniformCodec(2, 4, granularity="channel"),
    }
    codec = OutlierCodec(codecs[inner], alpha)
    x = states(seed)
    x[0, 0, 0, 0] = 1000.0  # an outlier far out
    parts = codec.encode(x)
    x_hat = codec.decode(parts, 16, torch.float32)
    tb = codec.token_block
    units = x.reshape(2, 3, 8 // tb, tb * 16)
    k = math.ceil(alpha * tb * 16 - 1e-9)
    assert parts["outlier_idx"].shape[-1] == k
    top = units.abs().topk(k, dim=-1).indices
    restored = torch.gather(x_hat.reshape(units.shape), -1, top)
    assert torch.equal(restored, torch.gather(units, -1, top))
    assert float(x_hat[0, 0, 0, 0]) == 1000.0


def test_outliers_narrow_the_range_of_the_rest():
    x = states(5)
    x[..., 3] = 500.0  # one huge channel in every token
    plain = UniformCodec(4, 16).encode(x)
    with_outliers = OutlierCodec(UniformCodec(4, 16), 1 / 16).encode(x)
    assert float(with_outliers["scale"].float().max()) < float(plain["scale"].float().min()) / 10


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, True])
def test_bad_bits_rejected(bits):
    with pytest.raises(LMCompressError, match="bits"):
        UniformCodec(bits)


@pytest.mark.parametrize("alpha", [-0.1, 0.5, 0.7, float("nan")])
def test_bad_outlier_fraction_rejected(alpha):
    with pytest.raises(LMCompressError, match="outliers"):
        OutlierCodec(UniformCodec(4), alpha)


def test_group_size_must_divide_head_dim():
    with pytest.raises(LMCompressError, match="group_size=24 does not divide head_dim=16"):
        UniformCodec(4, 24).encode(states(0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("codec", [UniformCodec(4, 8), NormalCodec(4), FP8Codec(8)])
def test_non_finite_states_rejected(bad, codec):
    x = states(0)
    x[1, 2, 3, 4] = bad
    with pytest.raises(LMCompressError, match="NaN/inf"):
        codec.encode(x)


def test_outliers_across_heads_are_per_token():
    x = states(7)  # [2, 3, 8, 16]: 48 elements per token over the 3 heads
    codec = OutlierCodec(UniformCodec(2, 16, granularity="layer"), 0.05, across_heads=True)
    parts = codec.encode(x)
    assert parts["outlier_idx"].shape == (2, 1, 8, 3)  # ceil(0.05 * 48) per token, shared by the heads
    x_hat = codec.decode(parts, 16, torch.float32)
    units = x.transpose(1, 2).reshape(2, 8, 48)
    top = units.abs().topk(3, dim=-1).indices
    restored = torch.gather(x_hat.transpose(1, 2).reshape(2, 8, 48), -1, top)
    assert torch.equal(restored, torch.gather(units, -1, top))
