import pytest
import torch

from lmcompress.kv.reference import attend_blocks


def _sdpa(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                            attn_mask=mask, scale=scale)


@pytest.mark.parametrize("split", [[37], [1, 36], [10, 10, 17], [5, 0, 32]])
@pytest.mark.parametrize("masked", [False, True])
def test_blockwise_equals_full_attention(split, masked):
    g = torch.Generator().manual_seed(sum(split) + masked)
    b, hq, hkv, q, d = 2, 6, 2, 3, 8
    n = sum(split)
    query = torch.randn(b, hq, q, d, generator=g)
    keys = torch.randn(b, hkv, n, d, generator=g)
    values = torch.randn(b, hkv, n, d, generator=g)
    mask = torch.rand(b, 1, q, n, generator=g) > 0.3 if masked else None
    if masked:
        mask[..., 0] = True
    blocks, start = [], 0
    for s in split:
        blocks.append((keys[:, :, start:start + s], values[:, :, start:start + s],
                       None if mask is None else mask[..., start:start + s]))
        start += s
    out = attend_blocks(query, blocks, 0.3)
    ref = _sdpa(query, keys, values, mask, 0.3)
    assert (out.double() - ref).abs().max() < 1e-5


def test_rows_without_visible_keys_are_zero():
    query = torch.randn(1, 2, 2, 4)
    keys = torch.randn(1, 1, 3, 4)
    mask = torch.tensor([[[[True, True, False], [False, False, False]]]])
    out = attend_blocks(query, [(keys, keys, mask)], 1.0)
    assert torch.equal(out[:, :, 1], torch.zeros(1, 2, 4))
    assert out[:, :, 0].abs().sum() > 0
