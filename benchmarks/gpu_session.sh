#!/usr/bin/env bash
# The prepared steps for a lent GPU machine (the `device` tool: at most 600 s a command and about
# 15 minutes in all, start-up included), in order of value. Run them as separate commands:
#
#   bash benchmarks/gpu_session.sh tests   # ~2-4 min: the device path on a real GPU (tests/test_gpu.py:
#                                          # plans and errors as on the CPU, extraction, byte-identical
#                                          # reruns, worker threads in a fresh process; tests/test_device_path.py)
#   bash benchmarks/gpu_session.sh 256     # issue 12: 256 × 7B q/v float32, CPU then CUDA, same run (≥ 5×?)
#   bash benchmarks/gpu_session.sh 1000    # issue 12: 1000 × 7B q/v bfloat16 on CUDA alone (≤ 60 s?);
#                                          # generates 16.8 GB of adapters first
#
# It uses the machine's own python and its CUDA build of torch (never the CPU wheel of .ci/run),
# installing the project without dependencies plus the light ones. Results land in $OUT, which
# the device tool brings back; copy them to benchmarks/results/ and into RESULTS.md, section 4.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-out}"
WORK="${WORK:-/tmp/gpu-work}"
mkdir -p "$OUT" "$WORK"
python -m pip install -q --no-deps -e . > "$OUT/install.txt" 2>&1
python -m pip install -q safetensors huggingface-hub typer rich numpy pytest >> "$OUT/install.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
case "${1:-tests}" in
  tests)
    timeout 300 python -m pytest -p no:cacheprovider -q tests/test_gpu.py tests/test_device_path.py \
      > "$OUT/tests.txt" 2>&1
    echo "rc=$?" >> "$OUT/tests.txt" ;;
  256)
    timeout 540 python benchmarks/gpu_check.py --work "$WORK/a256" --count 256 \
      --out "$OUT/gpu-256-device.json" > "$OUT/gpu-256.log" 2>&1
    echo "rc=$?" >> "$OUT/gpu-256.log" ;;
  1000)
    timeout 540 python benchmarks/gpu_check.py --work "$WORK/a1000" --count 1000 --dtype bfloat16 \
      --devices cuda --out "$OUT/gpu-1000-bf16.json" > "$OUT/gpu-1000.log" 2>&1
    echo "rc=$?" >> "$OUT/gpu-1000.log" ;;
  *) echo "usage: gpu_session.sh tests|256|1000" >&2; exit 2 ;;
esac
