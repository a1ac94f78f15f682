"""Selection (index build) time vs kernel time of each selection method, on one attention layer.

Shape of a Gemma3-270M global layer (Hq=4, Hkv=1, D=256), fp32, random q/k/v, Tq = Tk. For each
method: the median time of ``block_mask`` (selection), of the kernel on that mask, and of the kernel
on the dense causal mask; the selection's share of the attention time it saves is
``selection / (dense kernel - sparse kernel)``.

    python scripts/bench_selection.py --length 8192 --budget 2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparse_llm.backends import LayerCall, get_method
from sparse_llm.backends.base import exact_attention


def median_time(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--methods", default="block_topk,dma,routing,dhsa")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    t, d = args.length, 256
    q, k, v = torch.randn(1, 4, t, d), torch.randn(1, 1, t, d), torch.randn(1, 1, t, d)
    call = LayerCall(0, d**-0.5)
    dense = get_method("dense")
    dense_mask = dense.block_mask(q, k, v, call)
    dense_s = median_time(lambda: exact_attention(q, k, v, dense_mask, call), args.runs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, T={t}, budget={args.budget}")
    print("| method | density | selection ms | kernel ms | dense kernel ms | selection / saved time |")
    print("|---|---|---|---|---|---|")
    for name in args.methods.split(","):
        method = get_method(name, budget=args.budget)
        mask = method.block_mask(q, k, v, call)
        select_s = median_time(lambda m=method: m.block_mask(q, k, v, call), args.runs)
        kernel_s = median_time(lambda m=mask: exact_attention(q, k, v, m, call), args.runs)
        saved = dense_s - kernel_s
        share = f"{select_s / saved:.1%}" if saved > 0 else "no saving"
        print(
            f"| {name} | {mask.density():.3f} | {select_s * 1e3:.1f} | {kernel_s * 1e3:.1f} "
            f"| {dense_s * 1e3:.1f} | {share} |"
        )


if __name__ == "__main__":
    main()
