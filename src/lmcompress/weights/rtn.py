"""Round-to-nearest (RTN) weight quantization: every decoder linear quantized group-wise, no calibration. The
baseline AWQ is measured against (same format, same grid, no scale or clip search)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._compat import decoder_layers
from .config import RTNConfig
from .quantize import QuantizeReport, on_device, register_handler, replace_with_packed


@register_handler(RTNConfig)
def quantize_rtn(
    model: nn.Module, config: RTNConfig, *, device: torch.device, progress: bool = True, **_: Any
) -> QuantizeReport:
    """Replace each decoder linear by its RTN-quantized packed form, layer by layer on ``device``."""
    report = QuantizeReport(method="rtn")
    layers = decoder_layers(model)
    for layer in tqdm(layers, desc="RTN", unit="layer", disable=not progress):
        with on_device(layer, device):
            report.linears += replace_with_packed(layer, config)
        report.layers += 1
    return report
