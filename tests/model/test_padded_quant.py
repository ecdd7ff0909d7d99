"""Padded batches with quantized KV (issue 9, item 8): a left-padded row decodes as the same sequence alone.

Pad tokens are freed after the first chunk, before anything is quantized, so they never enter KIVI's
per-channel key groups or its full-precision window: the logits of every decode step of a padded row equal
those of the row run alone with the same quantizer (to float rounding), and the row holds only its real tokens.
Before the fix the padded row of this test had 11x the logit error of the row alone (0.0103 vs 0.00095).
"""

from __future__ import annotations

import pytest
import torch

from lmcompress._compat import cache_kwargs, output_cache
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.models import tiny_model
from lmcompress.registry import KV_QUANTIZERS

pytestmark = pytest.mark.model

LONG, SHORT, STEPS = 80, 50, 4
GEN = torch.Generator().manual_seed(0)
ROW_A = torch.randint(3, 256, (1, LONG), generator=GEN)
ROW_B = torch.randint(3, 256, (1, SHORT), generator=GEN)
FEED = torch.randint(3, 256, (2, STEPS), generator=GEN)

SPECS = {
    "kivi": KVSpec(quant=KV_QUANTIZERS.get("kivi")(bits=2, group_size=16, residual=32)),
    "int": KVSpec(quant=KV_QUANTIZERS.get("int")(bits=2, group_size=16)),
}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def run_batch(model, spec):
    """Rows A and B (B left-padded to A's length) with a padding mask and per-row positions, as generate does."""
    pad = LONG - SHORT
    ids = torch.cat([ROW_A, torch.cat([torch.zeros(1, pad, dtype=torch.long), ROW_B], 1)], 0)
    mask = torch.ones(2, LONG, dtype=torch.long)
    mask[1, :pad] = 0
    cache = CompressedCache(model, spec)
    logits = []
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), **cache_kwargs(cache))
        for t in range(STEPS):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            out = model(FEED[:, t : t + 1], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                        **cache_kwargs(cache))
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1), cache


def run_alone(model, spec, ids, row):
    cache = CompressedCache(model, spec) if spec is not None else None
    logits = []
    with torch.no_grad():
        cache = output_cache(model(ids, **cache_kwargs(cache), use_cache=True))
        for t in range(STEPS):
            logits.append(model(FEED[row : row + 1, t : t + 1], **cache_kwargs(cache), use_cache=True).logits[0, -1])
    return torch.stack(logits, 0)


@pytest.mark.parametrize("name", list(SPECS))
def test_padded_row_decodes_as_alone(model, name):
    spec = SPECS[name]
    batch, cache = run_batch(model, spec)
    for row, ids in ((0, ROW_A), (1, ROW_B)):
        alone = run_alone(model, spec, ids, row)
        exact = run_alone(model, None, ids, row)
        quant_error = float((alone - exact).abs().max())
        assert quant_error > 1e-4  # the quantizer does change the logits: the comparison below means something
        assert float((batch[row] - alone).abs().max()) < 1e-5, (name, row)
    for layer in cache.layers:  # the pad tokens are gone: each row holds its real tokens only
        assert layer.held_per_head().tolist() == [[LONG + STEPS] * 2, [SHORT + STEPS] * 2]
