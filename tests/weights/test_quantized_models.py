"""A 4-bit checkpoint folder as ``--model``: ``load_model`` loads it through ``load_quantized`` (WQLinear layers,
any KV spec on top), and the bench's run specs record its weight format."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny
from lmcompress._compat import cache_kwargs
from lmcompress.cli import build_grid, build_parser
from lmcompress.kv import CompressedCache
from lmcompress.kv.parse import parse_method
from lmcompress.models import load_model, quantized_format
from lmcompress.weights import RTNConfig, WQLinear, quantize_, save_quantized

pytestmark = pytest.mark.model


@pytest.mark.parametrize(("fmt", "label"), [("awq", "awq-gemm w4 g32 asym"),
                                            ("compressed-tensors", "compressed-tensors pack-quantized w4 g32 asym")])
def test_quantized_folder_loads_as_a_model_and_composes_with_kv_specs(tmp_path, fmt, label):
    model = tiny("llama")
    quantize_(model, RTNConfig(group_size=32), progress=False)
    folder = save_quantized(model, tmp_path / fmt, format=fmt)
    assert quantized_format(str(folder)) == label
    assert quantized_format("tiny-llama") is None
    loaded, _ = load_model(str(folder))
    assert sum(isinstance(m, WQLinear) for m in loaded.modules()) == 28
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(2))
    cache = CompressedCache(loaded, parse_method("snapkv:window_size=16+kivi2:group_size=16", ratio=0.5))
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
        got = loaded(ids, **cache_kwargs(cache), use_cache=True).logits[:, -1]
    assert torch.equal(got, expected)  # prefill logits: eviction and KV quantization act after it
    assert max(cache.held_tokens()) <= 32  # ratio 0.5 of the 64 prompt tokens evicted

    args = build_parser().parse_args(["bench", "--model", str(folder), "--methods", "snapkv+kivi2",
                                      "--ratios", "0.5", "--lengths", "256", "--no-ppl"])  # fmt: skip
    runs = build_grid(args)
    assert runs and all(r.weights == label for r in runs)
    assert runs[0].to_dict()["weights"] == label
