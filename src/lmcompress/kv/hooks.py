"""Scoring hooks: forward pre-hooks that hand each attention module's input hidden states to its cache layer,
for eviction policies that score from hidden states (``needs_hidden_states``). Installed and removed by a
context manager; nothing stays attached to the model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .._compat import attention_modules
from .cache import CompressedCache


@contextmanager
def scoring_hooks(model: torch.nn.Module, cache: CompressedCache, *, always: bool = False) -> Iterator[None]:
    """Within this block, every attention module's ``hidden_states`` input ``[B, q, hidden]`` is handed to
    ``cache.layers[module.layer_idx].hidden_states`` before the module runs (only where a layer's policy needs
    hidden states, or ``always``)."""
    needs = always or any(
        layer.evict is not None and layer.evict.needs_hidden_states for layer in cache.layers
    )
    handles = []
    if needs:
        for module in attention_modules(model):
            layer = cache.layers[module.layer_idx]

            def hook(mod, args, kwargs, _layer=layer):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                _layer.hidden_states = hidden
                return None

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for layer in cache.layers:
            layer.hidden_states = None
