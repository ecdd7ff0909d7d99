"""When the Triton kernels run: CUDA tensors, Triton importable, and a storage format the kernels read.

Rotated formats (``RotatedCodec`` around such a codec) run the same kernels with the query rotated in and the output
rotated back (:mod:`.rotated`). Everything else (CPU, outliers, symmetric or codebook codecs, QAQ's mixed-bit buckets, 1/3-bit codes, head_dim
or groups that are not powers of two) returns None and the torch reference path runs. Set
``LMCOMPRESS_NO_KERNELS=1`` to force the reference path (for comparisons).
"""

from __future__ import annotations

import os

import torch

from ...triton_support import triton_available
from ..quant.kivi_store import KIVIStore
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
    if not (packable(kc, d) and packable(vc, d)) or kc.bits != vc.bits or vc.granularity == "channel":
        return None
    if d // (8 // kc.bits) < 16:
        return None
    key_tb = kc.group_size if kc.granularity == "channel" else 1
    key_group = d if kc.granularity == "head" else kc.group_size
    value_group = d if vc.granularity == "head" else vc.group_size
    return {"bits": kc.bits, "key_token_block": key_tb, "key_group": key_group, "value_group": value_group}


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
        q_rot = rotated.rotate_query(query, store.key_codec)  # rotated keys: q R . k R = q . k
        out, lse = decode.decode_attention(q_rot, keys, values, scaling=scaling, tokens=packed, **fmt)
        out = rotated.unrotate_output(out, store.value_codec)  # rotated values: (sum p v R) R^T
    return decode.merge_full_precision(out, lse, query, fp_keys, fp_values, scaling)
