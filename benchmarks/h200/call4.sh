#!/bin/bash
# H200 call 4 (issue 16): the fused RMSNorm kernel on CUDA, and its effect on the graph decode step at 32k
# (bf16 model without and with fused norms, in one process). Output under $OUT.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
LOG=$OUT/call4.log
step() { local name=$1 limit=$2; shift 2; echo "=== $name (timeout $limit s) $(date -u +%T)" | tee -a "$LOG"; timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "=== $name rc=${PIPESTATUS[0]} $(date -u +%T)" | tee -a "$LOG"; }
step fused_test "${T_TESTS:-25}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fused_rmsnorm_gpu.py
step decode_fused "${T_DECODE:-55}" python3 benchmarks/decode_gpu.py --contexts 32768 --batches --compiled-contexts \
  --setups "ours none" "ours snapkv 8x" "ours none, fused norm" "ours snapkv 8x, fused norm" --out "$OUT"
echo "=== done $(date -u +%T)" | tee -a "$LOG"
