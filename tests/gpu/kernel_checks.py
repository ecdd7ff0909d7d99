"""Kernel-vs-reference checks shared by the GPU tests (CUDA tensors) and the CPU tests (the same checks run in a
subprocess with ``TRITON_INTERPRET=1`` on tiny shapes). Each function raises AssertionError on a mismatch."""

from __future__ import annotations

import torch

from lmcompress.kv.quant.uniform import UniformCodec
from lmcompress.kv.reference import attend_blocks

PACK_CASES = [("token", 32, 2), ("token", 16, 4), ("head", 64, 2), ("channel", 32, 2), ("channel", 16, 4),
              ("token", 32, 8)]
DECODE_CASES = [("channel", 2), ("channel", 4), ("token", 2), ("token", 4), ("token", 8)]


def check_pack(device: str, tokens: int = 64, head_dim: int = 64) -> None:
    """Triton quantize-and-pack gives the torch codec's parts, bitwise."""
    from lmcompress.kv.kernels import pack

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, tokens, head_dim, generator=g) * 2 + torch.randn(head_dim, generator=g)).to(device)
    for gran, group, bits in PACK_CASES:
        codec = UniformCodec(bits, group, granularity=gran)
        ref = codec.encode(x.cpu())
        got = pack.quantize_pack(x, bits, gran, group)
        for name in ("scale", "zero"):
            assert torch.equal(ref[name], got[name].cpu()), (gran, group, bits, name)
        assert torch.equal(ref["codes"], got["codes"].cpu()), (gran, group, bits, "codes")


def check_decode(device: str, dtype: torch.dtype, tokens: int = 256, head_dim: int = 64, batch: int = 2,
                 kv_heads: int = 2, groups: int = 4, splits: int | None = 3, options: dict | None = None) -> float:
    """Decode attention over packed K/V equals the torch reference over the dequantized states; returns the
    largest relative error (max abs difference / max abs reference). ``options``: kernel configuration
    (``block_n``, ``num_warps``, ``maxnreg``, ``unpack``) passed to ``decode_attention``."""
    from lmcompress.kv.kernels import decode

    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for key_gran, bits in DECODE_CASES:
        kcodec = UniformCodec(bits, 32, granularity=key_gran)
        vcodec = UniformCodec(bits, 32)
        k = torch.randn(batch, kv_heads, tokens, head_dim, generator=g) + torch.randn(head_dim, generator=g) * 2
        v = torch.randn(batch, kv_heads, tokens, head_dim, generator=g)
        q = (torch.randn(batch, kv_heads * groups, 1, head_dim, generator=g)).to(dtype)
        kp = {n: t.to(device) for n, t in kcodec.encode(k).items()}
        vp = {n: t.to(device) for n, t in vcodec.encode(v).items()}
        kd = kcodec.decode({n: t.cpu() for n, t in kp.items()}, head_dim, torch.float32)
        vd = vcodec.decode({n: t.cpu() for n, t in vp.items()}, head_dim, torch.float32)
        scaling = head_dim**-0.5
        ref, lse_ref = attend_blocks(q.float(), [(kd, vd, None)], scaling, return_lse=True)
        out, lse = decode.decode_attention(
            q.to(device), kp, vp, bits=bits, key_token_block=32 if key_gran == "channel" else 1,
            key_group=32, value_group=32, scaling=scaling, splits=splits, **(options or {}),
        )
        assert out.dtype == dtype and out.shape == ref.shape
        rel = float((out.float().cpu() - ref).abs().max() / ref.abs().max())
        assert rel < 1e-2, (key_gran, bits, rel)
        assert float((lse.cpu() - lse_ref).abs().max()) < 1e-2, (key_gran, bits)
        worst = max(worst, rel)
    return worst


def check_merge(device: str) -> None:
    """Packed result merged with full-precision tokens equals attention over all of them."""
    from lmcompress.kv.kernels import decode

    g = torch.Generator().manual_seed(2)
    kcodec, vcodec = UniformCodec(4, 32, granularity="channel"), UniformCodec(4, 32)
    k, v = torch.randn(1, 2, 64, 64, generator=g), torch.randn(1, 2, 64, 64, generator=g)
    fk, fv = torch.randn(1, 2, 5, 64, generator=g), torch.randn(1, 2, 5, 64, generator=g)
    q = torch.randn(1, 4, 1, 64, generator=g)
    kp = {n: t.to(device) for n, t in kcodec.encode(k).items()}
    vp = {n: t.to(device) for n, t in vcodec.encode(v).items()}
    kd, vd = kcodec.decode(kcodec.encode(k), 64, torch.float32), vcodec.decode(vcodec.encode(v), 64, torch.float32)
    out, lse = decode.decode_attention(q.to(device), kp, vp, bits=4, key_token_block=32, key_group=32,
                                       value_group=32, scaling=0.125)
    merged = decode.merge_full_precision(out, lse, q.to(device), fk.to(device), fv.to(device), 0.125)
    ref = attend_blocks(q, [(kd, vd, None), (fk, fv, None)], 0.125)
    assert float((merged.cpu() - ref).abs().max()) < 2e-3


def check_store_dispatch(device: str) -> None:
    """The layer-level dispatch over KIVI's store (packed keys, values partly in its full-precision window) and
    over a per-token store equals the reference attention over the dequantized states."""
    from lmcompress.kv.kernels import dispatch
    from lmcompress.kv.quant import KIVI, IntKV, Rotated, TurboKV

    g = torch.Generator().manual_seed(3)
    kivi, int4 = KIVI(bits=2, group_size=32, residual=64), IntKV(bits=4, group_size=32)
    # rotated formats: the same kernels with the query rotated in and the output rotated back
    # and Lloyd-Max codebook codes (TurboKV: rotated, per head or per 32 channels) through a lookup table
    for quant in (kivi, int4, Rotated(base=kivi), Rotated(base=int4, keys=False), Rotated(base=int4, values=False),
                  TurboKV(key_bits=2, value_bits=2), TurboKV(key_bits=4, value_bits=4, group_size=32)):
        assert dispatch.kernel_format(quant.new_store(0, 64, torch.float32)) is not None, quant
        store = quant.new_store(0, 64, torch.float32)
        for _ in range(3):
            store.append(torch.randn(1, 2, 64, 64, generator=g).to(device),
                         torch.randn(1, 2, 64, 64, generator=g).to(device))
        fk, fv = torch.randn(1, 2, 7, 64, generator=g).to(device), torch.randn(1, 2, 7, 64, generator=g).to(device)
        q = torch.randn(1, 4, 1, 64, generator=g).to(device)
        out = dispatch.decode_attention(store, fk, fv, q, 0.125) if device == "cuda" else _dispatch_cpu(
            dispatch, store, fk, fv, q)
        k, v = store.dequantize()
        ref = attend_blocks(q, [(k, v, None), (fk, fv, None)], 0.125)
        assert float((out.cpu() - ref.cpu()).abs().max()) < 1e-4, quant


def check_codebook_half(device: str) -> None:
    """Lloyd-Max codebook codes on the bf16 path (codes looked up, dequantized in fp16): within the bf16 path's
    error of fp32 attention over the dequantized states."""
    from lmcompress.kv.kernels import dispatch
    from lmcompress.kv.quant import TurboKV

    g = torch.Generator().manual_seed(5)
    store = TurboKV(key_bits=2, value_bits=2).new_store(0, 64, torch.bfloat16)
    store.append(torch.randn(1, 2, 96, 64, generator=g).bfloat16().to(device),
                 torch.randn(1, 2, 96, 64, generator=g).bfloat16().to(device))
    fk = torch.randn(1, 2, 3, 64, generator=g).bfloat16().to(device)
    fv = torch.randn(1, 2, 3, 64, generator=g).bfloat16().to(device)
    q = torch.randn(1, 4, 1, 64, generator=g).bfloat16().to(device)
    out = dispatch.decode_attention(store, fk, fv, q, 0.125) if device == "cuda" else _dispatch_cpu(
        dispatch, store, fk, fv, q)
    k, v = store.dequantize()
    ref = attend_blocks(q.float(), [(k.float(), v.float(), None), (fk.float(), fv.float(), None)], 0.125)
    err = float((out.float().cpu() - ref.cpu()).abs().max()) / float(ref.abs().max())
    assert err < 1e-2, err


def _dispatch_cpu(dispatch, store, fk, fv, q):
    """dispatch.decode_attention minus its CUDA check (the interpreter runs the kernels on CPU tensors)."""
    enabled = dispatch.enabled
    dispatch.enabled = lambda x: True
    try:
        return dispatch.decode_attention(store, fk, fv, q, 0.125)
    finally:
        dispatch.enabled = enabled


if __name__ == "__main__":  # run by the CPU test under TRITON_INTERPRET=1
    check_pack("cpu")
    print("decode rel err", check_decode("cpu", torch.float32, tokens=128, batch=1))
    check_decode("cpu", torch.bfloat16, tokens=96, batch=1, groups=3, splits=2)
    check_decode("cpu", torch.float16, tokens=64, batch=1, splits=1, options={"unpack": 0})
    check_decode("cpu", torch.bfloat16, tokens=128, batch=1, splits=1, options={"block_n": 64})
    check_merge("cpu")
    check_store_dispatch("cpu")
    check_codebook_half("cpu")
    print("ok")
