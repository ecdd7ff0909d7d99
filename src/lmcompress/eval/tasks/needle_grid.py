"""Needle-in-a-haystack grid (the kvcompress suite's test): pass-key needles at every (length, depth) cell.

Each cell holds ``needles`` pass-key prompts (different keys; :func:`.passkey.build_prompt`) of ``length``
tokens with the needle at ``depth``; a needle counts when the first number of the answer is the key. Lengths
default to 1024 doubled up to the model's positions (the last one the largest length that leaves the answer
room); depths to 5 / 50 / 95 %. Per-cell accuracies are in ``details["cells"]``; :func:`needle_matrix` turns a
result into a length x depth matrix for a heatmap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

from ..._compat import max_positions
from ...errors import LMCompressError, check_choice, check_positive_int, check_range
from ...registry import TASKS
from ..pipeline import DECODE_MODES
from .base import RunContext, Task, TaskResult
from .passkey import build_prompt, first_number
from .prompting import answer_prompt, generation_record, mean_costs, need_tokenizer


def auto_lengths(positions: int, room: int, start: int = 1024) -> tuple[int, ...]:
    """``start`` doubled while it fits ``positions - room``, plus ``positions - room`` itself."""
    top = positions - room
    if top < start:
        raise LMCompressError(f"the model's {positions} positions leave no room for a {start}-token needle prompt")
    out, n = [], start
    while n < top:
        out.append(n)
        n *= 2
    return (*out, top)


@TASKS.register("needle_grid")
@dataclass(frozen=True)
class NeedleGrid(Task):
    """Pass-key needles over a length x depth grid (see the module docstring).

    Attributes:
        lengths: prompt lengths in tokens (empty: 1024 doubled up to the model's positions).
        depths: needle depths, each in [0, 1].
        needles: needles (keys) per cell.
        seed: key generator seed.
        digits: key length.
        filler: ``synthetic`` (repeated sentences) or ``lee`` (news text).
        query_aware: compress context and question together.
        max_new_tokens: answer room.
        decode: ``auto``, ``eager`` or ``static``.
    """

    name = "needle_grid"
    primary_metric: ClassVar[str] = "accuracy"
    chance: ClassVar[float | None] = 0.0

    lengths: tuple[int, ...] = ()
    depths: tuple[float, ...] = (0.05, 0.5, 0.95)
    needles: int = 3
    seed: int = 0
    digits: int = 5
    filler: str = "synthetic"
    query_aware: bool = False
    max_new_tokens: int = 10
    decode: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(self.lengths))
        object.__setattr__(self, "depths", tuple(float(d) for d in self.depths))
        for n in self.lengths:
            check_positive_int("lengths", n)
        if not self.depths:
            raise LMCompressError("depths is empty; allowed: one or more depths in [0, 1]")
        for d in self.depths:
            check_range("depth", d, 0.0, 1.0, high_open=False)
        check_positive_int("needles", self.needles)
        check_positive_int("digits", self.digits)
        check_choice("filler", self.filler, ("synthetic", "lee"))
        check_positive_int("max_new_tokens", self.max_new_tokens)
        check_choice("decode", self.decode, DECODE_MODES)
        if self.max_new_tokens < self.digits:
            raise LMCompressError(f"max_new_tokens={self.max_new_tokens} leaves no room for a {self.digits}-digit "
                                  f"key; allowed: >= digits")

    def max_sequence_tokens(self) -> int:
        return max(self.lengths) + self.max_new_tokens if self.lengths else 0

    def grid_lengths(self, model) -> tuple[int, ...]:
        limit = max_positions(model.config)
        if not self.lengths:
            if not limit:
                raise LMCompressError("the model does not state its positions; give lengths= explicitly")
            return auto_lengths(limit, self.max_new_tokens)
        if limit and max(self.lengths) + self.max_new_tokens > limit:
            raise LMCompressError(f"lengths up to {max(self.lengths)} plus {self.max_new_tokens} answer tokens exceed "
                                  f"the model's {limit} positions; allowed: lengths <= {limit - self.max_new_tokens}")
        return self.lengths

    def run(self, ctx: RunContext) -> TaskResult:
        tokenizer = need_tokenizer(ctx, self.name)
        cells, records = [], []
        for length in self.grid_lengths(ctx.model):
            for depth in self.depths:
                rng = random.Random(f"{self.seed}-{length}-{depth}")
                hits = 0
                for _ in range(self.needles):
                    key = str(rng.randrange(10 ** (self.digits - 1), 10**self.digits))
                    parts = build_prompt(tokenizer, length, depth, key, self.filler)
                    gen = answer_prompt(ctx, parts, max_new_tokens=self.max_new_tokens,
                                        query_aware=self.query_aware, decode=self.decode)
                    rec = generation_record(gen)
                    rec.update(length=length, depth=depth, key=key, correct=first_number(gen.text) == key)
                    records.append(rec)
                    hits += rec["correct"]
                cells.append({"length": length, "depth": depth, "needles": self.needles,
                              "accuracy": hits / self.needles})
        return TaskResult(
            metrics={"accuracy": sum(c["accuracy"] for c in cells) / len(cells)},
            costs=mean_costs(records),
            details={"cells": cells, "samples": records},
        )


def needle_matrix(result: Any) -> dict[str, list]:
    """``{"lengths": [L...], "depths": [D...], "accuracy": [[acc of (L_i, D_j)]...]}`` (rows: lengths, ascending;
    columns: depths, ascending; None where a cell is missing) from a :class:`TaskResult`, its ``to_dict()``, a
    result-store record, or the ``cells`` list itself."""
    if isinstance(result, TaskResult):
        cells = result.details["cells"]
    elif isinstance(result, dict):
        inner = result.get("result", result)
        cells = inner["details"]["cells"]
    else:
        cells = list(result)
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    table = {(c["length"], c["depth"]): c["accuracy"] for c in cells}
    return {"lengths": lengths, "depths": depths,
            "accuracy": [[table.get((n, d)) for d in depths] for n in lengths]}
