"""KVzip (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction") and
KVzip+ (its normalised score, as kvpress's ``kvzip_plus_normalization``).

Rule. After the context is prefilled, the model is run again on a *repeat prompt* for each chunk of the context
(``chunk_size`` tokens): ``instruction + suffix + chunk`` ("Repeat the previous context exactly.", later chunks
"Repeat the part of the previous context exactly, starting with" and the last 8 tokens of the previous chunk;
``suffix`` is the chat template's assistant turn opener, or ``"\\n"`` without one). The repeat tokens attend to the
whole cache as usual; for the score, the attention of each repeat query ``t`` over the key set ``[the first
min(n_sink, chunk start) context tokens, the chunk, the repeat tokens (causal)]`` is softmaxed and a context token
``j`` of the chunk scores ``max over the G query heads of its KV head and all repeat queries t of a[t, j]``.
KVzip+ multiplies each ``a[t, j]`` by ``||W_o,h v_j|| / ||x_t||`` (``W_o,h``: the query head's slice of the
output projection, ``x_t``: the attention input of query ``t``). Tokens at positions ``< n_sink`` start at score 1
and the first ``prefix_tokens`` tokens (a chat template's system prefix) are not reconstructed, so the ones past
the sinks keep score 0 (kvpress's behaviour). The repeat tokens are dropped from every layer after each chunk.

Selection (kvpress's KVzipPress, without its masking): with the global budget (the paper's; default) the kept
entries are the ``N - floor(ratio * N)`` best of all ``N = layers * KV heads * n`` context entries of a batch
row together, so layers and heads keep different counts; ``layerwise=True`` applies the same count to each
layer's ``KV heads * n`` entries (heads still differ). With ``budget=b`` the global total is
``layers * KV heads * min(n, b)``. Heads then hold different lengths, so layers are stored ragged and the evicted
entries are freed (kvpress masks them and keeps every key).

Extra prefill cost: one more forward over every context token (plus the short instructions), each chunk
attending to the full context, and the score products above (``q x (chunk + sinks + q)`` per query head and
layer): about one prefill's worth of compute on top of the prefill (kvpress states 2-3x prefill time in total).
Measured in BENCHMARKS.md ("KVzip prefill cost").

Source: kvpress 0.5.5 ``kvzip_press.py`` and github.com/snu-mllab/KVzip ``attention/score.py`` (read, not
copied). Deviations: the model's softmax scale is used where kvpress uses ``1/sqrt(head_dim)`` (identical for
every architecture but Gemma 3); the softmax runs in float32; the ``||W_o,h v_j||`` norm is computed as
``sqrt(v_j' W_o,h W_o,h' v_j)`` (the same value up to rounding); kvpress supports batch size 1 only and refuses
Gemma 3, here batch rows are selected independently and Gemma 3's sliding layers (not compressed) are restored
after each chunk; when composed with a quantizer the context is already packed when it is reconstructed, so the
scores see dequantized keys; without a tokenizer (tiny test models) and without ``prompt_ids`` the instruction
is left out (a warning says so) and each chunk is re-fed bare. Original KVzip keeps tokens above a score
threshold (ties included); here counts are exact.

Needs the model-level hook of :func:`lmcompress.kv.hooks.scoring_hooks` (pass ``tokenizer=``; the pipeline
does), which runs the reconstruction after each compressed prefill forward.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ... import _compat
from ..._compat import cache_kwargs
from ...errors import LMCompressError, check_positive_int
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, evicted_count, group_queries, topk_mask

if TYPE_CHECKING:  # pragma: no cover
    from ..cache import CompressedCache
    from ..layer import CompressedLayer

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
#: tokens of the previous chunk appended to the later chunks' instruction.
PREV_POSTFIX = 8


def reconstruction_scores(queries: torch.Tensor, keys: torch.Tensor, scaling: float, sink: int, chunk: int, *,
                          hidden_norm: torch.Tensor | None = None, wov_norm: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """KVzip scores of one chunk.

    Args:
        queries: ``[B, Hq, q, D]`` queries (after RoPE) of the repeat tokens.
        keys: ``[B, Hkv, sink + chunk + q, D]``: the sink keys, the chunk's keys, the repeat tokens' keys.
        scaling: softmax scale.
        sink, chunk: how many of ``keys`` are sinks and chunk tokens.
        hidden_norm: ``[B, q]`` norms of the repeat queries' attention inputs (KVzip+), or None.
        wov_norm: ``[B, Hkv, G, sink + chunk + q]`` norms ``||W_o,h v_j||`` per query head (KVzip+), or None.

    Returns:
        ``[B, Hkv, chunk]`` float32: max over the group's query heads and the repeat queries of the (normalised)
        attention to each chunk token.
    """
    hkv, q = keys.shape[1], queries.shape[2]
    m = keys.shape[2]
    if m != sink + chunk + q:
        raise RuntimeError(f"keys hold {m} tokens, expected sink + chunk + q = {sink + chunk + q}")
    qg = group_queries(queries, hkv).float()  # [B, Hkv, G, q, D]
    logits = torch.einsum("bhgqd,bhkd->bhgqk", qg, keys.float()) * scaling
    future = torch.ones(q, q, dtype=torch.bool, device=keys.device).triu(1)
    logits[..., m - q :] = logits[..., m - q :].masked_fill(future, -math.inf)
    attn = logits.softmax(dim=-1)
    if hidden_norm is not None:
        attn = attn / hidden_norm.float()[:, None, None, :, None]
    if wov_norm is not None:
        attn = attn * wov_norm.float().unsqueeze(3)
    return attn[..., sink : sink + chunk].amax(dim=(2, 3))


def wov_norms(values: torch.Tensor, o_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``||W_o,h v_j||_2`` for every query head ``h`` and value ``v_j``.

    Args:
        values: ``[B, Hkv, m, D]``.
        o_weight: ``[hidden, Hq * D]`` the output projection's weight.
        num_heads: Hq.

    Returns:
        ``[B, Hkv, G, m]`` float32.
    """
    hkv, d = values.shape[1], values.shape[3]
    w = o_weight.float().view(-1, num_heads, d).permute(1, 2, 0)  # [Hq, D, hidden]
    gram = (w @ w.transpose(1, 2)).view(hkv, num_heads // hkv, d, d)  # W_h W_h'
    sq = torch.einsum("bhmd,hgde,bhme->bhgm", values.float(), gram, values.float())
    return sq.clamp_min(0).sqrt()


def chat_suffix(tokenizer: Any) -> str:
    """The text a chat template puts after a user message up to the assistant's answer ("\\n" without one)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "\n"
    marker = "\n" + "#" * 13
    text = tokenizer.apply_chat_template([{"role": "user", "content": "dummy context" + marker}],
                                         add_generation_prompt=True, tokenize=False, enable_thinking=False)
    return text.split(marker)[-1]


class KVzipState:
    """Reconstruction state shared by the layers of one KVzip policy in one cache.

    Attributes:
        hooked: a model-level hook (``scoring_hooks``) runs the reconstruction for this cache.
        running: a reconstruction forward is in progress (layers score and drop the repeat tokens).
        n_ctx: context tokens being scored; ``chunk``: ``(start, end)`` of the current chunk in the context.
        scores: layer index -> ``[B, Hkv, n_ctx]`` float32 scores of the context tokens.
    """

    def __init__(self) -> None:
        self.hooked = False
        self.running = False
        self.n_ctx = 0
        self.chunk = (0, 0)
        self.scores: dict[int, torch.Tensor] = {}


@EVICTION_METHODS.register("kvzip")
@dataclass(frozen=True)
class KVzip(EvictionPolicy):
    """KVzip: keep the cached pairs the model attends to most while it reconstructs the context (see the module
    docstring for the rule, the cost and the deviations from kvpress / the paper).

    Attributes:
        layerwise: the same count for every layer (default False: one budget across all layers and heads).
        n_sink: first tokens that start at score 1 and join every later chunk's softmax (default 4).
        chunk_size: context tokens reconstructed per forward (default 2048).
        prefix_tokens: leading context tokens not reconstructed (a chat template's system prefix; default 0).
        prompt_ids: token ids of the repeat instruction, used for every chunk instead of the tokenized English
            instruction (then no tokenizer and no chat suffix are used), or None.
    """

    name = "kvzip"
    display = "KVzip"
    is_scorer = False
    #: KVzip+ normalisation (the ``kvzip_plus`` subclass sets it).
    plus: ClassVar[bool] = False

    layerwise: bool = False
    n_sink: int = 4
    chunk_size: int = 2048
    prefix_tokens: int = 0
    prompt_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.layerwise, bool):
            raise LMCompressError(f"layerwise={self.layerwise!r} is not allowed; it must be true or false")
        check_positive_int("n_sink", self.n_sink, allow_zero=True)
        check_positive_int("chunk_size", self.chunk_size)
        check_positive_int("prefix_tokens", self.prefix_tokens, allow_zero=True)
        if self.prompt_ids is not None:
            ids = self.prompt_ids
            if isinstance(ids, str) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in ids):
                raise LMCompressError(f"prompt_ids={ids!r} is not allowed; it must be a list of token ids >= 0")
            object.__setattr__(self, "prompt_ids", tuple(ids))

    # ------------------------------------------------------------------------------------------ cache hooks
    def new_shared_state(self, layers: list[CompressedLayer]) -> KVzipState:
        return KVzipState()

    def after_forward(self, layer: CompressedLayer, query: torch.Tensor, scaling: float,
                      module: torch.nn.Module | None) -> None:
        state: KVzipState = layer.shared
        if not state.running:
            if query.shape[2] > 1 and not state.hooked:
                raise LMCompressError(
                    f"{self.display} scores by re-running the model; run it inside "
                    "`lmcompress.kv.scoring_hooks(model, cache, tokenizer=...)` (the pipeline does this)"
                )
            return
        if layer.is_sliding:
            raise LMCompressError(f"{self.display} does not compress sliding-window layers; "
                                  "leave compress_sliding off")
        q = query.shape[2]
        inputs = layer.score_inputs(query, scaling, module)
        start, end = state.chunk
        ctx0 = inputs.keys.shape[2] - q - state.n_ctx
        sink = min(self.n_sink, start)
        parts = [slice(ctx0, ctx0 + sink), slice(ctx0 + start, ctx0 + end), slice(inputs.keys.shape[2] - q, None)]
        keys = torch.cat([inputs.keys[:, :, p] for p in parts], dim=2)
        hidden_norm = wov = None
        if self.plus:
            values = torch.cat([inputs.values[:, :, p] for p in parts], dim=2)
            hidden_norm = torch.linalg.vector_norm(inputs.hidden_states.float(), dim=-1)
            weight = _compat.output_projection_weight(module)
            wov = wov_norms(values, weight, query.shape[1])
        scores = reconstruction_scores(query, keys, scaling, sink, end - start,
                                       hidden_norm=hidden_norm, wov_norm=wov)
        state.scores[layer.layer_idx][:, :, start:end] = scores
        layer.drop_newest(q)

    # ------------------------------------------------------------------------------------------ model pass
    def repeat_prompts(self, tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
        """``(first instruction, later instruction, suffix)`` token ids."""
        if self.prompt_ids is not None:
            return list(self.prompt_ids), list(self.prompt_ids), []
        if tokenizer is None:
            warnings.warn(f"{self.display} has no tokenizer for its repeat instruction (pass tokenizer= to "
                          "scoring_hooks, or prompt_ids=); each chunk is re-fed without an instruction",
                          stacklevel=3)
            return [], [], []

        def enc(text: str) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False))

        return enc(FIRST_PROMPT), enc(LATER_PROMPT), enc(chat_suffix(tokenizer))

    def set_hooked(self, cache: CompressedCache, hooked: bool) -> None:
        for layer in cache.layers:
            if layer.evict is self:
                layer.shared.hooked = hooked

    def after_model_forward(self, model: torch.nn.Module, cache: CompressedCache, input_ids: torch.Tensor | None,
                            tokenizer: Any = None) -> None:
        """Run the reconstruction after a prefill forward of ``input_ids: [B, n]`` and evict (called by the
        model-level hook of ``scoring_hooks``)."""
        layers = [layer for layer in cache.layers if layer.evict is self]
        if not layers or layers[0].shared.running:
            return
        state: KVzipState = layers[0].shared
        if input_ids is None:
            if any(layer.compression_enabled for layer in layers):
                raise LMCompressError(f"{self.display} needs input_ids (it re-feeds the context), not inputs_embeds")
            return
        n = input_ids.shape[1]
        if n < 2 or not all(layer.compression_enabled for layer in layers):
            return
        state.n_ctx = n
        shared, memo_key = self._memo(cache)
        if shared is not None:
            stored = shared.memo_scores(model, input_ids, memo_key)
            if stored is not None:
                state.scores = stored
                self.evict(layers, state)
                state.scores = {}
                return
        first, later, suffix = self.repeat_prompts(tokenizer)
        b = input_ids.shape[0]
        device = input_ids.device
        state.scores = {}
        for layer in layers:
            init = torch.zeros((b, layer.num_heads, n), dtype=torch.float32, device=device)
            init[..., : self.n_sink] = 1.0
            state.scores[layer.layer_idx] = init
        others = [layer for layer in cache.layers if layer.evict is not self]
        saved = [(copy.deepcopy(layer.segments), layer.seen, layer.ragged) for layer in others]
        ctx = input_ids[:, self.prefix_tokens :]
        chunks = [(s, min(s + self.chunk_size, ctx.shape[1])) for s in range(0, ctx.shape[1], self.chunk_size)]
        state.running = True
        try:
            for i, (s, e) in enumerate(chunks):
                head = first if i == 0 else later + ctx[0, max(0, s - PREV_POSTFIX) : s].tolist()
                lead = torch.tensor([head + suffix], dtype=input_ids.dtype, device=device).expand(b, -1)
                state.chunk = (self.prefix_tokens + s, self.prefix_tokens + e)
                model(input_ids=torch.cat([lead, ctx[:, s:e]], dim=1), **cache_kwargs(cache), use_cache=True,
                      logits_to_keep=1)
                for layer, (segments, seen, ragged) in zip(others, saved):
                    layer.segments, layer.seen, layer.ragged = copy.deepcopy(segments), seen, ragged
                    layer._inputs_cache = None
        finally:
            state.running = False
        if shared is not None:
            shared.remember_scores(model, input_ids, memo_key, state.scores)
        self.evict(layers, state)
        state.scores = {}

    def _memo(self, cache: CompressedCache) -> tuple[Any, str]:
        """Inside a grid's shared prefills (:func:`lmcompress.eval.shared_prefill.sharing_prefills`), the store
        for reconstruction scores and this policy's key in it. The scores do not depend on the ratio or budget,
        so the same prompt at another ratio reuses them: exact, the reconstruction is deterministic given the
        prompt, the model, these parameters and the quantizer (if any) that packed the context it reads."""
        from ...eval.shared_prefill import active_prefills

        shared = active_prefills()
        if shared is None:
            return None, ""
        params = dataclasses.replace(self, ratio=0.0, budget=None)
        return shared, f"{params!r}|{cache.spec.quant!r}|{cache.spec.compress_sliding}"

    # ------------------------------------------------------------------------------------------ selection
    def context_keep(self, scores: dict[int, torch.Tensor], num_layers: int) -> dict[int, torch.Tensor]:
        """Kept context entries per layer.

        Args:
            scores: layer index -> ``[B, Hkv, n]`` scores (protection not yet applied).
            num_layers: decoder layers of the model (for ``n_keep``).

        Returns:
            layer index -> ``[B, Hkv, n]`` bool, exactly the counts the module docstring gives.
        """
        order = sorted(scores)
        b, hkv, n = scores[order[0]].shape
        pos = torch.arange(n, device=scores[order[0]].device).expand(b, hkv, n)
        prot = {i: self.protect(scores[i].float(), pos) for i in order}

        def keep_of(entries: int) -> int:
            if self.budget is not None:
                return entries // n * min(n, self.budget)
            return entries - evicted_count(entries, float(self.ratio))

        if self.layerwise:
            return {i: topk_mask(prot[i].reshape(b, -1), keep_of(hkv * n)).view(b, hkv, n) for i in order}
        flat = torch.cat([prot[i].reshape(b, -1) for i in order], dim=1)
        mask = topk_mask(flat, keep_of(flat.shape[1]))
        return {i: part.view(b, hkv, n) for i, part in zip(order, mask.split(hkv * n, dim=1))}

    def evict(self, layers: list[CompressedLayer], state: KVzipState) -> None:
        kept = self.context_keep(state.scores, layers[0].num_layers)
        n = state.n_ctx
        for layer in layers:
            held = layer.held
            if layer.ragged:
                full = layer.positions() >= 0
            else:
                full = torch.ones((layer.batch_size, layer.num_heads, held), dtype=torch.bool, device=layer.device)
            full[:, :, held - n :] = kept[layer.layer_idx].to(full.device)
            layer.keep(full)


@EVICTION_METHODS.register("kvzip_plus")
@dataclass(frozen=True)
class KVzipPlus(KVzip):
    """KVzip+: KVzip with each attention weight scaled by ``||W_o,h v_j|| / ||x_t||`` (see :mod:`.kvzip`)."""

    name = "kvzip_plus"
    display = "KVzip+"
    plus = True
    needs_hidden_states = True
