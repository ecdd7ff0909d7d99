"""KV-cache compression: specs, the compressed cache, eviction policies and quantizers."""

from .attention import lmcompress_attention, prepare_model
from .cache import CompressedCache
from .evict import EvictionPolicy, SnapKV, StreamingLLM
from .hooks import scoring_hooks
from .quant import IntKV, KVQuantizer
from .spec import KVSpec

__all__ = [
    "CompressedCache",
    "EvictionPolicy",
    "IntKV",
    "KVQuantizer",
    "KVSpec",
    "SnapKV",
    "StreamingLLM",
    "lmcompress_attention",
    "prepare_model",
    "scoring_hooks",
]
