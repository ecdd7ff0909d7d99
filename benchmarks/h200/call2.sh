#!/bin/bash
# H200 call 2 (issue 16): the graph-decode GPU tests, then the end-to-end decode benchmark (benchmarks/decode_gpu.py)
# with kvpress from the carried wheels. Run from the carried tree's root; wheels in $WHL; output under $OUT.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LMCOMPRESS_CACHE_DIR=$OUT/cache
WHL=${WHL:-../whl}
LOG=$OUT/call2.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL"/*.whl \
  >/tmp/pip.log 2>&1 || { echo "wheel install failed:"; tail -5 /tmp/pip.log; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$LOG"
step() { local name=$1 limit=$2; shift 2; echo "=== $name (timeout $limit s) $(date -u +%T)" | tee -a "$LOG"; timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "=== $name rc=${PIPESTATUS[0]} $(date -u +%T)" | tee -a "$LOG"; }
step graph_tests "${T_TESTS:-70}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_graph_decode.py
step decode_gpu "${T_DECODE:-505}" python3 benchmarks/decode_gpu.py --kvpress-path /tmp/site \
  --time-budget "${BUDGET:-420}" --out "$OUT"
echo "=== done $(date -u +%T)" | tee -a "$LOG"
