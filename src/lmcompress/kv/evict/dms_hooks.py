"""The hooks that compute DMS decision logits (see :mod:`lmcompress.kv.evict.dms`), installed by
:func:`lmcompress.kv.scoring_hooks` for the duration of a block and removed after it.

* borrowed channel (default): a forward hook on the module that outputs the query after ``q_norm`` and before
  RoPE (:func:`lmcompress._compat.pre_rope_query_module`) reads channel ``D - 1`` of the first query head of each
  GQA group, ``[B, q, Hkv]``, as ``x * dms_alpha_scale - dms_initial_alpha_offset`` and returns the query with
  that channel zeroed (the attention function zeroes it again after RoPE);
* separate alpha: a forward pre-hook on the decoder layer applies ``self_attn.dms_proj_alpha_norm`` (RMSNorm)
  and ``self_attn.dms_proj_alpha`` (linear ``hidden -> Hkv``) to the layer's residual input.

The logits go to the cache layer's :class:`~lmcompress.kv.evict.dms.DMSLayerState` as ``[B, Hkv, q]`` float32.
"""

from __future__ import annotations

from typing import Any

import torch

from ... import _compat
from ...errors import LMCompressError
from .dms_config import DMSSettings


def borrowed_channel_logits(query: torch.Tensor, num_kv_heads: int, head_dim: int,
                            settings: DMSSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """From a pre-RoPE query ``[B, q, Hq, D]`` or ``[B, q, Hq * D]``: ``(logits [B, Hkv, q] float32, the query
    with channel D - 1 of the first head of each group zeroed, same shape)``."""
    shape = query.shape
    q4 = query if shape[-1] == head_dim else query.view(*shape[:-1], -1, head_dim)
    groups = q4.shape[-2] // num_kv_heads
    x = q4[..., ::groups, -1].float()  # [B, q, Hkv]
    logits = (x * settings.alpha_scale - settings.initial_alpha_offset).transpose(1, 2).contiguous()
    out = q4.clone()
    out[..., ::groups, -1] = 0
    return logits, out.view(shape)


def separate_alpha_logits(module: torch.nn.Module, hidden: torch.Tensor, settings: DMSSettings) -> torch.Tensor:
    """``[B, Hkv, q]`` float32 logits from the residual input ``hidden: [B, q, hidden]`` of the decoder layer
    whose attention is ``module``."""
    norm = getattr(module, "dms_proj_alpha_norm", None)
    proj = getattr(module, "dms_proj_alpha", None)
    if norm is None or proj is None:
        raise LMCompressError(
            f"dms_separate_alpha is set but attention layer {module.layer_idx} has no dms_proj_alpha weights; "
            "load the checkpoint with lmcompress.kv.evict.dms_load.load_dms_model"
        )
    x = proj(norm(hidden))
    return (x.float() * settings.alpha_scale - settings.initial_alpha_offset).transpose(1, 2).contiguous()


def attach_separate_alpha(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Give every attention module of ``model`` the separate-alpha submodules where it lacks them:
    ``dms_proj_alpha_norm`` (RMSNorm over the hidden size, weight 1) and ``dms_proj_alpha`` (linear to one logit
    per KV head, weight and bias 0, so that every logit starts at ``-dms_initial_alpha_offset``). Returns the
    attention modules. Parameter names match NVIDIA's checkpoints (``self_attn.dms_proj_alpha.weight``)."""
    cfg = _compat.text_config(model.config)
    _, _, kv_heads, _ = _compat.kv_geometry(model.config)
    modules = _compat.attention_modules(model)
    ref = next(model.parameters())
    for module in modules:
        if getattr(module, "dms_proj_alpha", None) is None:
            norm = torch.nn.RMSNorm(cfg.hidden_size, eps=_compat.rms_norm_eps(model.config))
            proj = torch.nn.Linear(cfg.hidden_size, kv_heads, bias=_compat.attention_bias(model.config))
            torch.nn.init.zeros_(proj.weight)
            if proj.bias is not None:
                torch.nn.init.zeros_(proj.bias)
            module.add_module("dms_proj_alpha_norm", norm.to(device=ref.device, dtype=ref.dtype))
            module.add_module("dms_proj_alpha", proj.to(device=ref.device, dtype=ref.dtype))
    return modules


def install_decision_hooks(model: torch.nn.Module, cache: Any, policy: Any) -> list[Any]:
    """Hooks that hand each layer of ``cache`` whose policy is ``policy`` its decision logits; returns handles.

    Raises:
        LMCompressError: the model's config lacks DMS settings (and ``policy`` does not override them), or the
            separate-alpha weights are missing.
    """
    settings = policy.settings(model.config)
    _, _, kv_heads, head_dim = _compat.kv_geometry(model.config)
    handles = []
    layers = _compat.decoder_layers(model) if settings.separate_alpha else None
    for module in _compat.attention_modules(model):
        layer = cache.layers[module.layer_idx]
        if layer.evict is not policy:
            continue
        state = layer.evict_state
        state.settings = settings
        if settings.separate_alpha:
            if getattr(module, "dms_proj_alpha", None) is None:
                separate_alpha_logits(module, torch.zeros(0), settings)  # raises the clear error

            def pre_hook(mod, args, kwargs, _state=state, _attn=module):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                _state.pending = separate_alpha_logits(_attn, hidden, settings)
                return None

            handles.append(layers[module.layer_idx].register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            def hook(mod, args, output, _state=state):
                logits, zeroed = borrowed_channel_logits(output, kv_heads, head_dim, settings)
                _state.pending = logits
                return zeroed

            handles.append(_compat.pre_rope_query_module(module).register_forward_hook(hook))
    return handles
