"""KV-cache quantization methods (one file each, registered by name in ``KV_QUANTIZERS``)."""

from .base import KVQuantizer
from .int_token import IntKV

__all__ = ["IntKV", "KVQuantizer"]
