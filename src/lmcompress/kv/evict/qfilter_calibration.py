"""Compute Q-Filters for a model on this machine's text (the authors' filters cannot be downloaded here).

Procedure (the Q-Filters authors' ``make_filters.py``, read, not copied): the model prefills ``num_sequences``
windows of ``max_seq_len`` consecutive tokens of the Lee corpus (its documents joined by blank lines and
tokenized once); the post-RoPE queries every attention layer computes are recorded; per layer, the same
``num_svd_samples`` token slots, drawn at random (seeded) from all recorded tokens, form one ``[N, head_dim]``
matrix per query head; its SVD gives the first right singular vector ``v`` and left ``u``; the head's filter is
``-sign * v`` with ``sign = +1`` when more than half of ``u``'s entries are positive, else ``-1``; a KV head's
filter is the mean of its group's filters (consecutive query heads, as the model groups them).

Deviations: Lee-corpus windows (the authors: sequences of at least ``max_seq_len`` tokens of a web corpus, one per
document, and in their loop ``num_sequences - 1`` of them); the random slots are drawn before the prefills from a
seeded generator (the authors draw them from the stacked queries with the global generator: the same
distribution); float32 throughout (the authors prefill in bfloat16 autocast).

    python -m lmcompress.kv.evict.qfilter_calibration --model smollm2-135m --out qfilter_smollm2.safetensors
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..._compat import cache_kwargs
from ...errors import LMCompressError, check_positive_int
from .base import EvictionPolicy
from .calibration_files import model_identity
from .qfilter import save_filters

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer


@dataclass(frozen=True)
class _QueryRecorder(EvictionPolicy):
    """Evicts nothing; records each layer's post-RoPE queries of every forward (``[B, Hq, q, D]``)."""

    name = "_qfilter_recorder"
    is_scorer = False

    @property
    def is_noop(self) -> bool:
        return False

    def new_layer_state(self) -> dict:
        return {"queries": []}

    def observe(self, layer: CompressedLayer, query: torch.Tensor, scaling: float) -> None:
        layer.evict_state["queries"].append(query.detach().float().cpu())

    def after_forward(self, layer, query, scaling, module) -> None:
        return None


def record_queries(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per attention layer ``[Hq, n, D]`` float32 post-RoPE queries of one prefill of ``ids: [1, n]``."""
    from ..cache import CompressedCache
    from ..spec import KVSpec

    cache = CompressedCache(model, KVSpec(evict=_QueryRecorder(), compress_sliding=True))
    with torch.no_grad():
        model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    return [torch.cat(layer.evict_state["queries"], dim=2)[0] for layer in cache.layers]


def filters_from_queries(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``queries: [Hq, N, D]`` of one layer -> ``[Hkv, D]`` float32 filters (rule in the module docstring)."""
    hq, _, d = queries.shape
    if hq % num_kv_heads:
        raise LMCompressError(f"{hq} query heads do not split into {num_kv_heads} KV groups")
    u, _, vh = torch.linalg.svd(queries.double(), full_matrices=False)  # u: [Hq, N, D], vh: [Hq, D, D]
    sign = torch.where((u[..., 0] > 0).double().mean(dim=-1) > 0.5, 1.0, -1.0).to(torch.float64)  # [Hq]
    per_head = -sign[:, None] * vh[:, 0, :]  # [Hq, D]
    return per_head.view(num_kv_heads, hq // num_kv_heads, d).mean(dim=1).float()


def compute_filters(model: torch.nn.Module, samples: list[torch.Tensor], num_svd_samples: int = 3000,
                    seed: int = 0) -> torch.Tensor:
    """``[layers, Hkv, D]`` filters from the prefills of ``samples`` (each ``[1, n]``); ``num_svd_samples``
    token slots drawn from all of them (all when there are fewer)."""
    from ..._compat import kv_geometry

    check_positive_int("num_svd_samples", num_svd_samples)
    lengths = [int(s.shape[1]) for s in samples]
    total = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=g)[: min(num_svd_samples, total)].sort().values
    per_layer: list[list[torch.Tensor]] = []
    start = 0
    for ids, n in zip(samples, lengths):
        local = chosen[(chosen >= start) & (chosen < start + n)] - start
        start += n
        qs = record_queries(model, ids)
        if not per_layer:
            per_layer = [[] for _ in qs]
        for i, q in enumerate(qs):
            per_layer[i].append(q[:, local])
    hkv = kv_geometry(model.config)[2]
    return torch.stack([filters_from_queries(torch.cat(q, dim=1), hkv) for q in per_layer])


def lee_windows(tokenizer: Any, num_sequences: int, max_seq_len: int, device: torch.device) -> list[torch.Tensor]:
    """``num_sequences`` consecutive ``[1, max_seq_len]`` windows of the tokenized Lee corpus."""
    from ...eval.text import english_text

    check_positive_int("num_sequences", num_sequences)
    check_positive_int("max_seq_len", max_seq_len)
    ids = tokenizer(english_text("lee"), return_tensors="pt").input_ids[0]
    if ids.numel() < num_sequences * max_seq_len:
        raise LMCompressError(f"the Lee corpus has {ids.numel()} tokens; num_sequences={num_sequences} x "
                              f"max_seq_len={max_seq_len} needs {num_sequences * max_seq_len}: ask for fewer")
    return [ids[i * max_seq_len:(i + 1) * max_seq_len][None].to(device) for i in range(num_sequences)]


def calibrate(model: torch.nn.Module, tokenizer: Any, out: str | Path, *, num_sequences: int = 20,
              max_seq_len: int = 2048, num_svd_samples: int = 3000, seed: int = 0) -> Path:
    """Compute the filters on Lee-corpus windows and save them (safetensors + JSON naming the model)."""
    device = next(model.parameters()).device
    t0 = time.time()
    samples = lee_windows(tokenizer, num_sequences, max_seq_len, device)
    filters = compute_filters(model, samples, num_svd_samples, seed)
    meta = {"calibration": {"text": "lee (gensim lee_background.cor), consecutive windows",
                            "num_sequences": num_sequences, "max_seq_len": max_seq_len,
                            "num_svd_samples": num_svd_samples, "seed": seed, "seconds": round(time.time() - t0, 1)}}
    return save_filters(out, filters, model_identity(model), meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True, help="safetensors path (PATH.json is written beside it)")
    parser.add_argument("--num-sequences", type=int, default=20)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--num-svd-samples", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from ...models import load_model

    try:
        model, tok = load_model(args.model, quiet=True)
        path = calibrate(model, tok, args.out, num_sequences=args.num_sequences, max_seq_len=args.max_seq_len,
                         num_svd_samples=args.num_svd_samples, seed=args.seed)
    except LMCompressError as exc:
        print(f"qfilter_calibration: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {path}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
