"""The inline executor shares prefills across a grid's methods: same stored answers as an unshared grid."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from random_ids import ids

from lmcompress.eval.pipeline import answer
from lmcompress.eval.tasks.base import RunContext, Task, TaskResult
from lmcompress.kv import AdaKV, KVSpec, SnapKV, StreamingLLM
from lmcompress.kv.quant import KIVI
from lmcompress.runner.executors import InlineExecutor
from lmcompress.runner.spec import RunSpec
from lmcompress.runner.store import ResultStore

pytestmark = pytest.mark.model


@dataclass(frozen=True)
class RandomPrompts(Task):
    """Greedy answers to random prompts (a stand-in for a generation task; not registered)."""

    name = "random_prompts"
    primary_metric = "first_token"
    seed: int = 0
    samples: int = 2
    query_aware: bool = False

    def run(self, ctx: RunContext) -> TaskResult:
        out = []
        for i in range(self.samples):
            gen = answer(ctx.model, ids(80, seed=100 * self.seed + i), ids(5, seed=7), ctx.spec, max_new_tokens=5,
                         query_aware=self.query_aware, eos_token_ids=[])
            out.append({"tokens": gen.token_ids, "held": gen.held_tokens, "kv_bytes": gen.kv_bytes})
        return TaskResult(metrics={"first_token": float(out[0]["tokens"][0])},
                          costs={"kv_bytes": out[0]["kv_bytes"], "ttft_s": gen.ttft_s}, details={"samples": out})


def _grid() -> list[RunSpec]:
    specs = [KVSpec(), KVSpec(evict=SnapKV(ratio=0.5, window_size=8)), KVSpec(evict=StreamingLLM(ratio=0.75)),
             KVSpec(evict=AdaKV(base=SnapKV(ratio=0.5, window_size=8))),
             KVSpec(quant=KIVI(bits=2, residual=32, group_size=16))]
    tasks = [RandomPrompts(seed=1), RandomPrompts(seed=2, query_aware=True)]
    return [RunSpec("tiny-llama", s, t) for s in specs for t in tasks]


def test_shared_and_unshared_grids_store_the_same_answers(model, tmp_path):
    runs = _grid()
    loader = lambda name: (model, None)  # noqa: E731
    shared_ex = InlineExecutor(progress=False, loader=loader)
    with torch.inference_mode(), ResultStore(tmp_path / "a.sqlite") as store:
        shared = shared_ex.run(runs, store)
    with torch.inference_mode(), ResultStore(tmp_path / "b.sqlite") as store:
        unshared = InlineExecutor(progress=False, loader=loader, share_prefill=False).run(runs, store)
    assert [r["result"]["details"] for r in shared] == [r["result"]["details"] for r in unshared]
    assert all(r["result"]["costs"]["prefill"] == "shared" for r in shared)
    assert all("prefill" not in r["result"]["costs"] for r in unshared)
    # 2 tasks x 2 prompts recorded once each; every one of the 10 runs replays its 2 prompts
    assert shared_ex.prefill_stats["recorded"] == 4
    assert shared_ex.prefill_stats["replayed"] == 20
