"""AutoAWQ GEMM layout: nibble order, round trips, reference dequantization."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcompress.errors import LMCompressError
from lmcompress.weights.packing import (
    AWQ_ORDER,
    dequantize_gemm,
    pack_columns,
    pack_gemm,
    unpack_columns,
)
from lmcompress.weights.quantizer import quantize_weight


def test_nibble_i_holds_column_awq_order_i():
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]])
    packed = pack_columns(codes)
    assert packed.dtype == torch.int32 and packed.shape == (2, 1)
    for row in range(2):
        word = int(packed[row, 0]) & 0xFFFFFFFF
        nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
        assert nibbles == [int(codes[row, AWQ_ORDER[i]]) for i in range(8)]
    assert (int(packed[0, 0]) & 0xFFFFFFFF) == 0x75316420


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), words=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(rows, words, seed):
    codes = torch.randint(0, 16, (rows, 8 * words), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unpack_columns(pack_columns(codes)).long(), codes)


def test_pack_rejects_bad_codes_and_widths():
    with pytest.raises(LMCompressError, match="multiple of 8"):
        pack_columns(torch.zeros(2, 12, dtype=torch.int64))
    with pytest.raises(LMCompressError, match=r"\[0, 15\]"):
        pack_columns(torch.full((1, 8), 16))


def test_dequantize_gemm_matches_quantized_weight():
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    q = quantize_weight(w, 4, 32)
    qweight, qzeros, scales = pack_gemm(q.codes, q.zeros, q.scales)
    assert qweight.shape == (128, 6) and qzeros.shape == (4, 6) and scales.shape == (4, 48)
    assert scales.dtype == torch.float16
    assert torch.equal(dequantize_gemm(qweight, qzeros, scales, 32), q.dequantize().t())
