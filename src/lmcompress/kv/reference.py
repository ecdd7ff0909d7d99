"""Torch reference attention over compressed storage: blocks of keys/values combined with an online softmax,
so a packed cache is dequantized one block at a time and never whole.

This is the CPU path and the oracle that CUDA kernels are tested against.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def attend_blocks(
    query: torch.Tensor, blocks: Iterable[Block], scaling: float, *, return_lse: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``query`` over the concatenation of ``blocks``, computed block by block.

    Args:
        query: ``[B, Hq, q, D]``.
        blocks: ``(keys, values, mask)`` with keys/values ``[B, Hkv, b, D]`` (Hq a multiple of Hkv: grouped
            query heads share a KV head) and mask ``None`` (all visible) or bool ``[B or 1, 1, q, b]``
            (True = visible).
        scaling: softmax scale.

        return_lse: also return the log-sum-exp of each row's scaled scores, ``[B, Hq, q]`` float32 (-inf for
            rows with no visible key), from which any key's probability is ``exp(score * scaling - lse)``.

    Returns:
        ``[B, Hq, q, D]`` in ``query.dtype``; rows with no visible key are 0. With ``return_lse``, ``(out, lse)``.
    """
    b, hq, q, d = query.shape
    qg: torch.Tensor | None = None
    m = denom = acc = None
    for keys, values, mask in blocks:
        if keys.shape[2] == 0:
            continue
        hkv = keys.shape[1]
        if qg is None:
            qg = query.reshape(b, hkv, hq // hkv, q, d).float()
            m = torch.full((b, hkv, hq // hkv, q), -torch.inf, device=query.device)
            denom = torch.zeros_like(m)
            acc = torch.zeros((b, hkv, hq // hkv, q, values.shape[-1]), device=query.device)
        s = torch.einsum("bhgqd,bhkd->bhgqk", qg, keys.float()) * scaling
        if mask is not None:
            s = s.masked_fill(~mask.unsqueeze(2), -torch.inf)
        m_new = torch.maximum(m, s.amax(dim=-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe.unsqueeze(-1))
        corr = torch.exp(m - m_safe)
        denom = denom * corr + p.sum(dim=-1)
        acc = acc * corr.unsqueeze(-1) + torch.einsum("bhgqk,bhkd->bhgqd", p, values.float())
        m = m_new
    if acc is None:
        out = torch.zeros_like(query)
        lse = torch.full((b, hq, q), -torch.inf, device=query.device)
        return (out, lse) if return_lse else out
    out = acc / denom.clamp_min(1e-30).unsqueeze(-1)
    out = out.reshape(b, hq, q, -1).to(query.dtype)
    if not return_lse:
        return out
    lse = torch.where(denom > 0, m + torch.log(denom.clamp_min(1e-30)), torch.full_like(m, -torch.inf))
    return out, lse.reshape(b, hq, q)
