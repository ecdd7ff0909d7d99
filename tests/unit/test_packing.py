import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcompress.errors import LMCompressError
from lmcompress.kv.quant.packing import container_bits, pack, packed_size, unpack


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 70), rows=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_pack_round_trip_is_exact(bits, n, rows, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_size(n, bits))
    assert torch.equal(unpack(packed, bits, n).long(), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_width_is_packed_exactly(bits):
    assert packed_size(64, bits) == 8 * bits
    assert container_bits(bits) == bits


def test_two_bit_layout_is_little_end_first():
    codes = torch.tensor([[1, 2, 3, 0]])
    assert pack(codes, 2).item() == 1 | (2 << 2) | (3 << 4)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_bits_rejected(bits):
    with pytest.raises(LMCompressError, match="bits"):
        container_bits(bits)
