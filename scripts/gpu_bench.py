"""One step of ``scripts/gpu_bench.sh``: appends one JSON line per result to ``OUT/results.jsonl``
as soon as it is measured, so a step cut by its timeout keeps what it finished.

Steps: ``device`` (GPU, versions), ``tests`` (the ``cuda``-marked tests, full log to
``OUT/cuda_tests.log``), ``kernel --head-dim D`` (the kernel alone, Llama-3.2-1B attention heads
32/8, block 128, bf16, 32K/64K/128K, densities 0.1..0.9, window and random masks: ours vs our dense
vs SDPA flash vs FlexAttention on the same blocks), ``prefill`` (Llama-3.2-1B-shape prefill at
32K/64K, random weights, bf16, every method at block 128, most telling methods first; latency and
peak memory). ``--dry-run`` runs each step at tiny sizes on CPU (a 2-layer model of the same
family) to prove the plumbing; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("gpu_bench")

LENGTHS = (32768, 65536, 131072)
DENSITIES = (0.1, 0.3, 0.5, 0.7, 0.9)
PREFILL_LENGTHS = (32768, 65536)
FIRST_METHODS = ("sdpa", "dense", "streaming", "block_topk", "xattention", "flexprefill", "neighborhood")
TINY_LLAMA = dict(
    num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2
)


class Rows:
    """Appends JSON lines to ``OUT/results.jsonl`` (opened per line: nothing lost to a kill)."""

    def __init__(self, out: Path, step: str) -> None:
        self.path, self.step = out / "results.jsonl", step

    def __call__(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": self.step, **row}, default=str) + "\n")


def step_device(args, rows: Rows) -> None:
    import torch
    import triton

    from sparse_llm.results import run_metadata

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows({**run_metadata(device), "triton": triton.__version__, "dry_run": args.dry_run})


def step_tests(args, rows: Rows) -> None:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-rfE"]
    if importlib.util.find_spec("xdist") and not args.dry_run:
        cmd += ["-n", "8"]
    cmd += ["tests/test_triton_cuda.py"] if args.dry_run else ["tests"]
    start = time.perf_counter()
    with (args.out / "cuda_tests.log").open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    last = (args.out / "cuda_tests.log").read_text().strip().splitlines()[-1:]
    rows(
        {
            "returncode": proc.returncode,
            "summary": last[0] if last else "",
            "seconds": time.perf_counter() - start,
        }
    )


def step_kernel(args, rows: Rows) -> None:
    from sparse_llm.bench.kernel import KernelBenchConfig, run_kernel_bench

    common = dict(patterns=("window", "random"), head_dim=args.head_dim, flex=True, partial_cost=False)
    if args.dry_run:
        sizes = dict(lengths=(256,), densities=(0.3, 0.7), q_heads=4, kv_heads=2, block_size=32, repeats=1)
        config = KernelBenchConfig(**sizes, **common)
    else:
        sizes = dict(lengths=LENGTHS, densities=DENSITIES, q_heads=32, kv_heads=8, block_size=128, repeats=3)
        config = KernelBenchConfig(**sizes, **common, dtype="bfloat16", device="cuda")
    run_kernel_bench(config, on_row=rows)


def step_prefill(args, rows: Rows) -> None:
    from sparse_llm import list_methods
    from sparse_llm.bench.runner import BenchConfig, run_bench

    methods = list(dict.fromkeys([*FIRST_METHODS, "floor", *list_methods()]))
    if args.dry_run:
        from sparse_llm.model_shapes import build_shape_model

        folder = tempfile.mkdtemp(prefix="gpu_bench_tiny_")
        build_shape_model("llama-3.2-1b-shape", head_dim=32, **TINY_LLAMA).save_pretrained(folder)
        model, lengths, methods, block = folder, (96,), ["sdpa", "streaming"], 16  # baseline + a method
        device, dtype, repeats = "cpu", "float32", 1
    else:
        model, lengths, block = "llama-3.2-1b-shape", PREFILL_LENGTHS, 128
        device, dtype, repeats = "cuda", "bfloat16", 2
    for method in methods:  # the most telling methods first: the step's timeout cuts the rest
        for length in lengths:
            params = {} if method in ("sdpa", "floor") else {method: {"block_size": block}}
            config = BenchConfig(
                model=model,
                methods=(method,),
                lengths=(length,),
                repeats=repeats,
                device=device,
                dtype=dtype,
                method_params=params,
            )
            try:
                report = run_bench(config, progress=False)
            except RuntimeError as err:  # one failing method must not hide the others' rows
                rows({"method": method, "length": length, "error": str(err)[-2000:]})
                continue
            rows({"model": "tiny-llama" if args.dry_run else model, **report["results"][0]})


STEPS = {"device": step_device, "tests": step_tests, "kernel": step_kernel, "prefill": step_prefill}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    logger.info("step %s%s", args.step, " (dry run)" if args.dry_run else "")
    STEPS[args.step](args, Rows(args.out, args.step if args.step != "kernel" else f"kernel_d{args.head_dim}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
