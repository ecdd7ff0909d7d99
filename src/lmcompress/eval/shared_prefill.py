"""Shared prefill: one uncompressed prefill per prompt, replayed into every method's compressed cache.

Why it is exact. :func:`lmcompress.eval.pipeline.answer` prefills the context (or, query-aware, context and
question) in **one chunk**. In a single chunk every layer attends over the full-precision keys and values of the
whole chunk *before* its cache layer compresses (``CompressedLayer.after_attention`` runs eviction and packing
after the attention call), so the hidden states, and with them every layer's queries, keys, values and the
final logits, are those of the uncompressed model whatever the method. What a method does to its cache during
the chunk is a function of, per layer and in layer order: the chunk's post-RoPE keys and values
(``layer.update``), the attention call's post-RoPE queries, mask and scale (``layer.attend``, which matters only
for attention-aware stores such as QAQ, and ``layer.after_attention``), the attention module and, for policies
that ask, the attention input hidden states. A recording of those, taken once with an uncompressed cache, is
replayed into a fresh :class:`~lmcompress.kv.cache.CompressedCache` layer by layer, calling the same three
layer methods with the same tensors in the same order: the cache ends in the state the real prefill leaves,
including state shared across layers (CAKE's cascading budgets are recomputed from the same per-layer inputs
in the same order) and sliding-window trimming.

What qualifies: every registered eviction method and quantizer (query-agnostic and query-aware) that scores
from the chunk itself, since none of them changes what the *current* chunk's layers compute. What does not:
policies that run the model again after the prefill (``after_model_forward``: KVzip's reconstruction pass,
which a replay would skip; such prefills run normally), DMS (its hooks change the chunk's own attention), a prefill in several chunks (later
chunks attend over the compressed earlier ones; the pipeline never does this, and a replay is only attempted
on an empty cache), a batch of several prompts, and tasks that do not go through ``answer``/``prefill``
(perplexity, kv_error and multiple_choice run their own forwards and are simply not shared). What a shared run
does *not* reproduce: its cost measurements. TTFT and peak memory of a replayed run cover the replay (plus the
question and the answer), not a real prefill; the executor marks such results (``costs["prefill"] =
"shared"``) and the report flags them. Measure costs with ``--no-shared-prefill``.

Memory: a recording holds, per layer, the chunk's keys, values and queries (and hidden states when a policy
needs them); recordings are kept in a least-recently-used store bounded by ``max_bytes``.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from .._compat import cache_kwargs
from ..kv.cache import CompressedCache
from ..kv.hooks import scoring_hooks
from ..kv.spec import KVSpec

_ACTIVE: ContextVar[SharedPrefills | None] = ContextVar("lmcompress_shared_prefills", default=None)


@dataclass
class LayerRecord:
    """One layer's inputs to its cache layer during the recorded chunk.

    Attributes:
        keys, values: ``[1, Hkv, n, D]`` post-RoPE states of the chunk.
        query: ``[1, Hq, n, D]`` post-RoPE queries.
        mask: the attention mask the layer received (bool/float ``[1, 1, n, n]``) or None.
        scaling: softmax scale.
        module: the attention module.
        hidden: ``[1, n, hidden]`` attention input, or None when not recorded.
    """

    keys: torch.Tensor
    values: torch.Tensor
    query: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    module: torch.nn.Module | None
    hidden: torch.Tensor | None


@dataclass
class PrefillRecord:
    layers: list[LayerRecord]
    logits: torch.Tensor  # [1, vocab] of the chunk's last token
    seconds: float  # wall time of the recorded uncompressed prefill
    has_hidden: bool

    @property
    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for rec in self.layers:
            for t in (rec.keys, rec.values, rec.query, rec.mask, rec.hidden):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total


def runs_model(cache: CompressedCache) -> bool:
    """Whether a policy runs the model again after the prefill (``after_model_forward``, e.g. KVzip's context
    reconstruction): its scores come from that extra pass, which a replay does not make, so it never shares.
    Likewise a policy that hooks the model's own forward (``model_hooks``: DMS changes the chunk's queries and
    attention mask, so its prefill is not the uncompressed one)."""
    return any(layer.evict is not None and (hasattr(layer.evict, "after_model_forward")
                                            or hasattr(layer.evict, "model_hooks")) for layer in cache.layers)


def _needs_hidden(cache: CompressedCache) -> bool:
    return any(layer.evict is not None and layer.evict.needs_hidden_states for layer in cache.layers)


def record_prefill(model: torch.nn.Module, ids: torch.Tensor, *, hidden: bool) -> PrefillRecord:
    """Run ``ids: [1, n]`` through ``model`` with an uncompressed cache and record every layer's cache inputs."""
    cache = CompressedCache(model, KVSpec())
    records: dict[int, LayerRecord] = {}

    def recorder(layer, query, mask, scaling, module) -> None:
        seg = layer.segments[0]  # uncompressed: one uniform segment holding exactly this chunk
        records[layer.layer_idx] = LayerRecord(seg.fp_k.view(), seg.fp_v.view(), query, mask, scaling, module,
                                               layer.hidden_states if hidden else None)

    for layer in cache.layers:
        layer.recorder = recorder
    started = time.perf_counter()
    with scoring_hooks(model, cache, always=hidden):
        out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - started
    if len(records) != len(cache.layers):
        missing = sorted(set(range(len(cache.layers))) - set(records))
        raise RuntimeError(f"shared prefill recorded no attention call for layers {missing}")
    return PrefillRecord([records[i] for i in range(len(cache.layers))], out.logits[:, -1], seconds, hidden)


def replay_into(record: PrefillRecord, cache: CompressedCache) -> torch.Tensor:
    """Feed a recorded chunk into an empty ``cache`` exactly as the model's forward would; returns the chunk's
    last-token logits ``[1, vocab]``."""
    for layer, rec in zip(cache.layers, record.layers):
        layer.hidden_states = rec.hidden
        layer.update(rec.keys, rec.values)
        if any(seg.store is not None and seg.store.needs_attention for seg in layer.segments):
            layer.attend(rec.query, rec.mask, rec.scaling)  # attention-aware stores observe this call
        layer.after_attention(rec.query, rec.mask, rec.scaling, rec.module)
        layer.hidden_states = None
    return record.logits


class SharedPrefills:
    """Recorded prefills by prompt, least recently used dropped beyond ``max_bytes``.

    Attributes:
        recorded / replayed: counts of prefills run uncompressed and of replays served.
        record_seconds: wall time spent recording.
    """

    def __init__(self, max_bytes: int = 4 << 30) -> None:
        self.max_bytes = max_bytes
        self._records: OrderedDict[tuple, PrefillRecord] = OrderedDict()
        self.recorded = 0
        self.replayed = 0
        self.record_seconds = 0.0
        #: scores of policies that re-run the model (KVzip's reconstruction), by prompt and policy-without-ratio;
        #: see :meth:`memo_scores` / :meth:`remember_scores`.
        self._scores: dict[tuple, dict[int, torch.Tensor]] = {}

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._records.values())

    def clear(self) -> None:
        self._records.clear()
        self._scores.clear()

    def memo_scores(self, model: torch.nn.Module, ids: torch.Tensor, policy_key: str
                    ) -> dict[int, torch.Tensor] | None:
        """Scores a policy stored for ``ids: [B, n]`` under ``policy_key`` (its parameters but the ratio or
        budget, and whatever else changes its scores, e.g. the quantizer that packs the context it reads), as
        copies; None if not stored. A hit counts as a replay (the run's TTFT then does not cover the scoring)."""
        stored = self._scores.get((self._key(model, ids), policy_key))
        if stored is None:
            return None
        self.replayed += 1
        return {i: t.clone() for i, t in stored.items()}

    def remember_scores(self, model: torch.nn.Module, ids: torch.Tensor, policy_key: str,
                        scores: dict[int, torch.Tensor]) -> None:
        """Store copies of a policy's per-layer scores for ``ids`` (kept until :meth:`clear`, i.e. while the grid
        stays on one task's prompts; some KB to a few MB a prompt)."""
        self._scores[(self._key(model, ids), policy_key)] = {i: t.clone() for i, t in scores.items()}

    @staticmethod
    def _key(model: torch.nn.Module, ids: torch.Tensor) -> tuple:
        digest = hashlib.sha256(ids.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()
        return id(model), tuple(ids.shape), str(ids.device), digest

    def replay(self, model: torch.nn.Module, ids: torch.Tensor, cache: CompressedCache) -> torch.Tensor | None:
        """Replay ``ids: [1, n]`` into ``cache`` from a recording (made now if missing); None where the chunk
        does not qualify (not the first chunk of an empty cache, a batch, static mode): run it normally then."""
        if ids.shape[0] != 1 or cache.get_seq_length() != 0 or cache.is_static or runs_model(cache):
            return None
        hidden = _needs_hidden(cache)
        key = self._key(model, ids)
        record = self._records.get(key)
        if record is None or (hidden and not record.has_hidden):
            record = record_prefill(model, ids, hidden=hidden)
            self.recorded += 1
            self.record_seconds += record.seconds
            self._store(key, record)
        else:
            self._records.move_to_end(key)
        self.replayed += 1
        return replay_into(record, cache)

    def _store(self, key: tuple, record: PrefillRecord) -> None:
        self._records[key] = record
        self._records.move_to_end(key)
        while self._records and self.nbytes > self.max_bytes:
            self._records.popitem(last=False)


@contextmanager
def not_sharing() -> Iterator[None]:
    """Within this block prefills run for real, even inside :func:`sharing_prefills` (e.g. a warm-up)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_prefills() -> SharedPrefills | None:
    """The :class:`SharedPrefills` of the innermost :func:`sharing_prefills` block, or None."""
    return _ACTIVE.get()


@contextmanager
def sharing_prefills(max_bytes: int = 4 << 30) -> Iterator[SharedPrefills]:
    """Within this block, every single-chunk prefill of :func:`lmcompress.eval.pipeline.prefill` (hence every
    ``answer`` call and the tasks built on it) is served from a shared uncompressed recording."""
    shared = SharedPrefills(max_bytes)
    token = _ACTIVE.set(shared)
    try:
        yield shared
    finally:
        _ACTIVE.reset(token)
        shared.clear()
