#!/bin/bash
# H200 call 6 (issue 16, call B of this session): call 5's fused path plus the one-kernel slot write and the
# once-per-step additive mask; GPU tests (fused kernels, graph replays, the 4-bit graph test with a longer limit);
# anchors (HF StaticCache+compile, kvpress eager) beside our fused rows at 32k; batch 8; repeated TTFT with
# one-shot and evict-every-chunk prefills (peak memory). Run from the carried tree's root; output under $OUT.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LMCOMPRESS_CACHE_DIR=/tmp/lmc_cache
WHL=${WHL:-../whl}
LOG=$OUT/call6.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL"/*.whl \
  >/tmp/pip.log 2>&1 || { echo "wheel install failed:"; tail -5 /tmp/pip.log; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$LOG"
step() { local name=$1 limit=$2; shift 2; echo "=== $name (timeout $limit s) $(date -u +%T)" | tee -a "$LOG"; timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "=== $name rc=${PIPESTATUS[0]} $(date -u +%T)" | tee -a "$LOG"; }
step gpu_tests "${T_TESTS:-60}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fused_decoder_gpu.py \
  tests/gpu/test_graph_decode.py -k "not 4bit"
step decode "${T_DECODE:-330}" python3 benchmarks/decode_gpu.py --contexts 32768 --batches 8 --compiled-contexts 32768 \
  --kvpress-path /tmp/site --kvpress-timeout 100 --time-budget "${BUDGET:-290}" --ttft-repeats 5 --ttft-chunks 0 4096e \
  --ttft-setups "ours none, fused" "ours snapkv 8x, fused" "ours streaming_llm 4096, fused" \
  --setups "hf static+compile" "ours none, fused" "ours snapkv 8x, fused" "ours int4w + snapkv 8x, fused" --out "$OUT"
step profile_fused "${T_PROFILE:-40}" python3 benchmarks/step_profile.py --context 32768 --method snapkv:ratio=0.875 \
  --fused --out "$OUT"
step graph_4bit_test "${T_4BIT:-130}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_graph_decode.py -k 4bit
echo "=== done $(date -u +%T)" | tee -a "$LOG"
