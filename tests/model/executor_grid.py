"""The small grid the executor-equivalence tests run with every executor (inline, local processes, Ray), and the
deterministic part of a stored row they compare. The tiny models have no tokenizer, so the task is decode_cost
(random prompt ids), at two settings; four KV specs; one cell that fails (int4's default group does not divide the
tiny model's head_dim)."""

from __future__ import annotations

from lmcompress.eval.tasks import DecodeCost
from lmcompress.kv.parse import parse_method
from lmcompress.runner.executors import InlineExecutor
from lmcompress.runner.spec import RunSpec
from lmcompress.runner.store import ResultStore

TIMING = {"ttft_s", "decode_tok_s", "peak_mem_bytes", "mem_source", "prefill"}
METHODS = ("none", "snapkv:ratio=0.5", "streaming_llm:ratio=0.5", "int4:group_size=16")
TASKS = (DecodeCost(length=160, new_tokens=6, seed=0), DecodeCost(length=96, new_tokens=4, seed=1, decode="eager"))
FAILING_ERROR = "LMCompressError: group_size=64 does not divide head_dim=16"


def grid_runs() -> list[RunSpec]:
    runs = [RunSpec("tiny-llama", parse_method(m), t) for t in TASKS for m in METHODS]
    runs.append(RunSpec("tiny-llama", parse_method("int4"), DecodeCost(length=160, new_tokens=6)))  # fails
    return runs


def deterministic(rec: dict) -> dict:
    """Key, status and the fields that do not depend on timing: spec, metrics and costs less timings and memory
    readings, details (held tokens, generated ids); a failed cell's error's first line."""
    result = rec["result"]
    if result is None:
        return {"key": rec["key"], "status": rec["status"], "error": rec["error"].splitlines()[0]}
    return {"key": rec["key"], "status": rec["status"], "spec": rec["spec"],
            "metrics": {k: v for k, v in result["metrics"].items() if k not in TIMING},
            "costs": {k: v for k, v in result["costs"].items() if k not in TIMING},
            "details": result["details"]}


def inline_records(path) -> list[dict]:
    """The grid run inline into a new store at ``path``, checked to be a real run of both tasks."""
    runs = grid_runs()
    with ResultStore(path) as store:
        records = InlineExecutor(progress=False, keep_going=True).run(runs, store)
    assert [r["status"] for r in records] == ["ok"] * (len(runs) - 1) + ["failed"]
    assert records[-1]["error"].startswith(FAILING_ERROR)
    assert {r["result"]["costs"].get("prefill") for r in records[:-1]} == {"shared"}  # inline really shared prefills
    assert len({tuple(r["result"]["details"]["token_ids"]) for r in records[:-1]}) > 1  # the cells differ
    assert {r["result"]["costs"]["prompt_tokens"] for r in records[:-1]} == {160, 96}  # both tasks ran
    return records
