"""QAQ's evaluator metrics as a task: how far a compressed KV cache moves the model from the uncompressed one.

For each sample, a context of ``context_tokens`` is prefilled into an uncompressed cache and into a cache with
the spec under test; then the next ``continuation_tokens`` tokens are fed (teacher-forced, one chunk) to both.
Measured, against the uncompressed run:

* per layer, key and value quantization error of the held tokens: ``mse`` and relative ``||x_hat - x||^2 /
  ||x||^2`` (after eviction, against the uncompressed states of the kept positions);
* per layer, attention-output error of the continuation: relative ``||a_hat - a|| / ||a||`` of each attention
  module's output (after ``o_proj``), and its mse;
* logit error of the continuation: mean KL(uncompressed || compressed), top-1 agreement, and logit mse (QAQ's
  ``logit_error``);
* bytes: the compressed cache's ``nbytes`` after the context, and the same bytes as in a bf16 model
  (full-precision tensors counted at 2 bytes per element: the CPU runs fp32).

QAQ measures the same quantities (``key/value_quantization_error``, ``attention_error``, ``logit_error``); its
attention error compares attention probabilities, which an SDPA model does not return, so the attention module's
output is compared instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..._compat import attention_modules, cache_kwargs
from ...errors import LMCompressError, check_choice, check_positive_int
from ...kv.cache import CompressedCache
from ...kv.hooks import scoring_hooks
from ...kv.spec import KVSpec
from ...registry import TASKS
from ..kv_bytes import bf16_equivalent_bytes, uncompressed_bf16_bytes
from ..text import TEXT_SOURCES, english_text
from .base import RunContext, Task, TaskResult


def kv_pairs(ref_layer, layer) -> Iterator[tuple[torch.Tensor, ...]]:
    """``(ref_keys, ref_values, keys, values)`` of every storage segment of ``layer`` (one for all heads, or one
    per batch row and head after a head-wise eviction): its held tokens, packed ones dequantized, and the
    uncompressed states at the same positions."""
    rk, rv = ref_layer.segments[0].all_tokens()
    heads = layer.num_heads
    for i, seg in enumerate(layer.segments):
        k, v = seg.all_tokens()
        if layer.ragged:
            b, h = divmod(i, heads)
            sk, sv = rk[b : b + 1, h : h + 1], rv[b : b + 1, h : h + 1]
        else:
            sk, sv = rk, rv
        if seg.pos is not None:  # evicted: the uncompressed states of the kept positions
            idx = seg.pos.view().to(torch.int64).unsqueeze(-1).expand(-1, -1, -1, sk.shape[-1])
            sk, sv = torch.gather(sk, 2, idx), torch.gather(sv, 2, idx)
        yield sk, sv, k, v


@contextmanager
def capture_attention_outputs(model: torch.nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, ``outputs[layer_idx]`` is the last output ``[B, q, hidden]`` of each attention module."""
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for module in attention_modules(model):
        def hook(mod, args, out, _idx=module.layer_idx):
            outputs[_idx] = (out[0] if isinstance(out, tuple) else out).detach()

        handles.append(module.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def _errors(ref: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """``(mse, ||x - ref||^2 / ||ref||^2)``."""
    diff = (x.float() - ref.float()).pow(2).sum()
    return float(diff / ref.numel()), float(diff / ref.float().pow(2).sum().clamp_min(1e-30))


@torch.no_grad()
def kv_error_sample(model: torch.nn.Module, spec: KVSpec, ids: torch.Tensor, context: int) -> dict:
    """Metrics for one sequence ``ids: [1, n]``: context ``ids[:, :context]``, continuation the rest."""
    ref_cache = CompressedCache(model, KVSpec())
    cache = CompressedCache(model, spec)
    model(ids[:, :context], **cache_kwargs(ref_cache))
    with scoring_hooks(model, cache):
        model(ids[:, :context], **cache_kwargs(cache))
    layers = []
    for ref_layer, layer in zip(ref_cache.layers, cache.layers):
        pairs = list(kv_pairs(ref_layer, layer))
        cat = [torch.cat([p[j].flatten() for p in pairs]) for j in range(4)]
        k_mse, k_rel = _errors(cat[0], cat[2])
        v_mse, v_rel = _errors(cat[1], cat[3])
        layers.append({"layer": layer.layer_idx, "key_mse": k_mse, "key_rel": k_rel, "value_mse": v_mse,
                       "value_rel": v_rel, "held": layer.held})
    nbytes, nbytes_bf16 = cache.nbytes, bf16_equivalent_bytes(cache.tensors())
    with capture_attention_outputs(model) as ref_out:
        ref_logits = model(ids[:, context:], **cache_kwargs(ref_cache)).logits.float()
        ref_out = dict(ref_out)
    with capture_attention_outputs(model) as out, cache.compression_paused():
        logits = model(ids[:, context:], **cache_kwargs(cache)).logits.float()
        out = dict(out)
    for entry in layers:
        a_ref, a = ref_out[entry["layer"]].float(), out[entry["layer"]].float()
        entry["attn_out_mse"] = float((a_ref - a).pow(2).mean())
        entry["attn_out_rel"] = float((a_ref - a).norm() / a_ref.norm().clamp_min(1e-30))
    logp_ref, logp = F.log_softmax(ref_logits, -1), F.log_softmax(logits, -1)
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1)
    return {
        "layers": layers,
        "logit_kl": float(kl.mean()),
        "top1_agreement": float((ref_logits.argmax(-1) == logits.argmax(-1)).float().mean()),
        "logit_mse": float((ref_logits - logits).pow(2).mean()),
        "nbytes": nbytes,
        "nbytes_bf16": nbytes_bf16,
        "ratio_bf16": uncompressed_bf16_bytes(model, context) / nbytes_bf16,
    }


def summarize(samples: list[dict]) -> dict:
    """Means over samples (per layer and overall)."""
    n = len(samples)
    keys = [k for k in samples[0]["layers"][0] if k not in ("layer", "held")]
    layers = []
    for i, first in enumerate(samples[0]["layers"]):
        entry = {"layer": first["layer"]}
        for k in keys:
            entry[k] = sum(s["layers"][i][k] for s in samples) / n
        layers.append(entry)
    names = ("logit_kl", "top1_agreement", "logit_mse", "nbytes", "nbytes_bf16", "ratio_bf16")
    out = {k: sum(s[k] for s in samples) / n for k in names}
    for k in keys:
        out[k] = sum(e[k] for e in layers) / len(layers)
    out["layers"] = layers
    out["samples"] = n
    return out


@TASKS.register("kv_error")
@dataclass(frozen=True)
class KVError(Task):
    """QAQ's evaluator metrics on text from ``source`` (see the module docstring).

    Attributes:
        source: a text source of :func:`lmcompress.eval.text.documents`.
        samples: sequences measured (consecutive windows of the joined text).
        context_tokens: tokens prefilled into the compressed cache.
        continuation_tokens: tokens fed after it, whose logits and attention outputs are compared.
    """

    name = "kv_error"
    primary_metric = "logit_kl"
    higher_is_better = False

    source: str = "lee-test"
    samples: int = 4
    context_tokens: int = 512
    continuation_tokens: int = 64

    def __post_init__(self) -> None:
        check_choice("source", self.source, TEXT_SOURCES)
        check_positive_int("samples", self.samples)
        check_positive_int("context_tokens", self.context_tokens)
        check_positive_int("continuation_tokens", self.continuation_tokens)

    def sequences(self, tokenizer) -> list[torch.Tensor]:
        ids = tokenizer(english_text(self.source), return_tensors="pt").input_ids
        n = self.context_tokens + self.continuation_tokens
        count = min(self.samples, ids.shape[1] // n)
        if count == 0:
            raise LMCompressError(f"text source {self.source!r} has fewer than {n} tokens")
        return [ids[:, i * n : (i + 1) * n] for i in range(count)]

    def run(self, ctx: RunContext) -> TaskResult:
        if ctx.tokenizer is None:
            raise LMCompressError("the kv_error task needs a model with a tokenizer (not a tiny test model)")
        samples = [kv_error_sample(ctx.model, ctx.spec, ids.to(ctx.device), self.context_tokens)
                   for ids in self.sequences(ctx.tokenizer)]
        s = summarize(samples)
        layers = s.pop("layers")
        costs = {k: s.pop(k) for k in ("nbytes", "nbytes_bf16", "ratio_bf16")}
        costs["kv_bytes"] = costs.pop("nbytes")
        costs["kv_bytes_bf16"] = costs.pop("nbytes_bf16")
        return TaskResult(metrics=s, costs=costs, details={"layers": layers})
