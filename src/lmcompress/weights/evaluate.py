"""Quality of a weight-quantized model against its original: perplexity on held-out text, and the KL
divergence of its next-token distributions from the original model's, token by token.

The text is tokenized once and cut into non-overlapping windows of ``window`` tokens. A tokenizer that starts
every text with special tokens (Gemma's ``<bos>``) gets them at the start of every window, as the model saw in
training; then every text token of a window is predicted, else every one but the first. Perplexity is
``exp(mean NLL)``; KL is ``mean_t KL(p_ref(. | t) || p_model(. | t))`` in nats.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import LMCompressError


@dataclass
class LMQuality:
    """Perplexity (and KL against a reference) of one model on one text.

    Attributes:
        perplexity: ``exp`` of the mean next-token negative log-likelihood.
        kl: mean per-token ``KL(reference || model)`` in nats (None without a reference).
        top1_agreement: share of positions where both models' most likely next token agree (None without one).
        tokens: predictions scored.
        windows: windows of ``window`` tokens.
        seconds: wall time.
    """

    perplexity: float
    kl: float | None
    top1_agreement: float | None
    tokens: int
    windows: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def start_tokens(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before every text by default (e.g. ``[<bos>]``; often none)."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    if n > 0 and with_special[n:] == plain:
        return list(with_special[:n])
    return []


def held_out_ids(tokenizer: Any, source: str = "lee-test", max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``[T]`` of a text source's documents joined by blank lines (no special tokens)."""
    from ..eval.text import documents

    ids = tokenizer("\n\n".join(documents(source)), add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    ids: torch.Tensor,
    *,
    reference: torch.nn.Module | None = None,
    window: int = 512,
    prefix: list[int] | None = None,
) -> LMQuality:
    """Perplexity of ``model`` on ``ids`` (``[T]``), and KL / top-1 agreement against ``reference`` if given.

    Args:
        prefix: token ids put before every window's text (see :func:`start_tokens`); they are not scored.

    Raises:
        LMCompressError: fewer than one window of tokens.
    """
    prefix = list(prefix or [])
    text_len = window - len(prefix)
    windows = ids.numel() // text_len if text_len > 0 else 0
    if windows < 1:
        raise LMCompressError(f"window={window} is longer than the {ids.numel()} tokens given; use a smaller window")
    first = max(0, len(prefix) - 1)  # position whose logits predict the first scored token
    start = time.perf_counter()
    nll_sum = 0.0
    kl_sum = 0.0
    agree = 0
    count = 0
    for w in range(windows):
        text = ids[w * text_len : (w + 1) * text_len]
        chunk = torch.cat([torch.tensor(prefix, dtype=torch.long), text]).unsqueeze(0)
        logits = model(input_ids=chunk.to(_device_of(model)), use_cache=False).logits[0, first:-1].float()
        targets = chunk[0, first + 1 :].to(logits.device)
        logp = F.log_softmax(logits, dim=-1)
        nll_sum += float(-logp.gather(1, targets[:, None]).sum())
        if reference is not None:
            ref_logits = (
                reference(input_ids=chunk.to(_device_of(reference)), use_cache=False).logits[0, :-1].float()
            )
            ref_logp = F.log_softmax(ref_logits.to(logp.device), dim=-1)
            kl_sum += float((ref_logp.exp() * (ref_logp - logp)).sum())
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        count += targets.numel()
    return LMQuality(
        perplexity=math.exp(nll_sum / count),
        kl=kl_sum / count if reference is not None else None,
        top1_agreement=agree / count if reference is not None else None,
        tokens=count,
        windows=windows,
        seconds=time.perf_counter() - start,
    )
