"""Greedy decoding over a static-mode cache, optionally replaying a captured CUDA graph of one decode step.

Eager decoding of small batches is launch-bound (each step issues thousands of kernels from Python); with the
cache in static mode (:meth:`~lmcompress.kv.cache.CompressedCache.begin_static`) a whole decode step has fixed
shapes and no host reads, so it is captured once and replayed. The next token and its position live in device
buffers that the step itself updates. The first steps run eagerly on a side stream (they also warm up kernels
before capture) and are real decoding steps.

Batches of ``B`` rows decode together (every row at the same position: prompts of equal length, no padding):
the token and position buffers are ``[B, 1]``.
"""

from __future__ import annotations

import torch

from .._compat import cache_kwargs
from ..kv.cache import CompressedCache

WARMUP_STEPS = 2


class StaticDecoder:
    """Args:
    model: the causal LM.
    cache: a :class:`CompressedCache` holding the processed prompt.
    max_new_tokens: decode steps to make room for.
    rolling: keep the cache size fixed with StreamingLLM's rolling window (see ``begin_static``).
    use_graph: capture a CUDA graph (default: when the model is on CUDA).
    """

    def __init__(self, model: torch.nn.Module, cache: CompressedCache, max_new_tokens: int, *,
                 rolling: bool = False, use_graph: bool | None = None) -> None:
        from ..errors import LMCompressError
        from ..placement import model_devices

        devices = model_devices(model)
        if len(devices) > 1:
            raise LMCompressError(f"static decode runs a fixed-shape step on one device (a CUDA graph on CUDA); this "
                                  f"model is spread over {', '.join(devices)}; allowed: decode='eager' (or 'auto', "
                                  "which falls back to it)")
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        cache.begin_static(max_new_tokens, rolling=rolling)
        self.batch = max(1, getattr(cache.layers[0], "batch_size", 1) or 1)
        self.tok = torch.zeros((self.batch, 1), dtype=torch.long, device=self.device)
        self.pos = torch.zeros((self.batch, 1), dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self._eager_steps = 0

    def _step(self) -> torch.Tensor:
        out = self.model(input_ids=self.tok, position_ids=self.pos, **cache_kwargs(self.cache), use_cache=True)
        logits = out.logits[:, -1]
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        return logits

    def _eager(self, steps: int) -> None:
        if self.device.type != "cuda":
            for _ in range(steps):
                self.logits = self._step()
            return
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(steps):
                self.logits = self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.graph = graph

    @torch.inference_mode()
    def start(self, token: int | torch.Tensor, position: int) -> None:
        """Set the token to feed next (an int, or ``[B]`` / ``[B, 1]`` tokens, one per row) and its logical
        position (the same for every row)."""
        if isinstance(token, torch.Tensor):
            self.tok.copy_(token.reshape(self.batch, 1))
        else:
            self.tok.fill_(token)
        self.pos.fill_(position)

    @torch.inference_mode()
    def run(self, steps: int) -> None:
        """Run ``steps`` decode steps without reading results on the host (for timing)."""
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
                continue
            self._eager(1)
            self._eager_steps += 1
            if self.use_graph and self._eager_steps >= WARMUP_STEPS:
                last = self.logits
                self._capture()  # records a step without running it; self.logits is now the graph's output
                self.logits.copy_(last)  # so that it holds this (eager) step's logits until the next replay

    @torch.inference_mode()
    def generate(self, steps: int, eos_token_ids: list[int] | tuple[int, ...] = ()) -> list[int]:
        """Greedy tokens of up to ``steps`` decode steps (stops after an EOS token, which is not returned);
        batch 1 only (:meth:`generate_batch` for more rows)."""
        if self.batch != 1:
            raise ValueError(f"generate() decodes one row; this decoder holds batch={self.batch}: "
                             "use generate_batch()")
        tokens = []
        for _ in range(steps):
            self.run(1)
            token = int(self.tok)
            if token in eos_token_ids:
                break
            tokens.append(token)
        return tokens

    @torch.inference_mode()
    def generate_batch(self, steps: int) -> torch.Tensor:
        """``[B, steps]`` greedy tokens of every row (no EOS handling)."""
        out = torch.empty((self.batch, steps), dtype=torch.long, device=self.device)
        for i in range(steps):
            self.run(1)
            out[:, i] = self.tok[:, 0]
        return out

    def close(self) -> None:
        """Return the cache to its dynamic layout (``seen`` and held tokens include the decoded ones)."""
        self.cache.end_static()
        self.graph = None
