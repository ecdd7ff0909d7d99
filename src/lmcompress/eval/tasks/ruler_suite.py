"""The ``ruler`` group: every RULER-style task at one length, and the mean of their scores.

The synthetic tasks always run; ``qa_1`` / ``qa_2`` join when their files are given. From Python, ``run``
evaluates the members one after another; the CLI (``lmcompress bench --tasks ruler:...``) expands the group
into its members (:meth:`RulerSuite.members`) so each is stored and resumed on its own, and the report averages
the members of the group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import LMCompressError, check_choice, check_positive_int
from ...registry import TASKS
from ..pipeline import DECODE_MODES
from .base import RunContext, Task, TaskResult
from .prompting import ANSWER_PREFIX_MODES
from .ruler_niah import NIAH_TASKS

SYNTHETIC = (*NIAH_TASKS, "vt", "cwe", "fwe")


@TASKS.register("ruler")
@dataclass(frozen=True)
class RulerSuite(Task):
    """All RULER-style tasks at one length; the score is the mean of the members' scores (0..100).

    Attributes:
        length / samples / seed / query_aware / answer_prefix / decode / answer_batch: passed to every member.
        haystack_source: essay text of the niah tasks that use one.
        qa_1 / qa_2: RULER-format jsonl files for the qa tasks ("" leaves the task out).
        tasks: a comma-separated subset of the member names ("" = all).
    """

    name = "ruler"
    primary_metric: ClassVar[str] = "score"
    chance: ClassVar[float | None] = 0.0

    length: int = 4096
    samples: int = 5
    seed: int = 42
    query_aware: bool = False
    answer_prefix: str = "auto"
    decode: str = "auto"
    answer_batch: int = 1
    haystack_source: str = "lee"
    qa_1: str = ""
    qa_2: str = ""
    tasks: str = ""

    def __post_init__(self) -> None:
        check_positive_int("length", self.length)
        check_positive_int("samples", self.samples)
        check_choice("answer_prefix", self.answer_prefix, ANSWER_PREFIX_MODES)
        check_choice("decode", self.decode, DECODE_MODES)
        check_positive_int("answer_batch", self.answer_batch)
        self.members()  # validates every member's parameters before anything runs

    def member_names(self) -> list[str]:
        names = [*SYNTHETIC, *(["qa_1"] if self.qa_1 else []), *(["qa_2"] if self.qa_2 else [])]
        if not self.tasks:
            return names
        chosen = [t.strip() for t in self.tasks.replace("/", ",").split(",") if t.strip()]
        for t in chosen:
            if t not in names:
                raise LMCompressError(f"tasks={t!r} is not a member of the ruler group; allowed: {', '.join(names)}")
        return chosen

    def members(self) -> list[Task]:
        """The member tasks with this group's shared parameters."""
        shared = {"length": self.length, "samples": self.samples, "seed": self.seed, "query_aware": self.query_aware,
                  "answer_prefix": self.answer_prefix, "decode": self.decode,
                  "answer_batch": self.answer_batch}
        out = []
        for name in self.member_names():
            cls = TASKS.get(name)
            fields = {f.name for f in dataclasses.fields(cls)}
            kwargs: dict[str, Any] = {k: v for k, v in shared.items() if k in fields}
            if "haystack_source" in fields:
                kwargs["haystack_source"] = self.haystack_source
            if name in ("qa_1", "qa_2"):
                kwargs["path"] = getattr(self, name)
            out.append(cls(**kwargs))
        return out

    def max_sequence_tokens(self) -> int:
        return self.length

    def run(self, ctx: RunContext) -> TaskResult:
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {}
        costs: list[dict[str, Any]] = []
        for task in self.members():
            res = task.run(ctx)
            metrics[task.name] = res.metrics["score"]
            details[task.name] = res.details
            costs.append(res.costs)
        scores = list(metrics.values())
        kv = [c["kv_bytes"] for c in costs]
        return TaskResult(
            metrics={"score": sum(scores) / len(scores), **metrics},
            costs={"tasks": len(scores), "kv_bytes": sum(kv) / len(kv),
                   "ttft_s": sum(c["ttft_s"] for c in costs) / len(costs),
                   "peak_mem_bytes": max(c["peak_mem_bytes"] for c in costs)},
            details=details,
        )
