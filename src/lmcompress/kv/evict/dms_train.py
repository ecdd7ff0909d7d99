"""DMS in training mode (for retrofitting, :mod:`lmcompress.kv.evict.dms_retrofit`): the whole sequence in one
forward without a cache, with differentiable decisions.

As in the DMS paper and NVIDIA's training code: each decision logit gets logistic noise (the difference of two
Gumbel samples) and a temperature, ``z = (logit + noise) / tau``; key ``j`` gets the additive attention bias
``log sigmoid(-z_{j+1})`` (the decision of token ``j + 1`` marks ``j``) for the queries outside its window
(``i - j > W``), so a decision near 1 removes the key smoothly. The fraction of evicted tokens is measured with a
straight-through estimator (hard decisions ``sigmoid(z) > 0.5`` forward, the sigmoid's gradient backward).
The borrowed query channel is zeroed before and after RoPE, as at inference.

Approximate by design (a relaxation): the trained model is then run with hard decisions by
:class:`~lmcompress.kv.evict.dms.DMS`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ... import _compat
from .dms_config import DMSSettings
from .dms_hooks import borrowed_channel_logits, separate_alpha_logits

TRAIN_ATTN_NAME = "lmcompress_dms_train"


class DMSTrainState:
    """Per-forward training state: noisy logits per layer and the straight-through evicted fraction."""

    def __init__(self, settings: DMSSettings, tau: float, generator: torch.Generator | None) -> None:
        self.settings = settings
        self.tau = tau
        self.generator = generator
        self.logits: dict[int, torch.Tensor] = {}  # layer -> [B, Hkv, S] noisy logits / tau
        self.fractions: list[torch.Tensor] = []  # per layer: scalar STE fraction of evicted tokens

    def record(self, layer_idx: int, logits: torch.Tensor) -> None:
        """Add noise to ``logits: [B, Hkv, S]``, keep them for the layer's attention, record the fraction."""
        if self.settings.alpha_per == "layer":
            logits = logits[:, :1].expand_as(logits)
        u = torch.rand(logits.shape, generator=self.generator).clamp(1e-6, 1 - 1e-6).to(logits.device)
        z = (logits + torch.log(u) - torch.log1p(-u)) / self.tau
        p = torch.sigmoid(z)
        hard = (p > 0.5).to(p.dtype) - p.detach() + p
        self.logits[layer_idx] = z
        self.fractions.append(hard[..., 1:].mean())  # the first token's decision marks nothing

    def evicted_fraction(self) -> torch.Tensor:
        return torch.stack(self.fractions).mean()


_ACTIVE: dict[int, DMSTrainState] = {}  # id(model config) -> state, only inside `dms_training`


def dms_train_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Soft DMS attention. ``query: [B, Hq, S, D]`` (after RoPE), ``key``/``value: [B, Hkv, S, D]``; returns
    ``([B, S, Hq, D], None)``. Outside :func:`dms_training` it is plain causal softmax attention."""
    state = _ACTIVE.get(id(module.config))
    _, hq, s, d = query.shape
    hkv = key.shape[1]
    groups = hq // hkv
    scaling = d ** -0.5 if scaling is None else scaling
    if state is not None and not state.settings.separate_alpha:
        query = query.clone()
        query[:, ::groups, :, -1] = 0
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scores = (query @ k.transpose(-1, -2)).float() * scaling  # [B, Hq, S, S]
    i = torch.arange(s, device=query.device)
    causal = i[None, :] <= i[:, None]
    if state is not None:
        z = state.logits[module.layer_idx]  # [B, Hkv, S]
        marked_by_next = torch.nn.functional.pad(z[..., 1:], (0, 1), value=-math.inf)
        bias = torch.nn.functional.logsigmoid(-marked_by_next)  # [B, Hkv, S] over keys
        outside = (i[:, None] - i[None, :]) > state.settings.window_size  # [S, S]
        bias = bias.repeat_interleave(groups, dim=1).unsqueeze(-2) * outside  # [B, Hq, S, S]
        scores = scores + bias
    scores = scores.masked_fill(~causal, -math.inf)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., -s:], -math.inf)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return (probs @ v).transpose(1, 2).contiguous(), None


@contextmanager
def dms_training(model: torch.nn.Module, settings: DMSSettings, *, tau: float = 0.1,
                 generator: torch.Generator | None = None) -> Iterator[DMSTrainState]:
    """Within this block ``model`` runs DMS's training attention; yields the state of the block (read
    :meth:`DMSTrainState.evicted_fraction` after each forward; ``fractions`` is cleared at every forward)."""
    _compat.register_named_attention(TRAIN_ATTN_NAME, dms_train_attention)
    previous = _compat.attention_implementation(model)
    _, _, kv_heads, head_dim = _compat.kv_geometry(model.config)
    state = DMSTrainState(settings, tau, generator)
    handles = []

    def start(mod, args, kwargs):
        state.logits.clear()
        state.fractions.clear()

    handles.append(model.register_forward_pre_hook(start, with_kwargs=True))
    layers = _compat.decoder_layers(model)
    for module in _compat.attention_modules(model):
        if settings.separate_alpha:
            def pre_hook(mod, args, kwargs, _attn=module):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                state.record(_attn.layer_idx, separate_alpha_logits(_attn, hidden, settings))

            handles.append(layers[module.layer_idx].register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            def hook(mod, args, output, _attn=module):
                logits, zeroed = borrowed_channel_logits(output, kv_heads, head_dim, settings)
                state.record(_attn.layer_idx, logits)
                return zeroed

            handles.append(_compat.pre_rope_query_module(module).register_forward_hook(hook))
    _ACTIVE[id(model.config)] = state
    _compat.set_attention(model, TRAIN_ATTN_NAME)
    try:
        yield state
    finally:
        for h in handles:
            h.remove()
        _ACTIVE.pop(id(model.config), None)
        if previous is not None:
            _compat.set_attention(model, previous)
