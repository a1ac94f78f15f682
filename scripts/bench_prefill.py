"""Prefill latency and peak activation memory of an embedded model under each attention method.

Each (method, length) runs in a fresh subprocess so one configuration's allocations cannot pollute
the next one's memory peak. Peak activation memory = peak RSS during the timed prefill minus the RSS
after loading the model (CPU) or the CUDA allocator peak above the loaded model (GPU).

    python scripts/bench_prefill.py --lengths 1024,4096,8192 --out docs/results/prefill_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

DEFAULT_METHODS = {
    "sdpa": {},
    "floor": {},
    "dense": {},
    "streaming": {"sink_tokens": 128, "local_tokens": 1024},
    "block_topk": {"budget": 2048},
}


def child(args) -> None:
    from sparse_llm.bench.prefill import bench_prefill
    from sparse_llm.eval.haystack import load_haystack_text
    from sparse_llm.models import load

    model, tokenizer = load(args.model, device=args.device)
    text = load_haystack_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.length].to(args.device)
    if ids.shape[1] < args.length:
        raise SystemExit(f"haystack text has only {ids.shape[1]} tokens, fewer than {args.length}")
    result = bench_prefill(model, ids, args.method, json.loads(args.params), repeats=args.repeats)
    print("RESULT " + json.dumps(result.to_dict()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--lengths", default="1024,4096,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="JSON file for all results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch
    import transformers

    results = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for method in args.methods.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--model",
                args.model,
                "--device",
                args.device,
                "--method",
                method,
                "--length",
                str(length),
                "--repeats",
                str(args.repeats),
                "--params",
                json.dumps(DEFAULT_METHODS.get(method, {})),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{method} at {length} failed")
            result = json.loads(line[len("RESULT ") :])
            results.append(result)
            print(
                f"{length:6d} {method:11s} median {result['median_s']:7.2f} s  "
                f"peak {result['peak_mem_mb']:8.1f} MiB  density {result['density']}",
                flush=True,
            )
    report = {
        "model": args.model,
        "device": args.device,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "results": results,
    }
    print(markdown(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


def markdown(results: list[dict]) -> str:
    """Table with speedups over sdpa and the Amdahl bound sdpa / floor per length."""
    by = {(r["length"], r["method"]): r for r in results}
    lines = [
        "| length | method | density | prefill s (median) | speedup vs sdpa | peak act. MiB | mem vs sdpa |",
        "|---|---|---|---|---|---|---|",
    ]
    for (length, method), r in by.items():
        sdpa = by.get((length, "sdpa"))
        speed = f"{sdpa['median_s'] / r['median_s']:.2f}x" if sdpa else "-"
        mem = f"{r['peak_mem_mb'] / sdpa['peak_mem_mb']:.2f}" if sdpa and sdpa["peak_mem_mb"] > 0 else "-"
        density = "-" if r["density"] is None else f"{r['density']:.3f}"
        label = "floor (attention = 0)" if method == "floor" else method
        lines.append(
            f"| {length} | {label} | {density} | {r['median_s']:.2f} | {speed} "
            f"| {r['peak_mem_mb']:.0f} | {mem} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
