"""KV quantization on the real default model (SmolLM2-135M): short-window checks of what BENCHMARKS.md measures
at full size."""

from __future__ import annotations

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.eval.tasks import KVError, Perplexity, RunContext
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.kv.quant import KIVI, QAQ

pytestmark = pytest.mark.golden


def test_kivi4_perplexity_close_to_full_precision(smollm):
    model, tok = smollm
    task = Perplexity(context_tokens=512, eval_tokens=128, chunk=64)
    fp = task.run(RunContext(model, tok, KVSpec())).metrics["perplexity"]
    kivi = task.run(RunContext(model, tok, KVSpec(quant=KIVI(bits=4)))).metrics["perplexity"]
    assert abs(kivi / fp - 1) < 0.02


def test_qaq_mixed_widths_on_real_states(smollm):
    model, tok = smollm
    spec = KVSpec(quant=QAQ(key_error=3e-3, value_error=3e-2, min_bits=1))
    res = KVError(samples=1, context_tokens=256, continuation_tokens=32).run(RunContext(model, tok, spec))
    assert res.metrics["top1_agreement"] > 0.85
    assert res.costs["ratio_bf16"] > 2.5
    cache = CompressedCache(model, spec)
    with torch.no_grad():
        model(tok("The quick brown fox " * 40, return_tensors="pt").input_ids, **cache_kwargs(cache))
    widths = cache.layers[10].store.width_histogram()
    assert len(widths["values"]) >= 3 and len(widths["keys"]) >= 2  # tokens really stored at several widths
