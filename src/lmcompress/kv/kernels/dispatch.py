"""When the Triton kernels run: CUDA tensors, Triton importable, and a storage format the kernels read.

Rotated formats (``RotatedCodec`` around such a codec) run the same kernels with the query rotated in and the output
rotated back (:mod:`.rotated`); Lloyd-Max codebook codes (TurboKV) are read through a ``2**bits`` lookup table. Everything else (CPU, outliers, symmetric or codebook codecs, QAQ's mixed-bit buckets, 1/3-bit codes, head_dim
or groups that are not powers of two) returns None and the torch reference path runs. Set
``LMCOMPRESS_NO_KERNELS=1`` to force the reference path (for comparisons).
"""

from __future__ import annotations

import os

import torch

from ...triton_support import triton_available
from ..quant.kivi_store import KIVIStore
from ..quant.lloyd_max import LloydMaxCodec, lloyd_max_codebook
from ..quant.store import PackedStore
from ..quant.uniform import UniformCodec
from . import rotated

KERNEL_BITS = (2, 4, 8)


def enabled(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("LMCOMPRESS_NO_KERNELS", "") != "1" and triton_available()


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def packable(codec, head_dim: int) -> bool:
    """Whether the quantize-and-pack kernel produces ``codec``'s parts for states of ``head_dim`` channels."""
    if type(codec) is not UniformCodec or codec.symmetric or codec.bits not in KERNEL_BITS:
        return False
    per = 8 // codec.bits
    if not (_pow2(head_dim) and head_dim >= 16):
        return False
    if codec.granularity == "channel":
        return _pow2(codec.group_size) and codec.group_size >= 16
    if codec.granularity == "head":
        return True
    return codec.granularity == "token" and _pow2(codec.group_size) and codec.group_size >= per


def _codebook(codec, head_dim: int) -> bool:
    """Whether the decode kernel reads ``codec`` as codebook codes (Lloyd-Max: ``level[c] * scale`` per token and
    group, through a ``2**bits`` lookup table)."""
    if type(codec) is not LloydMaxCodec or codec.bits not in KERNEL_BITS:
        return False
    if not (_pow2(head_dim) and head_dim >= 16) or head_dim % codec.group(head_dim):
        return False
    g = codec.group(head_dim)
    return _pow2(g) and g >= 8 // codec.bits


def _group(codec, head_dim: int) -> int:
    if type(codec) is LloydMaxCodec:
        return codec.group(head_dim)
    return head_dim if codec.granularity == "head" else codec.group_size


def quantize_pack(codec, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The codec's parts of ``x: [B, H, T, D]`` from the Triton kernel, or None."""
    if not enabled(x) or not packable(codec, x.shape[-1]):
        return None
    from . import pack

    return pack.quantize_pack(x, codec.bits, codec.granularity, codec.group_size)


def kernel_format(store) -> dict | None:
    """Kernel arguments describing ``store``'s layout, or None when the decode kernel cannot read it."""
    if type(store) not in (PackedStore, KIVIStore):
        return None
    kc, vc = rotated.inner(store.key_codec), rotated.inner(store.value_codec)  # rotated: read as the inner codec
    d = store.head_dim
    if not all(packable(c, d) or _codebook(c, d) for c in (kc, vc)) or kc.bits != vc.bits:
        return None
    if getattr(vc, "granularity", "token") == "channel" or d // (8 // kc.bits) < 16:
        return None
    key_tb = kc.group_size if getattr(kc, "granularity", "token") == "channel" else 1
    return {"bits": kc.bits, "key_token_block": key_tb, "key_group": _group(kc, d), "value_group": _group(vc, d)}


def _with_codebook(codec, parts: dict, head_dim: int, device) -> tuple[dict, torch.Tensor | None]:
    """Parts as the kernel takes them (codebook codes get a zero ``zero``) and the codec's table or None."""
    if type(codec) is not LloydMaxCodec:
        return parts, None
    levels, _ = lloyd_max_codebook(codec.bits, codec.group(head_dim), device)
    return {**parts, "zero": torch.zeros_like(parts["scale"])}, levels


def decode_attention(store, fp_keys: torch.Tensor, fp_values: torch.Tensor, query: torch.Tensor,
                     scaling: float) -> torch.Tensor | None:
    """``[B, Hq, 1, D]`` attention of one query over ``store`` (packed) plus full-precision tokens, or None."""
    if not enabled(query) or store.length == 0 or query.shape[2] != 1:
        return None
    fmt = kernel_format(store)
    if fmt is None:
        return None
    from . import decode

    keys, values, packed, tail_k, tail_v = store.kernel_view()  # tail keys come decoded (original basis)
    if tail_k is not None:  # KIVI: the newest values of the packed region are in full precision
        fp_keys = torch.cat([tail_k.to(fp_keys.dtype), fp_keys], dim=2)
        fp_values = torch.cat([tail_v.to(fp_values.dtype), fp_values], dim=2)
    if packed == 0:
        b, hq, _, d = query.shape
        out = query.new_zeros((b, hq, 1, d))
        lse = torch.full((b, hq, 1), -torch.inf, device=query.device)
    else:
        d = store.head_dim
        keys, key_lut = _with_codebook(rotated.inner(store.key_codec), keys, d, query.device)
        values, value_lut = _with_codebook(rotated.inner(store.value_codec), values, d, query.device)
        q_rot = rotated.rotate_query(query, store.key_codec)  # rotated keys: q R . k R = q . k
        out, lse = decode.decode_attention(q_rot, keys, values, scaling=scaling, tokens=packed, key_lut=key_lut,
                                           value_lut=value_lut, **fmt)
        out = rotated.unrotate_output(out, store.value_codec)  # rotated values: (sum p v R) R^T
    return decode.merge_full_precision(out, lse, query, fp_keys, fp_values, scaling)
