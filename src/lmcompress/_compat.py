"""Every touch of transformers internals lives here, so a transformers release breaks one file.

Supported: transformers 5.17 (the GPU machine; tested by `make test-lowest`) through 5.x (5.24 tested by
`make test`).
What is used:

* ``transformers.cache_utils.Cache`` / ``CacheLayerMixin``: the cache extension point.
* ``AttentionInterface.register`` and ``AttentionMaskInterface.register``: our attention function and its
  mask builder are registered under one name (``ATTN_NAME``) and selected with the public
  ``model.set_attn_implementation``.
* ``sdpa_attention_forward`` and ``sdpa_mask``: when our attention function sees an ordinary cache (plain
  tensors) it delegates to transformers' own SDPA path, so outputs are identical to ``attn_implementation="sdpa"``.
* config fields: ``layer_types``, ``sliding_window``, ``num_key_value_heads``, ``head_dim``.
* the cache keyword: transformers 5.24 renamed ``past_key_values`` to ``cache`` in ``forward``, ``generate`` and
  the mask builders (the old name warns with a FutureWarning and goes in 5.40); 5.17 knows only the old name.
  :func:`cache_arg` decides once, from the signature of a model's ``forward``; every call site of ours passes the
  cache through :func:`cache_kwargs` and reads it back through :func:`output_cache`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import transformers
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

__all__ = [
    "ATTN_NAME",
    "TRANSFORMERS_VERSION",
    "Cache",
    "CacheLayerMixin",
    "attention_is_registered",
    "cache_arg",
    "cache_kwargs",
    "layer_is_sliding",
    "output_cache",
    "register_attention",
    "sdpa_attention_forward",
    "text_config",
]

ATTN_NAME = "lmcompress"
TRANSFORMERS_VERSION: str = transformers.__version__


@functools.cache
def cache_arg() -> str:
    """The keyword under which this transformers takes a KV cache: ``"cache"`` (5.24 and later) or
    ``"past_key_values"`` (before). Read from the signature of ``LlamaModel.forward`` (every decoder of a release
    renames together; the deprecation decorator keeps the wrapped signature)."""
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{cache_arg(): cache}``, to pass a cache to ``model(...)`` or ``model.generate(...)`` as
    ``model(ids, **cache_kwargs(cache))``."""
    return {cache_arg(): cache}


def output_cache(output: Any) -> Any:
    """The cache a model output returns (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    return getattr(output, cache_arg(), None)


def register_attention(fn: Callable[..., Any]) -> None:
    """Register ``fn`` as attention implementation ``ATTN_NAME`` with SDPA-style masks.

    Idempotent. Called lazily by :func:`lmcompress.kv.attention.prepare_model`, never at import.
    """
    AttentionInterface.register(ATTN_NAME, fn)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def attention_is_registered() -> bool:
    return ATTN_NAME in ALL_ATTENTION_FUNCTIONS and ATTN_NAME in ALL_MASK_ATTENTION_FUNCTIONS


def set_attention(model: torch.nn.Module, name: str) -> None:
    """Select attention implementation ``name`` on ``model`` through the public API."""
    model.set_attn_implementation(name)


def attention_implementation(model: torch.nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def text_config(config: Any) -> Any:
    """The decoder (text) config of a possibly multimodal config."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def layer_is_sliding(config: Any, layer_idx: int) -> bool:
    """Whether decoder layer ``layer_idx`` uses sliding-window attention, as the model defines it."""
    cfg = text_config(config)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        return layer_types[layer_idx] in ("sliding_attention", "chunked_attention")
    return getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)


def sliding_window_of(config: Any) -> int | None:
    cfg = text_config(config)
    return getattr(cfg, "sliding_window", None)


def kv_geometry(config: Any) -> tuple[int, int, int, int]:
    """(num_layers, num_heads, num_kv_heads, head_dim) of a decoder config."""
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, heads, kv_heads, head_dim


def max_positions(config: Any) -> int:
    return int(getattr(text_config(config), "max_position_embeddings", 0) or 0)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder, in layer order (modules with a ``layer_idx`` and q/k/v or
    fused qkv projections)."""
    found = []
    for module in model.modules():
        if hasattr(module, "layer_idx") and (hasattr(module, "q_proj") or hasattr(module, "qkv_proj")):
            found.append(module)
    return sorted(found, key=lambda m: m.layer_idx)


def pre_rope_key_value_modules(attention: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The modules whose outputs are an attention module's pre-RoPE keys and its values (``k_norm`` when the
    architecture normalises keys, as Qwen3 and Gemma 3 do, else ``k_proj``; ``v_proj``), or None for fused
    projections (Phi-3's ``qkv_proj``)."""
    k = getattr(attention, "k_norm", None) or getattr(attention, "k_proj", None)
    v = getattr(attention, "v_proj", None)
    return None if k is None or v is None else (k, v)


def output_projection_weight(module: torch.nn.Module) -> torch.Tensor:
    """``[hidden, Hq * D]`` weight of an attention module's output projection (``o_proj`` in every supported
    architecture; dequantized for AWQ projections, which have no ``weight``)."""
    proj = getattr(module, "o_proj", None) if module is not None else None
    if proj is None:
        raise TypeError(f"{type(module).__name__} has no o_proj output projection")
    weight = getattr(proj, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else proj.dequantize()


def rotary_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder's shared rotary-embedding module (``model.model.rotary_emb`` in every supported
    architecture), or None if the model has none."""
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    return getattr(base, "rotary_emb", None)


def rotary_cos_sin(rotary: torch.nn.Module, config: Any, layer_idx: int, positions: torch.Tensor,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[P, rotary_dim]`` float32, that the model applies at int ``positions: [P]`` in layer
    ``layer_idx`` (Gemma 3 uses a different RoPE for sliding and full layers; its module takes ``layer_type``)."""
    import inspect

    x = torch.zeros(1, device=device, dtype=torch.float32)
    pos = positions.to(device=device, dtype=torch.long).unsqueeze(0)
    params = inspect.signature(rotary.forward).parameters
    if "layer_type" in params:
        layer_types = getattr(text_config(config), "layer_types", None)
        layer_type = layer_types[layer_idx] if layer_types is not None else None
        cos, sin = rotary(x, pos, layer_type=layer_type)
    else:
        cos, sin = rotary(x, pos)
    # (on the caller's device: a model spread over devices may keep its rotary module on another one)
    return cos[0].float().to(device), sin[0].float().to(device)


# ----------------------------------------------------------------------------------------------- pipelines


def pipeline_base_class() -> type:
    """transformers' ``Pipeline`` base class (imported on first use: ``transformers.pipelines`` is heavy)."""
    from transformers import Pipeline

    return Pipeline


def register_pipeline_task(task: str, pipeline_class: type) -> None:
    """Register ``pipeline_class`` as the custom ``transformers.pipeline(task, ...)`` for causal LMs (idempotent:
    registering the same task again replaces the entry)."""
    from transformers import AutoModelForCausalLM
    from transformers.pipelines import PIPELINE_REGISTRY

    PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=pipeline_class, pt_model=AutoModelForCausalLM)


def pipeline_tasks() -> list[str]:
    """Task names ``transformers.pipeline`` accepts, custom ones included."""
    from transformers.pipelines import PIPELINE_REGISTRY

    return list(PIPELINE_REGISTRY.get_supported_tasks())


# ----------------------------------------------------------------------------------------------- decoder layers


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers (a ``ModuleList``) of a causal LM, through the public ``get_decoder()``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} exposes no decoder layer list (get_decoder().layers)")
    return layers


#: transformers RMSNorm classes computing ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` in fp32 (checked
#: against their source in transformers 5.x); Gemma's ``(1 + weight)`` norms are not among them.
LLAMA_RMSNORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")


def llama_rmsnorm_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """``(parent, attribute name, module)`` of every Llama-family RMSNorm in ``model``."""
    out = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if (type(child).__name__ in LLAMA_RMSNORM_CLASSES and hasattr(child, "variance_epsilon")
                    and isinstance(getattr(child, "weight", None), torch.nn.Parameter)):
                out.append((parent, name, child))
    return out


def layer_output_hidden(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns (a tensor in transformers 5.x, a tuple's first item before)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def detached_hf_quantizer(model: torch.nn.Module) -> Iterator[None]:
    """Hide ``model.hf_quantizer`` for the block.

    A model loaded from a GGUF file keeps transformers' GGUF quantizer (its weights were dequantized on load),
    and ``save_pretrained`` refuses such models as "not serializable". Once lmcompress has re-quantized the
    weights that quantizer no longer describes them, so saving goes through with it hidden.
    """
    had = "hf_quantizer" in vars(model)
    previous = getattr(model, "hf_quantizer", None)
    model.hf_quantizer = None
    try:
        yield
    finally:
        if had:
            model.hf_quantizer = previous
        else:
            del model.hf_quantizer


# ----------------------------------------------------------------------------------------------- DMS decisions


def pre_rope_query_module(module: torch.nn.Module) -> torch.nn.Module:
    """The submodule of an attention module whose output is the query after ``q_norm`` and before RoPE:
    ``q_norm`` where the architecture has one (Qwen3: output ``[B, q, Hq, D]``; OLMo 2: ``[B, q, Hq * D]``),
    else ``q_proj`` (Llama, Mistral, Qwen2: ``[B, q, Hq * D]``). Both transformers' attention classes apply RoPE
    right after it.

    Raises:
        TypeError: the module has a fused ``qkv_proj`` and no ``q_norm`` (no separate query output to hook).
    """
    norm = getattr(module, "q_norm", None)
    if isinstance(norm, torch.nn.Module):
        return norm
    proj = getattr(module, "q_proj", None)
    if isinstance(proj, torch.nn.Module):
        return proj
    raise TypeError(f"{type(module).__name__} has no q_proj/q_norm; DMS needs a separate query projection")


def attention_bias(config: Any) -> bool:
    """Whether the attention projections of ``config``'s decoder have a bias (``attention_bias``)."""
    return bool(getattr(text_config(config), "attention_bias", False))


def rms_norm_eps(config: Any) -> float:
    return float(getattr(text_config(config), "rms_norm_eps", 1e-6))


def register_named_attention(name: str, fn: Callable[..., Any]) -> None:
    """Register ``fn`` as attention implementation ``name`` with SDPA-style masks (idempotent), to be selected
    with :func:`set_attention` (DMS retrofitting's training attention)."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


# ----------------------------------------------------------------------------------------------- fused decoder


#: attention classes whose forward is Llama's (projections, RoPE with ``rotate_half``, cache update, attention
#: function, ``o_proj``; checked against their source in transformers 5.17 and 5.24); no sliding window or norms.
LLAMA_ATTENTION_CLASSES = ("LlamaAttention",)
#: MLP classes computing ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``.
GATED_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def _children_of_class(model: torch.nn.Module, names: tuple[str, ...]
                       ) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    out = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child).__name__ in names:
                out.append((parent, name, child))
    return out


def llama_attention_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """``(parent, attribute name, module)`` of every Llama attention module with separate q/k/v projections."""
    return [(p, n, m) for p, n, m in _children_of_class(model, LLAMA_ATTENTION_CLASSES)
            if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "head_dim"))]


def silu_mlp_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """``(parent, attribute name, module)`` of every gated MLP whose activation is SiLU."""
    return [(p, n, m) for p, n, m in _children_of_class(model, GATED_MLP_CLASSES)
            if type(getattr(m, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU")
            and all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj"))]


def attention_function(config: Any) -> Callable[..., Any]:
    """The attention function a transformers attention module calls for ``config._attn_implementation``
    (``eager`` -> Llama's ``eager_attention_forward``)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    impl = getattr(config, "_attn_implementation", None)
    if impl in (None, "eager"):
        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def update_cache(cache: Any, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cos: torch.Tensor,
                 sin: torch.Tensor, cache_position: torch.Tensor | None) -> tuple[Any, Any]:
    """``cache.update`` as transformers' Llama attention calls it (5.17 reads ``cache_position`` from the
    ``cache_kwargs`` dict; 5.24 ignores it)."""
    return cache.update(key, value, layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
