"""fuse_decoder: the RoPE and SwiGLU Triton kernels (under the interpreter, in a subprocess) against
transformers' arithmetic (RoPE bit for bit, SwiGLU within one unit in the last place); the module swap keeps logits (concatenated projections sum in the same order on the
CPU here, so within float rounding); the static decode path over a fused model gives the eager path's tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.fused import FusedAttention, FusedMLP, fuse_decoder, fuse_rmsnorm
from lmcompress.models import tiny_model

ROOT = Path(__file__).resolve().parents[2]

KERNEL_CHECK = r"""
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from lmcompress.fused.rope_kernel import rope_qk
from lmcompress.fused.swiglu_kernel import swiglu
torch.manual_seed(0)
for b, s, hq, hk, d, dtype in ((1, 1, 8, 2, 32, torch.bfloat16), (2, 5, 4, 4, 16, torch.float16),
                              (1, 3, 6, 2, 8, torch.float32)):
    qkv = (torch.randn(b, s, (hq + 2 * hk) * d) * 2).to(dtype)
    q = qkv[..., : hq * d].view(b, s, hq, d)       # strided views of one projection, as in FusedAttention
    k = qkv[..., hq * d : (hq + hk) * d].view(b, s, hk, d)
    ang = torch.randn(1, s, d // 2) * 3
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype)
    qo, ko = rope_qk(q, k, cos, sin)
    qr, kr = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert qo.shape == qr.shape and ko.shape == kr.shape and qo.is_contiguous()
    assert torch.equal(qo, qr) and torch.equal(ko, kr), (dtype, (qo - qr).abs().max(), (ko - kr).abs().max())
    gu = (torch.randn(b, s, 2 * 48) * 3).to(dtype)
    g, u = gu[..., :48], gu[..., 48:]
    out, ref = swiglu(g, u), torch.nn.functional.silu(g) * u
    ulp = torch.finfo(dtype).eps * ref.float().abs().clamp_min(1e-3) * 2
    assert out.shape == ref.shape and int(((out.float() - ref.float()).abs() > ulp + 1e-6).sum()) == 0, dtype
print("ok")
"""


def test_kernels_match_transformers_in_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.parametrize("concat", [True, False])
def test_swap_keeps_logits_and_cache(concat):
    from lmcompress.kv import CompressedCache, KVSpec

    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        ref_cache = CompressedCache(model, KVSpec())
        ref_next = model(ids, **cache_kwargs(ref_cache)).logits
        counts = fuse_decoder(model, concat=concat)
        after = model(ids).logits
        cache = CompressedCache(model, KVSpec())
        nxt = model(ids, **cache_kwargs(cache)).logits
    assert counts == {"attention": 4, "mlp": 4}
    assert sum(isinstance(m, FusedAttention) for m in model.modules()) == 4
    assert sum(isinstance(m, FusedMLP) for m in model.modules()) == 4
    assert hasattr(model.model.layers[0].self_attn, "qkv_proj") == concat
    assert hasattr(model.model.layers[0].mlp, "gate_up_proj") == concat
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nxt, ref_next, rtol=1e-5, atol=1e-5)
    assert cache.nbytes == ref_cache.nbytes
    assert fuse_decoder(model) == {"attention": 0, "mlp": 4 * 0}  # already fused


def test_4bit_projections_concatenate_and_keep_logits():
    from lmcompress.weights import RTNConfig, quantize_
    from lmcompress.weights.linear import WQLinear

    model = tiny_model("llama")
    quantize_(model, RTNConfig(group_size=32), progress=False)
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
        fuse_decoder(model)
        after = model(ids).logits
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.qkv_proj, WQLinear) and attn.qkv_proj.out_features == 64 + 2 * 32
    assert isinstance(mlp.gate_up_proj, WQLinear)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_other_architectures_keep_their_attention():
    model = tiny_model("qwen3")  # q_norm/k_norm: not Llama's attention; its MLP is the gated SiLU one
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        assert fuse_decoder(model) == {"attention": 0, "mlp": 4}
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_static_decode_over_a_fused_model_matches_its_eager_decode_and_the_unfused_model():
    from lmcompress.eval.graph_decode import StaticDecoder
    from lmcompress.kv import CompressedCache, KVSpec, SnapKV

    plain, model = tiny_model("llama"), tiny_model("llama")
    fuse_rmsnorm(model)
    fuse_decoder(model)
    spec = KVSpec(evict=SnapKV(ratio=0.875, window_size=8))
    prompt = torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dyn, sta = CompressedCache(plain, spec), CompressedCache(model, spec)
        tok = plain(prompt, **cache_kwargs(dyn)).logits[:, -1].argmax(-1, keepdim=True)
        model(prompt, **cache_kwargs(sta))
        dec = StaticDecoder(model, sta, 32)
        dec.start(int(tok), 64)
        static = dec.generate(32)
        dec.close()
        eager = []
        for _ in range(32):
            tok = plain(tok, **cache_kwargs(dyn)).logits[:, -1].argmax(-1, keepdim=True)
            eager.append(int(tok))
    assert static == eager


@pytest.mark.parametrize("concat", [True, False])
def test_mlp_row_chunks_compute_the_same_function(concat, monkeypatch):
    """A forward with more rows than FusedMLP.max_rows runs in chunks (bounded intermediates), same output."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    fuse_decoder(model, concat=concat)
    with torch.no_grad():
        whole = model(ids).logits
        monkeypatch.setattr(FusedMLP, "max_rows", 5)  # 24 rows: chunks of 5, the last one of 4
        chunked = model(ids).logits
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
