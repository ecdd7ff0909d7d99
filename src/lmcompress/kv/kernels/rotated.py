"""Rotated formats for the decode paths: a :class:`~lmcompress.kv.quant.rotation.RotatedCodec` around a codec
that a decode path reads is read as that codec, with the query rotated in and the output rotated back.

Keys stored as ``k R`` give ``(q R) . (k R) = q . k`` (``R`` orthogonal), and values stored as ``v R`` give a
packed-part output ``sum_t p_t v_t R``, so ``out = (sum_t p_t v_t R) R^T``. Full-precision tokens stay in the
original basis and are attended with the original query.
"""

from __future__ import annotations

import torch

from ..quant.rotation import RotatedCodec, rotate, rotation_signs, unrotate


def inner(codec):
    """The codec a decode path reads: the wrapped one for rotated codecs, else ``codec`` itself."""
    return codec.inner if type(codec) is RotatedCodec else codec


def signs(codec, head_dim: int, device: torch.device) -> torch.Tensor | None:
    """The sign vector of a rotated codec (``R = diag(signs) H / sqrt(D)``), or None."""
    return rotation_signs(head_dim, codec.seed, device) if type(codec) is RotatedCodec else None


def rotate_query(query: torch.Tensor, key_codec) -> torch.Tensor:
    """``query [..., D]`` in the keys' basis (``q R`` for rotated keys), in ``query.dtype``."""
    s = signs(key_codec, query.shape[-1], query.device)
    return query if s is None else rotate(query, s).to(query.dtype)


def unrotate_output(out: torch.Tensor, value_codec) -> torch.Tensor:
    """A packed-part output ``[..., D]`` back in the original basis (``y R^T`` for rotated values)."""
    s = signs(value_codec, out.shape[-1], out.device)
    return out if s is None else unrotate(out, s).to(out.dtype)
