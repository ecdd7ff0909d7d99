"""The task contract.

A task is a frozen dataclass of its parameters, registered by name in ``registry.TASKS``. ``run`` evaluates one
model + ``KVSpec`` and returns a :class:`TaskResult` of task metrics (accuracy, perplexity, ...), cost metrics
(KV bytes, TTFT, decode tokens/s, peak memory) and JSON-able details. Parameters (``params()``) and the spec key
the result store, so a task must be deterministic for its parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from ...kv.spec import KVSpec


@dataclass
class TaskResult:
    metrics: dict[str, float]
    costs: dict[str, float | str | None]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "costs": self.costs, "details": self.details}


@dataclass
class RunContext:
    """What a task runs on."""

    model: torch.nn.Module
    tokenizer: Any
    spec: KVSpec
    model_name: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass(frozen=True)
class Task:
    name: ClassVar[str] = "base"
    #: the metric a report sorts and plots by, and whether higher is better.
    primary_metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    #: a suite the task belongs to (e.g. ``"ruler"``; reports may average a group's primary metrics), or "".
    group: ClassVar[str] = ""
    #: the primary metric's chance level where one is known (e.g. 0.0 for string match), else None.
    chance: ClassVar[float | None] = None

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def run(self, ctx: RunContext) -> TaskResult:
        raise NotImplementedError

    def max_sequence_tokens(self) -> int:
        """The longest sequence (prompt + answer room) a run needs, known before the model loads (0: unknown
        until the run, e.g. lengths derived from the model)."""
        return int(getattr(self, "length", 0) or 0) + int(getattr(self, "max_new_tokens", 0) or 0)

    def label(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.params().items())})"
