"""Inline and local-process executors store identical results for the same small grid (issue 14): every
deterministic field (status or a failed cell's error, KV bytes, prompt tokens, held tokens, generated token ids) is equal; only timings,
memory readings and the shared-prefill marker may differ. (The Ray executor is not tested here: ``ray`` is not
installed in this environment.)"""

from __future__ import annotations

import pytest

from lmcompress.eval.tasks import DecodeCost
from lmcompress.kv.parse import parse_method
from lmcompress.runner.executors import InlineExecutor
from lmcompress.runner.parallel import LocalExecutor
from lmcompress.runner.spec import RunSpec
from lmcompress.runner.store import ResultStore

pytestmark = pytest.mark.model

TIMING = {"ttft_s", "decode_tok_s", "peak_mem_bytes", "mem_source", "prefill"}


def deterministic(rec: dict) -> dict:
    result = rec["result"]
    if result is None:  # a failed cell: its error's first line
        return {"key": rec["key"], "status": rec["status"], "error": rec["error"].splitlines()[0]}
    return {"key": rec["key"], "status": rec["status"], "spec": rec["spec"],
            "metrics": {k: v for k, v in result["metrics"].items() if k not in TIMING},
            "costs": {k: v for k, v in result["costs"].items() if k not in TIMING},
            "details": result["details"]}


def test_inline_and_local_processes_store_identical_results(tmp_path):
    runs = [RunSpec("tiny-llama", parse_method(m), DecodeCost(length=160, new_tokens=6, seed=s))
            for s in (0, 1) for m in ("none", "snapkv:ratio=0.5", "streaming_llm:ratio=0.5", "int4:group_size=16")]
    runs.append(RunSpec("tiny-llama", parse_method("int4"), DecodeCost(length=160, new_tokens=6)))  # fails
    with ResultStore(tmp_path / "inline.sqlite") as store:
        inline = InlineExecutor(progress=False, keep_going=True).run(runs, store)
    with ResultStore(tmp_path / "local.sqlite") as store:
        local = LocalExecutor(["cpu", "cpu"], progress=False, keep_going=True).run(runs, store)
    assert [r["status"] for r in inline] == ["ok"] * (len(runs) - 1) + ["failed"]
    assert inline[-1]["error"].startswith("LMCompressError: group_size=64 does not divide head_dim=16")
    assert [deterministic(r) for r in inline] == [deterministic(r) for r in local]
    assert {r["result"]["costs"].get("prefill") for r in inline[:-1]} == {"shared"}  # inline really shared prefills
    assert len({tuple(r["result"]["details"]["token_ids"]) for r in inline[:-1]}) > 1  # the cells differ
