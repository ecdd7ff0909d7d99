"""SimLayerKV (Zhang et al., 2024, arXiv:2410.13846): "lazy" layers, whose last tokens attend almost only to the
initial and the recent tokens, fall back to a streaming window; the other layers keep every token.

Rule (kvpress 0.5.5's ``SimLayerKVPress``, read, not copied), per layer at each prefill forward of ``n`` held
tokens, for each batch row:

* ``a[h, i, j]``: softmax attention of query head ``h`` of the ``i``-th of the last ``n_last`` tokens over every
  held key ``j`` (causal among the last tokens), in float32, with the model's softmax scale;
* drop the columns of the last ``n_last`` tokens, average over query heads and the ``n_last`` queries: ``m[j]``;
* ``lazy_score = sum_{pos_j < n_initial} m[j] + sum_{newest - n_last - n_recent < pos_j <= newest - n_last} m[j]``
  (the first ``n_initial`` tokens and the ``n_recent`` tokens before the last ``n_last``);
* the layer is lazy when ``lazy_score > lazy_threshold``: it keeps the ``n_initial`` first and the ``n_recent``
  newest tokens (positions ``< n_initial`` or ``> newest - n_recent``), the rest is freed; otherwise it keeps all.

Nothing is compressed when a row holds ``n <= n_initial + n_recent + n_last`` tokens or when ``lazy_threshold``
is 1 (kvpress's default: a mass of probabilities cannot exceed 1, so nothing is ever lazy).

``ratio``: not a parameter of SimLayerKV (kvpress computes its ``compression_ratio`` after the fact and refuses
to have it set). Here ``ratio`` and ``budget`` must stay unset and a bench ``--ratios`` sweep does not apply to
it (``takes_ratio = False``, like DMS): the compression that results depends on the content and is measured
(``KV MB`` / ``cache.nbytes``), as for the threshold methods. It is controlled by ``lazy_threshold`` (lower: more
lazy layers) and the window sizes.

Deviations from kvpress 0.5.5, all deliberate:

* **Kept window**: ``n_initial + n_recent`` tokens (the paper's streaming window and this project's rule).
  kvpress keeps ``keys[:, :, -n_recent + n_last:]``, i.e. ``n_recent - n_last`` recent tokens (``n_recent - 1``
  at its ``n_last = 1``; and everything when ``n_last = n_recent``): our kept set is kvpress's plus the
  ``n_last`` oldest tokens of the window. The lazy decision is the same.
* **Batch rows decide independently** (kvpress averages the score over the batch, so one row's content changes
  another's compression); rows that decide differently make the layer ragged (one segment per row and head).
* The queries are the forward's own post-RoPE queries (kvpress rebuilds them from the hidden states: the same
  values) and the scale is the model's (kvpress ``1/sqrt(head_dim)``: the same except for Gemma 3). kvpress
  rounds the probabilities to the model dtype; here they stay float32.
* Prefill only, as kvpress: decoded tokens are appended to every layer (the paper's decoding variant keeps a
  lazy layer's window at a constant size). Each prefill forward (a chunk of a chunked prefill) decides anew over
  the tokens held then.
* Positions, not indices, define "initial" and "recent", so a layer compressed by an earlier chunk is handled
  (identical to kvpress's indices for a one-forward prefill).

Evicted tokens are freed: ``cache.nbytes`` counts only the kept entries (kvpress truncates its tensors too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import LMCompressError, check_positive_int, check_range
from ...registry import EVICTION_METHODS
from .attention_probs import window_attention
from .base import EvictionPolicy, ScoreInputs


@EVICTION_METHODS.register("simlayerkv")
@dataclass(frozen=True)
class SimLayerKV(EvictionPolicy):
    """Lazy layers keep a streaming window, the others everything (see the module docstring).

    Attributes:
        lazy_threshold: a layer is lazy when its lazy score is above it; in [0, 1] (kvpress's default 1.0 makes
            no layer lazy; the SimLayerKV authors suggest 0.9 for Llama 3, 0.65 Llama 2, 0.8 Mistral, 0.85 Qwen).
        n_last: last tokens whose attention decides (default 1).
        n_recent: recent tokens a lazy layer keeps (default 1024).
        n_initial: initial (sink) tokens a lazy layer keeps (default 4).
    """

    name = "simlayerkv"
    display = "SimLayerKV"
    is_scorer = False
    headwise = True  # batch rows may decide differently (ragged storage)
    takes_ratio: ClassVar[bool] = False
    lazy_threshold: float = 1.0
    n_last: int = 1
    n_recent: int = 1024
    n_initial: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio or self.budget is not None:
            raise LMCompressError(f"{self.display} takes no ratio or budget (got ratio={self.ratio}, "
                                  f"budget={self.budget}): its compression follows from lazy_threshold, n_recent "
                                  "and n_initial and is measured")
        t = self.lazy_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise LMCompressError(f"lazy_threshold={t!r} is not a number; allowed: [0, 1]")
        check_range("lazy_threshold", float(t), 0.0, 1.0, high_open=False)
        check_positive_int("n_last", self.n_last)
        check_positive_int("n_recent", self.n_recent)
        check_positive_int("n_initial", self.n_initial, allow_zero=True)

    @property
    def is_noop(self) -> bool:
        return float(self.lazy_threshold) == 1.0

    @property
    def query_window(self) -> int:
        return self.n_last

    @property
    def min_tokens(self) -> int:
        """A row is compressed only when it holds more tokens than this."""
        return self.n_initial + self.n_recent + self.n_last

    def lazy_scores(self, inputs: ScoreInputs) -> torch.Tensor:
        """``[B]`` float32: each batch row's attention mass of the last ``n_last`` queries on the initial and
        recent tokens (every row must hold more than ``n_last`` tokens and the chunk ``n_last`` queries)."""
        attn = window_attention(inputs, self.n_last, self.display)  # [B, Hkv, G, w, n]
        pos = inputs.positions  # [B, Hkv, n]
        newest = pos.amax(dim=-1, keepdim=True)
        cutoff = newest - self.n_last  # the last n_last tokens are not counted
        measured = (pos >= 0) & ((pos < self.n_initial) | (pos > cutoff - self.n_recent)) & (pos <= cutoff)
        mass = (attn * measured[:, :, None, None, :]).sum(dim=-1)  # [B, Hkv, G, w]
        return mass.flatten(1).mean(dim=1)

    def lazy_rows(self, inputs: ScoreInputs) -> torch.Tensor:
        """``[B]`` bool: the rows for which this layer is lazy (False where a row is too short to compress)."""
        b = inputs.keys.shape[0]
        counts = inputs.valid_counts()[:, 0]  # every head of a row holds the same tokens before this policy
        long_enough = counts > self.min_tokens
        if self.is_noop or not bool(long_enough.any()) or inputs.queries.shape[2] < self.n_last or \
                int(counts.min()) <= self.n_last:  # (a padded row shorter than the window: nothing is lazy)
            return torch.zeros(b, dtype=torch.bool, device=inputs.keys.device)
        return long_enough & (self.lazy_scores(inputs) > float(self.lazy_threshold))

    def keep_mask(self, inputs: ScoreInputs) -> torch.Tensor:
        valid = inputs.valid if inputs.valid is not None else torch.ones(
            inputs.keys.shape[:3], dtype=torch.bool, device=inputs.keys.device)
        lazy = self.lazy_rows(inputs)
        if not bool(lazy.any()):
            return valid.clone()
        pos = inputs.positions
        newest = pos.amax(dim=-1, keepdim=True)
        window = (pos >= 0) & ((pos < self.n_initial) | (pos > newest - self.n_recent))
        if self.protect_sinks or self.protect_recent:
            window |= self.protect(torch.zeros(pos.shape, device=pos.device), pos) == math.inf
        keep = torch.where(lazy[:, None, None], window, torch.ones_like(window))
        return keep & valid
