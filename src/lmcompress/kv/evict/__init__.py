"""KV eviction policies (one file each, registered by name in ``EVICTION_METHODS``).

Score-based (usable alone or inside the wrappers): Random, StreamingLLM, Knorm, KeyDiff, SnapKV, PyramidKV,
TOVA, ExpectedAttention, H2O, ObservedAttention. Wrappers and schedules: AdaKV (head-adaptive budgets),
DecodingCompression (compress every N generated tokens), ThresholdEviction (DMS-style), DMS (learned
delayed eviction from a DMS checkpoint's decisions), and CAKE (layer budgets
from attention preferences, cascading).

kvpress 0.5.5's other presses: scorers LagKV, LeverageScore, CUR, NonCausalAttn, Compactor, CapPress;
wrappers ChunkKV (whole chunks) and EntropyGatedChunkKV, BlockPress and ChunkPress (score parts of the prompt),
PerLayerCompression (a ratio per layer), ComposedPolicy (policies in sequence), FINCH (question-aware,
re-rotated), KeyRerotation (kept keys at contiguous positions), CompressionRatioDecoding and PrefillDecoding
(decoding-time variants).

Calibrated: DuoAttention (head pattern), KVzap (surrogate), QFilter (filters from the model's queries);
SimLayerKV (lazy layers keep a streaming window).
"""

from .adakv import AdaKV
from .base import EvictionPolicy, ScoreInputs
from .block import BlockPress
from .cake import CAKE
from .cap import CapPress
from .chunk import ChunkPress
from .chunkkv import ChunkKV
from .compactor import Compactor
from .composed import ComposedPolicy
from .critical_adakv import CriticalAdaKV
from .critical_kv import CriticalKV
from .cur import CUR
from .decoding import DecodingCompression
from .dms import DMS
from .duo_attention import DuoAttention
from .entropy_chunkkv import EntropyGatedChunkKV
from .expected_attention import ExpectedAttention
from .finch import Finch
from .h2o import H2O
from .key_rerotation import KeyRerotation
from .keydiff import KeyDiff
from .knorm import Knorm
from .kvzap import KVzap
from .kvzip import KVzip, KVzipPlus
from .lagkv import LagKV
from .leverage import LeverageScore
from .non_causal import NonCausalAttn
from .observed_attention import ObservedAttention
from .per_layer import PerLayerCompression
from .prefill_decoding import PrefillDecoding
from .pyramidkv import PyramidKV
from .qfilter import QFilter
from .random import Random
from .ratio_decoding import CompressionRatioDecoding
from .simlayerkv import SimLayerKV
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .think import ThinK
from .threshold import ThresholdEviction
from .tova import TOVA

__all__ = [
    "CAKE",
    "CUR",
    "DMS",
    "H2O",
    "TOVA",
    "AdaKV",
    "BlockPress",
    "CapPress",
    "ChunkKV",
    "ChunkPress",
    "Compactor",
    "ComposedPolicy",
    "CompressionRatioDecoding",
    "CriticalAdaKV",
    "CriticalKV",
    "DecodingCompression",
    "DuoAttention",
    "EntropyGatedChunkKV",
    "EvictionPolicy",
    "ExpectedAttention",
    "Finch",
    "KVzap",
    "KVzip",
    "KVzipPlus",
    "KeyDiff",
    "KeyRerotation",
    "Knorm",
    "LagKV",
    "LeverageScore",
    "NonCausalAttn",
    "ObservedAttention",
    "PerLayerCompression",
    "PrefillDecoding",
    "PyramidKV",
    "QFilter",
    "Random",
    "ScoreInputs",
    "SimLayerKV",
    "SnapKV",
    "StreamingLLM",
    "ThinK",
    "ThresholdEviction",
]
