"""Train a KVzap surrogate on this machine: hidden states -> log KVzip+ scores, per layer and KV head.

Data: for every text sample (Lee-corpus documents, cut to ``max_tokens``), the model prefills the sample with a
KVzip+ policy whose selection is replaced by a recorder, so the targets are exactly KVzip+'s scores (the
reconstruction pass with the tokenizer's repeat prompt) and the inputs are each layer's attention inputs
``x_j`` of the prefill. The first ``n_sink`` tokens of every sample (scored 1 by KVzip's convention, not by
attention) are left out. Target: ``log(score)``, clamped at ``log(1e-12)``.

Fit: linear surrogates by ridge-regularised least squares (closed form, ``ridge`` on the weights); MLP surrogates
(``hidden_dim`` units, GELU) by Adam on the mean squared error. Quality on held-out samples (the Lee corpus's
test file, never seen in training): R^2 of the log scores and Spearman rank correlation per (layer, head),
averaged, plus pooled over all entries. Both are saved in the surrogate's JSON.

    python -m lmcompress.kv.evict.kvzap_train --model smollm2-135m --type both --out kvzap_smollm2.safetensors
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..._compat import cache_kwargs
from ...errors import check_choice, check_positive_int
from .calibration_files import model_identity
from .kvzap import SURROGATE_TYPES, Surrogate, save_surrogate
from .kvzip import KVzipPlus, KVzipState

if TYPE_CHECKING:  # pragma: no cover
    from ..layer import CompressedLayer

LOG_FLOOR = math.log(1e-12)


class _Recorder(KVzipPlus):
    """KVzip+ that records the prompt's hidden states and its scores instead of evicting."""

    def after_forward(self, layer: CompressedLayer, query, scaling, module) -> None:
        state: KVzipState = layer.shared
        if not state.running and query.shape[2] > 1:
            store = layer.evict_state
            store["hidden"] = layer.hidden_states.detach().float()
        super().after_forward(layer, query, scaling, module)

    def new_layer_state(self) -> dict:
        return {}

    def evict(self, layers: list, state: KVzipState) -> None:
        for layer in layers:
            layer.evict_state["scores"] = state.scores[layer.layer_idx].clone()


def collect(model: torch.nn.Module, tokenizer: Any, samples: list[torch.Tensor], n_sink: int = 4
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer ``X: [T, hidden]`` attention inputs and ``Y: [T, Hkv]`` log KVzip+ scores over all samples
    (sinks left out)."""
    from ..cache import CompressedCache
    from ..hooks import scoring_hooks
    from ..spec import KVSpec

    xs: list[list[torch.Tensor]] = []
    ys: list[list[torch.Tensor]] = []
    for ids in samples:
        policy = _Recorder(ratio=0.5, n_sink=n_sink)
        cache = CompressedCache(model, KVSpec(evict=policy))
        with torch.no_grad(), scoring_hooks(model, cache, tokenizer):
            model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        layers = [layer for layer in cache.layers if layer.evict is not None]
        if not xs:
            xs, ys = [[] for _ in layers], [[] for _ in layers]
        for i, layer in enumerate(layers):
            x = layer.evict_state["hidden"][0, n_sink:]  # [n, hidden]
            y = layer.evict_state["scores"][0, :, n_sink:].T  # [n, Hkv]
            xs[i].append(x.cpu())
            ys[i].append(y.clamp_min(1e-12).log().clamp_min(LOG_FLOOR).cpu())
    return [torch.cat(x) for x in xs], [torch.cat(y) for y in ys]


def fit(xs: list[torch.Tensor], ys: list[torch.Tensor], kind: str, *, hidden_dim: int = 64, ridge: float = 1e-3,
        steps: int = 400, lr: float = 3e-3, seed: int = 0) -> Surrogate:
    check_choice("type", kind, SURROGATE_TYPES)
    d, h = xs[0].shape[1], ys[0].shape[1]
    torch.manual_seed(seed)
    model = Surrogate(len(xs), d, h, None if kind == "linear" else hidden_dim)
    for i, (x, y) in enumerate(zip(xs, ys)):
        if kind == "linear":
            xa = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
            reg = ridge * x.shape[0] * torch.eye(d + 1, dtype=torch.float64)
            reg[-1, -1] = 0.0  # no penalty on the bias
            w = torch.linalg.solve(xa.T @ xa + reg, xa.T @ y.double())  # [d + 1, h]
            with torch.no_grad():
                model.layers[i].weight.copy_(w[:-1].T.float())
                model.layers[i].bias.copy_(w[-1].float())
        else:
            module = model.layers[i]
            with torch.no_grad():
                module[2].bias.copy_(y.mean(0))
            opt = torch.optim.Adam(module.parameters(), lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(module(x), y)
                loss.backward()
                opt.step()
    return model.eval()


def _ranks(v: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(v, dtype=torch.float64)
    out[v.argsort()] = torch.arange(v.numel(), dtype=torch.float64)
    return out


def quality(model: Surrogate, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> dict[str, float]:
    """R^2 and Spearman correlation of predicted vs. true log scores: per (layer, head) averaged, and pooled."""
    r2s, rhos, preds, trues = [], [], [], []
    with torch.no_grad():
        for i, (x, y) in enumerate(zip(xs, ys)):
            p = model.predict(i, x[None])[0].T.double()  # [T, Hkv]
            y = y.double()
            for h in range(y.shape[1]):
                ss_res = float(((p[:, h] - y[:, h]) ** 2).sum())
                ss_tot = float(((y[:, h] - y[:, h].mean()) ** 2).sum())
                r2s.append(1 - ss_res / ss_tot if ss_tot > 0 else float("nan"))
                rhos.append(float(torch.corrcoef(torch.stack([_ranks(p[:, h]), _ranks(y[:, h])]))[0, 1]))
            preds.append(p.flatten())
            trues.append(y.flatten())
    p, y = torch.cat(preds), torch.cat(trues)
    pooled_r2 = 1 - float(((p - y) ** 2).sum()) / float(((y - y.mean()) ** 2).sum())
    pooled_rho = float(torch.corrcoef(torch.stack([_ranks(p), _ranks(y)]))[0, 1])
    mean = [v for v in r2s if v == v]
    return {"r2_mean_per_head": sum(mean) / len(mean), "spearman_mean_per_head": sum(rhos) / len(rhos),
            "r2_pooled": pooled_r2, "spearman_pooled": pooled_rho}


def text_samples(tokenizer: Any, source: str, count: int, max_tokens: int, device: torch.device
                 ) -> list[torch.Tensor]:
    from ...eval.text import documents

    docs = [d for d in documents(source) if len(d) > 400][:count]
    return [tokenizer(d, return_tensors="pt").input_ids[:, :max_tokens].to(device) for d in docs]


def train(model: torch.nn.Module, tokenizer: Any, outs: dict[str, str | Path], *, train_samples: int = 8,
          test_samples: int = 4, max_tokens: int = 256, hidden_dim: int = 64) -> dict[str, dict[str, Any]]:
    """Collect once, fit one surrogate per ``outs`` entry (type -> path), measure on held-out text and save;
    returns type -> metrics."""
    check_positive_int("train_samples", train_samples)
    check_positive_int("test_samples", test_samples)
    device = next(model.parameters()).device
    x_tr, y_tr = collect(model, tokenizer, text_samples(tokenizer, "lee", train_samples, max_tokens, device))
    x_te, y_te = collect(model, tokenizer, text_samples(tokenizer, "lee-test", test_samples, max_tokens, device))
    metrics = {}
    for kind, out in outs.items():
        surrogate = fit(x_tr, y_tr, kind, hidden_dim=hidden_dim)
        meta = {"train": {"text": "lee (gensim lee_background.cor)", "samples": train_samples,
                          "tokens": int(x_tr[0].shape[0]), "max_tokens": max_tokens,
                          **quality(surrogate, x_tr, y_tr)},
                "held_out": {"text": "lee-test (gensim lee.cor)", "samples": test_samples,
                             "tokens": int(x_te[0].shape[0]), **quality(surrogate, x_te, y_te)}}
        save_surrogate(out, surrogate, model_identity(model), meta)
        metrics[kind] = meta
    return metrics


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--type", default="linear", choices=[*SURROGATE_TYPES, "both"])
    parser.add_argument("--out", required=True, help="weights path; with --type both, TYPE is put before the suffix")
    parser.add_argument("--train-samples", type=int, default=8)
    parser.add_argument("--test-samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--hidden-dim", type=int, default=64)
    args = parser.parse_args(argv)
    from ...models import load_model

    model, tok = load_model(args.model, quiet=True)
    out = Path(args.out)
    kinds = SURROGATE_TYPES if args.type == "both" else (args.type,)
    outs = {k: out.with_name(f"{out.stem}_{k}{out.suffix}") if args.type == "both" else out for k in kinds}
    metrics = train(model, tok, outs, train_samples=args.train_samples, test_samples=args.test_samples,
                    max_tokens=args.max_tokens, hidden_dim=args.hidden_dim)
    print(json.dumps(metrics, indent=1))
    for path in outs.values():
        print(f"wrote {path} and {path}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
