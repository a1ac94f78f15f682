"""CPU timing of block-sparse attention: our gather path vs compiled FlexAttention vs causal SDPA.

Gemma3-270M attention shape (Hq=4, Hkv=1, D=256), fp32, B=1, Tq=Tk. Masks: full causal (density 1.0)
and sink + local window tuned to density ~0.25. Warm-up (and flex's compile) untimed; the methods run
interleaved, N times each, and the median is reported, with an inline correctness check against SDPA
(dense) or the gather path (sparse). Each setting runs with the default thread count and with one
thread. Usage: python scripts/bench_kernel_cpu.py [--lengths 4096 8192] [--threads 2 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from sparse_llm.bench.kernel import window_mask
from sparse_llm.kernels import BlockMask, block_sparse_attention
from sparse_llm.kernels.flex import to_flex_block_mask


def bench(q, k, v, mask: BlockMask, flex, runs: int) -> None:
    """Time the three methods interleaved; print median/min, speedup vs SDPA and max|diff|."""
    fmask = to_flex_block_mask(mask, num_q_heads=q.shape[1])
    fns = {
        "gather": lambda: block_sparse_attention(q, k, v, mask, impl="cpu"),
        "flex": lambda: flex(q, k, v, block_mask=fmask, enable_gqa=True),
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    }
    outs = {name: fn() for name, fn in fns.items()}  # warm-up (and flex's compile), untimed
    truth = outs["sdpa_causal"] if mask.density() == 1.0 else outs["gather"]
    errs = {name: (o - truth).abs().max().item() for name, o in outs.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    sdpa = statistics.median(times["sdpa_causal"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"threads={torch.get_num_threads()} T={q.shape[2]} density={mask.density():.3f} {name:12s} "
            f"median {med * 1e3:8.1f} ms "
            f"(min {min(ts) * 1e3:8.1f}) speedup vs sdpa {sdpa / med:5.2f}x "
            f"ideal {1 / mask.density():4.2f}x max|diff| {errs[name]:.1e}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads(), 1])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, default {torch.get_num_threads()} threads", flush=True)
    flex = torch.compile(flex_attention)
    torch.manual_seed(0)
    for t in args.lengths:
        q, k, v = torch.randn(1, 4, t, 256), torch.randn(1, 1, t, 256), torch.randn(1, 1, t, 256)
        start = time.perf_counter()
        masks = [BlockMask.causal(q_len=t, kv_len=t, block_q=args.block, block_k=args.block)]
        masks.append(window_mask(t, args.block, 0.25, device="cpu"))  # sink block + local window
        print(f"T={t}: mask building {(time.perf_counter() - start) * 1e3:.1f} ms (both masks)", flush=True)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for mask in masks:
                bench(q, k, v, mask, flex, args.runs)


if __name__ == "__main__":
    main()
