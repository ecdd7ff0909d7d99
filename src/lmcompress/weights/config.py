"""Weight-quantization configs: ``RTNConfig`` (round-to-nearest baseline) and ``AWQConfig`` (activation-aware
scale search + clip search). Both are frozen, hashable, validated at construction and serialisable.

The packed format they produce is AutoAWQ's GEMM layout (see :mod:`lmcompress.weights.packing`), which holds
4-bit codes only, so ``bits`` must be 4.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import LMCompressError, check_choice, check_positive_int, check_range
from ..registry import WEIGHT_METHODS

SUPPORTED_BITS = (4,)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
CALIBRATION_SOURCES = ("lee", "lee-test", "jargon", "random")


@dataclass(frozen=True)
class WeightQuantConfig:
    """Fields shared by every weight method: the integer format of the packed weights.

    Attributes:
        bits: code width; only 4 (the AutoAWQ GEMM layout packs eight 4-bit codes per int32).
        group_size: input channels sharing one scale and zero point; must divide the in_features of every
            quantized linear (checked before any weight is touched).
        zero_point: asymmetric codes with a per-group zero point (AWQ's default). ``False`` quantizes
            symmetrically to [-8, 7] and stores the codes shifted by 8 with zero point 8, so the checkpoint keeps
            the same layout.
    """

    method: ClassVar[str] = ""
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise LMCompressError(
                f"bits={self.bits!r} is not supported; allowed: {', '.join(map(str, SUPPORTED_BITS))} "
                "(the AutoAWQ GEMM layout packs 4-bit codes)"
            )
        if isinstance(self.group_size, bool) or self.group_size not in SUPPORTED_GROUP_SIZES:
            raise LMCompressError(
                f"group_size={self.group_size!r} is not supported; allowed: "
                f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
            )
        if not isinstance(self.zero_point, bool):
            raise LMCompressError(f"zero_point={self.zero_point!r} is not allowed; it must be True or False")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> WeightQuantConfig:
        data = dict(data)
        cls = WEIGHT_METHODS.get(data.pop("method"))
        return cls(**data)

    def quantization_config(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of a saved checkpoint's config.json, as AutoAWQ and vLLM read it."""
        return {
            "quant_method": "awq",
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": self.zero_point,
            "version": "gemm",
            "modules_to_not_convert": None,
        }


@WEIGHT_METHODS.register("rtn")
@dataclass(frozen=True)
class RTNConfig(WeightQuantConfig):
    """Round-to-nearest group quantization of every decoder linear, no calibration: the baseline AWQ must beat."""

    method: ClassVar[str] = "rtn"


@WEIGHT_METHODS.register("awq")
@dataclass(frozen=True)
class AWQConfig(WeightQuantConfig):
    """Activation-aware weight quantization (Lin et al., 2023), as in llm-awq / AutoAWQ.

    Attributes:
        calib_source: text for calibration (``lee``: gensim's Lee news corpus; ``random``: uniform random token
            ids, for timing runs on random-weight models only).
        calib_samples: number of calibration sequences.
        calib_seq_len: tokens per calibration sequence.
        seed: selects the calibration sequences (and the random tokens); the whole search is deterministic for it.
        n_grid: points of the scale-exponent grid alpha in {0, 1/n, ..., (n-1)/n} (alpha = 0 is the identity).
        duo_scaling: ``False`` (llm-awq): s = mean|x|^alpha; ``True`` (AutoAWQ's default):
            s = mean|x|^alpha / (mean|w|^(1-alpha) + 1e-4), with |w| normalized per quantization group.
        clip: run the clip search (shrink each group's max |w|) after scaling.
        clip_grid / clip_max_shrink: shrink ratios 1, 1 - 1/clip_grid, ... down to 1 - clip_max_shrink (exclusive).
        clip_tokens: the clip search uses about this many calibration tokens (every step-th, step >= 1).
        calib_batch: calibration sequences per forward pass (bounds activation memory, not the result).
    """

    method: ClassVar[str] = "awq"
    calib_source: str = "lee"
    calib_samples: int = 128
    calib_seq_len: int = 512
    seed: int = 0
    n_grid: int = 20
    duo_scaling: bool = False
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512
    calib_batch: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("calib_source", self.calib_source, CALIBRATION_SOURCES)
        check_positive_int("calib_samples", self.calib_samples)
        check_positive_int("calib_seq_len", self.calib_seq_len)
        check_positive_int("seed", self.seed, allow_zero=True)
        check_positive_int("n_grid", self.n_grid)
        check_positive_int("clip_grid", self.clip_grid)
        check_range("clip_max_shrink", self.clip_max_shrink, 0.0, 1.0, low_open=True)
        check_positive_int("clip_tokens", self.clip_tokens)
        check_positive_int("calib_batch", self.calib_batch)
        for name in ("duo_scaling", "clip"):
            if not isinstance(getattr(self, name), bool):
                raise LMCompressError(
                    f"{name}={getattr(self, name)!r} is not allowed; it must be True or False"
                )
