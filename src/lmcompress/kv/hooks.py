"""Scoring hooks, installed and removed by a context manager (nothing stays attached to the model):

* forward pre-hooks that hand each attention module's input hidden states to its cache layer, for eviction
  policies that score from hidden states (``needs_hidden_states``);
* hooks a policy installs itself (``policy.model_hooks(model, cache)``: DMS's decision logits);
* a forward hook on the model that calls ``policy.after_model_forward(model, cache, input_ids, tokenizer)``
  after each forward, for policies that score by running the model again (KVzip's context reconstruction).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .._compat import attention_modules
from .cache import CompressedCache


def needs_hidden_states(policy: Any) -> bool:
    """Whether ``policy`` or a policy it wraps (``base``) scores from hidden states."""
    while policy is not None:
        if getattr(policy, "needs_hidden_states", False):
            return True
        policy = getattr(policy, "base", None)
    return False


@contextmanager
def scoring_hooks(model: torch.nn.Module, cache: CompressedCache, tokenizer: Any = None, *,
                  always: bool = False) -> Iterator[None]:
    """Within this block, every attention module's ``hidden_states`` input ``[B, q, hidden]`` is handed to
    ``cache.layers[module.layer_idx].hidden_states`` before the module runs (only where a layer's policy, or a
    policy it wraps, needs hidden states, or ``always``), and policies with a model pass run it after each forward
    of ``model`` (``tokenizer`` is handed to them, e.g. for KVzip's repeat prompt)."""
    needs = always or any(layer.evict is not None and needs_hidden_states(layer.evict) for layer in cache.layers)
    handles = []
    if needs:
        for module in attention_modules(model):
            layer = cache.layers[module.layer_idx]

            def hook(mod, args, kwargs, _layer=layer):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                _layer.hidden_states = hidden
                return None

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    passes = {id(layer.evict): layer.evict for layer in cache.layers
              if layer.evict is not None and hasattr(layer.evict, "after_model_forward")}
    if passes:
        def model_hook(mod, args, kwargs, output):
            ids = kwargs.get("input_ids", args[0] if args else None)
            for policy in passes.values():
                policy.after_model_forward(model, cache, ids, tokenizer)
            return None

        handles.append(model.register_forward_hook(model_hook, with_kwargs=True))
        for policy in passes.values():
            policy.set_hooked(cache, True)
    hooked = {id(layer.evict): layer.evict for layer in cache.layers
              if layer.evict is not None and hasattr(layer.evict, "model_hooks")}
    for policy in hooked.values():  # policies computing their own inputs from the model (DMS decisions)
        handles.extend(policy.model_hooks(model, cache))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for policy in passes.values():
            policy.set_hooked(cache, False)
        for layer in cache.layers:
            layer.hidden_states = None


@contextmanager
def policy_hooks(model: torch.nn.Module, cache: CompressedCache) -> Iterator[None]:
    """Only the hooks policies install themselves (``policy.model_hooks``: DMS's decision logits), for decoding
    loops that run no scoring hooks; a no-op for every other policy."""
    hooked = {id(layer.evict): layer.evict for layer in cache.layers
              if layer.evict is not None and hasattr(layer.evict, "model_hooks")}
    handles = [h for policy in hooked.values() for h in policy.model_hooks(model, cache)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
