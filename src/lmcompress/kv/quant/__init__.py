"""KV-cache quantization methods (one file each, registered by name in ``KV_QUANTIZERS``)."""

from .base import KVQuantizer
from .fp8_kv import FP8KV
from .int_token import IntKV
from .kivi import KIVI
from .kvquant import KVQuant
from .normal_kv import NormalKV
from .qaq import QAQ
from .rotated_kv import Rotated
from .turbo_kv import TurboKV
from .uniform_kv import UniformKV

__all__ = ["FP8KV", "KIVI", "QAQ", "IntKV", "KVQuant", "KVQuantizer", "NormalKV", "Rotated", "TurboKV",
           "UniformKV"]
