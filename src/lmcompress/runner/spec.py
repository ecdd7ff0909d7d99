"""``RunSpec``: one experiment = model x weights x KVSpec x task; its key is a stable hash of everything that
determines the result (model fingerprint, spec, task parameters, library versions)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..eval.tasks.base import Task
from ..kv.spec import KVSpec
from ..registry import TASKS


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"lmcompress": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


@lru_cache(maxsize=32)
def model_fingerprint(name_or_path: str) -> str:
    """A string that changes when the model's weights change: the embedded GGUF's sha256, a GGUF file's size
    and mtime, a folder's config and weight files' sizes and mtimes, or the tiny model's name."""
    from ..models import EMBEDDED_MODELS, TINY_MODELS

    if name_or_path in EMBEDDED_MODELS:
        return "sha256:" + EMBEDDED_MODELS[name_or_path].sha256
    if name_or_path in TINY_MODELS:
        return "tiny:" + name_or_path
    p = Path(name_or_path).expanduser()
    files = [p] if p.is_file() else sorted(x for x in p.glob("*") if x.suffix in (".json", ".safetensors", ".bin"))
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return "files:" + h.hexdigest()[:16]


def task_from_dict(data: dict[str, Any]) -> Task:
    return TASKS.get(data["name"])(**data["params"])


@dataclass(frozen=True)
class RunSpec:
    model: str
    kv: KVSpec
    task: Task
    weights: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "weights": self.weights,
            "kv": self.kv.to_dict(),
            "kv_label": self.kv.label(),
            "task": {"name": self.task.name, "params": self.task.params()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        return cls(data["model"], KVSpec.from_dict(data["kv"]), task_from_dict(data["task"]), data.get("weights"))

    def key(self) -> str:
        blob = {
            **{k: v for k, v in self.to_dict().items() if k != "kv_label"},
            "model_fingerprint": model_fingerprint(self.model),
            "versions": library_versions(),
        }
        text = json.dumps(blob, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:24]
