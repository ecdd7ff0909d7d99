"""KV eviction policies (one file each, registered by name in ``EVICTION_METHODS``).

Score-based (usable alone or inside the wrappers): Random, StreamingLLM, Knorm, KeyDiff, SnapKV, PyramidKV,
TOVA, ExpectedAttention, H2O, ObservedAttention. Wrappers and schedules: AdaKV (head-adaptive budgets),
DecodingCompression (compress every N generated tokens), ThresholdEviction (DMS-style), and CAKE (layer budgets
from attention preferences, cascading).
"""

from .adakv import AdaKV
from .base import EvictionPolicy, ScoreInputs
from .cake import CAKE
from .critical_adakv import CriticalAdaKV
from .critical_kv import CriticalKV
from .decoding import DecodingCompression
from .duo_attention import DuoAttention
from .expected_attention import ExpectedAttention
from .h2o import H2O
from .keydiff import KeyDiff
from .knorm import Knorm
from .kvzap import KVzap
from .kvzip import KVzip, KVzipPlus
from .observed_attention import ObservedAttention
from .pyramidkv import PyramidKV
from .random import Random
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .threshold import ThresholdEviction
from .tova import TOVA

__all__ = [
    "CAKE",
    "H2O",
    "TOVA",
    "AdaKV",
    "CriticalAdaKV",
    "CriticalKV",
    "DecodingCompression",
    "DuoAttention",
    "EvictionPolicy",
    "ExpectedAttention",
    "KVzap",
    "KVzip",
    "KVzipPlus",
    "KeyDiff",
    "Knorm",
    "ObservedAttention",
    "PyramidKV",
    "Random",
    "ScoreInputs",
    "SnapKV",
    "StreamingLLM",
    "ThresholdEviction",
]
