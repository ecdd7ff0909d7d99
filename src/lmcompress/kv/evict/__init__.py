"""KV eviction policies (one file each, registered by name in ``EVICTION_METHODS``)."""

from .base import EvictionPolicy, ScoreInputs
from .snapkv import SnapKV
from .streaming import StreamingLLM

__all__ = ["EvictionPolicy", "ScoreInputs", "SnapKV", "StreamingLLM"]
