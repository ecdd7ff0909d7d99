"""Calls the fused C decode-attention kernel (:mod:`.cpu_native`) for the formats it reads.

It computes what :func:`lmcompress.kv.kernels.cpu_decode.decode_attention` computes with torch products (the same
scores from the codes, the same single softmax, the same value sums; equal up to float32 summation order), in one
loop per (batch row, KV head) with no temporaries but one unpacked token. It reads asymmetric uniform codes of 2, 4
or 8 bits, keys per token / head (groups of channels) or per channel over token blocks (KIVI), values per token /
head, not rotated; :func:`attention` returns None for anything else, and the torch path runs.
"""

from __future__ import annotations

import torch

from ..quant.uniform import UniformCodec
from . import cpu_native

BITS = (2, 4, 8)


def _reads(codec, key: bool, d: int) -> bool:
    if type(codec) is not UniformCodec or codec.symmetric or codec.bits not in BITS or d % (8 // codec.bits):
        return False
    granularities = ("token", "head", "channel") if key else ("token", "head")
    return codec.granularity in granularities and d <= 256


def _rows(t: torch.Tensor) -> bool:
    """``t: [B, H, ...]`` can be walked as ``B * H`` rows of stride ``t.stride(1)``, dense in its last dim."""
    return (t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1)) and t.stride(-1) == 1


def _groups(codec: UniformCodec, d: int) -> int:
    return d if codec.granularity in ("head", "channel") else codec.group_size


def attention(store, kparts: dict, vparts: dict, n: int, vp: int, fp_keys: torch.Tensor, fp_values: torch.Tensor,
              qg: torch.Tensor, scaling: float) -> torch.Tensor | None:
    """``[B, Hkv, G, D]`` float32 attention of ``qg: [B, Hkv, G, D]`` over ``n`` packed keys then ``fp_keys:
    [B, Hkv, m, D]``, and ``vp`` packed values then ``fp_values: [B, Hkv, n + m - vp, D]``; None when the kernel
    is not built or does not read this format."""
    kc, vc = store.key_codec, store.value_codec
    b, h, g, d = qg.shape
    if not (_reads(kc, True, d) and _reads(vc, False, d)) or g > 64:
        return None
    lib = cpu_native.library()
    if lib is None:
        return None
    m = fp_keys.shape[2]
    if fp_values.shape[2] != n + m - vp:
        return None
    if n == 0 or any(name not in kparts for name in ("codes", "scale", "zero")):
        return None
    if vp == 0:  # nothing packed yet on the value side (KIVI's window): empty stand-ins, never read
        vparts = {"codes": torch.empty((b, h, 0, 1), dtype=torch.uint8),
                  "scale": torch.empty((b, h, 0, 1)), "zero": torch.empty((b, h, 0, 1))}
    kcodes, vcodes = kparts["codes"], vparts["codes"]
    ks, kz = kparts["scale"].float(), kparts["zero"].float()
    vs, vz = vparts["scale"].float(), vparts["zero"].float()
    fk, fv = fp_keys.float(), fp_values.float()
    q = qg.contiguous()
    channel = kc.granularity == "channel"
    if not all(_rows(t) for t in (kcodes, ks, kz, vcodes, vs, vz, fk, fv)) or kcodes.dtype != torch.uint8:
        return None
    if ks.stride() != kz.stride() or vs.stride() != vz.stride():
        return None
    if channel:  # codes [B, H, nb, tb, P]: blocks must follow each other densely
        tb = kc.group_size
        if kcodes.dim() != 5 or kcodes.stride(2) != tb * kcodes.stride(3):
            return None
        kc_tok, ks_tok, kgroup = kcodes.stride(3), ks.stride(2), tb
    else:
        kc_tok, ks_tok, kgroup = kcodes.stride(2), ks.stride(2), _groups(kc, d)
    out = torch.empty((b, h, g, d), dtype=torch.float32)
    work = torch.empty((b * h * g * (n + m),), dtype=torch.float32)
    rc = lib.lmc_decode_attention(
        b * h, g, d, q.data_ptr(), float(scaling),
        n, 1 if channel else 0, kc.bits, kgroup,
        kcodes.data_ptr(), kcodes.stride(1), kc_tok, ks.data_ptr(), kz.data_ptr(), ks.stride(1), ks_tok,
        vp, vc.bits, _groups(vc, d),
        vcodes.data_ptr(), vcodes.stride(1), vcodes.stride(2), vs.data_ptr(), vz.data_ptr(), vs.stride(1),
        vs.stride(2),
        m, fk.data_ptr(), fk.stride(1), fk.stride(2), fv.data_ptr(), fv.stride(1), fv.stride(2),
        out.data_ptr(), work.data_ptr())
    return out if rc == 0 else None


def encode(codec, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """``codec.encode(x)`` for ``x: [B, H, T, D]`` on the CPU through the C encode kernel (bit-identical codes,
    scales and zero points: the kernel rounds every operation as the torch ops do), or None where it does not
    apply (symmetric codes, widths other than 2/4/8 bits, granularities other than token/head, the kernel not
    built) or ``x`` fails the finiteness check (the torch path then raises the library's error)."""
    if (type(codec) is not UniformCodec or codec.symmetric or codec.bits not in BITS
            or codec.granularity not in ("token", "head") or x.is_cuda or x.dim() != 4):
        return None
    b, h, t, d = x.shape
    group = d if codec.granularity == "head" else codec.group_size
    if d % group or d % (8 // codec.bits):
        return None
    lib = cpu_native.encode_library()
    if lib is None:
        return None
    xf = x.float().contiguous()
    ng = d // group
    codes = torch.empty((b, h, t, d * codec.bits // 8), dtype=torch.uint8)
    scale = torch.empty((b, h, t, ng), dtype=torch.float16)
    zero = torch.empty((b, h, t, ng), dtype=torch.float16)
    rc = lib.lmc_encode_affine(xf.data_ptr(), b * h * t, d, group, codec.bits, codes.data_ptr(), scale.data_ptr(),
                               zero.data_ptr())
    return {"scale": scale, "zero": zero, "codes": codes} if rc == 0 else None
