#!/bin/bash
# H200 call 3 (issue 16): the 4-bit-weight graph test, a per-step kernel profile of the static decode, and the
# shared anchor baseline (HF eager + kvpress at the anchor ratios). Output under $OUT.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
WHL=${WHL:-../whl}
LOG=$OUT/call3.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL"/*.whl \
  >/tmp/pip.log 2>&1 || { echo "wheel install failed:"; tail -5 /tmp/pip.log; }
step() { local name=$1 limit=$2; shift 2; echo "=== $name (timeout $limit s) $(date -u +%T)" | tee -a "$LOG"; timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "=== $name rc=${PIPESTATUS[0]} $(date -u +%T)" | tee -a "$LOG"; }
step graph_test_4bit "${T_TESTS:-80}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_graph_decode.py -k 4bit
step profile "${T_PROF:-100}" python3 benchmarks/step_profile.py --context 32768 --method snapkv:ratio=0.875 --out "$OUT"
step anchor_baseline "${T_ANCHOR:-110}" env RESULTS_DIR=$OUT PYTHONPATH=/tmp/site python3 anchors/gpu_anchor_baseline.py
echo "=== done $(date -u +%T)" | tee -a "$LOG"
