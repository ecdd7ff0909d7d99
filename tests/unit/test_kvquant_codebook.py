"""KVQuant's parts without a model: codebook codes, sensitivity-weighted k-means, the quantizer's settings."""

from __future__ import annotations

import pytest
import torch

from lmcompress.errors import LMCompressError
from lmcompress.kv.parse import parse_method
from lmcompress.kv.quant import KVQuant, UniformKV
from lmcompress.kv.quant.codebook import CodebookCodec, uniform_levels, weighted_error, weighted_kmeans
from lmcompress.kv.quant.kvquant import KVQuantCalibration
from lmcompress.kv.spec import KVSpec


def test_uniform_levels_match_uniform_codec():
    x = torch.randn(1, 2, 16, 32, generator=torch.Generator().manual_seed(0))
    cb = CodebookCodec(uniform_levels(3), group_size=8, granularity="channel")
    out = cb.decode(cb.encode(x), 32, torch.float32)
    scale = cb.params(x)["scale"].float()  # [1, 2, 2, 32]: max - min per channel and 8 tokens
    bound = (scale / 7 / 2).repeat_interleave(8, dim=2) + 1e-6
    assert bool(((out - x).abs() <= bound).all())
    ref = UniformKV(key_bits=3, value_bits=3, key_granularity="channel", group_size=8).key_codec(0)
    diff = (out - ref.decode(ref.encode(x), 32, torch.float32)).abs()
    # same codes except near a rounding midpoint (the fp16 step differs: (max-min)/7 vs (max-min) * 1/7)
    assert float((diff < 1e-2).float().mean()) > 0.99 and bool((diff <= 2 * bound).all())


def test_codebook_decodes_to_nearest_level():
    levels = (0.0, 0.1, 0.2, 1.0)
    cb = CodebookCodec(levels, group_size=4, granularity="token")
    x = torch.tensor([[[[0.0, 0.04, 0.16, 1.0], [0.0, 0.65, 0.55, 1.0]]]])  # min 0, max 1 in every group
    out = cb.decode(cb.encode(x), 4, torch.float32)
    assert torch.allclose(out, torch.tensor([[[[0.0, 0.0, 0.2, 1.0], [0.0, 1.0, 0.2, 1.0]]]]), atol=1e-3)
    parts = cb.encode(x)
    assert parts["codes"].dtype == torch.uint8 and parts["codes"].shape[-1] == 1  # 4 two-bit codes per byte


def test_weighted_kmeans_finds_weighted_centres():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([0.05, 0.3, 0.55, 0.9])
    u = (centres[torch.randint(0, 4, (4000,), generator=g)] + 0.01 * torch.randn(4000, generator=g)).clamp(0, 1)
    levels = weighted_kmeans(u, torch.ones_like(u), 2)
    assert torch.allclose(levels, centres, atol=0.01)
    # weights move a level to the weighted mean of its cell
    w = torch.where(u > 0.7, torch.where(u > 0.9, 9.0, 1.0), 1.0)
    moved = weighted_kmeans(u, w, 2)
    cell = u > 0.7
    assert abs(float(moved[3]) - float((u[cell] * w[cell]).sum() / w[cell].sum())) < 1e-3


def test_weighted_kmeans_beats_uniform_levels():
    u = torch.rand(20000, generator=torch.Generator().manual_seed(2)) ** 3  # mass near 0
    w = torch.ones_like(u)
    fitted = weighted_kmeans(u, w, 2)
    best = weighted_error(u, w, fitted)
    assert best < 0.7 * weighted_error(u, w, torch.tensor(uniform_levels(2)))
    for i in range(4):  # a local optimum: moving any level by +-0.01 does not lower the error
        for step in (-0.01, 0.01):
            moved = fitted.clone()
            moved[i] += step
            assert weighted_error(u, w, moved.sort().values) >= best * (1 - 1e-6)
    with pytest.raises(LMCompressError, match="1-D"):
        weighted_kmeans(u.view(2, -1), w.view(2, -1), 2)


@pytest.mark.parametrize("levels, match", [((0.0, 0.5, 1.0), "3 levels"), ((0.5, 0.0), "sorted"),
                                           ((0.0, 1.5), r"\[0, 1\]")])
def test_bad_codebooks(levels, match):
    with pytest.raises(LMCompressError, match=match):
        CodebookCodec(levels)


def test_kvquant_settings_parse_and_round_trip(tmp_path):
    quant = parse_method("kvquant:bits=3,group_size=32").quant
    assert isinstance(quant, KVQuant) and quant.bits == 3 and quant.group_size == 32
    path = tmp_path / "c.safetensors"
    KVQuantCalibration(torch.tensor([uniform_levels(3)] * 2), torch.tensor([uniform_levels(3)] * 2),
                       {"bits": 3, "group_size": 32, "outliers": 0.01}).save(path)
    spec = KVSpec(quant=KVQuant(bits=3, group_size=32, calibration=str(path)))
    back = KVSpec.from_dict(spec.to_dict())
    assert back.quant == spec.quant
    assert back.quant.key_inner(1).levels == pytest.approx(uniform_levels(3), abs=1e-7)
    with pytest.raises(LMCompressError, match="group_size=32"):
        KVQuant(bits=3, group_size=64, calibration=str(path))
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(LMCompressError, match="cannot be read"):
        KVQuant(calibration=str(tmp_path / "bad.safetensors"))
