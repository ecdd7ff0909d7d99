"""lmcompress: make LLM inference memory small and measure honestly what that costs.

Public API (importing it does no work and patches nothing)::

    from lmcompress import load_model, KVSpec, CompressedCache, SnapKV, StreamingLLM, IntKV
"""

from .errors import LMCompressError
from .kv import (
    CAKE,
    H2O,
    TOVA,
    AdaKV,
    CompressedCache,
    DecodingCompression,
    ExpectedAttention,
    IntKV,
    KeyDiff,
    Knorm,
    KVSpec,
    ObservedAttention,
    PyramidKV,
    Random,
    SnapKV,
    StreamingLLM,
    ThresholdEviction,
    prepare_model,
    scoring_hooks,
)
from .models import DEFAULT_MODEL, load_model


def pipeline(model, tokenizer=None, spec=None, *, decode: str = "auto"):
    """Compress a context once, answer questions about it: see :mod:`lmcompress.eval.context_pipeline`."""
    from .eval.context_pipeline import pipeline as build

    return build(model, tokenizer, spec, decode=decode)


def register_pipeline() -> str:
    """Register ``transformers.pipeline("lmcompress-text-generation", ...)``: see
    :mod:`lmcompress.eval.hf_pipeline`. Returns the task name."""
    from .eval.hf_pipeline import register_pipeline as register

    return register()

__version__ = "0.1.0"

__all__ = [
    "CAKE",
    "DEFAULT_MODEL",
    "H2O",
    "TOVA",
    "AdaKV",
    "CompressedCache",
    "DecodingCompression",
    "ExpectedAttention",
    "IntKV",
    "KVSpec",
    "KeyDiff",
    "Knorm",
    "LMCompressError",
    "ObservedAttention",
    "PyramidKV",
    "Random",
    "SnapKV",
    "StreamingLLM",
    "ThresholdEviction",
    "__version__",
    "load_model",
    "pipeline",
    "prepare_model",
    "register_pipeline",
    "scoring_hooks",
]
