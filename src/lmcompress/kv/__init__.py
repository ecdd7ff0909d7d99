"""KV-cache compression: specs, the compressed cache, eviction policies and quantizers."""

from .attention import lmcompress_attention, prepare_model
from .cache import CompressedCache
from .evict import (
    CAKE,
    H2O,
    TOVA,
    AdaKV,
    DecodingCompression,
    EvictionPolicy,
    ExpectedAttention,
    KeyDiff,
    Knorm,
    ObservedAttention,
    PyramidKV,
    Random,
    SnapKV,
    StreamingLLM,
    ThresholdEviction,
)
from .hooks import scoring_hooks
from .quant import IntKV, KVQuantizer
from .spec import KVSpec

__all__ = [
    "CAKE",
    "H2O",
    "TOVA",
    "AdaKV",
    "CompressedCache",
    "DecodingCompression",
    "EvictionPolicy",
    "ExpectedAttention",
    "IntKV",
    "KVQuantizer",
    "KVSpec",
    "KeyDiff",
    "Knorm",
    "ObservedAttention",
    "PyramidKV",
    "Random",
    "SnapKV",
    "StreamingLLM",
    "ThresholdEviction",
    "lmcompress_attention",
    "prepare_model",
    "scoring_hooks",
]
