#!/bin/bash
# H200 call 1 (issue 16): kernel tables, GPU test tiers, and the copy-bandwidth/compiled anchor, one call.
# Run from the carried tree's root (src/, benchmarks/, tests/, anchors/ beside this), wheels in $WHL.
# Every step under its own timeout; all output tee'd to $OUT.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
WHL=${WHL:-../whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL"/*.whl \
  >/tmp/pip.log 2>&1 || { echo "wheel install failed:"; tail -5 /tmp/pip.log; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/call1.log"
python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__)' | tee -a "$OUT/call1.log"
step() { local name=$1 limit=$2; shift 2; echo "=== $name (timeout $limit s) $(date -u +%T)" | tee -a "$OUT/call1.log"; timeout "$limit" "$@" 2>&1 | tee -a "$OUT/call1.log"; echo "=== $name rc=${PIPESTATUS[0]} $(date -u +%T)" | tee -a "$OUT/call1.log"; }
step w4a16 "${T_W4A16:-220}" python3 benchmarks/gpu_w4a16.py --batches 1,16 --out "$OUT"
step kvattn "${T_KV:-100}" python3 benchmarks/gpu_kv_attention.py --splits-scale 1.0 --out "$OUT"
step tests "${T_TESTS:-100}" env PYTHONPATH=$PWD/src:$PWD/tests/weights:$PWD/tests/gpu \
  python3 -m pytest -q --maxfail=5 -p no:cacheprovider tests/gpu tests/weights/test_kernels_gpu.py
# anchor 2 (GEMV bf16/int4, copy bandwidth, HF StaticCache+compile) under the wheels' transformers 5.2
step anchor_compiled "${T_ANCHOR:-140}" env RESULTS_DIR=$OUT PYTHONPATH=/tmp/site python3 anchors/gpu_anchor_compiled.py
echo "=== done $(date -u +%T)" | tee -a "$OUT/call1.log"
