#!/bin/bash
# H200 call 9 (issue 16, g1's call A): the split-K Triton decode attention over static slots (A/B against SDPA in
# the same run), SnapKV's prefill without host syncs (repeated TTFT vs no compression), GPU tests of both, the
# profiles of a 32k prefill and of a fused decode step. Run from the carried tree's root; output under $OUT.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LMCOMPRESS_CACHE_DIR=/tmp/lmc_cache
LOG=$OUT/call9.log
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$LOG"
step() { local name=$1 limit=$2; shift 2; echo "=== $name (timeout $limit s) $(date -u +%T)" | tee -a "$LOG"; timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "=== $name rc=${PIPESTATUS[0]} $(date -u +%T)" | tee -a "$LOG"; }
step gpu_tests "${T_TESTS:-80}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_slot_attention_gpu.py \
  tests/gpu/test_graph_decode.py tests/gpu/test_fused_decoder_gpu.py -k "not 4bit"
step slot_bench "${T_BENCH:-50}" python3 benchmarks/slot_attention_bench.py --out "$OUT"
step decode "${T_DECODE:-270}" python3 benchmarks/decode_gpu.py --contexts 32768 --batches 8 --compiled-contexts \
  --time-budget "${BUDGET:-230}" --ttft-repeats 5 --ttft-chunks 0 \
  --ttft-setups "ours none, fused" "ours snapkv 8x, fused" \
  --setups "ours snapkv 8x, fused" "ours snapkv 8x, fused, sdpa attn" "ours none, fused" \
  "ours int4w + snapkv 8x, fused" "ours int4w + snapkv 8x, fused, sdpa attn" --out "$OUT"
step profile_fused "${T_PROFILE:-40}" python3 benchmarks/step_profile.py --context 32768 --method snapkv:ratio=0.875 \
  --fused --out "$OUT"
step prefill_profile "${T_PREFILL:-60}" python3 benchmarks/prefill_profile.py --context 32768 \
  --methods none snapkv:ratio=0.875 --out "$OUT"
echo "=== done $(date -u +%T)" | tee -a "$LOG"
