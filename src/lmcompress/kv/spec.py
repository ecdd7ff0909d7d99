"""``KVSpec``: what a compressed cache does — eviction, quantization, or both — as one frozen, hashable,
serialisable value. Specs key the result store, so :meth:`KVSpec.to_dict` is canonical and stable."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ..errors import LMCompressError
from ..registry import EVICTION_METHODS, KV_QUANTIZERS
from .evict.base import EvictionPolicy
from .quant.base import KVQuantizer


@dataclass(frozen=True)
class KVSpec:
    """A KV-cache compression recipe.

    Attributes:
        evict: an eviction policy (``SnapKV(ratio=0.5)``, ...) or None.
        quant: a KV quantizer (``IntKV(bits=4)``, ...) or None.
        compress_sliding: also evict/quantize sliding-window layers (default False: they keep the model's own
            window in full precision, which bounds their size already).
    """

    evict: EvictionPolicy | None = None
    quant: KVQuantizer | None = None
    compress_sliding: bool = False

    def __post_init__(self) -> None:
        if self.evict is not None and not isinstance(self.evict, EvictionPolicy):
            raise LMCompressError(f"evict={self.evict!r} is not an eviction policy; see `lmcompress methods`")
        if self.quant is not None and not isinstance(self.quant, KVQuantizer):
            raise LMCompressError(f"quant={self.quant!r} is not a KV quantizer; see `lmcompress methods`")

    @property
    def is_identity(self) -> bool:
        return (self.evict is None or self.evict.is_noop) and self.quant is None

    def label(self) -> str:
        """Short human-readable name, e.g. ``snapkv(ratio=0.5)+int(bits=4)``; a wrapper shows its base by the
        base's own short name (``criticaladakv(base=expected_attention(ratio=0.5))``)."""
        parts = [short_label(obj) for obj in (self.evict, self.quant) if obj is not None]
        return "+".join(parts) or "none"

    def to_dict(self) -> dict[str, Any]:
        return {
            "evict": self.evict.to_dict() if self.evict else None,
            "quant": self.quant.to_dict() if self.quant else None,
            "compress_sliding": self.compress_sliding,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVSpec:
        def build(registry, entry):
            if entry is None:
                return None
            entry = dict(entry)
            cls = registry.get(entry.pop("method"))
            from_dict = getattr(cls, "from_dict", None)
            return from_dict(entry) if from_dict is not None else cls(**entry)

        return cls(
            evict=build(EVICTION_METHODS, data.get("evict")),
            quant=build(KV_QUANTIZERS, data.get("quant")),
            compress_sliding=bool(data.get("compress_sliding", False)),
        )

    def key(self) -> str:
        """Stable short hash of the canonical dict."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def short_label(obj: Any) -> str:
    """``name(k=v, ...)`` of a policy or quantizer: the parameters that differ from their defaults, plus ``bits``
    and ``ratio`` always (not ``ratio`` where a budget is set, where the method takes none, or where a wrapper's
    ratio is unset and its base decides), nested methods by their own short label."""
    fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    defaults = {f.name: f.default for f in dataclasses.fields(obj)}
    always = {"bits", "ratio"} if getattr(obj, "takes_ratio", True) else {"bits"}  # DMS: no ratio
    if fields.get("budget") or (dataclasses.is_dataclass(fields.get("base")) and not fields.get("ratio")):
        always.discard("ratio")

    def show(v: Any) -> str:
        if dataclasses.is_dataclass(v) and hasattr(v, "name"):
            return short_label(v)
        if isinstance(v, tuple) and v and all(dataclasses.is_dataclass(x) for x in v):
            return "(" + ", ".join(short_label(x) for x in v) + ")"
        return str(v)

    shown = ", ".join(f"{k}={show(v)}" for k, v in fields.items() if v != defaults[k] or k in always)
    return f"{obj.name}({shown})"
