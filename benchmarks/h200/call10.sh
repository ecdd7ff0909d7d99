#!/bin/bash
# H200 call 10 (issue 16, g1's call B): the one-launch slot attention (chunks merged by the last program) with a
# sweep of its launch settings, the best of which the decode run uses; wider/8-warp W4A16 GEMV candidates in the
# kernel table (bf16 cuBLAS and torch int4 in the same run); repeated TTFT and prefill peak with the row-chunked
# fused MLP; decode at 32k. Run from the carried tree's root; output under $OUT.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LMCOMPRESS_CACHE_DIR=/tmp/lmc_cache
LOG=$OUT/call10.log
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$LOG"
step() { local name=$1 limit=$2; shift 2; echo "=== $name (timeout $limit s) $(date -u +%T)" | tee -a "$LOG"; timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "=== $name rc=${PIPESTATUS[0]} $(date -u +%T)" | tee -a "$LOG"; }
step gpu_tests "${T_TESTS:-70}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_slot_attention_gpu.py \
  tests/gpu/test_graph_decode.py tests/gpu/test_fused_decoder_gpu.py -k "not 4bit"
step slot_bench "${T_BENCH:-70}" python3 benchmarks/slot_attention_bench.py --out "$OUT"
CFG=$(python3 -c "
import json, sys
rows = json.load(open('$OUT/slot_attention_bench.json'))
r = next(r for r in rows if r['batch'] == 1 and r['capacity'] == 4160)
print(json.dumps(r['best_config'] if r['best_us'] < r['triton_us'] else {}))" 2>/dev/null || echo '{}')
echo "slot config for the decode run: $CFG" | tee -a "$LOG"
step decode "${T_DECODE:-230}" python3 benchmarks/decode_gpu.py --contexts 32768 --batches --compiled-contexts \
  --time-budget "${BUDGET:-190}" --ttft-repeats 5 --ttft-chunks 0 --slot-config "$CFG" \
  --ttft-setups "ours none, fused" "ours snapkv 8x, fused" "ours int4w + snapkv 8x, fused" \
  --setups "ours snapkv 8x, fused" "ours snapkv 8x, fused, sdpa attn" "ours none, fused" \
  "ours int4w + snapkv 8x, fused" "ours int4w + snapkv 8x, fused, sdpa attn" --out "$OUT"
step w4a16 "${T_W4A16:-130}" python3 benchmarks/gpu_w4a16.py --batches 1 --out "$OUT"
step profile_fused "${T_PROFILE:-35}" python3 benchmarks/step_profile.py --context 32768 --method snapkv:ratio=0.875 \
  --fused --out "$OUT"
echo "=== done $(date -u +%T)" | tee -a "$LOG"
