"""``--tasks`` parsing: names, typed parameters, lists, groups and the bench's defaults."""

from __future__ import annotations

import argparse

import pytest

from lmcompress.cli import build_grid, build_parser
from lmcompress.cli_tasks import build_tasks, parse_task_list
from lmcompress.errors import LMCompressError, UnknownNameError


def test_parse_task_list_items_params_and_brackets():
    assert parse_task_list("ruler:length=4096,samples=5,passkey,needle_grid:depths=[0.05,0.95],lengths=1024/2048") == [
        ("ruler", {"length": "4096", "samples": "5"}), ("passkey", {}),
        ("needle_grid", {"depths": "[0.05,0.95]", "lengths": "1024/2048"})]
    assert parse_task_list("longbench:path=/a:b.jsonl") == [("longbench", {"path": "/a:b.jsonl"})]
    with pytest.raises(LMCompressError, match="starts with a parameter"):
        parse_task_list("length=5")


def test_build_tasks_types_values_expands_groups_and_inherits_flags():
    tasks = build_tasks("ruler:length=2048,samples=2,needle_grid:depths=[0.05,0.95],lengths=1024/2048,"
                        "multiple_choice:limit=3", {"query_aware": True, "decode": "eager"}, list)
    names = [t.name for t in tasks]
    assert names[:11] == ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                          "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]
    assert all(t.length == 2048 and t.samples == 2 and t.query_aware and t.decode == "eager" for t in tasks[:11])
    grid = tasks[11]
    assert grid.depths == (0.05, 0.95) and grid.lengths == (1024, 2048) and grid.query_aware
    assert tasks[12].limit == 3
    explicit = build_tasks("vt:query_aware=false", {"query_aware": True}, list)[0]
    assert explicit.query_aware is False
    with pytest.raises(UnknownNameError, match="unknown task 'nope'"):
        build_tasks("nope", {}, list)


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", *argv])


def test_bench_grid_keeps_its_default_and_adds_it_on_request():
    default = build_grid(_args("--methods", "none"))
    assert [r.task.name for r in default] == ["passkey"] * 6 + ["perplexity"]
    only = build_grid(_args("--methods", "none,snapkv", "--ratios", "0.5", "--tasks", "vt:length=2048"))
    assert [(r.kv.label(), r.task.name) for r in only] == [("none", "vt"), (only[1].kv.label(), "vt")]
    both = build_grid(_args("--methods", "none", "--no-ppl", "--tasks", "default,cwe"))
    assert [r.task.name for r in both] == ["passkey"] * 6 + ["cwe"]


def test_task_table_rows_and_group_mean():
    from lmcompress.cli_tasks import task_table

    def rec(task, value, kv):
        return {"spec": {"kv_label": "none", "task": {"name": task, "params": {}}},
                "result": {"metrics": {"score": value}, "costs": {"kv_bytes": kv}}}

    lines = task_table([rec("vt", 40.0, 1000), rec("cwe", 20.0, 3000)]).splitlines()
    assert lines[2] == "| none | vt | score | 40.000 | 1000 |"
    assert lines[-1] == "| none | ruler (mean of 2) | score | 30.000 | |"
