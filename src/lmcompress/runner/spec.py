"""``RunSpec``: one experiment = model x weights x KVSpec x task; its key (with the dtype and device type it runs
at) is a stable hash of everything that determines the result except the lmcompress code version, which the
store keeps beside it (see :mod:`lmcompress.runner.provenance`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..eval.tasks.base import Task
from ..kv.spec import KVSpec
from ..registry import TASKS
from .provenance import config_key, library_versions, model_identity

__all__ = ["RunSpec", "library_versions", "model_fingerprint", "task_from_dict"]


def model_fingerprint(name_or_path: str) -> str:
    """The ``weights`` part of :func:`~lmcompress.runner.provenance.model_identity`."""
    return model_identity(name_or_path)["weights"]


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

    def key(self, dtype: torch.dtype | str = "float32", device: torch.device | str = "cpu") -> str:
        """The store's config key of this run at ``dtype`` on a device of ``device``'s type: a hash of the spec,
        the model identity (name, weight files, quantization config), dtype, device type and the torch /
        transformers versions. The lmcompress code version is not part of it (rows of other code are *stale*,
        not missing)."""
        return config_key(self.to_dict(), dtype, device)
