#!/bin/bash
# H200 call 7 (issue 16, call C of this session): the fused graph test with the decoder's logits fix, the 4-bit
# graph test without the W4A16 tuner (LMCOMPRESS_W4A16_TUNE=0: default kernel configs, same kernels in the graph),
# a profile of the 32k prefill with and without SnapKV (where the TTFT cost goes), and fused rows at 128k / 8k.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LMCOMPRESS_CACHE_DIR=/tmp/lmc_cache
LOG=$OUT/call7.log
step() { local name=$1 limit=$2; shift 2; echo "=== $name (timeout $limit s) $(date -u +%T)" | tee -a "$LOG"; timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "=== $name rc=${PIPESTATUS[0]} $(date -u +%T)" | tee -a "$LOG"; }
step fused_tests "${T_TESTS:-45}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fused_decoder_gpu.py
step graph_4bit_test "${T_4BIT:-90}" env LMCOMPRESS_W4A16_TUNE=0 python3 -m pytest -q -p no:cacheprovider \
  tests/gpu/test_graph_decode.py -k 4bit
step prefill_profile "${T_PROFILE:-60}" python3 benchmarks/prefill_profile.py --context 32768 \
  --methods none snapkv:ratio=0.875 --out "$OUT"
step decode "${T_DECODE:-120}" python3 benchmarks/decode_gpu.py --contexts 131072 8192 --batches --compiled-contexts \
  --time-budget 95 --setups "ours none, fused" "ours snapkv 8x, fused" --out "$OUT"
echo "=== done $(date -u +%T)" | tee -a "$LOG"
