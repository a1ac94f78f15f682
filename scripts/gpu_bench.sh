#!/usr/bin/env bash
# One prepared GPU session on an H100/H200 (GPU image: python3 with torch, triton, transformers; run
# from the repo root from source, no network, nothing installed). Each step appends JSON lines to
# $OUT/results.jsonl as each row finishes (scripts/gpu_bench.py says what each step measures); a
# step cut by its timeout leaves a {"step": ..., "exit": 124} line. The timeouts add up to 475 s, so
# a rerun fits a 10-minute command and the whole session fits 15 minutes of device time.
#   scripts/gpu_bench.sh            # on the GPU
#   scripts/gpu_bench.sh --dry-run  # every step at tiny sizes on CPU (tests/test_gpu_bench.py)
set -uo pipefail
out="${OUT:-gpu_results}"
dry="${1:-}"
mkdir -p "$out"
export PYTHONPATH=.
[ -z "$dry" ] && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$out/device.txt"

step() {  # step TIMEOUT_S NAME [ARGS...]
    local limit=$1 name=$2
    shift 2
    timeout "$limit" python3 scripts/gpu_bench.py "$name" "$@" $dry --out "$out"
    local rc=$?
    [ $rc -eq 0 ] || echo "{\"step\": \"$name $*\", \"exit\": $rc}" >> "$out/results.jsonl"
}

step 15 device
step 90 tests
step 100 kernel --head-dim 64
step 80 kernel --head-dim 128
step 60 kernel --head-dim 256
step 130 prefill
