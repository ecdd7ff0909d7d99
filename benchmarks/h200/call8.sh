#!/bin/bash
# H200 call 8 (issue 16): where the fused int4w + SnapKV 8x decode step goes at 32k (kernels per step, kernel time
# by kernel, graph replay), W4A16 tuned for M = 1 as in decode_gpu.py. Output under $OUT.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LMCOMPRESS_CACHE_DIR=/tmp/lmc_cache
LOG=$OUT/call8.log
step() { local name=$1 limit=$2; shift 2; echo "=== $name (timeout $limit s) $(date -u +%T)" | tee -a "$LOG"; timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "=== $name rc=${PIPESTATUS[0]} $(date -u +%T)" | tee -a "$LOG"; }
step profile_int4_fused "${T_PROFILE:-150}" python3 benchmarks/step_profile.py --context 32768 \
  --method snapkv:ratio=0.875 --fused --int4 --out "$OUT"
echo "=== done $(date -u +%T)" | tee -a "$LOG"
