"""The C encode kernel (kv/kernels/cpu_encode_native.c) gives bit-identical codes, scales and zero points to the
torch encode of UniformCodec, and leaves bad input to the torch path's errors."""

from __future__ import annotations

import pytest
import torch

from lmcompress.errors import LMCompressError
from lmcompress.kv.kernels import cpu_fused, cpu_native
from lmcompress.kv.quant.uniform import UniformCodec

pytestmark = pytest.mark.skipif(cpu_native.encode_library() is None, reason="no C compiler: kernel not built")


def _inputs():
    g = torch.Generator().manual_seed(0)
    yield "normal", torch.randn(2, 3, 17, 64, generator=g)
    yield "outlier channels", torch.randn(1, 2, 33, 64, generator=g) * torch.linspace(0.01, 300.0, 64)
    yield "tiny values", torch.randn(1, 2, 9, 64, generator=g) * 1e-6
    yield "subnormal fp16 range", torch.randn(1, 1, 5, 64, generator=g) * 1e-8
    const = torch.full((1, 2, 4, 64), 0.3)
    const[:, :, 1] = -7.25  # constant groups: scale 0 -> 1
    const[:, :, 2] = 0.0
    yield "constant groups", const
    yield "near the fp16 limit", (torch.rand(1, 1, 6, 64, generator=g) - 0.5) * 2 * 32000.0
    yield "bf16 states", torch.randn(1, 3, 11, 64, generator=g).to(torch.bfloat16)


CODECS = [UniformCodec(4, 64), UniformCodec(4, 32), UniformCodec(4, 16), UniformCodec(2, 16), UniformCodec(2, 32),
          UniformCodec(8, 32), UniformCodec(4, 64, granularity="head"), UniformCodec(2, 64, granularity="head")]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: f"{c.bits}b-{c.granularity}-g{c.group_size}")
@pytest.mark.parametrize("name,x", list(_inputs()), ids=[n for n, _ in _inputs()])
def test_bit_identical_to_the_torch_encode(monkeypatch, codec, name, x):
    fast = cpu_fused.encode(codec, x)
    assert fast is not None
    monkeypatch.setenv("LMCOMPRESS_NO_NATIVE", "1")
    ref = codec.encode(x)
    assert set(fast) == set(ref)
    for part in ref:
        assert fast[part].dtype == ref[part].dtype and fast[part].shape == ref[part].shape, part
        assert torch.equal(fast[part].view(torch.uint8) if fast[part].dtype == torch.float16 else fast[part],
                           ref[part].view(torch.uint8) if ref[part].dtype == torch.float16 else ref[part]), part


def test_encode_goes_through_the_kernel_and_round_trips():
    codec = UniformCodec(4, 32)
    x = torch.randn(1, 3, 8, 64)
    parts = codec.encode(x)
    assert torch.equal(parts["codes"], cpu_fused.encode(codec, x)["codes"])
    err = (codec.decode(parts, 64, torch.float32) - x).abs()
    assert bool((err <= parts["scale"].float().repeat_interleave(32, -1) / 2 + 1e-6).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 40000.0])
def test_bad_values_leave_the_error_to_the_torch_path(bad):
    x = torch.randn(1, 1, 3, 64)
    x[0, 0, 1, 5] = bad
    assert cpu_fused.encode(UniformCodec(4, 32), x) is None
    with pytest.raises(LMCompressError, match=r"NaN/inf|exceed"):
        UniformCodec(4, 32).encode(x)


def test_formats_it_does_not_read():
    x = torch.randn(1, 1, 32, 64)
    for codec in (UniformCodec(3, 16), UniformCodec(4, 32, symmetric=True), UniformCodec(2, 32, granularity="channel"),
                  UniformCodec(4, 64, granularity="layer")):
        assert cpu_fused.encode(codec, x) is None
