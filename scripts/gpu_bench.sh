#!/usr/bin/env bash
# One prepared GPU session (about 5-8 minutes on an H100/H200; run from the repo root, no network needed):
#   1. the CUDA tests (Triton kernel vs reference, the 2x tolerance rule);
#   2. the kernel alone, bf16, Llama-3.2-1B attention shape (32 q heads, 8 KV heads, head dim 64),
#      32K/64K/128K, densities 0.1..0.9, window and random patterns, vs our dense and SDPA flash;
#   3. end-to-end prefill of llama-3.2-1b-shape (random weights), bf16, 32K/64K/128K, every method.
# Results land in ${OUT:-gpu_results}/ as JSON + PNG; copy them to docs/results/ with the device name.
set -uo pipefail
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
    | tee -a "$out/device.txt"

timeout 150 python -m pytest -m cuda -q -x -p no:cacheprovider 2>&1 | tail -15 | tee "$out/cuda_tests.txt"

timeout 200 python -m sparse_llm.cli bench kernel --device cuda --dtype bfloat16 --lengths 32k,64k,128k \
    --densities 0.1,0.25,0.5,0.75,0.9 --heads 32,8 --head-dim 64 --block-size 128 --repeats 5 --quiet \
    --out "$out/kernel_gpu.json" 2>&1 | tail -40

timeout 240 python -m sparse_llm.cli bench --model llama-3.2-1b-shape --device cuda --dtype bfloat16 \
    --lengths 32k,64k,128k --repeats 3 --quiet --methods sdpa,floor,dense,streaming,block_topk,dma,routing,dhsa,xattention,flexprefill \
    --method-params '{"streaming":{"block_size":128},"block_topk":{"block_size":128},"dma":{"block_size":128},"routing":{"block_size":128},"dhsa":{"block_size":128},"xattention":{"block_size":128},"flexprefill":{"block_size":128}}' \
    --out "$out/prefill_gpu_llama-3.2-1b-shape.json" 2>&1 | tail -40
