"""4-bit weight quantization: AWQ and its round-to-nearest baseline, packed in AutoAWQ's GEMM layout.

    from lmcompress.weights import AWQConfig, quantize_, save_quantized, load_quantized

    report = quantize_(model, AWQConfig(group_size=64), tokenizer=tokenizer)
    save_quantized(model, "out/", tokenizer=tokenizer)
    model, tokenizer = load_quantized("out/")

Methods are registered in ``lmcompress.registry.WEIGHT_METHODS`` (``awq``, ``rtn``); architectures in
:data:`lmcompress.weights.mappings.AWQ_MAPPINGS`.
"""

from . import awq as _awq  # noqa: F401  (registers the AWQ handler)
from . import rtn as _rtn  # noqa: F401  (registers the RTN handler)
from .checkpoint import load_quantized, save_quantized
from .config import AWQConfig, RTNConfig, WeightQuantConfig
from .linear import WQLinear
from .mappings import AWQ_MAPPINGS, supported_architectures
from .quantize import QuantizeReport, quantize_

__all__ = [
    "AWQ_MAPPINGS",
    "AWQConfig",
    "QuantizeReport",
    "RTNConfig",
    "WQLinear",
    "WeightQuantConfig",
    "load_quantized",
    "quantize_",
    "save_quantized",
    "supported_architectures",
]
