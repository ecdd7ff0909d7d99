"""Triton kernels against the torch reference on CUDA (the same checks run on CPU under ``TRITON_INTERPRET=1``:
``tests/unit/test_kv_kernels_interpret.py``)."""

from __future__ import annotations

import os

import pytest
import torch

from lmcompress._compat import cache_kwargs

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_pack_kernel_matches_codec_on_gpu():
    from kernel_checks import check_pack

    check_pack("cuda", tokens=1024, head_dim=128)


#: the dispatch's choice ({}) and other launch configurations of the same kernel
DECODE_OPTIONS = [(torch.bfloat16, {}), (torch.float16, {}), (torch.float32, {}), (torch.bfloat16, {"num_warps": 4}),
                  (torch.bfloat16, {"unpack": 1}), (torch.bfloat16, {"num_warps": 2, "block_n": 64})]


@cuda
@pytest.mark.parametrize(("dtype", "options"), DECODE_OPTIONS)
def test_decode_kernel_matches_reference_on_gpu(dtype, options):
    from kernel_checks import check_decode

    worst = check_decode("cuda", dtype, tokens=4096, head_dim=128, batch=2, kv_heads=8, groups=4, splits=None,
                         options=options)
    assert worst < 1e-2


@cuda
def test_merge_with_full_precision_tokens_on_gpu():
    from kernel_checks import check_merge

    check_merge("cuda")


@cuda
def test_store_dispatch_on_gpu():
    from kernel_checks import check_store_dispatch

    check_store_dispatch("cuda")


@cuda
def test_codebook_codes_on_the_half_path_on_gpu():
    from kernel_checks import check_codebook_half

    check_codebook_half("cuda")


@cuda
def test_cache_uses_kernels_on_gpu():
    """A model decoding with a KIVI cache on CUDA goes through the kernel and matches the reference path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmcompress.kv import CompressedCache, KVSpec
    from lmcompress.kv.kernels import dispatch
    from lmcompress.kv.quant import KIVI

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model = LlamaForCausalLM(config).cuda().eval()
    ids = torch.randint(0, 256, (1, 200), device="cuda")
    outs = {}
    torch.set_grad_enabled(False)
    for flag in ("1", "0"):
        os.environ["LMCOMPRESS_NO_KERNELS"] = flag
        cache = CompressedCache(model, KVSpec(quant=KIVI(bits=2, group_size=32, residual=64)))
        model(ids[:, :160], **cache_kwargs(cache))
        assert dispatch.kernel_format(cache.layers[0].store) is not None
        assert dispatch.enabled(ids) == (flag == "0")
        outs[flag] = torch.cat([model(ids[:, i : i + 1], **cache_kwargs(cache)).logits for i in range(160, 200)], 1)
    os.environ.pop("LMCOMPRESS_NO_KERNELS")
    torch.set_grad_enabled(True)
    assert float((outs["0"] - outs["1"]).abs().max()) < 2e-2
