"""Leaderboard report: rows from stored records of any task, plots, needle heatmaps, the HTML page (rendered in
headless Chromium when it is installed)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from lmcompress.cli import main
from lmcompress.kv import KVSpec, SnapKV, StreamingLLM
from lmcompress.kv.quant import KIVI
from lmcompress.runner.leaderboard import (
    leaderboard_rows,
    markdown_leaderboard,
    needle_cells,
    write_leaderboard,
)
from lmcompress.runner.store import ResultStore

PNG = b"\x89PNG\r\n\x1a\n"


def record(task: str, params: dict, spec: KVSpec, metrics: dict, kv_bytes: float, details=None,
           prefill: str | None = None, model: str = "m") -> dict:
    costs = {"kv_bytes": kv_bytes, "ttft_s": 0.5, "decode_tok_s": 20.0, "peak_mem_bytes": 3 * 2**20,
             "mem_source": "test"}
    if prefill:
        costs["prefill"] = prefill
    return {"spec": {"model": model, "weights": None, "kv": spec.to_dict(), "kv_label": spec.label(),
                     "task": {"name": task, "params": params}},
            "result": {"metrics": metrics, "costs": costs, "details": details or {}}}


NONE, SNAP = KVSpec(), KVSpec(evict=SnapKV(ratio=0.5))
STREAM, KIVI2 = KVSpec(evict=StreamingLLM(ratio=0.75)), KVSpec(quant=KIVI(bits=2))


def passkey(spec, length, depth, acc, kv, **kw):
    return record("passkey", {"length": length, "depth": depth, "samples": 2}, spec, {"accuracy": acc}, kv,
                  details={"samples": [{}, {}]}, **kw)


def records() -> list[dict]:
    out = []
    for spec, accs, kv in ((NONE, (1.0, 1.0, 0.5), 1000.0), (SNAP, (1.0, 0.5, 0.0), 500.0),
                           (STREAM, (0.0, 0.5, 1.0), 250.0)):
        for depth, acc in zip((0.1, 0.5, 0.9), accs):
            out.append(passkey(spec, 1024, depth, acc, kv))
    # a task the report knows nothing about, with its own metric, chance level and per-cell needle results
    cells = [{"length": 1024, "depth": 0.5, "score": 1.0}, {"length": 4096, "depth": 0.5, "score": 0.25}]
    out.append(record("made_up", {"samples": 5}, NONE, {"exact_match": 0.8, "chance": 0.1}, 4000.0,
                      details={"cells": cells}))
    out.append(record("made_up", {"samples": 5}, KIVI2, {"exact_match": 0.6, "chance": 0.1}, 1000.0,
                      prefill="shared"))
    return out


def test_rows_score_bytes_and_baseline():
    rows = {(r["task"], r["method"]): r for r in leaderboard_rows(records())}
    snap = rows[("passkey@1024", "snapkv(ratio=0.5)")]
    assert snap["score"] == pytest.approx(0.5) and snap["metric"] == "accuracy"
    assert snap["none_score"] == pytest.approx(2.5 / 3)
    assert snap["compression"] == pytest.approx(2.0)
    assert snap["samples"] == 6 and snap["runs"] == 3 and snap["ratio"] == "0.50"
    assert rows[("passkey@1024", "streaming_llm(ratio=0.75)")]["compression"] == pytest.approx(4.0)
    kivi = rows[("made_up", "kivi(bits=2)")]
    assert kivi["score"] == pytest.approx(0.6) and kivi["metric"] == "exact_match"  # first metric, not "chance"
    assert kivi["none_score"] == pytest.approx(0.8) and kivi["compression"] == pytest.approx(4.0)
    assert kivi["chance"] == pytest.approx(0.1) and kivi["samples"] == 5 and kivi["shared_prefill"]
    table = markdown_leaderboard(list(rows.values()))
    assert "| made_up | kivi(bits=2) | – | 0.600 (exact_match) | 0.800 | 0.00 | 4.00x | 0.50† |" in table
    assert "† from a shared prefill" in table


def test_needle_cells_from_passkey_runs_and_details():
    cells = needle_cells(records())
    snap = cells[("m", "passkey", "snapkv(ratio=0.5)")]
    assert [(c["length"], c["depth"], c["score"]) for c in snap] == [(1024, 0.1, 1.0), (1024, 0.5, 0.5),
                                                                      (1024, 0.9, 0.0)]
    assert [c["score"] for c in cells[("m", "made_up", "none")]] == [1.0, 0.25]


def test_write_leaderboard(tmp_path):
    out = write_leaderboard(records(), tmp_path)
    assert len(out["plots"]) == 2 and len(out["heatmaps"]) == 4
    for p in out["plots"] + out["heatmaps"]:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 2000
    page = out["html"].read_text()
    assert page.count("<tr>") == 1 + 5  # header + one row per (task, method)
    for p in out["plots"] + out["heatmaps"]:
        assert f'src="img/{p.name}"' in page


def test_report_cli_writes_the_page(tmp_path, capsys):
    with ResultStore(tmp_path / "s.sqlite") as store:
        for i, rec in enumerate(records()):
            store.put(f"k{i}", rec["spec"], rec["result"], provenance={"code_version": "test", "dtype": "float32"}, device="cpu", started_at=float(i),
                      duration_s=1.0)
    assert main(["report", "--store", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "| passkey@1024 | snapkv(ratio=0.5) | 0.50 | 0.500 (accuracy) | 0.833 |" in printed
    assert (tmp_path / "r" / "index.html").is_file()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--virtual-time-budget=10000"]


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_renders_in_headless_chromium(tmp_path):
    out = write_leaderboard(records(), tmp_path / "board")
    # a copy of the page that writes every image's decoded width into the DOM once loaded
    probe = out["html"].with_name("probe.html")
    probe.write_text(out["html"].read_text().replace("</body>", (
        "<script>window.addEventListener('load', () => { document.body.setAttribute('data-widths', "
        "Array.from(document.images).map(i => i.complete ? i.naturalWidth : -1).join(',')); });</script></body>")))

    def run(*args: str) -> str:
        profile = tmp_path / f"profile{len(list(tmp_path.iterdir()))}"
        cmd = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    dom = run("--dump-dom", probe.as_uri())
    widths = [int(w) for w in re.search(r'data-widths="([^"]*)"', dom).group(1).split(",")]
    assert len(widths) == 6 and all(w > 100 for w in widths)  # 2 plots + 4 heatmaps decoded
    assert len(re.findall(r"<tr>", dom)) == 6
    shot = tmp_path / "shot.png"
    run(f"--screenshot={shot}", "--window-size=1200,900", out["html"].as_uri())
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] == 900 and pixels.shape[1] == 1200
    assert float(pixels[..., :3].std()) > 0.05  # not a blank page
