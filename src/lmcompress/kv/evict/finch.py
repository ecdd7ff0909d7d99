"""FINCH (Corallo & Papotti, 2024, TACL; as kvpress's FinchPress does it): question-aware compression of a prompt
that ends with the question: SnapKV-like scores from the question's queries (normalised by how many keys each
query sees, no pooling), optionally selected chunk by chunk, and the kept keys re-rotated to contiguous
positions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ...errors import LMCompressError, check_positive_int
from ...registry import EVICTION_METHODS
from .attention_probs import window_attention
from .base import EvictionPolicy, ScoreInputs, evicted_count, topk_mask
from .key_rerotation import keep_rerotated

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer


@EVICTION_METHODS.register("finch")
@dataclass(frozen=True)
class Finch(EvictionPolicy):
    """FINCH on a prompt = context + question, the question being its last ``window_size`` tokens.

    score(j) = mean over the G query heads of mean over the question's queries i of
    ``softmax_i(j) * (n - w + i)`` (kvpress's normalisation: row i of the window scaled by ``n - w + i``), for
    the ``n - w`` context tokens; the question itself gets +inf (kept). Selection: the ``n - floor(r n)``
    best per head, or with ``chunk_length`` the ``c - floor(r c)`` best of each chunk of ``c`` tokens (kvpress:
    ``max(1, int(c (1 - r)))``). With ``rerotate_keys`` the kept keys are re-rotated as
    :class:`~lmcompress.kv.evict.key_rerotation.KeyRerotation` does (ending at the newest position).

    kvpress finds the question by a delimiter token inserted into the vocabulary and cut out of the embeddings;
    here the question length is a parameter (no model change), and the prompt must be prefilled in one chunk
    holding at least the question.

    Attributes:
        window_size: question tokens at the end of the prompt (required, >= 1).
        chunk_length: chunked selection (None: the whole context at once).
        normalize_scores: the count normalisation (default True).
        rerotate_keys: re-rotate the kept keys (default True).
    """

    name = "finch"
    display = "FINCH"
    window_size: int | None = None
    chunk_length: int | None = None
    normalize_scores: bool = True
    rerotate_keys: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size is None:
            raise LMCompressError("finch needs window_size = the number of question tokens ending the prompt")
        check_positive_int("window_size", self.window_size)
        if self.chunk_length is not None:
            check_positive_int("chunk_length", self.chunk_length)
            if self.budget is not None:
                raise LMCompressError("finch with chunk_length compresses by a ratio; give ratio, not budget")
            if self.chunk_length * (1 - float(self.ratio)) <= self.window_size:
                raise LMCompressError(
                    f"chunk_length={self.chunk_length} must exceed window_size / (1 - ratio) = "
                    f"{self.window_size / (1 - float(self.ratio)):.1f} so that the question fits in its chunk"
                )
        for flag in ("normalize_scores", "rerotate_keys"):
            if not isinstance(getattr(self, flag), bool):
                raise LMCompressError(f"{flag}={getattr(self, flag)!r} must be true or false")

    @property
    def query_window(self) -> int:
        return self.window_size

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        w, n = self.window_size, inputs.num_tokens
        attn = window_attention(inputs, w, self.display)[..., : n - w]  # [B, Hkv, G, w, n - w]
        if self.normalize_scores:
            counts = torch.arange(n - w, n, device=attn.device, dtype=attn.dtype)
            attn = attn * counts[:, None]
        scores = attn.mean(dim=-2).mean(dim=2)
        return F.pad(scores, (0, w), value=math.inf)

    def keep_mask(self, inputs: ScoreInputs) -> torch.Tensor:
        if self.chunk_length is None or inputs.valid is not None:
            return super().keep_mask(inputs)
        scores = self.final_scores(inputs)
        n, r = inputs.num_tokens, float(self.ratio)
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        for start in range(0, n, self.chunk_length):
            end = min(n, start + self.chunk_length)
            mask[:, :, start:end] = topk_mask(scores[:, :, start:end], end - start - evicted_count(end - start, r))
        return mask

    def after_forward(self, layer: CompressedLayer, query: torch.Tensor, scaling: float,
                      module: torch.nn.Module | None) -> None:
        if query.shape[2] <= 1:
            return
        inputs = layer.score_inputs(query, scaling, module)
        mask = self.keep_mask(inputs)
        if not self.rerotate_keys:
            layer.keep(mask)
            return
        if layer.ragged:
            raise LMCompressError("finch re-rotation needs the same tokens in every head (not a ragged layer)")
        counts = mask.sum(dim=-1)
        k = int(counts.flatten()[0])
        keep_rerotated(layer, inputs, mask.nonzero()[:, 2].view(*mask.shape[:2], k))
