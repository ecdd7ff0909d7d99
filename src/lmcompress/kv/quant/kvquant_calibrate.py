"""Calibration of KVQuant's per-layer non-uniform data types (sensitivity-weighted k-means).

For calibration text ``input_ids: [N, T]`` the model runs forward with the language-model loss; forward hooks
capture every layer's pre-RoPE keys (the ``k_norm`` / ``k_proj`` output) and values (``v_proj``) and
``torch.autograd.grad`` gives the loss's gradient with respect to them (no parameter gradients are accumulated).
The Fisher approximation weights each element by ``g**2``; an element normalised as ``u = (x - zero) / scale``
(with the quantizer's own groups and outliers, which are left out) contributes ``g**2 * scale**2 (u - level)**2``
to the output error, so the levels of each layer minimise ``sum g**2 scale**2 (u - level(u))**2``
(:func:`~.codebook.weighted_kmeans`), as in KVQuant.
"""

from __future__ import annotations

import torch

from ... import _compat
from ...errors import LMCompressError
from .codebook import CodebookCodec, uniform_levels, weighted_kmeans
from .kvquant import KVQuantCalibration, model_identity
from .outliers import top_magnitudes

#: elements per layer and stream kept for the k-means (a seeded random subset beyond it).
MAX_SAMPLES = 2_000_000


def _heads(x: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """``[B, T, H*D]`` or ``[B, T, H, D]`` -> ``[B, H, T, D]`` float32."""
    b, t = x.shape[:2]
    return x.reshape(b, t, kv_heads, head_dim).transpose(1, 2).float()


def _samples(x: torch.Tensor, g: torch.Tensor, codec: CodebookCodec, outliers: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised values ``u`` and weights ``g**2 scale**2`` (``[n]`` each) of ``x, g: [B, H, T, D]``."""
    tb = codec.token_block
    t = x.shape[2] - x.shape[2] % tb
    x, g = x[:, :, :t], g[:, :, :t]
    ignore = top_magnitudes(x, outliers, tb)[1] if outliers > 0 else torch.zeros_like(x, dtype=torch.bool)
    params = codec.params(x, ignore)
    u = codec.normalize(x, params)
    from . import granularity as gr

    scale = gr.expand(params["scale"].float(), codec.granularity, codec.group_size, x.shape)
    w = g.float() ** 2 * scale**2
    keep = ~ignore
    return u[keep], w[keep]


def calibrate_kvquant(model: torch.nn.Module, input_ids: torch.Tensor, *, bits: int = 2, group_size: int = 64,
                      outliers: float = 0.01, seed: int = 0) -> KVQuantCalibration:
    """Fit ``kvquant`` codebooks for ``model`` on ``input_ids: [N, T]`` (T at least ``group_size``).

    Returns a :class:`~.kvquant.KVQuantCalibration` (``key_levels``, ``value_levels`` ``[L, 2**bits]``) whose
    metadata names the model and the settings; save it with ``.save(path)``.
    """
    num_layers, _, kv_heads, head_dim = _compat.kv_geometry(model.config)
    if input_ids.dim() != 2 or input_ids.shape[1] < group_size:
        raise LMCompressError(f"calibration input_ids must be [N, T] with T >= group_size={group_size}, "
                              f"got {tuple(input_ids.shape)}")
    attns = _compat.attention_modules(model)
    mods = [_compat.pre_rope_key_value_modules(a) for a in attns]
    if len(attns) != num_layers or any(m is None for m in mods):
        raise LMCompressError("kvquant calibration needs separate key and value projections (k_proj/v_proj); "
                              "this architecture fuses them")
    captured: dict[tuple[int, int], torch.Tensor] = {}
    handles = []
    for i, (km, vm) in enumerate(mods):
        for j, m in enumerate((km, vm)):
            handles.append(m.register_forward_hook(lambda _m, _a, out, key=(i, j): captured.__setitem__(key, out)))
    key_codec = CodebookCodec(uniform_levels(bits), group_size, granularity="channel")
    value_codec = CodebookCodec(uniform_levels(bits), group_size, granularity="token")
    us: dict[tuple[int, int], list] = {k: [] for k in ((i, j) for i in range(num_layers) for j in (0, 1))}
    ws: dict[tuple[int, int], list] = {k: [] for k in us}
    try:
        for row in input_ids:
            captured.clear()
            ids = row.view(1, -1).to(next(model.parameters()).device)
            with torch.enable_grad():
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                loss = model(inputs_embeds=embeds, labels=ids, use_cache=False).loss
                keys = sorted(captured)
                grads = torch.autograd.grad(loss, [captured[k] for k in keys], allow_unused=True)
            for key, grad in zip(keys, grads, strict=True):
                x = _heads(captured[key].detach(), kv_heads, head_dim)
                g = torch.zeros_like(x) if grad is None else _heads(grad, kv_heads, head_dim)
                codec = key_codec if key[1] == 0 else value_codec
                u, w = _samples(x, g, codec, outliers)
                us[key].append(u.cpu())
                ws[key].append(w.cpu())
    finally:
        for h in handles:
            h.remove()
        captured.clear()
    gen = torch.Generator().manual_seed(seed)
    levels = torch.zeros(2, num_layers, 1 << bits)
    for (i, j), parts in us.items():
        u, w = torch.cat(parts), torch.cat(ws[(i, j)])
        if u.numel() > MAX_SAMPLES:
            pick = torch.randperm(u.numel(), generator=gen)[:MAX_SAMPLES]
            u, w = u[pick], w[pick]
        if float(w.sum()) <= 0:  # no gradient reached this layer: weigh every element alike
            w = torch.ones_like(w)
        levels[j, i] = weighted_kmeans(u, w / w.mean(), bits)
    meta = {**model_identity(model), "bits": bits, "group_size": group_size, "outliers": outliers,
            "tokens": int(input_ids.numel()), "weights": "fisher (squared loss gradients)"}
    return KVQuantCalibration(levels[0], levels[1], meta)
