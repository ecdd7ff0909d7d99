"""TOVA (Oren et al., 2024): keep the tokens the newest query attends to most, averaged over all heads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...registry import EVICTION_METHODS
from .attention_probs import window_attention
from .base import EvictionPolicy, ScoreInputs


@EVICTION_METHODS.register("tova")
@dataclass(frozen=True)
class TOVA(EvictionPolicy):
    """score(j) = attention of the last query to token j, averaged over *all* query heads (so every KV head keeps
    the same tokens, as in TOVA and kvpress); the last token gets +inf.

    In a ragged layer (heads holding different tokens after a head-wise eviction) the average is taken over the
    query heads of each KV group instead, since token indices no longer line up across KV heads.
    """

    name = "tova"
    display = "TOVA"

    @property
    def query_window(self) -> int:
        return 1

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        n = inputs.num_tokens
        attn = window_attention(inputs, 1, self.display)[..., 0, : n - 1]  # [B, Hkv, G, n-1]
        if inputs.valid is None:
            scores = attn.mean(dim=(1, 2), keepdim=False).unsqueeze(1).expand(-1, attn.shape[1], -1)
        else:
            scores = attn.mean(dim=2)
        return F.pad(scores, (0, 1), value=math.inf)
