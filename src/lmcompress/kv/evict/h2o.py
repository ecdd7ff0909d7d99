"""H2O (Zhang et al., 2023): heavy hitters, the tokens that have received the most attention so far.

The layer accumulates, for every held token, the attention it received from every query since it entered the
cache (prefill and decoding), averaged over the query heads of its KV group; this is the score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...errors import LMCompressError
from ...registry import EVICTION_METHODS
from .attention_probs import summed_attention
from .base import EvictionPolicy, ScoreInputs

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer

#: name of the per-token accumulated attention kept by the layer.
H2O_AUX = "h2o"


def accumulated_attention(inputs: ScoreInputs, method: str) -> torch.Tensor:
    """The accumulated attention ``[B, Hkv, n]`` recorded by the layer, or a clear error where there is none."""
    acc = inputs.aux.get(H2O_AUX)
    if acc is None or acc.shape != inputs.keys.shape[:3]:
        raise LMCompressError(
            f"{method} needs the attention weights every query paid to every cached token, and none were "
            "recorded for these tokens: use it as the eviction policy of a CompressedCache (or inside AdaKV / "
            "DecodingCompression), where the layer records them"
        )
    return acc


@EVICTION_METHODS.register("h2o")
@dataclass(frozen=True)
class H2O(EvictionPolicy):
    """score(j) = sum over all queries so far of their attention to token j (mean over the group's query heads).

    Combine with ``protect_recent`` for H2O's recent window; for the paper's fixed budget during generation use
    ``DecodingCompression(base=H2O(...), interval=1, target_size=budget)``.
    """

    name = "h2o"
    display = "H2O"

    def observe(self, layer: CompressedLayer, query: torch.Tensor, scaling: float) -> None:
        layer.add_aux(H2O_AUX, summed_attention(layer.score_inputs(query, scaling)))

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return accumulated_attention(inputs, self.display)
