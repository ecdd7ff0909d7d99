import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcompress.errors import LMCompressError
from lmcompress.kv.quant import IntKV
from lmcompress.kv.quant.uniform import UniformTokenCodec


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([8, 16, 32]), sym=st.booleans(),
       scale=st.floats(1e-2, 1e2), seed=st.integers(0, 2**31 - 1))
def test_round_trip_error_at_most_half_a_step(bits, group, sym, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 5, 32, generator=g) * scale
    codec = UniformTokenCodec(bits, group, symmetric=sym)
    parts = codec.encode(x)
    y = codec.decode(parts, 32, torch.float32)
    step = parts["scale"].float().repeat_interleave(group, dim=-1)
    err = (x - y).abs()
    # half a quantization step, plus the fp16 rounding of the zero point (asymmetric)
    slack = 0 if sym else (x.abs().amax() * 2**-10)
    assert bool((err <= step / 2 * (1 + 1e-3) + slack + 1e-6).all())


def test_codes_use_full_range_and_parts_are_packed():
    x = torch.linspace(-1, 1, 64).reshape(1, 1, 1, 64)
    parts = UniformTokenCodec(4, 64).encode(x)
    assert parts["codes"].shape == (1, 1, 1, 32)
    assert parts["scale"].dtype == torch.float16 and parts["zero"].dtype == torch.float16
    from lmcompress.kv.quant.packing import unpack

    codes = unpack(parts["codes"], 4, 64)
    assert codes.min() == 0 and codes.max() == 15


def test_nonfinite_rejected():
    x = torch.zeros(1, 1, 2, 16)
    x[0, 0, 1, 3] = float("nan")
    with pytest.raises(LMCompressError, match="NaN/inf"):
        UniformTokenCodec(4, 16).encode(x)


def test_group_size_must_divide_head_dim():
    with pytest.raises(LMCompressError, match="does not divide head_dim=64"):
        UniformTokenCodec(4, 48).encode(torch.zeros(1, 1, 1, 64))


@pytest.mark.parametrize("bits", [0, 1, 3, 9])
def test_int_kv_bits_checked(bits):
    with pytest.raises(LMCompressError, match="allowed: 2, 4, 8"):
        IntKV(bits=bits)


def test_bits_per_value_counts_metadata():
    # 4-bit codes + fp16 scale and zero per 64 channels = 4 + 32/64 bits
    assert UniformTokenCodec(4, 64).bits_per_value(64) == pytest.approx(4.5)
    assert UniformTokenCodec(8, 32, symmetric=True).bits_per_value(64) == pytest.approx(8.5)
