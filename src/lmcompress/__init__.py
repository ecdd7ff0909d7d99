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
    "prepare_model",
    "scoring_hooks",
]
