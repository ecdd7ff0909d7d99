"""fuse_decoder on CUDA: the RoPE kernel equals transformers' bf16 RoPE bit for bit, SwiGLU within one unit in
the last place; a fused model's graph replays give its eager static steps' tokens and stay close to the unfused
model's eager decode (64 steps, bf16)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lmcompress._compat import cache_kwargs
from lmcompress.eval.graph_decode import StaticDecoder
from lmcompress.fused import fuse_decoder, fuse_rmsnorm
from lmcompress.fused.rope_kernel import rope_qk
from lmcompress.fused.swiglu_kernel import swiglu
from lmcompress.kv import CompressedCache, KVSpec, SnapKV

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("seq", [1, 37])
def test_rope_kernel_equals_transformers_bf16(seq):
    torch.manual_seed(seq)
    hq, hk, d = 32, 8, 128
    qkv = (torch.randn(1, seq, (hq + 2 * hk) * d, device="cuda") * 2).to(torch.bfloat16)
    q = qkv[..., : hq * d].view(1, seq, hq, d)
    k = qkv[..., hq * d : (hq + hk) * d].view(1, seq, hk, d)
    ang = torch.rand(1, seq, d // 2, device="cuda") * 3e4
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(torch.bfloat16)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(torch.bfloat16)
    qo, ko = rope_qk(q, k, cos, sin)
    qr, kr = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert torch.equal(qo, qr) and torch.equal(ko, kr)


def test_swiglu_kernel_within_one_ulp():
    torch.manual_seed(1)
    gu = (torch.randn(5, 2 * 14336, device="cuda") * 3).to(torch.bfloat16)
    g, u = gu[:, :14336], gu[:, 14336:]
    out, ref = swiglu(g, u), torch.nn.functional.silu(g) * u
    ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs().clamp_min(1e-3) * 2
    assert not out.isnan().any() and int(((out.float() - ref.float()).abs() > ulp).sum()) == 0


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192)
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


def test_fused_graph_replay_matches_eager_static_and_unfused_decode():
    plain, model = _model(), _model()
    fuse_rmsnorm(model)
    assert fuse_decoder(model) == {"attention": 4, "mlp": 4}
    ids = torch.randint(0, 512, (1, 700), device="cuda")
    spec = KVSpec(evict=SnapKV(ratio=0.875))
    tokens, logits = {}, {}
    with torch.no_grad():
        for use_graph in (False, True):
            cache = CompressedCache(model, spec)
            first = int(model(ids, **cache_kwargs(cache)).logits[:, -1].argmax(-1))
            dec = StaticDecoder(model, cache, 64, use_graph=use_graph)
            dec.start(first, 700)
            tokens[use_graph], logits[use_graph] = [], []
            for _ in range(64):
                dec.run(1)
                tokens[use_graph].append(int(dec.tok))
                logits[use_graph].append(dec.logits.float().clone())
            assert (dec.graph is not None) == use_graph
            dec.close()
        # the unfused model fed the same tokens (teacher forcing: near-tied logits of a random model may pick
        # another greedy token after a rounding difference, and then every later step differs)
        dyn = CompressedCache(plain, spec)
        plain(ids, **cache_kwargs(dyn))
        ref, fed = [], [first, *tokens[True][:-1]]  # first: the fused prefill's token fed to the graph run
        for t in fed:
            ref.append(plain(torch.tensor([[t]], device="cuda"), **cache_kwargs(dyn)).logits[:, -1].float())
    assert tokens[True] == tokens[False]
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(logits[True], ref))
    assert err < 5e-2, err  # bf16: concatenated projections and SiLU's exp round differently
    agree = sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(logits[True], ref))
    assert agree >= 56, agree  # of 64 steps
