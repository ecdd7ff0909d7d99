"""``CompressedCache``: a ``transformers.Cache`` of :class:`~lmcompress.kv.layer.CompressedLayer` objects.

Usage::

    model, tok = load_model("smollm2-135m")
    cache = CompressedCache(model, KVSpec(evict=SnapKV(ratio=0.5), quant=IntKV(bits=4)))
    out = model.generate(ids, **cache_kwargs(cache), max_new_tokens=32)  # lmcompress._compat.cache_kwargs
    print(cache.nbytes, cache.held_tokens())

Building a cache switches the model to the ``lmcompress`` attention function (see
:func:`~lmcompress.kv.attention.prepare_model`), which is transformers' SDPA path for ordinary caches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .._compat import Cache, kv_geometry, layer_is_sliding, sliding_window_of
from .layer import CompressedLayer
from .rope import RopeTable
from .spec import KVSpec


class CompressedCache(Cache):
    """KV cache that evicts and/or quantizes per ``spec`` and frees what it drops.

    Args:
        model: the model the cache serves (its config gives layers, heads and sliding windows). The model is
            switched to the ``lmcompress`` attention implementation.
        spec: the compression recipe.
        reserve: spare token slots per layer kept after the first chunk and after each eviction, for the tokens
            that will follow (question, answer); they are allocated memory and counted in ``nbytes``.
    """

    def __init__(self, model: torch.nn.Module, spec: KVSpec | None = None, *, reserve: int = 0) -> None:
        from ..errors import check_positive_int
        from .attention import prepare_model

        check_positive_int("reserve", reserve, allow_zero=True)
        spec = spec or KVSpec()
        prepare_model(model)
        config = model.config
        num_layers, _, _, head_dim = kv_geometry(config)
        window = sliding_window_of(config)
        layers = []
        for i in range(num_layers):
            sliding = layer_is_sliding(config, i) and window is not None
            compress = not sliding or spec.compress_sliding
            layers.append(
                CompressedLayer(
                    i,
                    num_layers,
                    evict=spec.evict if compress else None,
                    quant=spec.quant if compress else None,
                    sliding_window=window if sliding else None,
                    reserve=0 if sliding else reserve,
                )
            )
        if spec.quant is not None:
            spec.quant.validate(head_dim)
            check_model = getattr(spec.quant, "check_model", None)  # quantizers fitted to a model (kvquant)
            if check_model is not None:
                check_model(model)
        rope = RopeTable(model)
        for layer in layers:
            layer.rope = rope
        super().__init__(layers=layers)
        self._share_policy_state()
        self.spec = spec

    def _share_policy_state(self) -> None:
        """Give the layers of each eviction policy the state the policy shares across them (CAKE's budgets)."""
        by_policy: dict[int, list[CompressedLayer]] = {}
        for layer in self.layers:
            if layer.evict is not None:
                by_policy.setdefault(id(layer.evict), []).append(layer)
        for group in by_policy.values():
            shared = group[0].evict.new_shared_state(group)
            for layer in group:
                layer.shared = shared

    def reset(self) -> None:
        super().reset()
        self._share_policy_state()

    # ------------------------------------------------------------------------------------ accounting
    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' storage tensors (metadata and spare capacity included)."""
        return sum(layer.nbytes for layer in self.layers)

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in layer.tensors()]

    def held_tokens(self) -> list[int]:
        """Tokens held per layer (per head; the longest head where heads differ)."""
        return [layer.held for layer in self.layers]

    def held_per_head(self) -> list[torch.Tensor]:
        """Per layer, ``[B, Hkv]`` tokens held by every batch row and KV head."""
        return [layer.held_per_head() for layer in self.layers]

    # ------------------------------------------------------------------------------------ control
    def copy(self) -> CompressedCache:
        """An independent copy of the cache's state (every layer's storage, policy state and the state shared
        across layers), for answering several questions from one compressed context: the copy holds its own
        tensors (as many bytes again as :attr:`nbytes`); the model's rotary table, the spec and its (frozen)
        policies and quantizers are shared, not copied.

        Raises:
            LMCompressError: the cache is in static decode mode (call :meth:`end_static` first).
        """
        import copy

        from ..errors import LMCompressError

        if self.is_static:
            raise LMCompressError("a cache in static decode mode cannot be copied; call end_static() first")
        memo: dict[int, object] = {id(self.spec): self.spec}
        for layer in self.layers:
            for shared in (layer.rope, layer.evict, layer.quant):
                if shared is not None:
                    memo[id(shared)] = shared
            for transient in (layer._inputs_cache, layer.hidden_states, layer.recorder):
                if transient is not None:  # scoring inputs hold the attention module: never copied
                    memo[id(transient)] = None
        return copy.deepcopy(self, memo)

    # ------------------------------------------------------------------------------------ static decode
    def begin_static(self, new_tokens: int, *, rolling: bool = False) -> None:
        """Switch every layer to fixed-shape decode storage (:mod:`lmcompress.kv.static`), so decode steps can
        be captured in a CUDA graph. Call after the prompt is processed; :meth:`end_static` switches back.

        Args:
            new_tokens: decode steps to make room for (append mode).
            rolling: keep the held size fixed instead: each new token overwrites the oldest non-sink token
                (StreamingLLM's rolling window; needs ``evict=StreamingLLM``).

        Raises:
            LMCompressError: the spec cannot decode statically (:func:`~lmcompress.kv.static.static_decode_supported`
                gives the reason), a layer is quantized, ragged or keeps policy state (use the eager path), or
                ``rolling`` without StreamingLLM.
        """
        from ..errors import LMCompressError, check_positive_int

        check_positive_int("new_tokens", new_tokens)
        from .static import static_decode_supported

        reason = static_decode_supported(self.spec)
        if reason is not None:
            raise LMCompressError(f"static decode cannot run {self.spec.label()} exactly: {reason}; "
                                  "use the eager decode path (decode='eager' or 'auto')")
        ring_start = None
        if rolling:
            if self.spec.evict is None or self.spec.evict.name != "streaming_llm":
                raise LMCompressError("rolling static decode needs evict=StreamingLLM (its window rolls); "
                                      f"got {self.spec.label()}")
            ring_start = self.spec.evict.n_sink
        clocks: dict = {}  # one set of device counters per slot layout, shared by the layers (kv/static.py)
        try:
            for layer in self.layers:
                layer.begin_static(new_tokens, ring_start if layer.evict is not None else None, clocks)
        except LMCompressError:
            self.end_static()
            raise

    def end_static(self) -> None:
        for layer in self.layers:
            layer.end_static()

    @property
    def is_static(self) -> bool:
        return any(layer.static is not None for layer in self.layers)

    def static_state(self) -> list[tuple[torch.Tensor, ...]]:
        """Device-side counters of every layer (to undo warm-up steps before capturing a graph)."""
        return [layer.static.state() for layer in self.layers]

    def restore_static_state(self, state: list[tuple[torch.Tensor, ...]]) -> None:
        for layer, st in zip(self.layers, state):
            layer.static.restore(st)

    @contextmanager
    def compression_paused(self) -> Iterator[CompressedCache]:
        """Within this block prefill chunks are appended without eviction (quantization still applies), e.g. to
        feed a question after a compressed context."""
        before = [layer.compression_enabled for layer in self.layers]
        for layer in self.layers:
            layer.compression_enabled = False
        try:
            yield self
        finally:
            for layer, flag in zip(self.layers, before):
                layer.compression_enabled = flag
