"""QAQ (Dong et al., 2024, "Quality Adaptive Quantization for LLM KV Cache"): per-token bit widths for keys and
values from error targets, with outliers kept exactly.

The paper's rules (Section 4.1), with ``T`` the number of cached tokens, ``S_t`` the attention token ``t``
receives and ``Q`` the query:

* values: ``sigma_V(t) <= sigma_X / (sqrt(T) * |S_t|)``, so that the attention output's error stays below
  ``sigma_X`` (``value_error``);
* keys: ``sigma_K(t)^2 <= log(T^3 / (T - 1) * sigma_S^2 + 1) / ||Q||^2``, so that the attention probabilities'
  error stays below ``sigma_S`` (``key_error``); ``||Q||^2`` is the upper 10% quantile (``query_quantile``) of
  the queries' squared norms;
* bits from the allowed error: a uniform quantizer over the token's range ``[min, max]`` has error std
  ``Delta / sqrt(3)``; ``bits = ceil(log2((max - min) / (2 sqrt(3) sigma) + 1))`` clamped to
  ``[min_bits, max_bits]``;
* ``S_t`` is predicted by the *attention window*: the largest attention the token received over the last ``n``
  steps (``attention_window``, default 5); tokens without ``n`` observations yet are kept at ``max_bits``;
* outliers: a fraction ``alpha`` (default 1%) of values is kept in full precision (sparse).

Deviations, all deliberate:

1. Bits are chosen per token per layer (QAQ's "layer" level): the largest width any KV head (and batch row) of
   the layer asks for, so that every token lives in one bucket of equal-width packed rows. Attention statistics
   are the maximum over the query heads of each KV group. Scale/zero granularity is separate (``granularity``).
2. ``1/sqrt(D)`` is not neglected: the norm used is that of the scaled query (``scaling * q``), which is what the
   softmax sees. ``||Q||^2``'s 90% quantile is estimated online per KV head, instead of from a distribution
   precomputed offline: it is the quantile over the query vectors of the latest forward that had at least
   ``QUERY_SAMPLE`` of them for the head (a prefill chunk); single decode steps keep it.
3. The ``+1`` inside the bits formula: the quantizer used here has ``2**bits`` levels from ``min`` to ``max``
   (error ``(max - min) / (2 (2**bits - 1))``), as in QAQ's code; the paper's mid-point rule drops it.
4. The paper re-quantizes tokens up or down each step from a full-precision copy in CPU memory. No full-precision
   copy is kept here (it would defeat the memory saving): a token is stored at ``max_bits`` until its window of
   ``n`` observations is complete, then re-quantized once, downward, from those ``max_bits`` codes to its final
   width (an extra rounding at ``max_bits``, e.g. 8). A token's width never rises afterwards.
5. Outliers are the top ``alpha`` by magnitude of each token vector (of all heads together with per-layer
   parameters; the paper: ``alpha`` quantiles at both ends of each group), stored with their indices, which are
   counted in the bytes (the paper's size formula omits them).
6. QAQ's reference code quantizes around the group mean with ``2**bits`` steps of ``(max - min) / 2**bits``;
   here the asymmetric min/max quantizer of :mod:`.uniform` (error <= scale / 2) is used.
7. With an eviction policy, kept tokens are re-quantized after eviction with the attention of the compressing
   forward's last ``n`` queries; tokens re-committed without any statistics (after a head-wise split into
   per-head storage) are treated as fully attended (``S_t = 1``: the most value bits the rule allows) and their
   keys kept at ``max_bits`` (no query norm is known yet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import LMCompressError, check_choice, check_positive_int
from ...registry import KV_QUANTIZERS
from . import granularity as gr
from .base import KVQuantizer
from .outliers import OutlierCodec, check_alpha, top_magnitudes
from .uniform import UniformCodec, check_bits

#: query vectors per KV head a forward needs to (re)estimate the squared-norm quantile.
QUERY_SAMPLE = 32


def bits_for_error(ranges: torch.Tensor, sigma: torch.Tensor, min_bits: int, max_bits: int) -> torch.Tensor:
    """``ceil(log2(range / (2 sqrt(3) sigma) + 1))`` clamped to ``[min_bits, max_bits]``. ``sigma`` may be inf
    (any width will do: ``min_bits``)."""
    need = torch.log2(ranges / (2 * math.sqrt(3) * sigma) + 1)
    return torch.ceil(need - 1e-6).clamp(min_bits, max_bits).to(torch.int64)


def key_sigma(query_sq_norm: torch.Tensor, tokens: int, key_error: float) -> torch.Tensor:
    """Allowed key error std per KV head: ``sqrt(log(T^3/(T-1) sigma_S^2 + 1) / ||Q||^2)`` (inf for T < 2)."""
    if tokens < 2:
        return torch.full_like(query_sq_norm, math.inf)
    bound = math.log(tokens**3 / (tokens - 1) * key_error**2 + 1)
    return torch.sqrt(bound / query_sq_norm.clamp_min(1e-12))


def value_sigma(attention: torch.Tensor, tokens: int, value_error: float) -> torch.Tensor:
    """Allowed value error std per token: ``sigma_X / (sqrt(T) |S_t|)`` (inf where the attention is 0)."""
    return value_error / (math.sqrt(max(tokens, 1)) * attention.abs())


@KV_QUANTIZERS.register("qaq")
@dataclass(frozen=True)
class QAQ(KVQuantizer):
    """Quality-adaptive KV quantization (see the module docstring for the rules and deviations).

    Attributes:
        key_error: target std of the attention probabilities' error (``sigma_S``).
        value_error: target std of the attention output's error (``sigma_X``).
        min_bits, max_bits: the width range, 1..8.
        attention_window: ``n``, the steps over which a token's largest attention is taken.
        outliers: ``alpha``, the fraction in [0, 0.5) of each token vector kept in full precision.
        granularity: scale/zero groups, ``token``, ``head`` or ``layer``.
        group_size: channels per group for ``token`` granularity.
        query_quantile: the quantile of squared query norms used for keys (0.9 in the paper).
    """

    name = "qaq"
    key_error: float = 1e-3
    value_error: float = 1e-2
    min_bits: int = 2
    max_bits: int = 8
    attention_window: int = 5
    outliers: float = 0.01
    granularity: str = "head"
    group_size: int = 64
    query_quantile: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.residual:
            raise LMCompressError(
                f"residual={self.residual} is not used by QAQ (its recent tokens are kept at max_bits); use 0"
            )
        for name in ("key_error", "value_error"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise LMCompressError(f"{name}={value!r} is not allowed; it must be a finite number > 0")
        check_bits(self.min_bits, what="min_bits")
        check_bits(self.max_bits, what="max_bits")
        if self.min_bits > self.max_bits:
            raise LMCompressError(f"min_bits={self.min_bits} exceeds max_bits={self.max_bits}")
        check_positive_int("attention_window", self.attention_window)
        check_alpha(self.outliers)
        check_choice("granularity", self.granularity, ("token", "head", "layer"))
        gr.check_granularity(self.granularity, self.group_size)
        if not 0 < self.query_quantile <= 1:
            raise LMCompressError(f"query_quantile={self.query_quantile!r} is out of range; allowed: (0, 1]")

    # ------------------------------------------------------------------------------------------ codecs
    def codec(self, bits: int):
        """The codec of one width (keys and values alike); with per-layer parameters the outliers are chosen
        per token across heads too."""
        inner = UniformCodec(bits, self.group_size, False, self.granularity)
        if not self.outliers:
            return inner
        return OutlierCodec(inner, self.outliers, across_heads=self.granularity == "layer")

    @property
    def top_width(self) -> int:
        """The width of tokens whose attention window is not complete yet."""
        return self.max_bits

    def key_codec(self, layer_idx: int):
        return self.codec(self.top_width)

    def value_codec(self, layer_idx: int):
        return self.codec(self.top_width)

    def new_store(self, layer_idx: int, head_dim: int, dtype: torch.dtype):
        from .qaq_store import QAQStore

        return QAQStore(self, head_dim, dtype)

    # ------------------------------------------------------------------------------------------ rules
    def token_ranges(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, t]`` largest ``max - min`` over the parameter groups of each token vector of ``x``, outliers
        left out."""
        across = self.granularity == "layer"
        ignore = top_magnitudes(x, self.outliers, across_heads=across)[1] if self.outliers else None
        xg = gr.groups(x.float(), self.granularity, self.group_size)
        ig = None if ignore is None else gr.groups(ignore, self.granularity, self.group_size)
        lo, hi = gr.masked_min_max(xg, ig)
        ranges = (hi - lo).amax(dim=-1)  # [B, H or 1, t]
        return ranges.expand(x.shape[0], x.shape[1], x.shape[2])

    def key_bits(self, keys: torch.Tensor, query_sq_norm: torch.Tensor, tokens: int) -> torch.Tensor:
        """Per-token key widths ``[t]`` (max over batch and heads) for ``keys: [B, Hkv, t, D]`` given the squared
        query-norm quantile ``[B, Hkv]`` and the context length."""
        sigma = key_sigma(query_sq_norm, tokens, self.key_error).unsqueeze(-1)
        bits = bits_for_error(self.token_ranges(keys), sigma, self.min_bits, self.max_bits)
        return bits.amax(dim=(0, 1))

    def value_bits(self, values: torch.Tensor, attention: torch.Tensor, tokens: int) -> torch.Tensor:
        """Per-token value widths ``[t]`` for ``values: [B, Hkv, t, D]`` given each token's window-max attention
        ``[B, Hkv, t]``."""
        sigma = value_sigma(attention, tokens, self.value_error)
        bits = bits_for_error(self.token_ranges(values), sigma, self.min_bits, self.max_bits)
        return bits.amax(dim=(0, 1))

    def validate(self, head_dim: int) -> None:
        self.codec(self.top_width).validate(head_dim)
