"""KVzap (Jegou et al., 2026, kvpress's ``KVzapPress``): a small surrogate on each layer's attention input
predicts KVzip+'s score of every KV pair, so the score costs one tiny matmul per token (no reconstruction pass)
and works while decoding; meant for the threshold wrapper (``threshold:base=kvzap``, DMS-style).

Score: ``s_j = f_layer(x_j)[h]``, the surrogate's output for KV head ``h`` on token ``j``'s attention input
``x_j`` (``[hidden] -> [Hkv]``); ``f`` is one linear map per layer or a 2-layer MLP (hidden width ``hidden_dim``,
GELU), trained to predict ``log`` of the KVzip+ score (see :mod:`.kvzap_train`). The surrogate is trained here on
installed text (kvpress downloads NVIDIA's trained weights, which cannot be had here), so its quality is what
``kvzap_train`` measured on held-out text, recorded in its JSON file and in BENCHMARKS.md.

Files: ``PATH`` (safetensors weights) and ``PATH.json`` (kind, type, sizes, the model it was trained for with
per-layer attention fingerprints, training and held-out metrics). A surrogate for another model is refused.
Scores exist only for tokens whose hidden states the forward saw: the prompt of a one-forward prefill, or the
newest tokens inside the threshold wrapper.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import LMCompressError
from ...registry import EVICTION_METHODS
from .base import EvictionPolicy, ScoreInputs
from .calibration_files import check_layer_identity, load_calibration

KIND = "kvzap_surrogate"
SURROGATE_TYPES = ("linear", "mlp")


class Surrogate(torch.nn.Module):
    """One ``[hidden] -> [Hkv]`` predictor per layer: linear, or Linear-GELU-Linear when ``hidden_dim`` is set."""

    def __init__(self, n_layers: int, input_dim: int, output_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        if hidden_dim is None:
            self.layers = torch.nn.ModuleList(torch.nn.Linear(input_dim, output_dim) for _ in range(n_layers))
        else:
            self.layers = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(input_dim, hidden_dim), torch.nn.GELU(),
                                    torch.nn.Linear(hidden_dim, output_dim))
                for _ in range(n_layers)
            )

    def predict(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: [B, q, hidden]`` -> ``[B, Hkv, q]`` float32 predicted log scores."""
        module = self.layers[layer_idx]
        out = module(hidden.to(next(module.parameters()).device, torch.float32))
        return out.transpose(1, 2)


def save_surrogate(path: str | Path, surrogate: Surrogate, identity: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``path`` (safetensors) and ``path.json``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in surrogate.state_dict().items()}, str(path))
    first = surrogate.layers[0]
    lin = first if isinstance(first, torch.nn.Linear) else first[0]
    out = first if isinstance(first, torch.nn.Linear) else first[2]
    doc = {"kind": KIND, "model": identity, "type": "linear" if surrogate.hidden_dim is None else "mlp",
           "n_layers": len(surrogate.layers), "input_dim": lin.in_features, "output_dim": out.out_features,
           "hidden_dim": surrogate.hidden_dim, **meta}
    Path(str(path) + ".json").write_text(json.dumps(doc, indent=1))
    return path


def load_surrogate(path: str) -> tuple[Surrogate, dict[str, Any]]:
    """Read a surrogate and its JSON; missing files and bad contents are clear errors."""
    from safetensors.torch import load_file

    if not Path(str(path)).is_file():
        raise LMCompressError(f"KVzap surrogate file {str(path)!r} does not exist; train one with "
                              "`python -m lmcompress.kv.evict.kvzap_train --model NAME --out PATH`")
    doc = load_calibration(str(path) + ".json", KIND, "KVzap")
    surrogate = Surrogate(int(doc["n_layers"]), int(doc["input_dim"]), int(doc["output_dim"]), doc.get("hidden_dim"))
    try:
        surrogate.load_state_dict(load_file(str(path)))
    except Exception as exc:
        raise LMCompressError(f"KVzap surrogate file {str(path)!r} does not hold the weights its JSON describes "
                              f"({type(exc).__name__})") from None
    return surrogate.eval(), doc


@EVICTION_METHODS.register("kvzap")
@dataclass(frozen=True)
class KVzap(EvictionPolicy):
    """KVzap surrogate scores (see the module docstring); usually inside ``threshold`` (DMS-style).

    Attributes:
        surrogate: path of the safetensors weights (``PATH.json`` beside them), required.
    """

    name = "kvzap"
    display = "KVzap"
    needs_hidden_states = True
    surrogate: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.surrogate:
            raise LMCompressError("KVzap needs surrogate=PATH (safetensors weights trained by "
                                  "`python -m lmcompress.kv.evict.kvzap_train`)")
        model, doc = load_surrogate(str(self.surrogate))
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_doc", doc)

    @property
    def surrogate_type(self) -> str:
        return str(self._doc["type"])

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        check_layer_identity(self._doc, str(self.surrogate), self.display, inputs.layer_idx, inputs.num_layers,
                             inputs.module)
        hidden = inputs.hidden_states
        if hidden is None:
            raise LMCompressError("KVzap needs the attention inputs; run the model inside "
                                  "`lmcompress.kv.scoring_hooks(model, cache)` (the pipeline does this)")
        q, n = hidden.shape[1], inputs.num_tokens
        if q != n:
            raise LMCompressError(f"KVzap scores tokens from their hidden states; this forward saw {q} of the {n} "
                                  "held tokens: compress the prompt in one forward or use threshold:base=kvzap")
        with torch.no_grad():
            return self._model.predict(inputs.layer_idx, hidden).to(inputs.keys.device)
