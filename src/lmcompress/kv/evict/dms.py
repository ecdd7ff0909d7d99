"""Dynamic Memory Sparsification (DMS, Łańcucki et al., 2025): learned, delayed, per-head eviction, as NVIDIA's
DMS checkpoints (Model-Optimizer ``experimental/dms``) define it, applied to the standard architecture.

Mechanism (per decoder layer and KV head; ``W`` = ``dms_window_size``):

* a decision logit per token: ``x * dms_alpha_scale - dms_initial_alpha_offset`` where ``x`` is the last channel
  of the first query head of the KV head's GQA group, after ``q_norm`` and before RoPE (or, with
  ``dms_separate_alpha``, one output of a separate RMSNorm + linear over the decoder layer's residual input).
  That query channel is zeroed before and after RoPE, so it does not take part in attention (not in the
  separate-alpha variant). ``dms_alpha_per="layer"``: head 0's decision for all KV heads;
* the decision of token ``t`` (logit > 0) marks token ``t - 1`` for eviction;
* query ``i`` sees key ``j <= i`` when ``i - j <= W`` or ``j`` is unmarked; a marked token that no later query
  can see (``j <= newest - W``) is released from storage (the layer stores heads ragged, so held tokens per head
  and ``nbytes`` really drop). Composes with KV quantization (the kept tokens are stored packed).

Decision logits are computed by hooks that :func:`lmcompress.kv.scoring_hooks` installs (see
:mod:`lmcompress.kv.evict.dms_hooks`); running the model outside that block raises a clear error.
The compression ratio is whatever the decisions give: ``ratio``/``budget`` must stay unset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ...errors import LMCompressError
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy
from .dms_config import REQUIRED_KEYS, DMSSettings, settings_from_mapping

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer

#: name of the per-token eviction marks kept by the layer (1.0 = marked).
DMS_AUX = "dms_mark"


class DMSLayerState:
    """Per-layer DMS state: the settings (set by the hooks) and the decision logits of the current forward."""

    def __init__(self) -> None:
        self.settings: DMSSettings | None = None
        #: ``[B, Hkv, q]`` float32 decision logits of the tokens of the forward in progress (set by the hooks).
        self.pending: torch.Tensor | None = None
        #: ``[B, Hkv, q]`` bool decisions of the last forward (for tests and statistics).
        self.last_decisions: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return []


@EVICTION_METHODS.register("dms")
@dataclass(frozen=True)
class DMS(EvictionPolicy):
    """Learned delayed eviction (DMS). Settings come from the model's config (``dms_*`` keys of its
    ``config.json``); a field set here overrides the config's value.

    Attributes:
        window_size: ``dms_window_size`` override.
        alpha_scale: ``dms_alpha_scale`` override.
        initial_alpha_offset: ``dms_initial_alpha_offset`` override.
        separate_alpha: ``dms_separate_alpha`` override.
        alpha_per: ``dms_alpha_per`` override (``"head"`` or ``"layer"``).
    """

    name = "dms"
    display = "DMS"
    is_scorer = False
    headwise = True
    #: the bench's ratio sweep does not apply (the decisions set the compression)
    takes_ratio: ClassVar[bool] = False
    window_size: int | None = None
    alpha_scale: float | None = None
    initial_alpha_offset: float | None = None
    separate_alpha: bool | None = None
    alpha_per: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio or self.budget is not None:
            raise LMCompressError(f"dms takes its compression from its learned decisions; leave ratio/budget "
                                  f"unset (got ratio={self.ratio}, budget={self.budget})")
        if all(getattr(self, k) is not None for k in ("window_size", "alpha_scale", "initial_alpha_offset")):
            self.settings({})  # validate overrides early

    @property
    def is_noop(self) -> bool:
        return False

    def settings(self, config: Any) -> DMSSettings:
        """The settings for a model with ``config`` (a transformers config or a ``config.json`` mapping), with
        this policy's overrides applied.

        Raises:
            LMCompressError: keys missing from config and overrides, or impossible values.
        """
        from ..._compat import text_config

        keys = (*REQUIRED_KEYS, "dms_separate_alpha", "dms_alpha_per")
        if isinstance(config, dict):
            mapping = {k: config[k] for k in keys if k in config}
        else:
            cfg = text_config(config)
            mapping = {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}
        for field, key in (("window_size", "dms_window_size"), ("alpha_scale", "dms_alpha_scale"),
                           ("initial_alpha_offset", "dms_initial_alpha_offset"),
                           ("separate_alpha", "dms_separate_alpha"), ("alpha_per", "dms_alpha_per")):
            value = getattr(self, field)
            if value is not None:
                mapping[key] = value
        return settings_from_mapping(mapping, where="the model config (with the dms overrides)")

    # ------------------------------------------------------------------------------------------ cache hooks
    def new_layer_state(self) -> DMSLayerState:
        return DMSLayerState()

    def model_hooks(self, model: torch.nn.Module, cache: Any) -> list[Any]:
        """Install the decision hooks on ``model`` for ``cache``'s DMS layers; returns the hook handles."""
        from .dms_hooks import install_decision_hooks

        return install_decision_hooks(model, cache, self)

    @staticmethod
    def _state(layer: CompressedLayer) -> tuple[DMSLayerState, DMSSettings]:
        state = layer.evict_state
        if state is None or state.settings is None or state.pending is None:
            raise LMCompressError(
                "dms needs its decision hooks; run the model inside `lmcompress.kv.scoring_hooks(model, cache)` "
                "(the pipeline does this)"
            )
        return state, state.settings

    def before_attention(self, layer: CompressedLayer, query: torch.Tensor) -> torch.Tensor:
        """Called by the attention function with ``query: [B, Hq, q, D]`` (after RoPE), after the layer appended
        the ``q`` new tokens: records the marks the new decisions set (token ``t - 1`` per decision of token
        ``t``) and returns the query with the borrowed channel zeroed (not with a separate alpha)."""
        state, settings = self._state(layer)
        q = query.shape[2]
        logits = state.pending
        if logits.shape[-1] != q:
            raise LMCompressError(f"dms decision logits cover {logits.shape[-1]} tokens, the forward has {q}")
        decisions = logits > 0
        if settings.alpha_per == "layer":
            decisions = decisions[:, :1].expand_as(decisions)
        state.last_decisions = decisions
        self._write_marks(layer, decisions.float(), q)
        if settings.separate_alpha:
            return query
        groups = query.shape[1] // layer.num_heads
        query = query.clone()
        query[:, ::groups, :, -1] = 0
        return query

    @staticmethod
    def _write_marks(layer: CompressedLayer, marks: torch.Tensor, q: int) -> None:
        """Write ``marks: [B, Hkv, q]`` (decisions of the newest ``q`` tokens) onto the tokens they mark: the
        token before the chunk and the chunk's first ``q - 1`` tokens."""
        for i, seg in enumerate(layer.segments):
            view = seg.aux_view(DMS_AUX)
            if view is None:
                rows, heads = (1, 1) if layer.ragged else (layer.batch_size, layer.num_heads)
                seg.set_aux(DMS_AUX, torch.zeros(rows, heads, seg.held, device=layer.device), fill=0.0)
                view = seg.aux_view(DMS_AUX)
            part = marks
            if layer.ragged:
                b, h = divmod(i, layer.num_heads)
                part = marks[b : b + 1, h : h + 1]
            n = view.shape[-1]
            start = n - q - 1
            if start >= 0:
                view[:, :, start : n - 1] = part
            else:  # the chunk starts the sequence: the first decision marks nothing
                view[:, :, : n - 1] = part[:, :, 1:]
        layer._inputs_cache = None

    def visibility(self, layer: CompressedLayer, q: int) -> torch.Tensor | None:
        """``[B, Hkv, q, held]`` bool (layout of :meth:`CompressedLayer.score_inputs`): whether each of the newest
        ``q`` queries may see each held token under DMS (True for unmarked tokens and inside the window;
        causality is the layer's), or None when every held token is visible to every query."""
        _, settings = self._state(layer)
        pos = layer.positions().to(torch.int64)  # [B, Hkv, n]
        marked = self._marks(layer) > 0
        first = layer.seen - q
        hidden = marked & (pos >= 0) & (pos < layer.seen - 1 - settings.window_size)
        if not bool(hidden.any()):
            return None
        q_pos = torch.arange(first, layer.seen, device=pos.device)
        inside = (q_pos.view(1, 1, q, 1) - pos.unsqueeze(-2)) <= settings.window_size
        return inside | ~marked.unsqueeze(-2)

    @staticmethod
    def _marks(layer: CompressedLayer) -> torch.Tensor:
        """``[B, Hkv, held]`` float marks (ragged: left-padded with 0)."""
        if not layer.ragged:
            view = layer.segments[0].aux_view(DMS_AUX)
            return view if view is not None else torch.zeros(layer.shape[:3], device=layer.device)
        return layer._padded(lambda s: s.aux_view(DMS_AUX), 0.0, torch.float32)

    def after_forward(self, layer: CompressedLayer, query: torch.Tensor, scaling: float,
                      module: torch.nn.Module | None) -> None:
        """Release the marked tokens that left the window of the newest token (no later query sees them)."""
        state, settings = self._state(layer)
        state.pending = None
        pos = layer.positions().to(torch.int64)
        valid = pos >= 0
        release = (self._marks(layer) > 0) & valid & (pos <= layer.seen - 1 - settings.window_size)
        if bool(release.any()):
            layer.keep(valid & ~release, in_place=query.shape[2] == 1)

    def observe(self, layer: CompressedLayer, query: torch.Tensor, scaling: float) -> None:
        """While compression is paused nothing is released, but the pending logits are consumed."""
        if not layer.compression_enabled and layer.evict_state is not None:
            layer.evict_state.pending = None
