"""Round-to-nearest group quantizer: grid, error bound, symmetric mode, float16 scales."""

from __future__ import annotations

import pytest
import torch

from lmcompress.errors import LMCompressError
from lmcompress.weights.quantizer import fake_quantize, quantize_weight


@pytest.mark.parametrize("zero_point", [True, False])
def test_fake_quantize_equals_dequantized_codes(zero_point):
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    q = quantize_weight(w, 4, 64, zero_point)
    assert torch.equal(fake_quantize(w, 4, 64, zero_point), q.dequantize())
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15
    assert q.scales.shape == (32, 4) and q.scales.dtype == torch.float16


def test_asymmetric_error_is_at_most_half_a_step():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(2))
    q = quantize_weight(w, 4, 32)
    step = q.scales.float().repeat_interleave(32, dim=1)
    # every group's range [min, max] lies on or inside the grid, so rounding moves a weight by <= step / 2
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    # the group's extremes are representable: 16 levels span max - min
    grouped = w.reshape(16, 4, 32)
    span = grouped.amax(-1) - grouped.amin(-1)
    assert torch.allclose(q.scales.float() * 15, span, rtol=1e-3)


def test_symmetric_uses_zero_point_eight():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    q = quantize_weight(w, 4, 64, zero_point=False)
    assert (q.zeros == 8).all()
    assert torch.allclose(q.scales.float()[:, 0], w.abs().amax(1) / 7, rtol=1e-3)
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 15


def test_group_must_divide_input_size():
    with pytest.raises(LMCompressError, match="group_size=128 does not divide the input size 576"):
        quantize_weight(torch.zeros(8, 576), 4, 128)
