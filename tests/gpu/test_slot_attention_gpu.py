"""The split-K slot decode attention on CUDA (bf16, 8B shape): equal to SDPA over the masked slots within bf16
tolerance, and replayed from a CUDA graph with the length changed on the device."""

from __future__ import annotations

import math

import pytest
import torch

from lmcompress.kv.kernels.slot_attention import slot_attention

pytestmark = pytest.mark.gpu


def _sdpa(q, k, v, length, scale):
    cap = k.shape[2]
    mask = torch.where(torch.arange(cap, device=q.device) < length, 0.0, float("-inf")).to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.view(1, 1, 1, cap),
                                                            scale=scale, enable_gqa=True)


def _ref(q, k, v, length, scale):
    g = q.shape[1] // k.shape[1]
    kk = k[:, :, :length].double().repeat_interleave(g, 1)
    vv = v[:, :, :length].double().repeat_interleave(g, 1)
    return ((q.double() @ kk.transpose(-1, -2)) * scale).softmax(-1) @ vv


@pytest.mark.parametrize("b,cap,length", [(1, 4160, 4097), (1, 32832, 32800), (4, 4160, 1), (2, 600, 600)])
def test_slot_attention_matches_sdpa_bf16(b, cap, length):
    torch.manual_seed(length)
    q = torch.randn(b, 32, 1, 128, device="cuda").to(torch.bfloat16)
    k = torch.randn(b, 8, cap, 128, device="cuda").to(torch.bfloat16)
    v = torch.randn(b, 8, cap, 128, device="cuda").to(torch.bfloat16)
    k[:, :, length:] = float("nan")
    v[:, :, length:] = float("nan")
    scale = 1 / math.sqrt(128)
    out = slot_attention(q, k, v, torch.tensor([length], device="cuda"), scale)
    ref = _ref(q, k, v, length, scale)
    k[:, :, length:] = 0
    v[:, :, length:] = 0
    sdpa = _sdpa(q, k, v, length, scale)
    err = float((out.double() - ref).norm() / ref.norm())
    err_sdpa = float((sdpa.double() - ref).norm() / ref.norm())
    assert torch.isfinite(out).all()
    assert err < 1e-2 and err < 3 * err_sdpa + 1e-3, (err, err_sdpa)


def test_slot_attention_replays_in_a_cuda_graph():
    torch.manual_seed(0)
    cap = 4160
    q = torch.randn(1, 32, 1, 128, device="cuda").to(torch.bfloat16)
    k = torch.randn(1, 8, cap, 128, device="cuda").to(torch.bfloat16)
    v = torch.randn(1, 8, cap, 128, device="cuda").to(torch.bfloat16)
    length = torch.tensor([100], device="cuda")
    slot_attention(q, k, v, length, 0.1)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = slot_attention(q, k, v, length, 0.1)
    for n in (100, 4000, 4160, 1):
        length.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, slot_attention(q, k, v, length, 0.1))
        assert float((out.double() - _ref(q, k, v, n, 0.1)).norm() / _ref(q, k, v, n, 0.1).norm()) < 1e-2
