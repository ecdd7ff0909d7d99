#!/bin/bash
# H200 call 5 (issue 16, call A of this session): fused decoder modules (concatenated qkv / gate-up, one-kernel
# RoPE and SwiGLU) + fused norms + one set of static slot counters per step; repeated TTFT with and without
# chunked prefill; the anchors (HF StaticCache+compile, kvpress SnapKV/StreamingLLM eager) in the same run.
# Run from the carried tree's root; wheels in $WHL; output under $OUT.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LMCOMPRESS_CACHE_DIR=/tmp/lmc_cache
WHL=${WHL:-../whl}
LOG=$OUT/call5.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL"/*.whl \
  >/tmp/pip.log 2>&1 || { echo "wheel install failed:"; tail -5 /tmp/pip.log; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$LOG"
python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__)' | tee -a "$LOG"
step() { local name=$1 limit=$2; shift 2; echo "=== $name (timeout $limit s) $(date -u +%T)" | tee -a "$LOG"; timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "=== $name rc=${PIPESTATUS[0]} $(date -u +%T)" | tee -a "$LOG"; }
step gpu_tests "${T_TESTS:-80}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fused_decoder_gpu.py \
  tests/gpu/test_fused_rmsnorm_gpu.py tests/gpu/test_graph_decode.py -k "not 4bit"
step decode "${T_DECODE:-380}" python3 benchmarks/decode_gpu.py --contexts 32768 --batches --compiled-contexts 32768 \
  --kvpress-path /tmp/site --kvpress-timeout 110 --time-budget "${BUDGET:-330}" --ttft-repeats 5 --ttft-chunks 0 4096 \
  --setups "hf static+compile" "ours snapkv 8x" "ours none, fused" "ours snapkv 8x, fused" \
  "ours int4w + snapkv 8x, fused" --out "$OUT"
step profile_fused "${T_PROFILE:-50}" python3 benchmarks/step_profile.py --context 32768 --method snapkv:ratio=0.875 \
  --fused --out "$OUT"
echo "=== done $(date -u +%T)" | tee -a "$LOG"
