"""``quantize_(model, config)``: quantize a causal LM's decoder linears in place, one decoder layer at a time.

Each config type has a handler (registered with :func:`register_handler`); this module holds what handlers
share: checks done before any weight changes, moving one layer at a time to the work device, replacing
``nn.Linear`` modules by packed :class:`WQLinear` ones, and the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._compat import decoder_layers
from ..errors import LMCompressError
from .config import WeightQuantConfig
from .linear import WQLinear
from .mappings import mapping_for
from .packing import PACK
from .quantizer import quantize_weight

Handler = Callable[..., "QuantizeReport"]
_HANDLERS: dict[type, Handler] = {}


def register_handler(config_type: type) -> Callable[[Handler], Handler]:
    def decorator(fn: Handler) -> Handler:
        _HANDLERS[config_type] = fn
        return fn

    return decorator


@dataclass
class QuantizeReport:
    """What a quantization run did and cost.

    Attributes:
        method: ``awq`` or ``rtn``.
        layers: decoder layers quantized.
        linears: linears replaced by :class:`WQLinear`.
        seconds: wall time of the whole run (calibration included).
        peak_device_bytes: ``torch.cuda.max_memory_allocated`` over the run on a CUDA work device, else None.
        details: per-layer search results (AWQ: chosen grid ratio per scale group, skipped groups).
    """

    method: str
    layers: int = 0
    linears: int = 0
    seconds: float = 0.0
    peak_device_bytes: int | None = None
    details: list[dict[str, Any]] = field(default_factory=list)


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of a decoder layer by relative name; a DMS checkpoint's separate-alpha decision
    projection (``self_attn.dms_proj_alpha``: one logit per KV head) is left out and stays in float."""
    return {name: m for name, m in layer.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith("dms_proj_alpha")}


def check_quantizable(model: nn.Module, config: WeightQuantConfig) -> None:
    """Fail before any weight changes if some decoder linear cannot take ``config``'s format.

    Raises:
        LMCompressError: ``group_size`` does not divide a linear's in_features, or out_features is not a multiple
            of 8 (the message names the first such linear).
    """
    for i, layer in enumerate(decoder_layers(model)):
        for name, linear in layer_linears(layer).items():
            if linear.in_features % config.group_size:
                divisors = [g for g in (32, 64, 128, 256) if linear.in_features % g == 0]
                hint = f"; allowed for this model: {', '.join(map(str, divisors))}" if divisors else ""
                raise LMCompressError(
                    f"group_size={config.group_size} does not divide in_features={linear.in_features} of "
                    f"layers.{i}.{name}{hint}"
                )
            if linear.out_features % PACK:
                raise LMCompressError(
                    f"layers.{i}.{name} has out_features={linear.out_features}, not a multiple of 8; "
                    "the AWQ GEMM layout cannot hold it"
                )


def module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Move ``module`` to ``device`` for the block and back to where it was afterwards."""
    home = module_device(module)
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@torch.no_grad()
def replace_with_packed(layer: nn.Module, config: WeightQuantConfig) -> int:
    """Quantize every linear of ``layer`` round-to-nearest and swap it for a :class:`WQLinear`.

    Returns:
        the number of linears replaced.
    """
    linears = layer_linears(layer)
    for name, linear in linears.items():
        q = quantize_weight(linear.weight.data, config.bits, config.group_size, config.zero_point)
        packed = WQLinear.from_quantized(q, linear.bias)
        parent_name, _, child = name.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        setattr(parent, child, packed)
    return len(linears)


def quantize_(
    model: nn.Module,
    config: WeightQuantConfig,
    *,
    tokenizer: Any = None,
    calibration: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize ``model``'s decoder linears in place with ``config`` (``AWQConfig`` or ``RTNConfig``).

    Args:
        model: a causal LM of a supported architecture; its layers may sit on the CPU.
        config: the method and format.
        tokenizer: tokenizes the calibration text (AWQ with a text source).
        calibration: ``[n, seq]`` token ids to use instead of ``config``'s calibration source.
        device: where each layer is processed (default: where the layers are); a layer visits it and returns.
        progress: show a progress bar per layer.

    Returns:
        a :class:`QuantizeReport`. ``model.config.quantization_config`` is set to the checkpoint entry.

    Raises:
        LMCompressError: an unsupported architecture, or a format this model's linears cannot take (both
            checked before any weight changes).
    """
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise LMCompressError(f"config {config!r} has no quantization handler; use AWQConfig or RTNConfig")
    mapping_for(model.config)  # an unsupported architecture fails first, naming the supported ones
    check_quantizable(model, config)
    work = torch.device(device) if device is not None else module_device(decoder_layers(model)[0])
    if work.type == "cuda":
        torch.cuda.reset_peak_memory_stats(work)
    start = time.perf_counter()
    report = handler(
        model, config, tokenizer=tokenizer, calibration=calibration, device=work, progress=progress
    )
    report.seconds = time.perf_counter() - start
    if work.type == "cuda":
        report.peak_device_bytes = torch.cuda.max_memory_allocated(work)
    model.config.quantization_config = config.quantization_config()
    return report
