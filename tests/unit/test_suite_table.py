"""Suite tables of the leaderboard (runner/suite_table.py): a method's mean over a group's member tasks beside the
uncompressed mean over the same members, and labels rebuilt from the stored spec."""

from __future__ import annotations

import pytest
from test_leaderboard import record

from lmcompress.kv import AdaKV, ExpectedAttention, KVSpec, SnapKV
from lmcompress.runner.leaderboard import leaderboard_rows
from lmcompress.runner.suite_table import markdown_suites, suite_rows

NONE, SNAP = KVSpec(), KVSpec(evict=SnapKV(ratio=0.5))
ADA = KVSpec(evict=AdaKV(base=ExpectedAttention(ratio=0.75)))


def ruler(task: str, spec: KVSpec, score: float, kv: float, batch: int = 1, label: str | None = None) -> dict:
    rec = record(task, {"length": 4096, "samples": 5, "query_aware": False}, spec, {"score": score}, kv,
                 details={"samples": [{}] * 5})
    rec["result"]["costs"]["decode_batch"] = batch
    if label is not None:
        rec["spec"]["kv_label"] = label  # as an older version spelled it
    return rec


def test_suite_mean_over_the_members_present_and_none_over_the_same():
    recs = [ruler("niah_single_1", NONE, 100.0, 1000.0), ruler("vt", NONE, 40.0, 1000.0),
            ruler("cwe", NONE, 10.0, 1000.0),
            ruler("niah_single_1", SNAP, 80.0, 500.0, batch=5), ruler("vt", SNAP, 20.0, 500.0, batch=5)]
    rows = {r["method"]: r for r in suite_rows(leaderboard_rows(recs))}
    snap, none = rows["snapkv(ratio=0.5)"], rows["none"]
    assert snap["suite"] == "ruler@4096" and snap["tasks"] == 2
    assert snap["mean"] == pytest.approx(50.0) and snap["none_mean"] == pytest.approx(70.0)  # not 50: cwe left out
    assert snap["compression"] == pytest.approx(2.0) and snap["samples"] == 10
    assert none["tasks"] == 3 and none["mean"] == pytest.approx(50.0)
    md = markdown_suites(leaderboard_rows(recs))
    assert "| snapkv(ratio=0.5) | 0.50 | 2 | 50.0 | 70.0 |" in md
    assert "‡" in md and "answers decoded as a batch" in md


def test_rows_stored_under_an_old_label_join_the_new_ones():
    recs = [ruler("vt", NONE, 40.0, 1000.0), ruler("vt", ADA, 30.0, 250.0, label="adakv(ratio=0.0, base=...)"),
            ruler("cwe", ADA, 10.0, 250.0)]
    methods = {r["method"] for r in suite_rows(leaderboard_rows(recs))}
    assert methods == {"none", "adakv(base=expected_attention(ratio=0.75))"}


def test_no_group_tasks_no_suite_table():
    assert markdown_suites(leaderboard_rows([record("made_up", {}, NONE, {"exact_match": 1.0}, 10.0)])) == ""
