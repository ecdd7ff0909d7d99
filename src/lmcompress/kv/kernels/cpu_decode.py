"""Decode attention (one query token) over packed affine codes on the CPU, from the codes themselves.

For the asymmetric uniform codec (:class:`~lmcompress.kv.quant.uniform.UniformCodec`: ``x = s c + z`` with fp16
``s``, ``z`` per parameter group) neither keys nor values are dequantized; only the integer codes are unpacked to
float, one block of tokens at a time, and the scales and zero points enter as small products:

* keys per token (``token``/``head`` granularity, INT4; groups ``n`` of channels):
  ``q . k_t = sum_n s_tn (q_n . c_tn) + sum_n z_tn sum(q_n)``;
* keys per channel over blocks of ``g`` tokens (``channel``, KIVI): with the block's ``s_b, z_b: [D]``,
  ``q . k_t = (q * s_b) . c_t + q . z_b``: the scales fold into the query once per block;
* values per token (groups ``n``): ``sum_t p_t v_td = sum_t (p_t s_tn) c_td + sum_t p_t z_tn`` for ``d`` in
  group ``n``.

The scores of the packed tokens and of the full-precision tokens (the layer's residual window, KIVI's value
window) go through **one** softmax, so the result equals dequantize-then-SDPA up to float32 rounding. Nothing is
cached between steps: the only per-step temporaries are the float codes of one block (``BLOCK_TOKENS`` tokens)
and the ``[B, Hq, T]`` scores.

Used by :meth:`~lmcompress.kv.segment.KVSegment.attend` for one query on the CPU (the CUDA counterpart is the
Triton kernel of :mod:`.decode`). Rotated formats around these codecs are read with the query rotated in and the
output rotated back (:mod:`.rotated`); other formats (symmetric, codebooks, outliers, QAQ, ``layer`` granularity)
return None and the block-wise reference runs. ``LMCOMPRESS_NO_KERNELS=1`` forces the reference. Where the fused C
kernel is built (:mod:`.cpu_fused`: 2-, 4- and 8-bit codes, not rotated) it computes the same sums in one loop
per KV head instead of these torch products.
"""

from __future__ import annotations

import os

import torch

from ..quant.kivi_store import KIVIStore
from ..quant.packing import unpack_float
from ..quant.store import PackedStore
from ..quant.uniform import UniformCodec
from . import cpu_fused, rotated

#: widths read as byte planes of 32-bit words (:func:`_codes`); others are unpacked
WORD_BITS = (1, 2, 4)
#: tokens whose codes are read together (bounds the float temporaries: 1024 x D floats per head)
BLOCK_TOKENS = 1024


def enabled(x: torch.Tensor) -> bool:
    return not x.is_cuda and os.environ.get("LMCOMPRESS_NO_KERNELS", "") != "1"


def _readable(codec, key: bool) -> bool:
    if type(codec) is not UniformCodec or codec.symmetric:
        return False
    return codec.granularity in (("token", "head", "channel") if key else ("token", "head"))


def supported(store) -> bool:
    """Whether this path reads ``store``'s format (plain or KIVI stores of asymmetric uniform codes)."""
    return (type(store) in (PackedStore, KIVIStore) and _readable(rotated.inner(store.key_codec), True)
            and _readable(rotated.inner(store.value_codec), False))


def _byte_aligned(codec: UniformCodec, d: int) -> bool:
    """Whether the codes are read as byte planes (2/4-bit, whole 32-bit words of bytes per token, every
    parameter group in whole bytes); other widths are unpacked in channel order."""
    if codec.bits not in WORD_BITS:
        return False
    per = 8 // codec.bits
    gs = d if codec.granularity in ("head", "channel") else codec.group_size
    return d % (4 * per) == 0 and gs % per == 0


def _codes(part: torch.Tensor, codec: UniformCodec, d: int) -> list[torch.Tensor]:
    """Packed ``[..., P]`` uint8 -> float32 code planes: for byte-plane widths ``per = 8 / bits`` contiguous
    planes ``[..., P]``, plane ``s`` holding channels ``s::per``; else one plane ``[..., D]`` of all channels.

    Planes are cut from 32-bit words, four bytes per shift and mask (``(w >> bits*s) & 0x0303...``), then
    converted to float in one contiguous pass each: no per-code shifts, no stacking or interleaving."""
    if not _byte_aligned(codec, d):
        return [unpack_float(part, codec.bits, d)]
    bits = codec.bits
    words = part.contiguous().view(torch.int32)
    mask = ((1 << bits) - 1) * 0x01010101
    return [torch.bitwise_and(words >> (bits * s) if s else words, mask).view(torch.uint8).float()
            for s in range(8 // bits)]


def _channels(a: torch.Tensor, planes: int) -> list[torch.Tensor]:
    """Channel-order ``a: [..., D]`` -> the ``planes`` contiguous slices ``a[..., s::planes]``."""
    return [a] if planes == 1 else [a[..., s::planes].contiguous() for s in range(planes)]


def _dot(a: list[torch.Tensor], c: list[torch.Tensor]) -> torch.Tensor:
    """``sum_s a_s @ c_s^T`` (``a_s: [..., r, P]``, ``c_s: [..., t, P]`` -> ``[..., r, t]``; BLAS reads the codes
    transposed, far faster than a product with only ``r`` output columns)."""
    out = torch.matmul(a[0], c[0].transpose(-1, -2))
    for a_s, c_s in zip(a[1:], c[1:]):
        out += torch.matmul(a_s, c_s.transpose(-1, -2))
    return out


def _groups(codec: UniformCodec, d: int) -> int:
    return 1 if codec.granularity == "head" else d // codec.group_size


def _block_diag(q: torch.Tensor, ng: int) -> torch.Tensor:
    """``q: [B, H, G, D]`` -> ``[B, H, G*ng, D]`` with row ``(g, n)`` holding ``q[g]`` on group ``n``'s channels
    and zeros elsewhere (so one matmul gives every group's partial dot product)."""
    b, h, g, d = q.shape
    if ng == 1:
        return q
    eye = torch.eye(ng, dtype=q.dtype).repeat_interleave(d // ng, dim=1)  # [ng, D]
    return (q.unsqueeze(3) * eye).reshape(b, h, g * ng, d)


def _key_scores_token(codec: UniformCodec, parts: dict, start: int, end: int, d: int,
                      qbd: list[torch.Tensor], qsum: torch.Tensor, out: torch.Tensor) -> None:
    """Scores ``[B, H, G, end-start]`` of per-token keys into ``out``. ``qbd``: the block-diagonal queries
    ``[B, H, G*ng, D]`` cut into the code planes' channels; ``qsum: [B, H, G, ng]``: each group's query sum."""
    b, h, g, ng = qsum.shape
    c = _codes(parts["codes"][:, :, start:end], codec, d)
    s = parts["scale"][:, :, start:end].float().transpose(-1, -2)  # [B, H, ng, t]
    z = parts["zero"][:, :, start:end].float().transpose(-1, -2)
    qc = _dot(qbd, c)  # [B, H, G*ng, t]
    if ng == 1:
        torch.addcmul(qsum * z, qc, s, out=out)
    else:
        torch.add((qc.view(b, h, g, ng, -1) * s.unsqueeze(2)).sum(3), torch.matmul(qsum, z), out=out)


def _key_scores_channel(codec: UniformCodec, parts: dict, start: int, end: int, qg: torch.Tensor,
                        out: torch.Tensor) -> None:
    """Scores of per-channel keys (blocks of ``tb`` tokens; ``start``/``end`` multiples of ``tb``)."""
    b, h, g, d = qg.shape
    tb = codec.group_size
    n0, n1 = start // tb, end // tb
    c = _codes(parts["codes"][:, :, n0:n1], codec, d)  # planes [B, H, nb, tb, P]
    s = parts["scale"][:, :, n0:n1].float()  # [B, H, nb, D]
    z = parts["zero"][:, :, n0:n1].float()
    qs = _channels(qg.unsqueeze(2) * s.unsqueeze(3), len(c))  # q * s_b: [B, H, nb, G, P]
    sc = _dot(qs, c)  # [B, H, nb, G, tb]
    sc += torch.matmul(z, qg.transpose(-1, -2)).unsqueeze(-1)  # + q . z_b
    out.copy_(sc.transpose(2, 3).reshape(b, h, g, -1))


def _key_scores(codec: UniformCodec, parts: dict, n: int, qg: torch.Tensor) -> torch.Tensor:
    """``[B, H, G, n]`` unscaled scores ``q . k`` of the first ``n`` packed keys."""
    b, h, g, d = qg.shape
    scores = qg.new_empty((b, h, g, n))
    if codec.granularity == "channel":
        step = max(codec.group_size, BLOCK_TOKENS - BLOCK_TOKENS % codec.group_size)
        for start in range(0, n, step):
            end = min(n, start + step)
            _key_scores_channel(codec, parts, start, end, qg, scores[..., start:end])
        return scores
    ng = _groups(codec, d)
    qbd = _channels(_block_diag(qg, ng), _planes(codec, d))
    qsum = qg.view(b, h, g, ng, d // ng).sum(-1)  # [B, H, G, ng]
    for start in range(0, n, BLOCK_TOKENS):
        end = min(n, start + BLOCK_TOKENS)
        _key_scores_token(codec, parts, start, end, d, qbd, qsum, scores[..., start:end])
    return scores


def _planes(codec: UniformCodec, d: int) -> int:
    return 8 // codec.bits if _byte_aligned(codec, d) else 1


def _value_sum(codec: UniformCodec, parts: dict, p: torch.Tensor, d: int) -> torch.Tensor:
    """``sum_t p_t v_t`` over the first ``n = p.shape[-1]`` packed values: ``p: [B, H, G, n]`` ->
    ``[B, H, G, D]``."""
    b, h, g, n = p.shape
    ng = _groups(codec, d)
    per = _planes(codec, d)
    acc = [p.new_zeros((b, h, g, d // per)) for _ in range(per)]  # plane s: channels s::per
    bias = p.new_zeros((b, h, g, ng))
    for start in range(0, n, BLOCK_TOKENS):
        end = min(n, start + BLOCK_TOKENS)
        c = _codes(parts["codes"][:, :, start:end], codec, d)  # planes [B, H, t, D/per]
        s = parts["scale"][:, :, start:end].float()  # [B, H, t, ng]
        z = parts["zero"][:, :, start:end].float()
        pb = p[..., start:end]
        bias += torch.matmul(pb, z)  # [B, H, G, ng]
        if ng == 1:
            w = pb * s.transpose(-1, -2)
        else:  # one row per (query head, group); each group then keeps its own channels
            w = (pb.unsqueeze(-1) * s.unsqueeze(2)).transpose(-1, -2).reshape(b, h, g * ng, -1)
        for a_s, c_s in zip(acc, c):
            part = torch.matmul(w, c_s)  # [B, H, G*ng, D/per]
            if ng > 1:
                pg = part.shape[-1] // ng
                part = part.view(b, h, g, ng, ng, pg).diagonal(dim1=3, dim2=4).transpose(-1, -2)
            a_s += part.reshape(b, h, g, -1)
    out = acc[0] if per == 1 else torch.stack(acc, dim=-1).reshape(b, h, g, d)
    return out + bias.repeat_interleave(d // ng, dim=-1)


def decode_attention(store, fp_keys: torch.Tensor, fp_values: torch.Tensor, query: torch.Tensor,
                     scaling: float) -> torch.Tensor | None:
    """``[B, Hq, 1, D]`` attention of one query over ``store`` (packed) followed by the full-precision
    ``fp_keys``/``fp_values: [B, Hkv, m, D]``, or None when this path does not read the store's format."""
    if not enabled(query) or query.shape[2] != 1 or store.length == 0 or not supported(store):
        return None
    b, hq, _, d = query.shape
    hkv = fp_keys.shape[1]
    g = hq // hkv
    qg = query.reshape(b, hkv, g, d).float()
    n = store.length
    kparts = store.parts("keys")
    if isinstance(store, KIVIStore):
        vp = store.value_packed
        window = store.value_window_view()
        fp_v = fp_values if window is None or window.shape[2] == 0 else torch.cat(
            [window.to(fp_values.dtype), fp_values], dim=2)
    else:
        vp, fp_v = n, fp_values
    vparts = store.parts("values")
    m = fp_keys.shape[2]
    fused = cpu_fused.attention(store, kparts, vparts, n, vp, fp_keys, fp_v, qg, scaling)
    if fused is not None:
        return fused.reshape(b, hq, 1, d).to(query.dtype)
    scores = qg.new_empty((b, hkv, g, n + m))
    kc, vc = rotated.inner(store.key_codec), rotated.inner(store.value_codec)
    scores[..., :n] = _key_scores(kc, kparts, n, rotated.rotate_query(qg, store.key_codec))
    if m:
        scores[..., n:] = torch.matmul(qg, fp_keys.float().transpose(-1, -2))
    p = torch.softmax(scores.mul_(scaling), dim=-1)
    if vp:  # rotated values: the packed part's sum comes out in the rotated basis
        out = rotated.unrotate_output(_value_sum(vc, vparts, p[..., :vp], d), store.value_codec)
    else:
        out = qg.new_zeros((b, hkv, g, d))
    if fp_v.shape[2]:
        out += torch.matmul(p[..., vp:], fp_v.float())
    return out.reshape(b, hq, 1, d).to(query.dtype)
