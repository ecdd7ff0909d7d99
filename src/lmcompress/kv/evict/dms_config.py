"""DMS settings as NVIDIA's DMS checkpoints (Model-Optimizer ``experimental/dms``) write them in ``config.json``.

Keys read (no remote code runs; the mechanism is :mod:`lmcompress.kv.evict.dms`, applied to the standard
architecture):

* ``dms_window_size`` (int >= 1): a token marked for eviction stays visible to the next ``window`` queries;
* ``dms_alpha_scale`` (float, not 0) and ``dms_initial_alpha_offset`` (float): the decision logit is
  ``x * dms_alpha_scale - dms_initial_alpha_offset``;
* ``dms_separate_alpha`` (bool, default False): ``x`` comes from a separate RMSNorm + linear over the decoder
  layer's residual input (``self_attn.dms_proj_alpha_norm`` / ``self_attn.dms_proj_alpha``) instead of the last
  query channel of the first query head of each GQA group;
* ``dms_alpha_per`` (``"head"`` or ``"layer"``, default ``"head"``): one decision per KV head, or head 0's
  decision for the whole layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...errors import LMCompressError

#: the keys a DMS checkpoint must have.
REQUIRED_KEYS = ("dms_window_size", "dms_alpha_scale", "dms_initial_alpha_offset")
ALPHA_PER = ("head", "layer")


@dataclass(frozen=True)
class DMSSettings:
    """Validated DMS settings (see the module docstring for each key's meaning)."""

    window_size: int
    alpha_scale: float
    initial_alpha_offset: float
    separate_alpha: bool = False
    alpha_per: str = "head"

    def __post_init__(self) -> None:
        w = self.window_size
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise LMCompressError(f"dms_window_size={w!r} is not allowed; it must be an integer >= 1")
        for name, value in (("dms_alpha_scale", self.alpha_scale),
                            ("dms_initial_alpha_offset", self.initial_alpha_offset)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LMCompressError(f"{name}={value!r} is not allowed; it must be a finite number")
        if self.alpha_scale == 0:
            raise LMCompressError("dms_alpha_scale=0 is not allowed; it must be a nonzero number "
                                  "(0 makes every decision logit constant)")
        if not isinstance(self.separate_alpha, bool):
            raise LMCompressError(f"dms_separate_alpha={self.separate_alpha!r} is not allowed; allowed: true, false")
        if self.alpha_per not in ALPHA_PER:
            raise LMCompressError(f"dms_alpha_per={self.alpha_per!r} is not supported; allowed: "
                                  f"{', '.join(ALPHA_PER)}")

    def to_config(self) -> dict[str, Any]:
        """The ``config.json`` keys of these settings."""
        d = asdict(self)
        return {"dms_window_size": d["window_size"], "dms_alpha_scale": float(d["alpha_scale"]),
                "dms_initial_alpha_offset": float(d["initial_alpha_offset"]),
                "dms_separate_alpha": d["separate_alpha"], "dms_alpha_per": d["alpha_per"]}


def settings_from_mapping(config: dict[str, Any], where: str = "config") -> DMSSettings:
    """:class:`DMSSettings` from a ``config.json`` mapping.

    Raises:
        LMCompressError: a required key is missing, or a value is impossible (window < 1, alpha scale 0, ...).
    """
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise LMCompressError(f"{where} is not a DMS checkpoint: it lacks {', '.join(missing)} "
                              "(retrofit one with `lmcompress dms retrofit`)")
    return DMSSettings(
        window_size=config["dms_window_size"],
        alpha_scale=config["dms_alpha_scale"],
        initial_alpha_offset=config["dms_initial_alpha_offset"],
        separate_alpha=config.get("dms_separate_alpha", False),
        alpha_per=config.get("dms_alpha_per", "head"),
    )


def settings_from_config(config: Any) -> DMSSettings:
    """:class:`DMSSettings` from a loaded ``transformers`` config (unknown ``config.json`` keys become
    attributes of it) or a mapping."""
    if isinstance(config, dict):
        return settings_from_mapping(config)
    from ..._compat import text_config

    cfg = text_config(config)
    keys = (*REQUIRED_KEYS, "dms_separate_alpha", "dms_alpha_per")
    mapping = {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}
    return settings_from_mapping(mapping, where=f"the config of {getattr(cfg, 'model_type', 'this model')}")


def read_settings(folder: str | Path) -> DMSSettings:
    """:class:`DMSSettings` from ``folder/config.json``.

    Raises:
        LMCompressError: no such folder or ``config.json``, not JSON, or not a valid DMS config.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LMCompressError(f"{folder!s} has no config.json; give a checkpoint folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LMCompressError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LMCompressError(f"{path} does not hold a JSON object")
    return settings_from_mapping(config, where=str(path))
