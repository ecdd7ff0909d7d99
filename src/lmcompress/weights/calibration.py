"""Calibration data for layer-by-layer quantization: token blocks from installed text, and the inputs each
decoder layer receives.

:func:`capture_layer_inputs` runs the model once with every decoder layer temporarily replaced (inside a
``try/finally`` on this model instance only) by a recorder that stores its call's keyword arguments and passes
the hidden states through. One pass on a single sample records each layer's keyword arguments (attention mask,
rotary position embeddings, which differ between sliding and full layers); they have batch size 1 and broadcast
over any number of samples. A second pass records the embeddings that enter layer 0, for all samples, and stops
there. Neither pass computes a decoder layer, so the model's layers can stay where they are (e.g. on the CPU).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from .._compat import decoder_layers
from ..errors import LMCompressError


def calibration_tokens(
    tokenizer: Any,
    source: str,
    n_samples: int,
    seq_len: int,
    seed: int,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """``[n_samples, seq_len]`` token ids for calibration.

    Text sources: the documents are shuffled with ``seed``, joined by blank lines, tokenized once and cut into
    consecutive blocks; the first ``n_samples`` are returned. A tokenizer that starts every text with special
    tokens (Gemma's ``<bos>``) gets them at the start of every block (``seq_len`` includes them), so the layers
    see the activations they see in use. ``random``: uniform ids in
    ``[0, vocab_size)`` from a generator seeded with ``seed`` (only meaningful for timing random-weight models).

    Raises:
        LMCompressError: no tokenizer for a text source, or too little text for the request.
    """
    if source == "random":
        if not vocab_size:
            raise LMCompressError("calib_source='random' needs the model's vocab_size")
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (n_samples, seq_len), generator=gen)
    if tokenizer is None:
        raise LMCompressError(
            f"calib_source={source!r} needs a tokenizer; pass tokenizer=..., or calib_source='random' for timing runs"
        )
    from ..eval.text import documents
    from .evaluate import start_tokens

    docs = documents(source)
    random.Random(seed).shuffle(docs)
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    prefix = start_tokens(tokenizer)
    text_len = seq_len - len(prefix)
    available = len(ids) // text_len if text_len > 0 else 0
    if available < n_samples:
        raise LMCompressError(
            f"calib_samples={n_samples} x calib_seq_len={seq_len} needs {n_samples * text_len} text tokens but "
            f"source {source!r} has {len(ids)}; allowed: calib_samples <= {available} at this length"
        )
    text = torch.tensor(ids[: n_samples * text_len], dtype=torch.long).reshape(n_samples, text_len)
    return torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n_samples, -1), text], dim=1)


class _StopForward(Exception):
    """Raised by a recorder to end a capture pass early."""


class _LayerRecorder(nn.Module):
    """Stands in for decoder layer ``index`` during a capture pass: records, passes hidden states through."""

    def __init__(self, index: int, sink: dict[int, Any], stop_at: int) -> None:
        super().__init__()
        self.index = index
        self.sink = sink
        self.stop_at = stop_at

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TypeError("decoder layers are expected to receive everything but hidden_states by keyword")
        self.sink[self.index] = (hidden_states, kwargs)
        if self.index >= self.stop_at:
            raise _StopForward
        return hidden_states


def _record(model: nn.Module, input_ids: torch.Tensor, stop_at: int) -> dict[int, Any]:
    layers = decoder_layers(model)
    originals = list(layers)
    sink: dict[int, Any] = {}
    try:
        for i in range(len(layers)):
            layers[i] = _LayerRecorder(i, sink, stop_at)
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return sink


_DROPPED_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache", "output_attentions")


def _clean_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}


def capture_layer_inputs(
    model: nn.Module, tokens: torch.Tensor, batch: int = 32
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The input of decoder layer 0 for every sample, and each layer's keyword arguments.

    Args:
        model: a causal LM (its embedding decides the device of the capture passes).
        tokens: ``[n, seq]`` calibration token ids.
        batch: samples per embedding pass.

    Returns:
        ``(hidden [n, seq, hidden_size], kwargs)``: ``kwargs[i]`` is layer ``i``'s keyword arguments from a
        one-sample pass (cache arguments removed), on the embedding's device.
    """
    device = model.get_input_embeddings().weight.device
    n_layers = len(decoder_layers(model))
    tokens = tokens.to(device)
    one = _record(model, tokens[:1], stop_at=n_layers - 1)
    if len(one) != n_layers:
        raise RuntimeError(f"capture reached {len(one)} of {n_layers} decoder layers")
    layer_kwargs = [_clean_kwargs(one[i][1]) for i in range(n_layers)]
    chunks = [
        _record(model, tokens[s : s + batch], stop_at=0)[0][0] for s in range(0, tokens.shape[0], batch)
    ]
    return torch.cat(chunks, dim=0), layer_kwargs


def move_to(value: Any, device: torch.device | str) -> Any:
    """``value`` (a tensor, or tuples / lists / dicts of them) moved to ``device``; other objects unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(move_to(v, device) for v in value)
    if isinstance(value, list):
        return [move_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value
