"""Measurements that mean the same thing everywhere (issue 9, item 7): with the warm-up after a model load, the
first measured cell's peak memory matches the same cell run later; inline and local-worker-process peaks of one
cell agree (both set up by ``prepare_measurement``). The local executor goes through the same claim path as the
inline one (a cell claimed by another live owner waits until that claim expires).

Each executor runs in a fresh interpreter (a subprocess; the local executor's worker is a spawned process), so
the first cell really is the first after a model load in that process.

Tolerance: peak memory here is the sampled RSS growth (``cpu_rss_sampled``) of a few-MB region, so two readings
of one cell are said to agree when they differ by at most 35 % of the later reading plus 1 MB (without the
warm-up the first cell read 13.9 MB against 3.3-4.1 MB later on the 2-core dev machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

SRC = str(Path(__file__).resolve().parents[2] / "src")
MB = 1e6


def agree(a: float, b: float) -> bool:
    return abs(a - b) <= 0.35 * b + 1 * MB


SCRIPT = textwrap.dedent("""
    import json, sys, threading, time

    from lmcompress.eval.tasks import DecodeCost
    from lmcompress.kv import KVSpec, SnapKV
    from lmcompress.runner.executors import InlineExecutor
    from lmcompress.runner.parallel import LocalExecutor
    from lmcompress.runner.spec import RunSpec
    from lmcompress.runner.store import ResultStore

    def other_runner(store_path, runs):
        # another live runner: holds the last cell's claim (heartbeat every 0.5 s) until the first three cells
        # are stored, then stores that cell itself
        from lmcompress.runner import provenance

        keys = [r.key() for r in runs]
        with ResultStore(store_path) as store:
            now = time.time()
            store._db.execute("INSERT INTO claims VALUES (?, 'elsewhere:1:x', 'elsewhere', 1, ?, ?)",
                              (keys[-1], now, now))
            while not all(store.has(k) for k in keys[:-1]):
                store.heartbeat("elsewhere:1:x")
                time.sleep(0.5)
            time.sleep(1.0)
            spec = runs[-1].to_dict()
            store.put(keys[-1], spec, {"metrics": {}, "costs": {"peak_mem_bytes": -1, "mem_source": "elsewhere"},
                                       "details": {}},
                      provenance=provenance.provenance(spec, "float32", "cpu").to_dict(), device="cpu",
                      started_at=time.time(), duration_s=0.0, owner="elsewhere:1:x")

    if __name__ == "__main__":
        mode, store_path = sys.argv[1:3]
        runs = [RunSpec("tiny-llama", KVSpec(evict=SnapKV(ratio=0.5)), DecodeCost(length=1024, new_tokens=8, seed=s))
                for s in range(4)]
        with ResultStore(store_path) as store:
            if mode == "inline":
                records = InlineExecutor(progress=False).run(runs, store)
            else:
                threading.Thread(target=other_runner, args=(store_path, runs), daemon=True).start()
                while not store.claims():
                    time.sleep(0.05)
                records = LocalExecutor(["cpu"], progress=False, claim_timeout_s=3.0, heartbeat_s=0.5).run(runs, store)
        print(json.dumps([{"peak": r["result"]["costs"]["peak_mem_bytes"], "source": r["result"]["costs"]["mem_source"],
                           "device": r["device"], "owner": r["owner"], "started_at": r["started_at"]}
                          for r in records]))
""")


@pytest.fixture(scope="module")
def peaks(tmp_path_factory):
    root = tmp_path_factory.mktemp("peaks")
    script = root / "measure.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    out = {}
    for mode in ("inline", "local"):
        proc = subprocess.run([sys.executable, str(script), mode, str(root / f"{mode}.sqlite")], env=env, text=True,
                              capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("mode", ["inline", "local"])
def test_first_cell_after_load_measures_like_a_later_one(peaks, mode):
    recs = peaks[mode][:3]  # (the local run's last cell was stored by the other runner)
    assert {r["source"] for r in recs} == {"cpu_rss_sampled"}
    first, later = recs[0]["peak"], sorted(r["peak"] for r in recs[1:])
    assert agree(first, later[len(later) // 2]), (first, later)


def test_inline_and_local_process_peaks_agree(peaks):
    for a, b in zip(peaks["inline"][:3], peaks["local"][:3]):
        assert agree(b["peak"], a["peak"]), ([r["peak"] for r in peaks["inline"]], [r["peak"] for r in peaks["local"]])


def test_local_executor_claims_like_inline(peaks):
    """The local executor skipped the cell another live runner held, waited, and returned that runner's row
    (its claim never expired: the runner kept its heartbeat fresh within the 3 s timeout)."""
    recs = peaks["local"]
    assert {r["device"] for r in recs} == {"cpu"}
    mine = {r["owner"] for r in recs[:3]}
    assert len(mine) == 1 and not next(iter(mine)).startswith("elsewhere")
    assert recs[3]["owner"] == "elsewhere:1:x" and recs[3]["source"] == "elsewhere"
