"""KVQuant (Hooper et al., 2024) KV quantization: per-channel keys quantized *before* RoPE, a non-uniform data
type per layer fitted offline on calibration text (sensitivity-weighted k-means), dense-and-sparse outliers.

Rules here:

* keys: un-rotated to pre-RoPE on commit (:class:`~.pre_rope_store.PreRopeStore`), quantized per channel over
  groups of ``group_size`` tokens; RoPE is applied again to dequantized blocks at the stored positions;
* values: per token, channels in groups of ``group_size`` (at most head_dim);
* both: each group normalised by its min/max to ``[0, 1]`` and coded with the layer's ``2**bits``-level codebook
  (:class:`~.codebook.CodebookCodec`), fitted by :func:`~.kvquant_calibrate.calibrate_kvquant` with Fisher weights
  (squared gradients of the language-model loss with respect to the pre-RoPE keys / values);
* outliers: the top ``outliers`` fraction by magnitude of each unit (a key group of ``group_size`` tokens of one
  head, one value vector) kept exactly in a sparse part (:class:`~.outliers.OutlierCodec`).

Deviations from the paper (approximations, stated): the paper normalises keys with per-channel ranges
calibrated offline and picks outliers with calibrated per-channel thresholds; here ranges and outliers are
computed online per group of tokens (so the newest ``< group_size`` keys stay in full precision until a group
fills). Without ``calibration`` the levels are uniform (pre-RoPE per-channel integer quantization).

Calibration files: one ``.safetensors`` file holding ``key_levels`` and ``value_levels`` ``[L, 2**bits]`` and, in
its (JSON) header metadata, the model it was fitted on and the settings; a cache built for another model, or a
quantizer with other settings, is refused with a clear error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import LMCompressError, check_positive_int
from ...registry import KV_QUANTIZERS
from .base import KVQuantizer
from .codebook import CodebookCodec, uniform_levels
from .outliers import OutlierCodec, check_alpha
from .pre_rope_store import PreRopeStore
from .uniform import check_bits


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """What a calibration records of its model: its name (the last part of its name or path), architecture,
    layers, KV heads and head_dim."""
    from ..._compat import kv_geometry

    config = model.config
    num_layers, _, kv_heads, head_dim = kv_geometry(config)
    model_type = str(getattr(config, "model_type", ""))
    name = Path(str(getattr(config, "_name_or_path", "") or "")).name or model_type  # not the machine's path
    return {"model": name, "model_type": model_type, "num_layers": int(num_layers), "kv_heads": int(kv_heads),
            "head_dim": int(head_dim)}


@dataclass(frozen=True)
class KVQuantCalibration:
    """Fitted codebooks: ``key_levels``, ``value_levels`` ``[L, 2**bits]`` float32 plus ``meta`` (model identity
    and the settings they were fitted with)."""

    key_levels: torch.Tensor
    value_levels: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({"key_levels": self.key_levels.float().contiguous(),
                   "value_levels": self.value_levels.float().contiguous()},
                  str(path), metadata={"kvquant": json.dumps(self.meta, sort_keys=True)})

    @classmethod
    def load(cls, path: str | Path) -> KVQuantCalibration:
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise LMCompressError(f"kvquant calibration file {str(p)!r} does not exist; create it with "
                                  "lmcompress.kv.quant.kvquant_calibrate.calibrate_kvquant(...).save(path)")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("kvquant", "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:  # a corrupt or foreign file
            raise LMCompressError(f"kvquant calibration file {str(p)!r} cannot be read: {exc}") from exc
        if not isinstance(meta, dict) or set(tensors) != {"key_levels", "value_levels"}:
            raise LMCompressError(f"{str(p)!r} is not a kvquant calibration (needs key_levels, value_levels and "
                                  "kvquant metadata)")
        return cls(tensors["key_levels"], tensors["value_levels"], meta)


@KV_QUANTIZERS.register("kvquant")
@dataclass(frozen=True)
class KVQuant(KVQuantizer):
    """KVQuant KV quantization (``kvquant-2``: 2-bit codes).

    Attributes:
        bits: code width 1..8.
        group_size: tokens per key group and channels per value group (must divide head_dim).
        outliers: fraction kept exactly per unit (0 = none), in [0, 0.5).
        calibration: path of a calibration file (``.safetensors``), or None for uniform levels.
        residual: recent tokens kept in full precision (quantized as they leave the window).
    """

    name = "kvquant"
    bits: int = 2
    group_size: int = 64
    outliers: float = 0.01
    calibration: str | None = None
    residual: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits(self.bits)
        check_positive_int("group_size", self.group_size)
        check_alpha(self.outliers)
        calib = None
        if self.calibration is not None:
            calib = KVQuantCalibration.load(self.calibration)
            self._check_settings(calib)
        object.__setattr__(self, "_calib", calib)

    def _check_settings(self, calib: KVQuantCalibration) -> None:
        meta = calib.meta
        for key in ("bits", "group_size", "outliers"):
            if key in meta and meta[key] != getattr(self, key):
                raise LMCompressError(f"kvquant calibration {self.calibration!r} was fitted with {key}={meta[key]!r}, "
                                      f"but the quantizer has {key}={getattr(self, key)!r}")
        if calib.key_levels.shape[-1] != 1 << self.bits:
            raise LMCompressError(f"kvquant calibration {self.calibration!r} has {calib.key_levels.shape[-1]} "
                                  f"levels; bits={self.bits} needs {1 << self.bits}")

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ``LMCompressError`` if the calibration was fitted on another model, or the model has no RoPE."""
        from ..._compat import rotary_embedding

        if rotary_embedding(model) is None:
            raise LMCompressError("kvquant quantizes keys before RoPE and needs a model with a rotary embedding "
                                  "(Llama, Mistral, Qwen2/3, Phi-3, Gemma 3); this model has none")
        calib = self._calib
        if calib is None:
            return
        have = model_identity(model)
        want = {k: calib.meta.get(k) for k in have}
        if want != have:
            raise LMCompressError(f"kvquant calibration {self.calibration!r} was fitted on {want}, not on this "
                                  f"model {have}; calibrate it for this model")

    def _levels(self, which: str, layer_idx: int) -> tuple[float, ...]:
        calib = self._calib
        if calib is None:
            return uniform_levels(self.bits)
        table = calib.key_levels if which == "keys" else calib.value_levels
        if layer_idx >= table.shape[0]:
            raise LMCompressError(f"kvquant calibration {self.calibration!r} has {table.shape[0]} layers, "
                                  f"layer {layer_idx} was asked for")
        return tuple(float(v) for v in table[layer_idx])

    def _wrap(self, codec: CodebookCodec):
        return OutlierCodec(codec, self.outliers) if self.outliers > 0 else codec

    def key_inner(self, layer_idx: int) -> CodebookCodec:
        return CodebookCodec(self._levels("keys", layer_idx), self.group_size, granularity="channel")

    def value_inner(self, layer_idx: int) -> CodebookCodec:
        return CodebookCodec(self._levels("values", layer_idx), self.group_size, granularity="token")

    def key_codec(self, layer_idx: int):
        return self._wrap(self.key_inner(layer_idx))

    def value_codec(self, layer_idx: int):
        return self._wrap(self.value_inner(layer_idx))

    def new_store(self, layer_idx: int, head_dim: int, dtype: torch.dtype) -> PreRopeStore:
        return PreRopeStore(self.key_codec(layer_idx), self.value_codec(layer_idx), head_dim, dtype,
                            layer_idx=layer_idx)
