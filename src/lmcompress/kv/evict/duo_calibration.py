"""DuoAttention head pattern, calibrated on this machine's text (no pattern can be downloaded here).

Approximate calibration, kvpress's "on the fly" DuoAttention scoring (``duo_attention_on_the_fly``), not the
paper's optimisation of gate values on synthetic passkey data: per text sample and layer, the mean pre-RoPE
query of each query head and the mean pre-RoPE key of each KV head are repeated at positions ``0 .. q_len - 1``
and rotated; the last query's softmax attention over those keys is accumulated (cumulative sum) and averaged
over positions, giving each head's "area under the cumulated attention curve" (small: attention near the end,
a streaming head; large: attention reaching far back, a retrieval head), averaged over the group's query heads
and over samples. Deviations from kvpress: text samples are Lee-corpus documents (kvpress: 50 BookSum
chapters); pre-RoPE queries and keys come from un-rotating what the attention function receives (the model's
own projections and norms, exact up to rounding) instead of re-running the projections; the model's softmax
scale is used (kvpress ``1/sqrt(d)``; the same except for Gemma 3).

    python -m lmcompress.kv.evict.duo_calibration --model smollm2-135m --out duo_smollm2.json
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..._compat import cache_kwargs
from ...errors import check_positive_int
from ..rope import rotate_half
from .base import EvictionPolicy
from .calibration_files import model_identity, save_calibration

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer

KIND = "duo_attention_pattern"


@dataclass(frozen=True)
class _MeanRecorder(EvictionPolicy):
    """Evicts nothing; records each layer's mean pre-RoPE query and key of every prefill forward."""

    name = "_duo_recorder"
    is_scorer = False

    @property
    def is_noop(self) -> bool:
        return False

    def new_layer_state(self) -> dict:
        return {}

    def observe(self, layer: CompressedLayer, query: torch.Tensor, scaling: float) -> None:
        q = query.shape[2]
        keys, _ = layer.segments[0].all_tokens()
        pos = torch.arange(layer.seen - q, layer.seen, device=query.device)
        pre_q = layer.rope.unrotate(query, pos, layer.layer_idx)  # [B, Hq, q, D]
        pre_k = layer.rope.unrotate(keys[:, :, -q:], pos, layer.layer_idx)  # [B, Hkv, q, D]
        layer.evict_state.update(q=pre_q.mean(dim=(0, 2)), k=pre_k.mean(dim=(0, 2)), scaling=scaling)

    def after_forward(self, layer, query, scaling, module) -> None:
        return None


def rotate_everywhere(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x: [H, D]`` pre-RoPE states -> ``[H, P, D]``: the same state rotated at each of the ``P`` positions of
    ``cos, sin: [P, r]`` (channels past ``r`` are not rotated)."""
    r = cos.shape[-1]
    x = x.unsqueeze(1).expand(-1, cos.shape[0], -1)
    head, rest = x[..., :r], x[..., r:]
    return torch.cat((head * cos + rotate_half(head) * sin, rest), dim=-1)


def head_scores(model: torch.nn.Module, samples: list[torch.Tensor], q_len: int = 500) -> torch.Tensor:
    """``[layers, Hkv]`` float64 DuoAttention head scores (mean over ``samples``, each ``[1, n]`` token ids)."""
    from ..cache import CompressedCache
    from ..spec import KVSpec

    check_positive_int("q_len", q_len)
    policy = _MeanRecorder()
    total = None
    for ids in samples:
        cache = CompressedCache(model, KVSpec(evict=policy, compress_sliding=True))
        with torch.no_grad():
            model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        rows = []
        for layer in cache.layers:
            st = layer.evict_state
            q, k = st["q"].float(), st["k"].float()  # [Hq, D], [Hkv, D]
            pos = torch.arange(q_len, device=q.device)
            cos, sin = layer.rope.cos_sin(pos, layer.layer_idx, q.device)  # [q_len, r]
            hq, hkv = q.shape[0], k.shape[0]
            qr = rotate_everywhere(q, cos, sin)[:, -1]  # [Hq, D]
            kr = rotate_everywhere(k, cos, sin).repeat_interleave(hq // hkv, dim=0)  # [Hq, q_len, D]
            attn = (torch.einsum("hd,hnd->hn", qr, kr) * st["scaling"]).softmax(dim=-1)
            s = attn.cumsum(dim=-1).mean(dim=-1).view(hkv, hq // hkv).mean(dim=-1)
            rows.append(s.double().cpu())
        scores = torch.stack(rows)
        total = scores if total is None else total + scores
    return total / len(samples)


def calibrate(model: torch.nn.Module, tokenizer, out: str | Path, *, num_samples: int = 50, q_len: int = 500,
              max_tokens: int = 1024, sink_size: int = 128, recent_size: int = 256) -> Path:
    """Compute the head pattern on ``num_samples`` Lee-corpus documents and save it (JSON naming the model)."""
    from ...eval.text import documents

    check_positive_int("num_samples", num_samples)
    docs = [d for d in documents("lee") if len(d) > 200][:num_samples]
    device = next(model.parameters()).device
    samples = [tokenizer(d, return_tensors="pt").input_ids[:, :max_tokens].to(device) for d in docs]
    scores = head_scores(model, samples, q_len)
    return save_calibration(out, KIND, model_identity(model), {
        "scores": scores.tolist(), "sink_size": sink_size, "recent_size": recent_size,
        "calibration": {"text": "lee", "samples": len(samples), "q_len": q_len, "max_tokens": max_tokens},
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--q-len", type=int, default=500)
    parser.add_argument("--sink-size", type=int, default=128)
    parser.add_argument("--recent-size", type=int, default=256)
    args = parser.parse_args(argv)
    from ...models import load_model

    model, tok = load_model(args.model, quiet=True)
    path = calibrate(model, tok, args.out, num_samples=args.samples, q_len=args.q_len,
                     sink_size=args.sink_size, recent_size=args.recent_size)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
